"""Reading Torch7 binary files (``torch.save`` in binary mode) and walking the objects in them.

:func:`read_t7` returns what the file holds as ``torchfile`` gives it: Lua tables as dicts (or lists
for keys 1..n, 0-indexed), torch objects as ``torchfile.TorchObject``, tensors as numpy views into
their storages, each view bound-checked. The helpers below read a module's fields and children with
errors that name the module's path (Lua's 1-based indices, e.g. ``model.trunk.modules[5]``) and what
was expected there; :mod:`segdist.models.t7` uses them to rebuild DeepMask/SharpMask.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from segdist.errors import SegdistError
from segdist.storage import is_local, read_bytes, url_to_fs


class T7FormatError(SegdistError):
    """A .t7 file cannot be read, or its module tree is not a DeepMask/SharpMask we know."""


# ---------------------------------------------------------------------------------------------
# reading the file


def _register_readers() -> None:
    """Tensor/storage readers for torchfile that bound-check every view.

    torchfile's own readers build ``as_strided`` views without checking that the storage holds the
    view (a truncated file would read foreign memory) and have none for CudaLong/Half types.
    Registering is idempotent; it replaces torchfile's readers for these types process-wide.
    """
    import torchfile

    dtypes = {
        "Float": np.float32, "Double": np.float64, "Long": np.int64, "Int": np.int32,
        "Short": np.int16, "Char": np.int8, "Byte": np.uint8, "Half": np.float16,
    }
    for prefix in ("torch.", "torch.Cuda"):
        for kind, dtype in dtypes.items():
            cuda_float = prefix == "torch.Cuda" and kind == "Float"
            tname = (prefix + ("" if cuda_float else kind) + "Tensor").encode()
            sname = (prefix + ("" if cuda_float else kind) + "Storage").encode()
            torchfile.type_handlers[tname] = _tensor_reader(dtype)
            torchfile.type_handlers[sname] = _storage_reader(dtype)


def _storage_reader(dtype):
    def read(reader, version):
        size = reader.read_long()
        if size < 0:
            raise T7FormatError(f"negative storage size {size}")
        data = reader.f.read(size * np.dtype(dtype).itemsize)
        if len(data) != size * np.dtype(dtype).itemsize:
            raise T7FormatError("the file ends inside a storage (truncated?)")
        return np.frombuffer(data, dtype=dtype)
    return read


def _tensor_reader(dtype):
    def read(reader, version):
        ndim = reader.read_int()
        if not 0 <= ndim <= 16:
            raise T7FormatError(f"tensor with {ndim} dimensions")
        size = reader.read_long_array(ndim)
        stride = reader.read_long_array(ndim)
        offset = reader.read_long() - 1  # Lua offsets are 1-based
        storage = reader.read_obj()
        if storage is None or ndim == 0:
            return np.empty(0, dtype=dtype)
        if not isinstance(storage, np.ndarray):
            raise T7FormatError("tensor whose storage is not a storage")
        if any(s <= 0 for s in size):
            return np.empty(size if all(s >= 0 for s in size) else 0, dtype=storage.dtype)
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if offset < 0 or min(stride) < 0 or last >= storage.size:
            raise T7FormatError(f"tensor view (offset {offset}, size {size}, stride {stride}) "
                                f"outside its storage of {storage.size} elements")
        item = storage.dtype.itemsize
        return np.lib.stride_tricks.as_strided(storage[offset:], shape=size,
                                               strides=[s * item for s in stride])
    return read


def read_t7(uri: str, storage_options: Mapping[str, Any] | None = None) -> tuple[Any, str]:
    """The object stored in a Torch7 binary file at ``uri`` (any fsspec URI), and its sha256.

    Lua tables become dicts (or lists for keys 1..n, 0-indexed), torch objects
    ``torchfile.TorchObject``, tensors numpy views into their storages. Raises T7FormatError if the
    file is not a readable Torch7 binary file.
    """
    import struct

    import torchfile

    _register_readers()
    local = is_local(uri)
    if local:
        fs, path = url_to_fs(uri, storage_options)
        if not os.path.exists(path):
            raise T7FormatError(f"{uri} does not exist")
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        digest = h.hexdigest()
    else:
        data = read_bytes(uri, storage_options)
        digest = hashlib.sha256(data).hexdigest()
        tmp = tempfile.NamedTemporaryFile(suffix=".t7", delete=False)
        with tmp:
            tmp.write(data)
        path = tmp.name
    try:
        with open(path, "rb") as f:
            try:
                obj = torchfile.T7Reader(f).read_obj()
            except T7FormatError as exc:
                raise T7FormatError(f"cannot read {uri} as a Torch7 file: {exc}") from exc
            except (torchfile.T7ReaderException, struct.error, NotImplementedError, ValueError,
                    OverflowError, MemoryError, UnicodeDecodeError) as exc:
                raise T7FormatError(f"cannot read {uri} as a Torch7 binary file "
                                    f"({type(exc).__name__}: {exc}); is it a model.t7 "
                                    "saved by torch.save in binary mode?") from exc
    finally:
        if not local:
            os.unlink(path)
    return obj, digest


# ---------------------------------------------------------------------------------------------
# walking the module tree


def is_object(obj: Any) -> bool:
    """Whether ``obj`` is a torch object (an nn module, tensor type, ...) as torchfile reads it."""
    import torchfile

    return isinstance(obj, torchfile.TorchObject)


def typename(obj: Any) -> str:
    """The torch class of a torchfile object, or a description of a plain Lua value."""
    if is_object(obj):
        t = obj.torch_typename()
        return t.decode() if isinstance(t, bytes) else str(t)
    if obj is None:
        return "nil"
    if isinstance(obj, np.ndarray):
        return "a tensor"
    if isinstance(obj, (dict, list)):
        return "a table"
    return f"a {type(obj).__name__} ({obj!r:.40})"


def lua_get(obj: Any, key: str) -> Any:
    """Field ``key`` of a torch object or Lua table (keys are byte strings in torchfile)."""
    # torchfile's table dicts answer any attribute lookup, so ask the TorchObject explicitly.
    inner = obj._obj if is_object(obj) else obj
    if isinstance(inner, dict):
        if key in inner:
            return inner[key]
        return inner.get(key.encode())
    return None


def expect(obj: Any, path: str, names: tuple[str, ...]) -> Any:
    """``obj`` if its class is one of ``names``; else T7FormatError naming ``path``."""
    found = typename(obj)
    if found not in names:
        raise T7FormatError(f"{path}: expected {' or '.join(names)}, found {found}")
    return obj


def need_field(obj: Any, path: str, key: str) -> Any:
    """Field ``key`` of ``obj``; T7FormatError naming ``path`` when it is absent (nil)."""
    v = lua_get(obj, key)
    if v is None:
        raise T7FormatError(f"{path}: {typename(obj)} has no field '{key}'")
    return v


def number_field(obj: Any, path: str, key: str, default: float | None = None) -> float:
    """Numeric field ``key`` (``default`` when absent and a default is given)."""
    v = lua_get(obj, key)
    if v is None and default is not None:
        return default
    if not isinstance(v, (int, float)):
        raise T7FormatError(f"{path}: field '{key}' should be a number, found {typename(v)}")
    return v


def tensor_field(obj: Any, path: str, key: str) -> np.ndarray:
    """Tensor field ``key`` as a float32 numpy copy (non-empty, else T7FormatError)."""
    v = need_field(obj, path, key)
    if not isinstance(v, np.ndarray) or v.size == 0:
        raise T7FormatError(f"{path}: field '{key}' should be a non-empty tensor, found {typename(v)}")
    return np.array(v, dtype=np.float32)  # a copy: the file's arrays are views into storages


def submodules(obj: Any, path: str, count: int | tuple[int, ...]) -> list[tuple[Any, str]]:
    """The children of a container as ``(module, path)`` pairs; their number must be in ``count``."""
    mods = need_field(obj, path, "modules")
    if isinstance(mods, dict):  # a Lua table whose keys are not 1..n
        keys = sorted(k for k in mods if isinstance(k, int))
        mods = [mods[k] for k in keys] if keys == list(range(1, len(keys) + 1)) else None
    if not isinstance(mods, list):
        raise T7FormatError(f"{path}.modules: expected a list of modules, found {typename(mods)}")
    counts = (count,) if isinstance(count, int) else count
    if len(mods) not in counts:
        raise T7FormatError(f"{path}: expected {' or '.join(map(str, counts))} modules in "
                            f"{typename(obj)}, found {len(mods)}")
    return [(m, f"{path}.modules[{i + 1}]") for i, m in enumerate(mods)]

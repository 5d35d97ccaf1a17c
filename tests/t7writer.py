"""A minimal Torch7 binary serialiser, enough to write files shaped like the released model.t7.

It follows torch7's ``File:writeObject`` (binary mode, 64-bit Linux: int = 4 bytes, long = 8 bytes,
little endian): a type tag per value; tables, torch objects and functions carry a reference index
(an object met again is written as its index only); torch objects are written as ``"V 1"``, the
class name, then their payload (a field table for nn modules; size/stride/offset/storage for
tensors; length and raw data for storages); functions as bytecode plus an upvalue table.

Python values map as: None -> nil, bool -> boolean, int/float -> number, str/bytes -> string,
dict -> table, list -> table with keys 1..n, :class:`LuaObject` -> torch object with a field table,
:class:`Tensor` / :class:`Storage` -> torch tensors/storages, :class:`LuaFunction` -> function.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np

TYPE_NIL, TYPE_NUMBER, TYPE_STRING, TYPE_TABLE, TYPE_TORCH, TYPE_BOOLEAN = 0, 1, 2, 3, 4, 5
TYPE_RECUR_FUNCTION = 8

_STORAGE_DTYPES = {
    "torch.FloatStorage": np.float32, "torch.DoubleStorage": np.float64,
    "torch.LongStorage": np.int64, "torch.CudaStorage": np.float32,
    "torch.CudaLongStorage": np.int64, "torch.ByteStorage": np.uint8,
}


@dataclass(eq=False)
class Storage:
    """A flat torch storage; ``data`` may be filled after tensors pointing into it are created."""

    typename: str = "torch.CudaStorage"
    data: np.ndarray | None = None


@dataclass(eq=False)
class Tensor:
    """A view into ``storage``: ``size``/``stride`` in elements, 0-based ``offset``."""

    storage: Storage | None
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    typename: str = "torch.CudaTensor"

    def array(self) -> np.ndarray:
        """The values the view selects (for reference computations)."""
        if self.storage is None or not self.size:
            return np.zeros(0, np.float32)
        item = self.storage.data.itemsize
        return np.lib.stride_tricks.as_strided(
            self.storage.data[self.offset:], shape=self.size,
            strides=[s * item for s in self.stride]).copy()


@dataclass(eq=False)
class LuaObject:
    """An instance of a torch class (e.g. ``nn.Linear``) whose payload is its field table."""

    typename: str
    fields: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, k: str) -> Any:
        return self.fields[k]


@dataclass(eq=False)
class LuaFunction:
    """A serialised Lua function (bytecode is opaque to readers that skip it)."""

    dumped: bytes = b"\x1bLJ\x02\x0a\x00stub"
    upvalues: list = field(default_factory=list)


def empty_tensor(typename: str = "torch.CudaTensor") -> Tensor:
    return Tensor(None, 0, (), (), typename)


def contiguous_strides(size: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for s in reversed(size):
        strides.append(acc)
        acc *= s
    return tuple(reversed(strides))


class ParamPool:
    """One flat storage holding many tensors, as ``getParameters()`` leaves them.

    ``view(array)`` reserves room for ``array`` and returns a contiguous Tensor into the shared
    storage; ``finish()`` materialises the storage's data.
    """

    def __init__(self, typename: str = "torch.CudaStorage"):
        self.storage = Storage(typename)
        self._chunks: list[np.ndarray] = []
        self._used = 0

    def view(self, array: np.ndarray, tensor_type: str = "torch.CudaTensor") -> Tensor:
        array = np.asarray(array, np.float32)
        t = Tensor(self.storage, self._used, tuple(array.shape), contiguous_strides(array.shape),
                   tensor_type)
        self._chunks.append(array.reshape(-1))
        self._used += array.size
        return t

    def finish(self) -> Storage:
        self.storage.data = (np.concatenate(self._chunks) if self._chunks
                             else np.zeros(0, np.float32))
        return self.storage


class _Writer:
    def __init__(self, f: BinaryIO):
        self.f = f
        self.index: dict[int, int] = {}
        self.keep: list[Any] = []  # ids stay unique while the objects live

    def int(self, v: int) -> None:
        self.f.write(struct.pack("<i", v))

    def long(self, v: int) -> None:
        self.f.write(struct.pack("<q", v))

    def string(self, s: str | bytes) -> None:
        b = s.encode() if isinstance(s, str) else s
        self.int(len(b))
        self.f.write(b)

    def _ref(self, obj: Any) -> bool:
        """Write the reference index; True when the object was written before (index only)."""
        key = id(obj)
        if key in self.index:
            self.int(self.index[key])
            return True
        self.index[key] = len(self.index) + 1
        self.keep.append(obj)
        self.int(self.index[key])
        return False

    def obj(self, v: Any) -> None:
        if v is None:
            self.int(TYPE_NIL)
        elif isinstance(v, bool):
            self.int(TYPE_BOOLEAN)
            self.int(1 if v else 0)
        elif isinstance(v, (int, float, np.integer, np.floating)):
            self.int(TYPE_NUMBER)
            self.f.write(struct.pack("<d", float(v)))
        elif isinstance(v, (str, bytes)):
            self.int(TYPE_STRING)
            self.string(v)
        elif isinstance(v, (dict, list)):
            self.int(TYPE_TABLE)
            if self._ref(v):
                return
            items = list(v.items()) if isinstance(v, dict) else [(i + 1, x) for i, x in enumerate(v)]
            self.int(len(items))
            for k, x in items:
                self.obj(k)
                self.obj(x)
        elif isinstance(v, LuaFunction):
            self.int(TYPE_RECUR_FUNCTION)
            if self._ref(v):
                return
            self.int(len(v.dumped))
            self.f.write(v.dumped)
            self.obj(v.upvalues)
        elif isinstance(v, (LuaObject, Tensor, Storage)):
            self.int(TYPE_TORCH)
            if self._ref(v):
                return
            self.string("V 1")
            self.string(v.typename)
            if isinstance(v, LuaObject):
                self.obj(v.fields)
            elif isinstance(v, Tensor):
                self.int(len(v.size))
                for s in v.size:
                    self.long(s)
                for s in v.stride:
                    self.long(s)
                self.long(v.offset + 1)  # Lua's 1-based storage offset
                self.obj(v.storage)
            else:
                data = np.ascontiguousarray(v.data, dtype=_STORAGE_DTYPES[v.typename])
                self.long(data.size)
                self.f.write(data.tobytes())
        else:
            raise TypeError(f"cannot serialise {type(v).__name__}")


def write_t7(obj: Any, f: BinaryIO) -> None:
    """Serialise ``obj`` (see the module docstring for the mapping) to the binary file ``f``."""
    _Writer(f).obj(obj)


def save_t7(obj: Any, path: str) -> None:
    with open(path, "wb") as f:
        write_t7(obj, f)

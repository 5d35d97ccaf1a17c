"""Reading the original DeepMask / SharpMask ``model.t7`` files into segdist models.

A released file is a Lua table ``{model = nn.DeepMask | nn.SharpMask, config = {...}}`` written by
Torch7 (read here with the ``torchfile`` package). The module tree is walked exactly as saved:

- trunk (``nn.Sequential``, Lua indices): [1] ``Sequential{SpatialSymmetricPadding(3), conv 7x7/2}``,
  [2] ``SpatialConstDiagonal`` (a folded BatchNorm: ``a``, ``b`` of shape 1xCx1x1 or C), [3] ReLU,
  [4] max pool 3x3/2 pad 1, [5..7] layer1..3 of residual blocks in the released (fb.resnet.torch)
  layout, [8] ``SpatialZeroPadding(-1)`` crop, [9] 1x1 conv, [10] ReLU, [11] ``View``,
  [12] ``Linear(feat_ch*f*f, fc_dim)``;
- residual block: ``Sequential{ConcatTable{branch, shortcut}, CAddTable, SpatialConstDiagonal,
  ReLU}`` with branch ``Sequential{1x1, SCD, ReLU, Sequential{SymPad(1), 3x3 (stride)}, SCD, ReLU,
  1x1}`` (bottleneck) or ``Sequential{Seq{SymPad(1), 3x3 (stride)}, SCD, ReLU, Seq{SymPad(1), 3x3}}``
  (basic), shortcut a bare 1x1 conv (or ``Sequential{conv}``) or ``Identity``;
- DeepMask heads: ``maskBranch = Sequential{Sequential{Linear(fc_dim, o*o)}, upsampling}``,
  ``scoreBranch = Sequential{Dropout, Linear, Threshold(0, 1e-6), Dropout, Linear}``;
- SharpMask: the refinement as ``refs[0]`` (``Sequential{Linear, View}``) and ``refs[1..4]``
  (``Sequential{ParallelTable{neth, netv}, CAddTable, ReLU, SpatialUpSamplingNearest(2)}``, the last
  one followed by SymPad, conv 3x3 -> 1, View), the DeepMask parts as ``trunk``,
  ``maskBranchDM``, ``scoreBranch``.

Weights are views (offset, size, stride) into shared flat storages; gradient buffers and Lua
function fields are present and ignored. The head and trunk forms that ``inference()`` produces
(Linear as conv, ``Identity`` instead of crop/View) are accepted too. Anything else is refused with a
:class:`T7FormatError` naming the module path, e.g. ``model.trunk.modules[5].modules[2]: expected
nn.Sequential, found nn.Foo`` (indices are Lua's, 1-based, as in the original code).
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from segdist.errors import SegdistError
from segdist.storage import is_local, read_bytes, url_to_fs

CONV = ("cudnn.SpatialConvolution", "nn.SpatialConvolution", "nn.SpatialConvolutionMM")
LINEAR = ("nn.Linear",)
AFFINE = ("nn.SpatialConstDiagonal", "inn.ConstAffine")
RELU = ("nn.ReLU", "cudnn.ReLU")
SEQ = ("nn.Sequential",)
SYMPAD = ("nn.SpatialSymmetricPadding",)


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


def _is_object(obj: Any) -> bool:
    import torchfile

    return isinstance(obj, torchfile.TorchObject)


def typename(obj: Any) -> str:
    """The torch class of a torchfile object, or a description of a plain Lua value."""
    if _is_object(obj):
        t = obj.torch_typename()
        return t.decode() if isinstance(t, bytes) else str(t)
    if obj is None:
        return "nil"
    if isinstance(obj, np.ndarray):
        return "a tensor"
    if isinstance(obj, (dict, list)):
        return "a table"
    return f"a {type(obj).__name__} ({obj!r:.40})"


def _get(obj: Any, key: str) -> Any:
    """Field ``key`` of a torch object or Lua table (keys are byte strings in torchfile)."""
    # torchfile's table dicts answer any attribute lookup, so ask the TorchObject explicitly.
    inner = obj._obj if _is_object(obj) else obj
    if isinstance(inner, dict):
        if key in inner:
            return inner[key]
        return inner.get(key.encode())
    return None


def _expect(obj: Any, path: str, names: tuple[str, ...]) -> Any:
    found = typename(obj)
    if found not in names:
        raise T7FormatError(f"{path}: expected {' or '.join(names)}, found {found}")
    return obj


def _field(obj: Any, path: str, key: str) -> Any:
    v = _get(obj, key)
    if v is None:
        raise T7FormatError(f"{path}: {typename(obj)} has no field '{key}'")
    return v


def _number(obj: Any, path: str, key: str, default: float | None = None) -> float:
    v = _get(obj, key)
    if v is None and default is not None:
        return default
    if not isinstance(v, (int, float)):
        raise T7FormatError(f"{path}: field '{key}' should be a number, found {typename(v)}")
    return v


def _array(obj: Any, path: str, key: str) -> np.ndarray:
    v = _field(obj, path, key)
    if not isinstance(v, np.ndarray) or v.size == 0:
        raise T7FormatError(f"{path}: field '{key}' should be a non-empty tensor, found {typename(v)}")
    return np.array(v, dtype=np.float32)  # a copy: the file's arrays are views into storages


def _modules(obj: Any, path: str, count: int | tuple[int, ...]) -> list[tuple[Any, str]]:
    mods = _field(obj, path, "modules")
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


class _Params:
    """Arrays collected under the segdist model's state-dict names."""

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}
        self.origin: dict[str, str] = {}

    def put(self, name: str, array: np.ndarray, path: str) -> None:
        self.arrays[name] = array
        self.origin[name] = path


def _conv(obj: Any, path: str, params: _Params, name: str, k: int, stride: int) -> int:
    """A convolution with zero built-in padding; returns its output channels."""
    _expect(obj, path, CONV)
    n_out, n_in = int(_number(obj, path, "nOutputPlane")), int(_number(obj, path, "nInputPlane"))
    kw, kh = int(_number(obj, path, "kW")), int(_number(obj, path, "kH"))
    dw, dh = int(_number(obj, path, "dW", 1)), int(_number(obj, path, "dH", 1))
    pw, ph = int(_number(obj, path, "padW", 0)), int(_number(obj, path, "padH", 0))
    if (kh, kw) != (k, k):
        raise T7FormatError(f"{path}: expected a {k}x{k} convolution, found {kh}x{kw}")
    if (dh, dw) != (stride, stride):
        raise T7FormatError(f"{path}: expected stride {stride}, found {dh}x{dw}")
    if (ph, pw) != (0, 0):
        raise T7FormatError(f"{path}: expected no built-in padding (the original pads with a "
                            f"preceding SpatialSymmetricPadding), found {ph}x{pw}")
    w = _array(obj, path, "weight")
    if w.size != n_out * n_in * k * k:
        raise T7FormatError(f"{path}: weight has {w.size} values, expected "
                            f"{n_out}x{n_in}x{k}x{k}")
    params.put(name + ".weight", w.reshape(n_out, n_in, k, k), path)
    bias = _get(obj, "bias")
    # A conv saved with noBias() has no bias; the released layout's convs have one: use zeros.
    b = _array(obj, path, "bias") if isinstance(bias, np.ndarray) and bias.size else np.zeros(n_out, np.float32)
    if b.size != n_out:
        raise T7FormatError(f"{path}: bias has {b.size} values, expected {n_out}")
    params.put(name + ".bias", b.reshape(n_out), path)
    return n_out


def _sympad(obj: Any, path: str, pad: int) -> None:
    _expect(obj, path, SYMPAD)
    got = [int(_number(obj, path, f"pad_{s}")) for s in "lrtb"]
    if got != [pad] * 4:
        raise T7FormatError(f"{path}: expected symmetric padding {pad} on every side, found "
                            f"(l, r, t, b) = {tuple(got)}")


def _padded_conv(obj: Any, path: str, params: _Params, name: str, k: int, stride: int) -> int:
    """``Sequential{SpatialSymmetricPadding(k//2), conv kxk}`` as updatePadding makes it."""
    _expect(obj, path, SEQ)
    (pad, pp), (conv, cp) = _modules(obj, path, 2)
    _sympad(pad, pp, k // 2)
    return _conv(conv, cp, params, name, k, stride)


def _affine(obj: Any, path: str, params: _Params, name: str, channels: int) -> None:
    _expect(obj, path, AFFINE)
    for key in ("a", "b"):
        v = _array(obj, path, key)
        if v.size != channels or any(s != 1 for s in v.shape if s != channels):
            raise T7FormatError(f"{path}: '{key}' has shape {list(v.shape)}, expected [{channels}] "
                                f"or [1, {channels}, 1, 1]")
        params.put(f"{name}.{key}", v.reshape(channels), path)


def _linear(obj: Any, path: str, params: _Params, name: str) -> tuple[int, int]:
    """nn.Linear, or the 1x1 / fxf convolution ``inference()`` turns it into -> (out, in)."""
    _expect(obj, path, LINEAR + CONV)
    w = _array(obj, path, "weight")
    n_out = w.shape[0]
    w = w.reshape(n_out, -1)  # a conv kernel [out, in, f, f] flattens to the Linear's row-major rows
    b = _array(obj, path, "bias").reshape(-1)
    if b.size != n_out:
        raise T7FormatError(f"{path}: bias has {b.size} values for {n_out} outputs")
    params.put(name + ".weight", w, path)
    params.put(name + ".bias", b, path)
    return n_out, w.shape[1]


def _block(obj: Any, path: str, params: _Params, name: str, stride: int) -> tuple[str, int]:
    """One released-layout residual block -> (kind, output channels)."""
    _expect(obj, path, SEQ)
    (cat, catp), (add, addp), (aff, affp), (relu, relup) = _modules(obj, path, 4)
    _expect(cat, catp, ("nn.ConcatTable",))
    _expect(add, addp, ("nn.CAddTable",))
    _expect(relu, relup, RELU)
    (branch, bp), (short, sp) = _modules(cat, catp, 2)
    _expect(branch, bp, SEQ)
    mods = _modules(branch, bp, (7, 4))
    if len(mods) == 7:
        kind = "bottleneck"
        _conv(*mods[0], params, name + ".conv1", 1, 1)
        planes = params.arrays[name + ".conv1.weight"].shape[0]
        _affine(*mods[1], params, name + ".aff1", planes)
        _expect(*mods[2], RELU)
        _padded_conv(*mods[3], params, name + ".conv2", 3, stride)
        _affine(*mods[4], params, name + ".aff2", planes)
        _expect(*mods[5], RELU)
        out = _conv(*mods[6], params, name + ".conv3", 1, 1)
    else:
        kind = "basic"
        planes = _padded_conv(*mods[0], params, name + ".conv1", 3, stride)
        _affine(*mods[1], params, name + ".aff1", planes)
        _expect(*mods[2], RELU)
        out = _padded_conv(*mods[3], params, name + ".conv2", 3, 1)
    st = typename(short)
    if st == "nn.Sequential":  # a shortcut kept inside a Sequential of one conv
        ((short, sp),) = _modules(short, sp, 1)
        st = typename(short)
    if st in CONV:
        _conv(short, sp, params, name + ".shortcut", 1, stride)
    elif st != "nn.Identity":
        raise T7FormatError(f"{sp}: expected a bare 1x1 cudnn.SpatialConvolution or nn.Identity "
                            f"as shortcut, found {st}")
    _affine(aff, affp, params, name + ".aff_out", out)
    return kind, out


def _trunk(obj: Any, path: str, params: _Params, prefix: str) -> dict[str, int]:
    """The DeepMask trunk -> settings ``arch``, ``feat_ch``, ``fc_dim``, ``f_sz``."""
    from segdist.models.trunk import ARCHS

    _expect(obj, path, SEQ)
    mods = _modules(obj, path, 12)
    r = prefix + "resnet."
    _padded_conv(*mods[0], params, r + "conv1", 7, 2)
    _affine(*mods[1], params, r + "aff1", 64)
    _expect(*mods[2], RELU)
    pool, pp = _expect(*mods[3], ("nn.SpatialMaxPooling", "cudnn.SpatialMaxPooling")), mods[3][1]
    geometry = [int(_number(pool, pp, k, 0)) for k in ("kW", "kH", "dW", "dH", "padW", "padH")]
    if geometry != [3, 3, 2, 2, 1, 1]:
        raise T7FormatError(f"{pp}: expected max pooling 3x3, stride 2, pad 1; found (kW, kH, dW, "
                            f"dH, padW, padH) = {tuple(geometry)}")
    kinds, counts = set(), []
    for li in range(3):
        layer, lp = mods[4 + li]
        _expect(layer, lp, SEQ)
        blocks = _field(layer, lp, "modules")
        blocks = _modules(layer, lp, len(blocks) if isinstance(blocks, list) else 1)
        for j, (blk, bp) in enumerate(blocks):
            kind, _ = _block(blk, bp, params, f"{r}layer{li + 1}.{j}", 2 if li and j == 0 else 1)
            kinds.add(kind)
        counts.append(len(blocks))
    arch = next((a for a, (k, c) in ARCHS.items() if kinds == {k} and tuple(counts) == c), None)
    if arch is None:
        raise T7FormatError(f"{path}: a trunk of {'/'.join(sorted(kinds))} blocks {counts} in "
                            f"layer1..3 is none of {sorted(ARCHS)}")
    crop, cp = mods[7]
    if typename(crop) == "nn.SpatialZeroPadding":
        got = [int(_number(crop, cp, f"pad_{s}")) for s in "lrtb"]
        if got != [-1] * 4:
            raise T7FormatError(f"{cp}: expected a crop of 1 cell per side (pad -1), found {got}")
    else:
        _expect(crop, cp, ("nn.SpatialZeroPadding", "nn.Identity"))
    feat_ch = _conv(*mods[8], params, prefix + "reduce", 1, 1)
    _expect(*mods[9], RELU)
    _expect(*mods[10], ("nn.View", "nn.Reshape", "nn.Identity"))
    fc_dim, fc_in = _linear(*mods[11], params, prefix + "fc")
    f = math.isqrt(fc_in // feat_ch)
    if f * f * feat_ch != fc_in:
        raise T7FormatError(f"{mods[11][1]}: {fc_in} inputs are not {feat_ch} channels x f x f")
    return {"arch": arch, "feat_ch": feat_ch, "fc_dim": fc_dim, "f_sz": f}


def _mask_branch(obj: Any, path: str, params: _Params, name: str) -> int:
    """``Sequential{Sequential{Linear}, upsampling}`` (or the inner Sequential alone) -> o_sz."""
    _expect(obj, path, SEQ)
    mods = _modules(obj, path, (1, 2))
    first, fp = mods[0]
    if typename(first) == "nn.Sequential":
        if len(mods) == 2:
            up, upp = mods[1]
            _expect(up, upp, SEQ)
            for m, mp in _modules(up, upp, range(0, 16)):
                if isinstance(_get(m, "weight"), np.ndarray) and _get(m, "weight").size:
                    raise T7FormatError(f"{mp}: expected the parameter-free upsampling of the mask "
                                        f"logits, found {typename(m)} with weights")
        ((lin, lp),) = _modules(first, fp, 1)
    elif len(mods) == 1:  # inference() form: maskBranch is the inner Sequential
        lin, lp = first, fp
    else:
        raise T7FormatError(f"{fp}: expected nn.Sequential holding the mask Linear, found "
                            f"{typename(first)}")
    n_out, _ = _linear(lin, lp, params, name)
    o = math.isqrt(n_out)
    if o * o != n_out:
        raise T7FormatError(f"{lp}: {n_out} mask outputs are not a square")
    return o


def _score_branch(obj: Any, path: str, params: _Params, name: str) -> int:
    """``Sequential{Dropout, Linear, Threshold(0, 1e-6), Dropout, Linear(., 1)}`` -> hidden size."""
    _expect(obj, path, SEQ)
    mods = _modules(obj, path, 5)
    _expect(*mods[0], ("nn.Dropout",))
    hidden, _ = _linear(*mods[1], params, name + ".1")
    _expect(*mods[2], ("nn.Threshold",) + RELU)
    _expect(*mods[3], ("nn.Dropout",))
    one, _ = _linear(*mods[4], params, name + ".4")
    if one != 1:
        raise T7FormatError(f"{mods[4][1]}: the score head should have 1 output, found {one}")
    return hidden


def _refinement(model: Any, path: str, params: _Params) -> tuple[int, int]:
    """SharpMask ``refs[0..4]`` -> (km, ks) read from the layer shapes."""
    refs = _field(model, path, "refs")
    rp = path + ".refs"
    if not isinstance(refs, dict) or sorted(k for k in refs if isinstance(k, int)) != [0, 1, 2, 3, 4]:
        raise T7FormatError(f"{rp}: expected a table with keys 0..4 (refs[0] = netvs[0]), found "
                            f"{typename(refs)}")
    netv0, n0p = refs[0], f"{rp}[0]"
    _expect(netv0, n0p, SEQ)
    (lin, lp), (view, vp) = _modules(netv0, n0p, 2)
    _linear(lin, lp, params, "netv0")
    _expect(view, vp, ("nn.View", "nn.Reshape"))
    for i in range(1, 5):
        ref, p = refs[i], f"{rp}[{i}]"
        _expect(ref, p, SEQ)
        mods = _modules(ref, p, 7 if i == 4 else 4)
        (par, pp), (add, ap), (relu, rlp), (up, upp) = mods[:4]
        _expect(par, pp, ("nn.ParallelTable",))
        _expect(add, ap, ("nn.CAddTable",))
        _expect(relu, rlp, RELU)
        _expect(up, upp, ("nn.SpatialUpSamplingNearest",))
        if int(_number(up, upp, "scale_factor", 2)) != 2:
            raise T7FormatError(f"{upp}: expected nearest upsampling x2")
        (neth, hp), (netv, vp2) = _modules(par, pp, 2)
        _expect(neth, hp, SEQ)
        hm = _modules(neth, hp, (8, 9))
        if len(hm) == 9:
            crop, cp = hm.pop(0)
            _expect(crop, cp, ("nn.SpatialZeroPadding", "nn.Identity"))
            want = -(2 ** (i - 1))
            if typename(crop) == "nn.SpatialZeroPadding":
                got = [int(_number(crop, cp, f"pad_{s}")) for s in "lrtb"]
                if got != [want] * 4:
                    raise T7FormatError(f"{cp}: expected a crop of {-want} cells per side, "
                                        f"found pads {got}")
        for j, conv_at in enumerate((1, 4, 7)):
            _sympad(*hm[conv_at - 1], 1)
            _conv(*hm[conv_at], params, f"neths.{i - 1}.{2 * j}", 3, 1)
            if j < 2:
                _expect(*hm[conv_at + 1], RELU)
        _expect(netv, vp2, SEQ)
        vm = _modules(netv, vp2, 5)
        for j, conv_at in enumerate((1, 4)):
            _sympad(*vm[conv_at - 1], 1)
            _conv(*vm[conv_at], params, f"netvs.{i - 1}.{2 * j}", 3, 1)
        _expect(*vm[2], RELU)
        if i == 4:
            _sympad(*mods[4], 1)
            _conv(*mods[5], params, "final", 3, 1)
            _expect(*mods[6], ("nn.View", "nn.Reshape"))
    km = params.arrays["netvs.0.0.weight"].shape[1]
    ks = params.arrays["neths.0.2.weight"].shape[0]
    return int(km), int(ks)


# ---------------------------------------------------------------------------------------------
# building the segdist model


@dataclass
class Converted:
    """A model rebuilt from a .t7 file.

    Attributes:
        kind: "deepmask" or "sharpmask".
        model: the segdist ``DeepMask`` (layout "released") or ``SharpMask``, eval mode, CPU.
        settings: architecture settings read from the tree (arch, i_sz, o_sz, ..., km, ks).
        original_config: the file's ``config`` table (train.lua options) as plain JSON values.
    """

    kind: str
    model: nn.Module
    settings: dict[str, Any]
    original_config: dict[str, Any]


def _plain(v: Any, depth: int = 0) -> Any:
    """A Lua config value as JSON-able Python (bytes decoded, tensors and objects dropped)."""
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if isinstance(v, list) and depth < 4:
        return [_plain(x, depth + 1) for x in v]
    if isinstance(v, dict) and depth < 4:
        return {str(_plain(k)): _plain(x, depth + 1) for k, x in v.items()}
    return None


def _load(model: nn.Module, params: _Params, root: str) -> None:
    """Copy the collected arrays into ``model``; every entry must match in name and shape."""
    state = model.state_dict()
    missing = sorted(k for k in state if k not in params.arrays)
    extra = sorted(k for k in params.arrays if k not in state)
    if missing or extra:
        raise T7FormatError(f"{root}: the module tree does not map onto the segdist model "
                            f"(missing {missing[:4]}, unexpected {extra[:4]})")
    for k, v in state.items():
        a = params.arrays[k]
        if tuple(a.shape) != tuple(v.shape):
            raise T7FormatError(f"{params.origin[k]}: shape {list(a.shape)} does not fit the "
                                f"segdist model's {k} of shape {list(v.shape)}")
    model.load_state_dict({k: torch.from_numpy(a) for k, a in params.arrays.items()})


def convert_tree(root: Any) -> Converted:
    """Rebuild the segdist model from the object a model.t7 holds (see the module docstring)."""
    from segdist.models.deepmask import DeepMask, DeepMaskConfig

    if not isinstance(root, dict):
        raise T7FormatError(f"file root: expected a table {{model=..., config=...}}, found "
                            f"{typename(root)}")
    model = _get(root, "model")
    config = _get(root, "config")
    kind = typename(model)
    if kind not in ("nn.DeepMask", "nn.SharpMask"):
        raise T7FormatError(f"model: expected nn.DeepMask or nn.SharpMask, found {kind}")
    original = _plain(config) if isinstance(config, dict) else {}
    params = _Params()
    sharp = kind == "nn.SharpMask"
    dm = "deepmask." if sharp else ""
    s = _trunk(_field(model, "model", "trunk"), "model.trunk", params, dm + "trunk.")
    mask_key = "maskBranchDM" if sharp else "maskBranch"
    o_sz = _mask_branch(_field(model, "model", mask_key), f"model.{mask_key}", params,
                        dm + "mask_head")
    hidden = _score_branch(_field(model, "model", "scoreBranch"), "model.scoreBranch", params,
                           dm + "score_head")
    settings = {"arch": s["arch"], "layout": "released", "i_sz": 16 * s["f_sz"], "o_sz": o_sz,
                "fc_dim": s["fc_dim"], "feat_ch": s["feat_ch"], "score_hidden": hidden}
    for key, ours in (("iSz", settings["i_sz"]), ("oSz", o_sz)):
        theirs = original.get(key)
        if isinstance(theirs, (int, float)) and int(theirs) != ours:
            raise T7FormatError(f"config.{key} = {theirs} but the module tree implies {ours}")
    deepmask = DeepMask(DeepMaskConfig(**settings))
    if sharp:
        from segdist.models.sharpmask import SharpMask

        km, ks = _refinement(model, "model", params)
        settings.update(km=km, ks=ks)
        net: nn.Module = SharpMask(deepmask, km=km, ks=ks)
    else:
        net = deepmask
    _load(net, params, "model")
    return Converted("sharpmask" if sharp else "deepmask", net.eval(), settings, original)


def load_t7(uri: str, storage_options: Mapping[str, Any] | None = None) -> tuple[Converted, str]:
    """Read and convert a released model.t7 -> (Converted, sha256 of the file)."""
    root, digest = read_t7(uri, storage_options)
    return convert_tree(root), digest

"""A minimal Torch7 binary serialiser, and module trees shaped like the original's saved models.

:func:`deepmask_file` / :func:`sharpmask_file` build ``{model = nn.DeepMask | nn.SharpMask,
config = ...}`` as the original training code saves it, in every layout a released file may have
(:class:`Variant`); :func:`save_t7` writes it.

The serialiser follows torch7's ``File:writeObject`` (binary mode, 64-bit Linux: int = 4 bytes,
long = 8 bytes, little endian): a type tag per value; tables, torch objects and functions carry a
reference index (an object met again is written as its index only); torch objects are written as
``"V 1"``, the class name, then their payload (a field table for nn modules; size/stride/offset/
storage for tensors; length and raw data for storages); functions as bytecode plus an upvalue table.

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


# ---------------------------------------------------------------------------------------------
# module trees shaped like the original's saved models, in every layout a released file may have


# Small heads so the tests are quick: i_sz 32 (f = 2, window 64), 8x8 mask logits.
HEADS = dict(i_sz=32, feat_ch=8, fc_dim=16, o_sz=8, score_hidden=8)
BLOCKS = {"resnet18": ("basic", (2, 2, 2)), "resnet50": ("bottleneck", (3, 4, 6))}


@dataclass(frozen=True)
class Variant:
    """How a saved tree is laid out; the defaults are the released model as documented.

    block: "released" = ``Sequential{ConcatTable, CAddTable, SCD, ReLU}`` (fb.resnet.torch's
    pretrained ResNet-50, BatchNorm after the addition) or "resnet-lua" = ``Sequential{ConcatTable,
    CAddTable, ReLU}`` with a BatchNorm after every convolution (fb.resnet.torch models/resnet.lua).
    shortcut: "bare" conv, "seq" = ``Sequential{conv}``, "conv-bn" = ``Sequential{conv, SCD}``;
    None = the block form's own ("bare" for released, "conv-bn" for resnet-lua).
    stride_on: "3x3" or "1x1" (the first 1x1 of a downsampling bottleneck).
    affine_shape: "1xCx1x1" (mid-2016 SpatialConstDiagonal) or "C"; affine_type its class name.
    conv_type: "cudnn.SpatialConvolution" or "nn.SpatialConvolutionMM" (2-D weight [out, in*k*k]).
    bias: False = convolutions saved after ``noBias()`` (no bias field).
    inference_form: the tree after the original's ``inference()`` (crop and View as Identity, the
    trunk's Linear as an f x f convolution, the heads' Linears as 1x1 convolutions, maskBranch the
    inner Sequential).
    """

    block: str = "released"
    shortcut: str | None = None
    stride_on: str = "3x3"
    affine_shape: str = "1xCx1x1"
    affine_type: str = "nn.SpatialConstDiagonal"
    conv_type: str = "cudnn.SpatialConvolution"
    bias: bool = True
    inference_form: bool = False

    @property
    def shortcut_form(self) -> str:
        return self.shortcut or ("bare" if self.block == "released" else "conv-bn")


class TreeBuilder:
    """nn.X objects with random weights whose tensors are views into shared flat storages
    (weights in one, gradients in another, as getParameters() leaves them)."""

    def __init__(self, seed: int, variant: Variant = Variant()):
        self.rng = np.random.default_rng(seed)
        self.v = variant
        self.new_pools()

    def new_pools(self) -> None:
        self.params, self.grads = ParamPool(), ParamPool()
        self.all_pools = getattr(self, "all_pools", []) + [self.params, self.grads]

    def finish(self) -> None:
        for p in self.all_pools:
            p.finish()

    def module(self, typename: str, **fields) -> LuaObject:
        base = {"output": empty_tensor(), "gradInput": empty_tensor(), "train": False,
                "_type": "torch.CudaTensor"}
        base.update(fields)
        return LuaObject(typename, base)

    def weights(self, array: np.ndarray) -> dict:
        return {"weight": self.params.view(array), "gradWeight": self.grads.view(np.zeros_like(array))}

    def conv(self, n_in: int, n_out: int, k: int, stride: int = 1, *,
             typename: str | None = None) -> LuaObject:
        w = self.rng.normal(0, np.sqrt(2.0 / (n_in * k * k)), (n_out, n_in, k, k))
        typename = typename or self.v.conv_type
        if typename == "nn.SpatialConvolutionMM":
            w = w.reshape(n_out, n_in * k * k)  # MM keeps its weight as a matrix
        fields = dict(nInputPlane=n_in, nOutputPlane=n_out, kW=k, kH=k, dW=stride, dH=stride,
                      padW=0, padH=0, groups=1, **self.weights(w),
                      iSize=Tensor(Storage("torch.LongStorage", np.array([1, n_in, 8, 8])), 0,
                                   (4,), (1,), "torch.LongTensor"),
                      accUpdateGradParameters=LuaFunction())
        if self.v.bias:
            fields.update(bias=self.params.view(self.rng.normal(0, 0.1, n_out)),
                          gradBias=self.grads.view(np.zeros(n_out)))
        return self.module(typename, **fields)

    def sympad(self, p: int) -> LuaObject:
        return self.module("nn.SpatialSymmetricPadding", pad_l=p, pad_r=p, pad_t=p, pad_b=p)

    def padded_conv(self, n_in: int, n_out: int, k: int, stride: int = 1) -> LuaObject:
        return self.seq(self.sympad(k // 2), self.conv(n_in, n_out, k, stride))

    def affine(self, c: int) -> LuaObject:
        shape = (1, c, 1, 1) if self.v.affine_shape == "1xCx1x1" else (c,)
        a = self.rng.uniform(0.5, 1.0, shape)
        b = self.rng.normal(0, 0.1, shape)
        return self.module(self.v.affine_type, a=self.params.view(a), b=self.params.view(b),
                           inplace=True)

    def relu(self) -> LuaObject:
        return self.module("cudnn.ReLU", inplace=True, mode="CUDNN_ACTIVATION_RELU")

    def seq(self, *mods, typename: str = "nn.Sequential") -> LuaObject:
        return self.module(typename, modules=list(mods))

    def linear(self, n_in: int, n_out: int, conv_f: int | None = None) -> LuaObject:
        """nn.Linear, or (``conv_f``) the f x f convolution inference() turns it into."""
        w = self.rng.normal(0, np.sqrt(1.0 / n_in), (n_out, n_in))
        b = self.rng.normal(0, 0.1, n_out)
        if conv_f is not None:
            f = conv_f
            return self.module(
                "cudnn.SpatialConvolution", nInputPlane=n_in // (f * f), nOutputPlane=n_out,
                kW=f, kH=f, dW=1, dH=1, padW=0, padH=0,
                **self.weights(w.reshape(n_out, n_in // (f * f), f, f)),
                bias=self.params.view(b), gradBias=self.grads.view(np.zeros(n_out)))
        return self.module("nn.Linear", **self.weights(w), bias=self.params.view(b),
                           gradBias=self.grads.view(np.zeros(n_out)),
                           accUpdateGradParameters=LuaFunction())

    def view(self, *size) -> LuaObject:
        return self.module("nn.View", size=Storage("torch.LongStorage", np.array(size)),
                           numElements=int(np.prod(size[1:])))

    def shortcut(self, n_in: int, out: int, stride: int) -> LuaObject:
        if stride == 1 and n_in == out:
            return self.module("nn.Identity")
        conv = self.conv(n_in, out, 1, stride)
        form = self.v.shortcut_form
        if form == "bare":
            return conv
        return self.seq(conv) if form == "seq" else self.seq(conv, self.affine(out))

    def block(self, kind: str, n_in: int, planes: int, stride: int) -> tuple[LuaObject, int]:
        lua = self.v.block == "resnet-lua"
        if kind == "bottleneck":
            out = planes * 4
            s1, s3 = (stride, 1) if self.v.stride_on == "1x1" else (1, stride)
            mods = [self.conv(n_in, planes, 1, s1), self.affine(planes), self.relu(),
                    self.padded_conv(planes, planes, 3, s3), self.affine(planes), self.relu(),
                    self.conv(planes, out, 1)]
        else:
            out = planes
            mods = [self.padded_conv(n_in, planes, 3, stride), self.affine(planes), self.relu(),
                    self.padded_conv(planes, planes, 3)]
        if lua:
            mods.append(self.affine(out))
        cat = self.seq(self.seq(*mods), self.shortcut(n_in, out, stride), typename="nn.ConcatTable")
        tail = [self.relu()] if lua else [self.affine(out), self.relu()]
        return self.seq(cat, self.module("nn.CAddTable", inplace=True), *tail), out

    def trunk(self, arch: str) -> LuaObject:
        kind, counts = BLOCKS[arch]
        mods = [self.padded_conv(3, 64, 7, 2), self.affine(64), self.relu(),
                self.module("cudnn.SpatialMaxPooling", kW=3, kH=3, dW=2, dH=2, padW=1, padH=1,
                            ceil_mode=False,
                            indices=Tensor(Storage("torch.CudaLongStorage", np.zeros(4, np.int64)),
                                           0, (1, 1, 2, 2), (4, 4, 2, 1), "torch.CudaLongTensor"))]
        n = 64
        for li, (planes, count) in enumerate(zip((64, 128, 256), counts)):
            blocks = []
            for j in range(count):
                blk, n = self.block(kind, n, planes, 2 if li and j == 0 else 1)
                blocks.append(blk)
            mods.append(self.seq(*blocks))
        f = HEADS["i_sz"] // 16
        flat = HEADS["feat_ch"] * f * f
        if self.v.inference_form:
            mods += [self.module("nn.Identity"), self.conv(n, HEADS["feat_ch"], 1), self.relu(),
                     self.module("nn.Identity"), self.linear(flat, HEADS["fc_dim"], conv_f=f)]
        else:
            mods += [self.module("nn.SpatialZeroPadding", pad_l=-1, pad_r=-1, pad_t=-1, pad_b=-1),
                     self.conv(n, HEADS["feat_ch"], 1), self.relu(), self.view(32, flat),
                     self.linear(flat, HEADS["fc_dim"])]
        return self.seq(*mods)

    def deepmask_parts(self, arch: str) -> dict:
        trunk = self.trunk(arch)
        self.new_pools()  # each branch has its own flat storage
        o = HEADS["o_sz"]
        dense = 1 if self.v.inference_form else None
        if self.v.inference_form:
            mask = self.seq(self.linear(HEADS["fc_dim"], o * o, conv_f=dense))
        else:
            mask = self.seq(self.seq(self.linear(HEADS["fc_dim"], o * o)),
                            self.seq(self.module("nn.Copy"), self.view(32, o, o),
                                     self.module("nn.SpatialReSamplingEx", owidth=2 * o,
                                                 oheight=2 * o, mode="bilinear", mode_c=2),
                                     self.view(32, 4 * o * o), self.module("nn.Copy")))
        self.new_pools()
        act = (self.relu() if self.v.inference_form
               else self.module("nn.Threshold", threshold=0, val=1e-6))
        score = self.seq(self.module("nn.Dropout", p=0.5),
                         self.linear(HEADS["fc_dim"], HEADS["score_hidden"], conv_f=dense), act,
                         self.module("nn.Dropout", p=0.5),
                         self.linear(HEADS["score_hidden"], 1, conv_f=dense))
        return {"trunk": trunk, "maskBranch": mask, "scoreBranch": score,
                "fSz": HEADS["i_sz"] // 16}

    def refinement(self, arch: str, km: int) -> tuple[list, dict, dict]:
        self.new_pools()
        f = HEADS["i_sz"] // 16
        exp = 4 if BLOCKS[arch][0] == "bottleneck" else 1
        nhu = [(256 * exp, 64), (128 * exp, 64), (64 * exp, 64), (64, 32)]
        n0 = self.seq(self.linear(HEADS["fc_dim"], f * f * km), self.view(32, km, f, f))
        neths, netvs, refs = [], {0: n0}, {0: n0}
        for i, (nhu1, nhu2) in enumerate(nhu, start=1):
            c = km // 2 ** (i - 1)
            hm = [] if i == 1 else [self.module("nn.SpatialZeroPadding", pad_l=-2 ** (i - 1),
                                                pad_r=-2 ** (i - 1), pad_t=-2 ** (i - 1),
                                                pad_b=-2 ** (i - 1))]
            hm += [self.sympad(1), self.conv(nhu1, nhu2, 3), self.relu(), self.sympad(1),
                   self.conv(nhu2, c, 3), self.relu(), self.sympad(1), self.conv(c, c // 2, 3)]
            h = self.seq(*hm)
            v = self.seq(self.sympad(1), self.conv(c, c, 3), self.relu(), self.sympad(1),
                         self.conv(c, c // 2, 3))
            neths.append(h)
            netvs[i] = v
            ref = self.seq(self.seq(h, v, typename="nn.ParallelTable"),
                           self.module("nn.CAddTable"), self.relu(),
                           self.module("nn.SpatialUpSamplingNearest", scale_factor=2))
            refs[i] = ref
        last = refs[4].fields["modules"]
        last += [self.sympad(1), self.conv(km // 16, 1, 3), self.view(32, HEADS["i_sz"] ** 2)]
        return neths, netvs, refs


def config_table(**extra) -> dict:
    """The ``config`` table train.lua saves (a few of its options)."""
    return {"iSz": HEADS["i_sz"], "oSz": HEADS["o_sz"], "gSz": 2 * HEADS["o_sz"], "batch": 32,
            "lr": 0.001, "rundir": "exps/", "hfreq": 0.5, **extra}


def deepmask_file(arch: str, variant: Variant = Variant(), seed: int = 0) -> dict:
    """``{model = nn.DeepMask, config = ...}`` as DeepMask training saves it."""
    b = TreeBuilder(seed, variant)
    model = b.module("nn.DeepMask", **b.deepmask_parts(arch))
    b.finish()
    return {"model": model, "config": config_table()}


def sharpmask_file(arch: str, variant: Variant = Variant(), km: int = 16, seed: int = 0) -> dict:
    """``{model = nn.SharpMask, config = ...}`` as SharpMask training saves it."""
    b = TreeBuilder(seed, variant)
    parts = b.deepmask_parts(arch)
    neths, netvs, refs = b.refinement(arch, km)
    model = b.module("nn.SharpMask", km=km, ks=km, skpos=[8, 6, 5, 3], trunk=parts["trunk"],
                     scoreBranch=parts["scoreBranch"], maskBranchDM=parts["maskBranch"],
                     fSz=parts["fSz"], neths=neths, netvs=netvs, refs=refs, inps={})
    b.finish()
    return {"model": model, "config": config_table(km=km, ks=km, gSz=HEADS["i_sz"], dm="/x")}

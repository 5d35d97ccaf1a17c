"""Reading the original DeepMask / SharpMask ``model.t7`` files into segdist models.

A released file is a Lua table ``{model = nn.DeepMask | nn.SharpMask, config = {...}}`` written by
Torch7 (read here with the ``torchfile`` package). The module tree is walked exactly as saved:

- trunk (``nn.Sequential``, Lua indices): [1] ``Sequential{SpatialSymmetricPadding(3), conv 7x7/2}``,
  [2] ``SpatialConstDiagonal`` (a folded BatchNorm: ``a``, ``b`` of shape 1xCx1x1 or C), [3] ReLU,
  [4] max pool 3x3/2 pad 1, [5..7] layer1..3 of residual blocks, [8] ``SpatialZeroPadding(-1)``
  crop, [9] 1x1 conv, [10] ReLU, [11] ``View``, [12] ``Linear(feat_ch*f*f, fc_dim)``;
- residual blocks, read by their structure: ``Sequential{ConcatTable{branch, shortcut}, CAddTable,
  SpatialConstDiagonal, ReLU}`` (fb.resnet.torch's pretrained ResNet-50: BatchNorm after the
  addition) or ``Sequential{ConcatTable{branch, shortcut}, CAddTable, ReLU}`` (fb.resnet.torch's
  ``models/resnet.lua``: the branch ends with a BatchNorm); branch ``Sequential{1x1, SCD, ReLU,
  Sequential{SymPad(1), 3x3}, SCD, ReLU, 1x1[, SCD]}`` (bottleneck; a downsampling block strides
  in the 3x3 or in the first 1x1) or ``Sequential{Seq{SymPad(1), 3x3 (stride)}, SCD, ReLU,
  Seq{SymPad(1), 3x3}[, SCD]}`` (basic); shortcut a bare 1x1 conv, ``Sequential{conv}``,
  ``Sequential{conv, SCD}`` where the block changes channels or resolution, else ``Identity``.
  Each trunk uses one of these forms throughout; it maps onto the matching ``Trunk`` layout
  (``released``, ``resnet-lua`` and their ``+shortcut-*`` / ``+stride-1x1`` forms, see
  :mod:`segdist.models.trunk`), recorded as ``layout`` in the settings;
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

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from segdist.models.t7file import (T7FormatError, expect, lua_get, need_field, number_field,
                                   read_t7, submodules, tensor_field, typename)

CONV = ("cudnn.SpatialConvolution", "nn.SpatialConvolution", "nn.SpatialConvolutionMM")
LINEAR = ("nn.Linear",)
AFFINE = ("nn.SpatialConstDiagonal", "inn.ConstAffine")
RELU = ("nn.ReLU", "cudnn.ReLU")
SEQ = ("nn.Sequential",)
SYMPAD = ("nn.SpatialSymmetricPadding",)


# ---------------------------------------------------------------------------------------------
# module forms


class _Params:
    """Arrays collected under the segdist model's state-dict names."""

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}
        self.origin: dict[str, str] = {}

    def put(self, name: str, array: np.ndarray, path: str) -> None:
        self.arrays[name] = array
        self.origin[name] = path


def _conv(obj: Any, path: str, params: _Params, name: str, k: int,
          stride: int | tuple[int, ...]) -> int:
    """A convolution with zero built-in padding; returns its output channels.

    ``stride``: the stride it must have, or a tuple of the strides it may have (the caller reads
    which one with :func:`_stride`).
    """
    expect(obj, path, CONV)
    n_out = int(number_field(obj, path, "nOutputPlane"))
    n_in = int(number_field(obj, path, "nInputPlane"))
    kw, kh = int(number_field(obj, path, "kW")), int(number_field(obj, path, "kH"))
    dw, dh = _stride(obj, path)
    pw, ph = int(number_field(obj, path, "padW", 0)), int(number_field(obj, path, "padH", 0))
    if (kh, kw) != (k, k):
        raise T7FormatError(f"{path}: expected a {k}x{k} convolution, found {kh}x{kw}")
    allowed = (stride,) if isinstance(stride, int) else tuple(sorted(set(stride)))
    if dh != dw or dh not in allowed:
        raise T7FormatError(f"{path}: expected stride {' or '.join(map(str, allowed))}, "
                            f"found {dh}x{dw}")
    if (ph, pw) != (0, 0):
        raise T7FormatError(f"{path}: expected no built-in padding (the original pads with a "
                            f"preceding SpatialSymmetricPadding), found {ph}x{pw}")
    w = tensor_field(obj, path, "weight")
    if w.size != n_out * n_in * k * k:
        raise T7FormatError(f"{path}: weight has {w.size} values, expected "
                            f"{n_out}x{n_in}x{k}x{k}")
    params.put(name + ".weight", w.reshape(n_out, n_in, k, k), path)
    bias = lua_get(obj, "bias")
    # A conv saved with noBias() has no bias; the released layout's convs have one: use zeros.
    has_bias = isinstance(bias, np.ndarray) and bias.size
    b = tensor_field(obj, path, "bias") if has_bias else np.zeros(n_out, np.float32)
    if b.size != n_out:
        raise T7FormatError(f"{path}: bias has {b.size} values, expected {n_out}")
    params.put(name + ".bias", b.reshape(n_out), path)
    return n_out


def _stride(obj: Any, path: str) -> tuple[int, int]:
    """(dH, dW) of a convolution (1 where the fields are absent, as nn's defaults)."""
    return int(number_field(obj, path, "dH", 1)), int(number_field(obj, path, "dW", 1))


def _sympad(obj: Any, path: str, pad: int) -> None:
    expect(obj, path, SYMPAD)
    got = [int(number_field(obj, path, f"pad_{s}")) for s in "lrtb"]
    if got != [pad] * 4:
        raise T7FormatError(f"{path}: expected symmetric padding {pad} on every side, found "
                            f"(l, r, t, b) = {tuple(got)}")


def _padded_conv(obj: Any, path: str, params: _Params, name: str, k: int,
                 stride: int | tuple[int, ...]) -> tuple[int, int]:
    """``Sequential{SpatialSymmetricPadding(k//2), conv kxk}`` as updatePadding makes it
    -> (output channels, stride)."""
    expect(obj, path, SEQ)
    (pad, pp), (conv, cp) = submodules(obj, path, 2)
    _sympad(pad, pp, k // 2)
    out = _conv(conv, cp, params, name, k, stride)
    return out, _stride(conv, cp)[0]


def _affine(obj: Any, path: str, params: _Params, name: str, channels: int) -> None:
    expect(obj, path, AFFINE)
    for key in ("a", "b"):
        v = tensor_field(obj, path, key)
        if v.size != channels or any(s != 1 for s in v.shape if s != channels):
            raise T7FormatError(f"{path}: '{key}' has shape {list(v.shape)}, expected [{channels}] "
                                f"or [1, {channels}, 1, 1]")
        params.put(f"{name}.{key}", v.reshape(channels), path)


def _linear(obj: Any, path: str, params: _Params, name: str) -> tuple[int, int]:
    """nn.Linear, or the 1x1 / fxf convolution ``inference()`` turns it into -> (out, in)."""
    expect(obj, path, LINEAR + CONV)
    w = tensor_field(obj, path, "weight")
    n_out = w.shape[0]
    w = w.reshape(n_out, -1)  # a conv kernel [out, in, f, f] flattens to the Linear's row-major rows
    b = tensor_field(obj, path, "bias").reshape(-1)
    if b.size != n_out:
        raise T7FormatError(f"{path}: bias has {b.size} values for {n_out} outputs")
    params.put(name + ".weight", w, path)
    params.put(name + ".bias", b, path)
    return n_out, w.shape[1]


@dataclass
class _BlockForm:
    """What one residual block's structure says about the trunk's layout (None: it cannot tell)."""

    kind: str                       # "bottleneck" or "basic"
    affine_after_add: bool
    shortcut_affine: bool | None    # None: identity shortcut
    stride_on_1x1: bool | None      # None: not a downsampling bottleneck
    out: int                        # output channels


def _block(obj: Any, path: str, params: _Params, name: str, n_in: int,
           downsample: bool) -> _BlockForm:
    """One residual block, read by its structure (the module docstring lists the forms)."""
    expect(obj, path, SEQ)
    mods = submodules(obj, path, (3, 4))
    # 4 modules: {ConcatTable, CAddTable, affine, ReLU} (BatchNorm after the addition, released);
    # 3 modules: {ConcatTable, CAddTable, ReLU} (BatchNorm inside the branch, resnet.lua).
    after_add = len(mods) == 4
    (cat, catp), (add, addp), (relu, relup) = mods[0], mods[1], mods[-1]
    expect(cat, catp, ("nn.ConcatTable",))
    expect(add, addp, ("nn.CAddTable",))
    expect(relu, relup, RELU)
    (branch, bp), (short, sp) = submodules(cat, catp, 2)
    expect(branch, bp, SEQ)
    tail = 0 if after_add else 1  # the affine after the branch's last convolution
    bm = submodules(branch, bp, (4, 5, 7, 8))
    if len(bm) not in (7 + tail, 4 + tail):
        why = ("the block applies its BatchNorm after the addition, so the branch ends with its "
               "last convolution" if after_add else "the block has no BatchNorm after the "
               "addition, so the branch ends with one (SpatialConstDiagonal after the last "
               "convolution)")
        raise T7FormatError(f"{bp}: expected {7 + tail} (bottleneck) or {4 + tail} (basic) modules "
                            f"in nn.Sequential, found {len(bm)}: {why}")
    stride = 2 if downsample else 1
    stride_on_1x1 = None
    if len(bm) == 7 + tail:
        kind = "bottleneck"
        planes = _conv(*bm[0], params, name + ".conv1", 1, (1, stride))
        s1 = _stride(*bm[0])[0]
        _affine(*bm[1], params, name + ".aff1", planes)
        expect(*bm[2], RELU)
        _, s3 = _padded_conv(*bm[3], params, name + ".conv2", 3, (1, stride))
        if downsample and s1 * s3 != stride:
            raise T7FormatError(f"{bp}: a downsampling bottleneck needs stride {stride} on its first "
                                f"1x1 or on its 3x3 convolution (one of them), found {s1} and {s3}")
        if downsample:
            stride_on_1x1 = s1 == stride
        _affine(*bm[4], params, name + ".aff2", planes)
        expect(*bm[5], RELU)
        out = _conv(*bm[6], params, name + ".conv3", 1, 1)
        if tail:
            _affine(*bm[7], params, name + ".aff3", out)
    else:
        kind = "basic"
        planes, _ = _padded_conv(*bm[0], params, name + ".conv1", 3, stride)
        _affine(*bm[1], params, name + ".aff1", planes)
        expect(*bm[2], RELU)
        out, _ = _padded_conv(*bm[3], params, name + ".conv2", 3, 1)
        if tail:
            _affine(*bm[4], params, name + ".aff2", out)
    shortcut_affine = _shortcut(short, sp, params, name, projection=downsample or n_in != out,
                                stride=stride, channels=out)
    if after_add:
        _affine(*mods[2], params, name + ".aff_out", out)
    return _BlockForm(kind, after_add, shortcut_affine, stride_on_1x1, out)


def _shortcut(obj: Any, path: str, params: _Params, name: str, *, projection: bool, stride: int,
              channels: int) -> bool | None:
    """A block's shortcut -> whether its projection has an affine (None for an identity).

    Projection (the block changes channels or resolution): a bare 1x1 conv with the block's
    stride, or ``Sequential{conv}`` / ``Sequential{conv, affine}``. Otherwise ``nn.Identity``.
    """
    if not projection:
        expect(obj, path, ("nn.Identity",))
        return None
    want = (f"a projection shortcut (1x1 convolution, stride {stride}, bare or in nn.Sequential "
            "with a SpatialConstDiagonal after it)")
    if typename(obj) in CONV:
        _conv(obj, path, params, name + ".shortcut", 1, stride)
        return False
    if typename(obj) != "nn.Sequential":
        raise T7FormatError(f"{path}: expected {want}, found {typename(obj)}")
    sm = submodules(obj, path, (1, 2))
    _conv(*sm[0], params, name + ".shortcut", 1, stride)
    if len(sm) == 2:
        _affine(*sm[1], params, name + ".shortcut_aff", channels)
    return len(sm) == 2


_FORM_WORDS = {
    "affine_after_add": {True: "its BatchNorm after the addition (4 modules)",
                         False: "its BatchNorm after the last convolution (3 modules)"},
    "shortcut_affine": {True: "a conv+BatchNorm projection shortcut",
                        False: "a bare conv projection shortcut"},
    "stride_on_1x1": {True: "the stride on the first 1x1 convolution",
                      False: "the stride on the 3x3 convolution"},
}


def _trunk(obj: Any, path: str, params: _Params, prefix: str) -> dict[str, int]:
    """The DeepMask trunk -> settings ``arch``, ``layout``, ``feat_ch``, ``fc_dim``, ``f_sz``."""
    from segdist.models.trunk import ARCHS, FoldedLayout

    expect(obj, path, SEQ)
    mods = submodules(obj, path, 12)
    r = prefix + "resnet."
    _padded_conv(*mods[0], params, r + "conv1", 7, 2)
    _affine(*mods[1], params, r + "aff1", 64)
    expect(*mods[2], RELU)
    pool, pp = expect(*mods[3], ("nn.SpatialMaxPooling", "cudnn.SpatialMaxPooling")), mods[3][1]
    geometry = [int(number_field(pool, pp, k, 0)) for k in ("kW", "kH", "dW", "dH", "padW", "padH")]
    if geometry != [3, 3, 2, 2, 1, 1]:
        raise T7FormatError(f"{pp}: expected max pooling 3x3, stride 2, pad 1; found (kW, kH, dW, "
                            f"dH, padW, padH) = {tuple(geometry)}")
    kinds, counts = set(), []
    # The first block that shows each layout property sets it for the trunk (one torch layout
    # per trunk); a later block that differs is refused at its path.
    seen: dict[str, tuple[bool, str]] = {}
    n = 64
    for li in range(3):
        layer, lp = mods[4 + li]
        expect(layer, lp, SEQ)
        blocks = need_field(layer, lp, "modules")
        blocks = submodules(layer, lp, len(blocks) if isinstance(blocks, list) else 1)
        for j, (blk, bp) in enumerate(blocks):
            form = _block(blk, bp, params, f"{r}layer{li + 1}.{j}", n, li > 0 and j == 0)
            for key, words in _FORM_WORDS.items():
                value = getattr(form, key)
                if value is None:
                    continue
                first = seen.setdefault(key, (value, bp))
                if first[0] != value:
                    raise T7FormatError(f"{bp}: this block has {words[value]} but {first[1]} has "
                                        f"{words[first[0]]}; a trunk must use one block layout")
            kinds.add(form.kind)
            n = form.out
        counts.append(len(blocks))
    arch = next((a for a, (k, c) in ARCHS.items() if kinds == {k} and tuple(counts) == c), None)
    if arch is None:
        raise T7FormatError(f"{path}: a trunk of {'/'.join(sorted(kinds))} blocks {counts} in "
                            f"layer1..3 is none of {sorted(ARCHS)}")
    after_add = seen["affine_after_add"][0]
    layout = FoldedLayout(
        affine_after_add=after_add,
        # a trunk without projection shortcuts cannot tell: its base's usual form
        shortcut_affine=seen.get("shortcut_affine", (not after_add, ""))[0],
        stride_on_1x1=seen.get("stride_on_1x1", (False, ""))[0]).name
    crop, cp = mods[7]
    if typename(crop) == "nn.SpatialZeroPadding":
        got = [int(number_field(crop, cp, f"pad_{s}")) for s in "lrtb"]
        if got != [-1] * 4:
            raise T7FormatError(f"{cp}: expected a crop of 1 cell per side (pad -1), found {got}")
    else:
        expect(crop, cp, ("nn.SpatialZeroPadding", "nn.Identity"))
    feat_ch = _conv(*mods[8], params, prefix + "reduce", 1, 1)
    expect(*mods[9], RELU)
    expect(*mods[10], ("nn.View", "nn.Reshape", "nn.Identity"))
    fc_dim, fc_in = _linear(*mods[11], params, prefix + "fc")
    f = math.isqrt(fc_in // feat_ch)
    if f * f * feat_ch != fc_in:
        raise T7FormatError(f"{mods[11][1]}: {fc_in} inputs are not {feat_ch} channels x f x f")
    return {"arch": arch, "layout": layout, "feat_ch": feat_ch, "fc_dim": fc_dim, "f_sz": f}


def _mask_branch(obj: Any, path: str, params: _Params, name: str) -> int:
    """``Sequential{Sequential{Linear}, upsampling}`` (or the inner Sequential alone) -> o_sz."""
    expect(obj, path, SEQ)
    mods = submodules(obj, path, (1, 2))
    first, fp = mods[0]
    if typename(first) == "nn.Sequential":
        if len(mods) == 2:
            up, upp = mods[1]
            expect(up, upp, SEQ)
            for m, mp in submodules(up, upp, range(0, 16)):
                if isinstance(lua_get(m, "weight"), np.ndarray) and lua_get(m, "weight").size:
                    raise T7FormatError(f"{mp}: expected the parameter-free upsampling of the mask "
                                        f"logits, found {typename(m)} with weights")
        ((lin, lp),) = submodules(first, fp, 1)
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
    expect(obj, path, SEQ)
    mods = submodules(obj, path, 5)
    expect(*mods[0], ("nn.Dropout",))
    hidden, _ = _linear(*mods[1], params, name + ".1")
    expect(*mods[2], ("nn.Threshold",) + RELU)
    expect(*mods[3], ("nn.Dropout",))
    one, _ = _linear(*mods[4], params, name + ".4")
    if one != 1:
        raise T7FormatError(f"{mods[4][1]}: the score head should have 1 output, found {one}")
    return hidden


def _refinement(model: Any, path: str, params: _Params) -> tuple[int, int]:
    """SharpMask ``refs[0..4]`` -> (km, ks) read from the layer shapes."""
    refs = need_field(model, path, "refs")
    rp = path + ".refs"
    if not isinstance(refs, dict) or sorted(k for k in refs if isinstance(k, int)) != [0, 1, 2, 3, 4]:
        raise T7FormatError(f"{rp}: expected a table with keys 0..4 (refs[0] = netvs[0]), found "
                            f"{typename(refs)}")
    netv0, n0p = refs[0], f"{rp}[0]"
    expect(netv0, n0p, SEQ)
    (lin, lp), (view, vp) = submodules(netv0, n0p, 2)
    _linear(lin, lp, params, "netv0")
    expect(view, vp, ("nn.View", "nn.Reshape"))
    for i in range(1, 5):
        ref, p = refs[i], f"{rp}[{i}]"
        expect(ref, p, SEQ)
        mods = submodules(ref, p, 7 if i == 4 else 4)
        (par, pp), (add, ap), (relu, rlp), (up, upp) = mods[:4]
        expect(par, pp, ("nn.ParallelTable",))
        expect(add, ap, ("nn.CAddTable",))
        expect(relu, rlp, RELU)
        expect(up, upp, ("nn.SpatialUpSamplingNearest",))
        if int(number_field(up, upp, "scale_factor", 2)) != 2:
            raise T7FormatError(f"{upp}: expected nearest upsampling x2")
        (neth, hp), (netv, vp2) = submodules(par, pp, 2)
        expect(neth, hp, SEQ)
        hm = submodules(neth, hp, (8, 9))
        if len(hm) == 9:
            crop, cp = hm.pop(0)
            expect(crop, cp, ("nn.SpatialZeroPadding", "nn.Identity"))
            want = -(2 ** (i - 1))
            if typename(crop) == "nn.SpatialZeroPadding":
                got = [int(number_field(crop, cp, f"pad_{s}")) for s in "lrtb"]
                if got != [want] * 4:
                    raise T7FormatError(f"{cp}: expected a crop of {-want} cells per side, "
                                        f"found pads {got}")
        for j, conv_at in enumerate((1, 4, 7)):
            _sympad(*hm[conv_at - 1], 1)
            _conv(*hm[conv_at], params, f"neths.{i - 1}.{2 * j}", 3, 1)
            if j < 2:
                expect(*hm[conv_at + 1], RELU)
        expect(netv, vp2, SEQ)
        vm = submodules(netv, vp2, 5)
        for j, conv_at in enumerate((1, 4)):
            _sympad(*vm[conv_at - 1], 1)
            _conv(*vm[conv_at], params, f"netvs.{i - 1}.{2 * j}", 3, 1)
        expect(*vm[2], RELU)
        if i == 4:
            _sympad(*mods[4], 1)
            _conv(*mods[5], params, "final", 3, 1)
            expect(*mods[6], ("nn.View", "nn.Reshape"))
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
        model: the segdist ``DeepMask`` (a folded trunk layout, ``settings["layout"]``) or
            ``SharpMask``, eval mode, CPU.
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
    model = lua_get(root, "model")
    config = lua_get(root, "config")
    kind = typename(model)
    if kind not in ("nn.DeepMask", "nn.SharpMask"):
        raise T7FormatError(f"model: expected nn.DeepMask or nn.SharpMask, found {kind}")
    original = _plain(config) if isinstance(config, dict) else {}
    params = _Params()
    sharp = kind == "nn.SharpMask"
    dm = "deepmask." if sharp else ""
    s = _trunk(need_field(model, "model", "trunk"), "model.trunk", params, dm + "trunk.")
    mask_key = "maskBranchDM" if sharp else "maskBranch"
    o_sz = _mask_branch(need_field(model, "model", mask_key), f"model.{mask_key}", params,
                        dm + "mask_head")
    hidden = _score_branch(need_field(model, "model", "scoreBranch"), "model.scoreBranch", params,
                           dm + "score_head")
    settings = {"arch": s["arch"], "layout": s["layout"], "i_sz": 16 * s["f_sz"], "o_sz": o_sz,
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

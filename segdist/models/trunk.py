"""The DeepMask trunk: a ResNet cut after layer3 (stride 16), with symmetric padding.

Block layouts (``layout``):

- ``torchvision``: torchvision's ResNet (BatchNorm after every convolution, conv+BN projection
  shortcut, convolutions without bias). Module names match torchvision's ``resnet*`` state_dict, so
  ImageNet weights load with :func:`load_imagenet_trunk`.
- the *folded* layouts of Torch7 ResNets as DeepMask saves them (BatchNorm folded into a fixed
  affine, :class:`FrozenAffine`; every convolution has a bias):

  - ``released``: the released DeepMask/SharpMask models (fb.resnet.torch's pretrained
    ResNet-50): the affine of a block's last convolution applied *after* the residual addition,
    a bare 1x1 convolution as projection shortcut;
  - ``resnet-lua``: fb.resnet.torch's ``models/resnet.lua``: an affine after every convolution
    including the last, a conv+affine projection shortcut, nothing after the addition;
  - modifiers: ``+shortcut-affine`` (``released`` with a conv+affine shortcut),
    ``+shortcut-bare`` (``resnet-lua`` with a bare conv shortcut), ``+stride-1x1`` (bottleneck
    trunks: a downsampling block strides in its first 1x1 convolution, as the original Caffe
    ResNets, instead of the 3x3). Order: base, shortcut modifier, stride modifier.

  Names: stem ``conv1``, ``aff1``; bottleneck ``conv1, aff1, conv2 (3x3), aff2, conv3, [aff3],
  shortcut, [shortcut_aff], [aff_out]``; basic block ``conv1, aff1, conv2, [aff2], shortcut,
  [shortcut_aff], [aff_out]`` (``aff_out`` after the addition in ``released``, ``aff3``/``aff2``
  after the last convolution in ``resnet-lua``; ``shortcut`` is None for identity shortcuts).

Every 3x3 and 7x7 convolution has zero built-in padding and is preceded by symmetric padding, as
the original's ``updatePadding`` does; the max pool keeps its own (-inf) padding of 1.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from segdist.errors import ConfigError
from segdist.models.layers import FrozenAffine, SymPadConv2d

# arch -> (block kind, blocks in layer1..layer3)
ARCHS: dict[str, tuple[str, tuple[int, int, int]]] = {
    "resnet50": ("bottleneck", (3, 4, 6)),
    "resnet34": ("basic", (3, 4, 6)),
    "resnet18": ("basic", (2, 2, 2)),
}


@dataclass(frozen=True)
class FoldedLayout:
    """Where a folded (Torch7, BatchNorm-as-affine) residual block has its affines and stride.

    affine_after_add: the block's last affine follows the residual addition (``released``), not
    its last convolution (``resnet-lua``). shortcut_affine: a projection shortcut is conv+affine.
    stride_on_1x1: a downsampling bottleneck strides in its first 1x1 convolution, not the 3x3.
    """

    affine_after_add: bool
    shortcut_affine: bool
    stride_on_1x1: bool

    @property
    def name(self) -> str:
        """The ``layout`` string of this form (see the module docstring)."""
        base = "released" if self.affine_after_add else "resnet-lua"
        parts = [base]
        if self.shortcut_affine == self.affine_after_add:  # differs from the base's shortcut
            parts.append("shortcut-affine" if self.shortcut_affine else "shortcut-bare")
        if self.stride_on_1x1:
            parts.append("stride-1x1")
        return "+".join(parts)


FOLDED_LAYOUTS: dict[str, FoldedLayout] = {
    f.name: f for f in (FoldedLayout(after, short, s1) for after in (True, False)
                        for short in (not after, after) for s1 in (False, True))
}
LAYOUTS = ("torchvision", *FOLDED_LAYOUTS)


def trunk_channels(arch: str) -> dict[str, int]:
    """Output channels of the trunk's four feature maps for ``arch``."""
    expansion = 4 if ARCHS[arch][0] == "bottleneck" else 1
    return {"conv1": 64, "layer1": 64 * expansion, "layer2": 128 * expansion,
            "layer3": 256 * expansion}


# ---------------------------------------------------------------------------------------------
# torchvision layout


class _TVBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = SymPadConv2d(planes, planes, 3, stride=stride, sym_pad=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + identity)


class _TVBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = SymPadConv2d(inplanes, planes, 3, stride=stride, sym_pad=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = SymPadConv2d(planes, planes, 3, sym_pad=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + identity)


# ---------------------------------------------------------------------------------------------
# folded layouts (Torch7 ResNets with BatchNorm folded into fixed affines)


class _FoldedBlock(nn.Module):
    """Shortcut and tail of a folded block; subclasses build the residual branch."""

    def _tail(self, inplanes: int, out: int, stride: int, form: FoldedLayout) -> None:
        self.shortcut = None
        self.shortcut_aff = None
        if stride != 1 or inplanes != out:
            self.shortcut = nn.Conv2d(inplanes, out, 1, stride=stride)
            if form.shortcut_affine:
                self.shortcut_aff = FrozenAffine(out)
        self.aff_out = FrozenAffine(out) if form.affine_after_add else None
        self.relu = nn.ReLU(inplace=True)

    def _residual(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        identity = x
        if self.shortcut is not None:
            identity = self.shortcut(x)
            if self.shortcut_aff is not None:
                identity = self.shortcut_aff(identity)
        y = y + identity
        # fb.resnet.torch's pretrained ResNet-50: "a batch normalization layer after the addition"
        return self.relu(self.aff_out(y) if self.aff_out is not None else y)


class _FoldedBottleneck(_FoldedBlock):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, form: FoldedLayout):
        super().__init__()
        out = planes * self.expansion
        s1, s3 = (stride, 1) if form.stride_on_1x1 else (1, stride)
        self.conv1 = nn.Conv2d(inplanes, planes, 1, stride=s1)
        self.aff1 = FrozenAffine(planes)
        self.conv2 = SymPadConv2d(planes, planes, 3, stride=s3, sym_pad=1)
        self.aff2 = FrozenAffine(planes)
        self.conv3 = nn.Conv2d(planes, out, 1)
        self.aff3 = None if form.affine_after_add else FrozenAffine(out)
        self._tail(inplanes, out, stride, form)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.aff1(self.conv1(x)))
        y = self.relu(self.aff2(self.conv2(y)))
        y = self.conv3(y)
        if self.aff3 is not None:
            y = self.aff3(y)
        return self._residual(x, y)


class _FoldedBasicBlock(_FoldedBlock):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int, form: FoldedLayout):
        super().__init__()
        self.conv1 = SymPadConv2d(inplanes, planes, 3, stride=stride, sym_pad=1)
        self.aff1 = FrozenAffine(planes)
        self.conv2 = SymPadConv2d(planes, planes, 3, sym_pad=1)
        self.aff2 = None if form.affine_after_add else FrozenAffine(planes)
        self._tail(inplanes, planes, stride, form)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.aff1(self.conv1(x)))
        y = self.conv2(y)
        if self.aff2 is not None:
            y = self.aff2(y)
        return self._residual(x, y)


class Trunk(nn.Module):
    """ResNet conv1..layer3 with symmetric padding.

    forward(x: float32 [B, 3, H, W], ImageNet-normalised) -> dict of feature maps:
    ``conv1`` (after the stem ReLU, 64 ch, ceil(H/2) x ceil(W/2)), ``layer1`` (/4), ``layer2`` (/8),
    ``layer3`` (/16; 1024 ch for resnet50, 256 for resnet18/34). Sizes are ceil(H/stride).
    """

    def __init__(self, arch: str = "resnet50", layout: str = "torchvision"):
        super().__init__()
        if arch not in ARCHS:
            raise ConfigError(f"unknown trunk arch {arch!r}; choose one of {sorted(ARCHS)}")
        if layout not in LAYOUTS:
            raise ConfigError(f"unknown trunk layout {layout!r}; choose one of {list(LAYOUTS)}")
        self.arch, self.layout = arch, layout
        kind, blocks = ARCHS[arch]
        self.form = FOLDED_LAYOUTS.get(layout)  # None: torchvision
        if self.form is not None and self.form.stride_on_1x1 and kind != "bottleneck":
            raise ConfigError(f"trunk layout {layout!r}: '+stride-1x1' applies to bottleneck "
                              f"trunks (resnet50); {arch} has basic blocks")
        if self.form is None:
            block = _TVBottleneck if kind == "bottleneck" else _TVBasicBlock
            make = block
        else:
            block = _FoldedBottleneck if kind == "bottleneck" else _FoldedBasicBlock
            make = functools.partial(block, form=self.form)
        folded = self.form is not None
        self.conv1 = SymPadConv2d(3, 64, 7, stride=2, sym_pad=3, bias=folded)
        if folded:
            self.aff1 = FrozenAffine(64)
        else:
            self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256), blocks)):
            layer = []
            for j in range(n):
                layer.append(make(inplanes, planes, 2 if (i > 0 and j == 0) else 1))
                inplanes = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
        self.channels = trunk_channels(arch)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.conv1(x)
        x = self.aff1(x) if self.form is not None else self.bn1(x)
        c1 = self.relu(x)
        l1 = self.layer1(self.maxpool(c1))
        l2 = self.layer2(l1)
        l3 = self.layer3(l2)
        return {"conv1": c1, "layer1": l1, "layer2": l2, "layer3": l3}

    @property
    def rf_radius(self) -> int:
        """Receptive-field radius of a layer3 cell, in input pixels (for tiling halos).

        Each kxk convolution reading a map of stride S widens the field by (k//2)*S on each side.
        A downsampling bottleneck that strides in its first 1x1 convolution (``+stride-1x1``) runs
        its 3x3 at the doubled stride, so its field grows twice as much as with the stride on the
        3x3.
        """
        kind, blocks = ARCHS[self.arch]
        stride_first = self.form is not None and self.form.stride_on_1x1
        radius, stride = 3, 2          # 7x7 stem conv at stride 1, output stride 2
        radius, stride = radius + 2, 4  # 3x3 max pool at stride 2
        for i, n in enumerate(blocks):
            for j in range(n):
                downsample = i > 0 and j == 0
                if downsample and stride_first:
                    stride *= 2  # the 1x1 subsamples before any 3x3 reads the map
                convs3 = 1 if kind == "bottleneck" else 2
                for c in range(convs3):
                    radius += stride
                    if downsample and c == 0 and not stride_first:
                        stride *= 2
        return radius


def build_trunk(arch: str = "resnet50", layout: str = "torchvision") -> Trunk:
    """A randomly initialised trunk (see :class:`Trunk`); BatchNorms start at identity."""
    return Trunk(arch, layout)


def load_imagenet_trunk(trunk: Trunk, weights: Any,
                        storage_options: Mapping[str, Any] | None = None) -> str:
    """Copy torchvision ImageNet ResNet weights (conv1..layer3) into a torchvision-layout trunk.

    Args:
        trunk: a ``Trunk`` with layout "torchvision" whose arch matches the weights.
        weights: a torchvision weights enum member (``ResNet50_Weights.IMAGENET1K_V1``), an enum
            name as a string ("DEFAULT", "IMAGENET1K_V1", "IMAGENET1K_V2"), a state dict, or the
            URI of a file holding one (torch.save or safetensors). layer4 and fc are ignored.
    Returns:
        sha256 of the weights file ("" for an in-memory state dict).
    Raises:
        ConfigError for a wrong layout, wrong arch or missing keys; StorageError when an enum
        cannot be downloaded (offline: the message says to pass a file).
    """
    from segdist.models.weights import enum_state_dict, read_state_dict

    if trunk.layout != "torchvision":
        raise ConfigError("ImageNet weights load only into a trunk with layout='torchvision' "
                          f"(this one is {trunk.layout!r}); convert released weights with convert-t7")
    digest = ""
    if isinstance(weights, Mapping):
        state = dict(weights)
    elif isinstance(weights, str) and "/" not in weights and "." not in weights:
        import torchvision

        enum_cls = torchvision.models.get_model_weights(trunk.arch)
        try:
            member = enum_cls[weights]
        except KeyError:
            raise ConfigError(f"unknown {enum_cls.__name__} member {weights!r}; use one of "
                              f"{[m.name for m in enum_cls] + ['DEFAULT']} or a file URI") from None
        state, digest = enum_state_dict(member)
    elif isinstance(weights, str):
        state, digest = read_state_dict(weights, storage_options)
    else:  # a torchvision WeightsEnum member
        state, digest = enum_state_dict(weights)
    own = trunk.state_dict()
    picked = {k: v for k, v in state.items() if k in own}
    missing = [k for k in own if k not in picked and not k.endswith("num_batches_tracked")]
    if missing:
        raise ConfigError(f"the weights lack {len(missing)} trunk entries (e.g. {missing[:3]}); "
                          f"are they torchvision {trunk.arch} ImageNet weights?")
    bad = [k for k, v in picked.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise ConfigError(f"shape mismatch for {bad[:3]}: the weights are not {trunk.arch}")
    trunk.load_state_dict(picked, strict=False)
    return digest

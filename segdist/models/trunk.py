"""The DeepMask trunk: a ResNet cut after layer3 (stride 16), with symmetric padding.

Two block layouts:

- ``torchvision``: torchvision's ResNet (BatchNorm after every convolution, conv+BN projection
  shortcut, convolutions without bias). Module names match torchvision's ``resnet*`` state_dict, so
  ImageNet weights load with :func:`load_imagenet_trunk`.
- ``released``: the layout of the released DeepMask/SharpMask models (fb.resnet.torch ResNet-50):
  convolutions with bias, BatchNorm folded into a fixed affine (:class:`FrozenAffine`), the
  affine of a block's last convolution applied *after* the residual addition, and a bare 1x1
  convolution as projection shortcut. Names: stem ``conv1``, ``aff1``; bottleneck ``conv1, aff1,
  conv2, aff2, conv3, shortcut, aff_out``; basic block ``conv1, aff1, conv2, shortcut, aff_out``.

Every 3x3 and 7x7 convolution has zero built-in padding and is preceded by symmetric padding, as
the original's ``updatePadding`` does; the max pool keeps its own (-inf) padding of 1.
"""

from __future__ import annotations

from collections.abc import Mapping
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
LAYOUTS = ("torchvision", "released")


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
# released (fb.resnet.torch, BatchNorm folded) layout


class _RelBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1)
        self.aff1 = FrozenAffine(planes)
        self.conv2 = SymPadConv2d(planes, planes, 3, stride=stride, sym_pad=1)
        self.aff2 = FrozenAffine(planes)
        self.conv3 = nn.Conv2d(planes, out, 1)
        self.shortcut = None
        if stride != 1 or inplanes != out:
            self.shortcut = nn.Conv2d(inplanes, out, 1, stride=stride)
        self.aff_out = FrozenAffine(out)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        y = self.relu(self.aff1(self.conv1(x)))
        y = self.relu(self.aff2(self.conv2(y)))
        y = self.conv3(y)
        # fb.resnet.torch's ResNet-50: "a batch normalization layer after the addition"
        return self.relu(self.aff_out(y + identity))


class _RelBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = SymPadConv2d(inplanes, planes, 3, stride=stride, sym_pad=1)
        self.aff1 = FrozenAffine(planes)
        self.conv2 = SymPadConv2d(planes, planes, 3, sym_pad=1)
        self.shortcut = None
        if stride != 1 or inplanes != planes:
            self.shortcut = nn.Conv2d(inplanes, planes, 1, stride=stride)
        self.aff_out = FrozenAffine(planes)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        y = self.relu(self.aff1(self.conv1(x)))
        y = self.conv2(y)
        return self.relu(self.aff_out(y + identity))


_BLOCKS = {
    ("torchvision", "bottleneck"): _TVBottleneck,
    ("torchvision", "basic"): _TVBasicBlock,
    ("released", "bottleneck"): _RelBottleneck,
    ("released", "basic"): _RelBasicBlock,
}


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
        block = _BLOCKS[(layout, kind)]
        released = layout == "released"
        self.conv1 = SymPadConv2d(3, 64, 7, stride=2, sym_pad=3, bias=released)
        if released:
            self.aff1 = FrozenAffine(64)
        else:
            self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256), blocks)):
            layer = []
            for j in range(n):
                layer.append(block(inplanes, planes, 2 if (i > 0 and j == 0) else 1))
                inplanes = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
        self.channels = trunk_channels(arch)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.conv1(x)
        x = self.aff1(x) if self.layout == "released" else self.bn1(x)
        c1 = self.relu(x)
        l1 = self.layer1(self.maxpool(c1))
        l2 = self.layer2(l1)
        l3 = self.layer3(l2)
        return {"conv1": c1, "layer1": l1, "layer2": l2, "layer3": l3}

    @property
    def rf_radius(self) -> int:
        """Receptive-field radius of a layer3 cell, in input pixels (for tiling halos).

        Each kxk convolution reading a map of stride S widens the field by (k//2)*S on each side.
        """
        kind, blocks = ARCHS[self.arch]
        radius, stride = 3, 2          # 7x7 stem conv at stride 1, output stride 2
        radius, stride = radius + 2, 4  # 3x3 max pool at stride 2
        for i, n in enumerate(blocks):
            for j in range(n):
                convs3 = 1 if kind == "bottleneck" else 2
                for c in range(convs3):
                    radius += stride
                    if i > 0 and j == 0 and c == 0:
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

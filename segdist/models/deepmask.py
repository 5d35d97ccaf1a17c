"""DeepMask (the updated ResNet version of the original DeepMask.lua).

Training path (one window per sample):
    x [B, 3, i_sz+32, i_sz+32] -> trunk -> layer3 [B, C3, f+2, f+2] (f = i_sz/16)
    -> crop 1 cell per side [B, C3, f, f] -> 1x1 conv C3->feat_ch, ReLU -> flatten (C, H, W
    row-major, feat_ch*f*f) -> Linear -> embedding [B, fc_dim]
    -> mask head Linear(fc_dim, o_sz*o_sz) -> mask logits [B, o_sz, o_sz] (row-major view)
    -> score head Dropout, Linear(fc_dim, score_hidden), Threshold(0, 1e-6), Dropout, Linear(., 1)
       -> score logits [B]

Dense path (whole padded image, the original's ``linear2convTrunk``): no crop; the embedding
Linear is applied as an f x f convolution whose weight is the *same* parameter viewed as
[fc_dim, feat_ch, f, f]. Embedding cell (r, c) reads layer3 cells r..r+f-1, c..c+f-1, i.e. the
i_sz x i_sz input window whose top-left pixel is (16r, 16c): the central i_sz region of a training
window whose top-left is (16r - 16, 16c - 16). Both heads are per-cell (1x1) maps of that embedding.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from segdist.errors import ConfigError
from segdist.models.trunk import ARCHS, LAYOUTS, Trunk, build_trunk

STRIDE = 16  # trunk output stride


@dataclass(frozen=True)
class DeepMaskConfig:
    """Architecture settings of a DeepMask (stored in checkpoints as JSON).

    arch/layout: the ResNet trunk (see ``segdist.models.trunk``). i_sz: input region (a multiple of
    16; the training window is i_sz + 32). o_sz: mask head output side. fc_dim: embedding size.
    feat_ch: channels of the 1x1 reduction. score_hidden: hidden units of the score head.
    """

    arch: str = "resnet50"
    layout: str = "torchvision"
    i_sz: int = 160
    o_sz: int = 56
    fc_dim: int = 512
    feat_ch: int = 128
    score_hidden: int = 1024

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ConfigError(f"DeepMask arch {self.arch!r} unknown; choose one of {sorted(ARCHS)}")
        if self.layout not in LAYOUTS:
            raise ConfigError(f"DeepMask layout {self.layout!r} unknown; choose one of {list(LAYOUTS)}")
        if self.i_sz < 16 or self.i_sz % 16:
            raise ConfigError(f"DeepMask i_sz must be a positive multiple of 16 (got {self.i_sz})")
        for name in ("o_sz", "fc_dim", "feat_ch", "score_hidden"):
            if getattr(self, name) < 1:
                raise ConfigError(f"DeepMask {name} must be >= 1 (got {getattr(self, name)})")

    @property
    def f_sz(self) -> int:
        """Side of the embedding's receptive window in layer3 cells (i_sz / 16)."""
        return self.i_sz // STRIDE

    @property
    def w_sz(self) -> int:
        """Training window side: i_sz plus 16 px of context on each side."""
        return self.i_sz + 32

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DeepMaskConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown DeepMask settings {unknown}; known: {sorted(known)}")
        return cls(**d)


class DeepMaskTrunk(nn.Module):
    """ResNet conv1..layer3 plus the extra layers: 1x1 conv C3 -> feat_ch, ReLU, Linear -> fc_dim.

    ``resnet`` is the :class:`Trunk`, ``reduce`` the 1x1 conv, ``fc`` the Linear(feat_ch*f*f, fc_dim).
    """

    def __init__(self, cfg: DeepMaskConfig):
        super().__init__()
        self.cfg = cfg
        self.resnet: Trunk = build_trunk(cfg.arch, cfg.layout)
        self.reduce = nn.Conv2d(self.resnet.channels["layer3"], cfg.feat_ch, 1)
        self.fc = nn.Linear(cfg.feat_ch * cfg.f_sz * cfg.f_sz, cfg.fc_dim)

    def window(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training windows x [B, 3, w_sz, w_sz] -> (embedding [B, fc_dim], trunk feature dict)."""
        feats = self.resnet(x)
        l3 = feats["layer3"][:, :, 1:-1, 1:-1]  # crop 1 cell per side: the central i_sz region
        r = F.relu(self.reduce(l3))              # B x feat_ch x f x f
        return self.fc(r.flatten(1)), feats

    def dense(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Padded image x [B, 3, H, W] -> (embedding map [B, fc_dim, h, w], trunk feature dict).

        h = ceil(H/16) - f + 1 (same for w); cell (r, c) is the i_sz window at pixel (16r, 16c).
        """
        feats = self.resnet(x)
        r = F.relu(self.reduce(feats["layer3"]))
        f = self.cfg.f_sz
        # The Linear's weight viewed as a conv kernel: flatten order of the training path is
        # (channel, row, col), which is exactly Conv2d's [out, in, kH, kW] row-major layout.
        w = self.fc.weight.view(self.cfg.fc_dim, self.cfg.feat_ch, f, f)
        return F.conv2d(r, w.to(r.dtype), self.fc.bias.to(r.dtype)), feats


def _score_head(cfg: DeepMaskConfig) -> nn.Sequential:
    return nn.Sequential(
        nn.Dropout(0.5),
        nn.Linear(cfg.fc_dim, cfg.score_hidden),
        nn.Threshold(0.0, 1e-6),  # the original's ReLU variant: x <= 0 -> 1e-6
        nn.Dropout(0.5),
        nn.Linear(cfg.score_hidden, 1),
    )


class DeepMask(nn.Module):
    """DeepMask with a ResNet trunk; ``.trunk``, ``.mask_head``, ``.score_head`` are its parts.

    ``forward`` is the training path (windows); ``features``/``score_map``/``masks_at`` are the
    dense path used for whole-image inference. Inputs are ImageNet-normalised RGB, float32.
    """

    def __init__(self, cfg: DeepMaskConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or DeepMaskConfig()
        self.trunk = DeepMaskTrunk(cfg)
        self.mask_head = nn.Linear(cfg.fc_dim, cfg.o_sz * cfg.o_sz)
        self.score_head = _score_head(cfg)

    # -- training path -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows x [B, 3, w_sz, w_sz] -> (mask logits [B, o_sz, o_sz], score logits [B]).

        Mask logit (i, j) covers the central i_sz x i_sz region of the window (row i, col j).
        """
        emb, _ = self.trunk.window(self._check_window(x))
        return self.mask_logits(emb), self.score_head(emb).squeeze(-1)

    def _check_window(self, x: torch.Tensor) -> torch.Tensor:
        w = self.cfg.w_sz
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[-2:] != (w, w):
            raise ValueError(f"DeepMask windows must be [B, 3, {w}, {w}], got {list(x.shape)}")
        return x

    def mask_logits(self, emb: torch.Tensor) -> torch.Tensor:
        """Embeddings [K, fc_dim] -> mask logits [K, o_sz, o_sz]."""
        o = self.cfg.o_sz
        return self.mask_head(emb).view(-1, o, o)

    # -- dense path ----------------------------------------------------------------------------
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Padded, normalised image(s) x [B, 3, H, W] -> embedding map [B, fc_dim, h, w]."""
        return self.trunk.dense(x)[0]

    def score_map(self, emb: torch.Tensor) -> torch.Tensor:
        """Embedding map [B, fc_dim, h, w] -> score logits [B, h, w] (the head at every cell)."""
        return self.score_head(emb.permute(0, 2, 3, 1)).squeeze(-1)

    def masks_at(self, emb: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Mask logits for selected cells only.

        Args:
            emb: embedding map [B, fc_dim, h, w].
            idx: int64 [K, 3] rows of (batch, row, col) into the map.
        Returns:
            mask logits [K, o_sz, o_sz] (equal to running the head densely and picking the cells).
        """
        vecs = emb[idx[:, 0], :, idx[:, 1], idx[:, 2]]  # K x fc_dim
        return self.mask_logits(vecs)

    # -- the protocol whole-image inference uses (segdist.proposers.dense.pipeline) -----------
    @property
    def mask_size(self) -> int:
        """Side of the mask logits a window yields (o_sz)."""
        return self.cfg.o_sz

    @property
    def activation_bytes_per_px(self) -> int:
        """Rough peak trunk working memory per padded input pixel and image (fp32), for tiling."""
        return 320 if self.cfg.arch == "resnet50" else 160

    @property
    def halo_px(self) -> int:
        """Input pixels beyond a window's layer3 cells that can change its outputs (tiling halo)."""
        return self.trunk.resnet.rf_radius

    def dense(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Padded image(s) [B, 3, H, W] -> (embedding map [B, fc_dim, h, w], per-window extras
        maps: none for DeepMask)."""
        return self.features(x), []

    def window_masks(self, vecs: torch.Tensor, extras: list[torch.Tensor]) -> torch.Tensor:
        """Embedding vectors [K, fc_dim] (+ window extras) -> mask logits [K, o_sz, o_sz]."""
        return self.mask_logits(vecs)


def deepmask(*, trunk: str = "resnet50", **settings) -> DeepMask:
    """An untrained DeepMask with a ``trunk`` ResNet ("resnet50", "resnet34", "resnet18");
    ``settings``: the other :class:`DeepMaskConfig` fields (layout, i_sz, o_sz, fc_dim, ...)."""
    return DeepMask(DeepMaskConfig(arch=trunk, **settings))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

"""SharpMask (SharpMask.lua): DeepMask plus a top-down refinement path with skip connections.

The coarse mask encoding ``netv0(emb)`` [K, km, f, f] is refined by four modules. Module i
(i = 1..4) reads the skip feature map of stride 16/2^(i-1) (layer3, layer2, layer1, the ReLU after
conv1), cropped to the window's central i_sz region (f*2^(i-1) cells), through a "horizontal" net
(three symmetric-padded 3x3 convs nhu1 -> nhu2 -> ks/2^(i-1) -> ks/2^i, ReLUs between), adds the
"vertical" net of the mask encoding (3x3 km/2^(i-1) -> same -> half), ReLU, and upsamples x2
(nearest). A final symmetric-padded 3x3 conv maps km/16 channels to 1: mask logits [K, i_sz, i_sz].

At inference the horizontal nets run convolutionally over whole feature maps (:meth:`hmaps`) and the
refinement runs only for selected windows, gathering for skip i the f*2^(i-1) window at the
matching offset, zero-filled outside the map (as InferSharpMask.lua does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segdist.models.deepmask import STRIDE, DeepMask
from segdist.models.layers import SymPadConv2d

SKIPS = ("layer3", "layer2", "layer1", "conv1")  # skip source of refinement module 1..4
SKIP_STRIDES = (16, 8, 4, 2)


class SharpMask(nn.Module):
    """SharpMask on a (frozen) DeepMask; ``.deepmask`` is that DeepMask.

    ``forward`` is the training path: windows [B, 3, w_sz, w_sz] -> (mask logits [B, i_sz, i_sz],
    score logits [B]). Only :meth:`refinement_parameters` are meant to be trained; the DeepMask's
    parameters have ``requires_grad=False`` and it stays in eval mode even in ``train()``.
    """

    def __init__(self, deepmask: DeepMask | None = None, km: int = 32, ks: int = 32):
        super().__init__()
        if km < 16 or km % 16 or ks < 16 or ks % 16:
            raise ValueError(f"SharpMask km and ks must be multiples of 16, >= 16 (got {km}, {ks})")
        self.deepmask = deepmask if deepmask is not None else DeepMask()
        self.km, self.ks = km, ks
        cfg = self.deepmask.cfg
        f = cfg.f_sz
        ch = self.deepmask.trunk.resnet.channels
        nhu = [(ch["layer3"], 64), (ch["layer2"], 64), (ch["layer1"], 64), (ch["conv1"], 32)]
        self.netv0 = nn.Linear(cfg.fc_dim, f * f * km)
        self.neths = nn.ModuleList()
        self.netvs = nn.ModuleList()
        for i, (nhu1, nhu2) in enumerate(nhu):
            hin, vin = ks // 2 ** i, km // 2 ** i
            self.neths.append(nn.Sequential(
                SymPadConv2d(nhu1, nhu2, 3, sym_pad=1), nn.ReLU(inplace=True),
                SymPadConv2d(nhu2, hin, 3, sym_pad=1), nn.ReLU(inplace=True),
                SymPadConv2d(hin, hin // 2, 3, sym_pad=1),
            ))
            self.netvs.append(nn.Sequential(
                SymPadConv2d(vin, vin, 3, sym_pad=1), nn.ReLU(inplace=True),
                SymPadConv2d(vin, vin // 2, 3, sym_pad=1),
            ))
        self.final = SymPadConv2d(km // 2 ** len(nhu), 1, 3, sym_pad=1)
        if ks // 2 ** len(nhu) != km // 2 ** len(nhu):
            raise ValueError("SharpMask needs km == ks (the horizontal and vertical paths are added)")
        self.deepmask.requires_grad_(False)
        self.deepmask.eval()

    @property
    def cfg(self):
        return self.deepmask.cfg

    def train(self, mode: bool = True) -> "SharpMask":
        super().train(mode)
        self.deepmask.eval()  # frozen: no BatchNorm statistics updates, no dropout in the scores
        return self

    def refinement_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters: netv0, the horizontal and vertical nets, the final conv."""
        mods = [self.netv0, self.neths, self.netvs, self.final]
        return [p for m in mods for p in m.parameters()]

    # -- shared refinement ---------------------------------------------------------------------
    def refine(self, emb: torch.Tensor, hs: list[torch.Tensor]) -> torch.Tensor:
        """Embeddings [K, fc_dim] and horizontal outputs hs[i] [K, ks/2^(i+1), f*2^i, f*2^i]
        (i = 0..3) -> mask logits [K, i_sz, i_sz]."""
        f = self.cfg.f_sz
        m = self.netv0(emb).view(-1, self.km, f, f)  # K x km x f x f, row-major like nn.View
        for h, netv in zip(hs, self.netvs):
            m = F.interpolate(F.relu(h.to(m.dtype) + netv(m)), scale_factor=2, mode="nearest")
        return self.final(m).squeeze(1)

    # -- training path -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows x [B, 3, w_sz, w_sz] -> (mask logits [B, i_sz, i_sz], score logits [B])."""
        dm = self.deepmask
        emb, feats = dm.trunk.window(dm._check_window(x))
        hs = []
        for name, stride, neth in zip(SKIPS, SKIP_STRIDES, self.neths):
            c = STRIDE // stride  # 16 px of context per side, in cells of this map
            hs.append(neth(feats[name][:, :, c:-c, c:-c]))
        return self.refine(emb, hs), dm.score_head(emb).squeeze(-1)

    # -- dense path ----------------------------------------------------------------------------
    def hmaps(self, feats: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Horizontal nets over whole trunk maps: feats (from ``deepmask.trunk.dense``) ->
        4 maps [B, ks/2^(i+1), H_i, W_i] at strides 16, 8, 4, 2."""
        return [neth(feats[name]) for name, neth in zip(SKIPS, self.neths)]

    def windows(self, hmaps: list[torch.Tensor], idx: torch.Tensor) -> list[torch.Tensor]:
        """Gather, for embedding cells idx int64 [K, 3] (batch, row, col), the window of each
        horizontal map: [K, C_i, f*2^i, f*2^i], zero outside the map."""
        return [gather_windows(h, idx, STRIDE // s, self.cfg.f_sz * (STRIDE // s))
                for h, s in zip(hmaps, SKIP_STRIDES)]

    def masks_at(self, emb: torch.Tensor, hmaps: list[torch.Tensor], idx: torch.Tensor
                 ) -> torch.Tensor:
        """Refined mask logits [K, i_sz, i_sz] for the embedding cells idx [K, 3] only."""
        vecs = emb[idx[:, 0], :, idx[:, 1], idx[:, 2]]
        return self.refine(vecs, self.windows(hmaps, idx))

    # -- the protocol whole-image inference uses (segdist.proposers.dense.pipeline) -----------
    @property
    def mask_size(self) -> int:
        """Side of the mask logits a window yields (i_sz)."""
        return self.cfg.i_sz

    @property
    def activation_bytes_per_px(self) -> int:
        """Trunk working memory plus the horizontal nets' maps (conv1-level dominates), per px."""
        return self.deepmask.activation_bytes_per_px + 160

    @property
    def halo_px(self) -> int:
        """Trunk receptive radius plus the horizontal nets' three 3x3 convs on layer3 (48 px)."""
        return self.deepmask.trunk.resnet.rf_radius + 3 * STRIDE

    @property
    def extras_layout(self) -> tuple[tuple[int, int], ...]:
        """Per horizontal-net map: (cells per embedding cell, window side in cells); the window of
        embedding cell (r, c) is [r*step, r*step + size) x [c*step, c*step + size) (see
        :meth:`windows`)."""
        return tuple((STRIDE // s, self.cfg.f_sz * (STRIDE // s)) for s in SKIP_STRIDES)

    def score_map(self, emb: torch.Tensor) -> torch.Tensor:
        """Embedding map [B, fc_dim, h, w] -> score logits [B, h, w] (DeepMask's score head)."""
        return self.deepmask.score_map(emb)

    def dense(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Padded image(s) [B, 3, H, W] -> (embedding map, the 4 horizontal-net maps)."""
        emb, feats = self.deepmask.trunk.dense(x)
        return emb, self.hmaps(feats)

    def window_masks(self, vecs: torch.Tensor, extras: list[torch.Tensor]) -> torch.Tensor:
        """Embedding vectors [K, fc_dim] + horizontal windows -> mask logits [K, i_sz, i_sz]."""
        return self.refine(vecs, extras)


def gather_windows(fmap: torch.Tensor, idx: torch.Tensor, step: int, size: int) -> torch.Tensor:
    """Square windows of a feature map.

    Args:
        fmap: [B, C, H, W].
        idx: int64 [K, 3] of (batch, row, col) in units of ``step`` cells of ``fmap``.
        step: cells of ``fmap`` per index unit (the window of (r, c) starts at (r*step, c*step)).
        size: window side in cells.
    Returns:
        [K, C, size, size]; cells outside the map are 0.
    """
    b, r, c = idx[:, 0], idx[:, 1] * step, idx[:, 2] * step
    h, w = fmap.shape[-2:]
    need_h = int(r.max().item()) + size - h if len(idx) else 0
    need_w = int(c.max().item()) + size - w if len(idx) else 0
    if need_h > 0 or need_w > 0:
        fmap = F.pad(fmap, (0, max(0, need_w), 0, max(0, need_h)))
    ar = torch.arange(size, device=fmap.device)
    rows = (r[:, None] + ar)[:, :, None]        # K x size x 1
    cols = (c[:, None] + ar)[:, None, :]        # K x 1 x size
    out = fmap.permute(0, 2, 3, 1)[b[:, None, None], rows, cols]  # K x size x size x C
    return out.permute(0, 3, 1, 2).contiguous()


def sharpmask(*, deepmask: DeepMask | None = None, km: int = 32, ks: int = 32,
              trunk: str = "resnet50", **settings) -> SharpMask:
    """An untrained SharpMask refinement on ``deepmask`` (frozen), or on an untrained DeepMask with
    a ``trunk`` ResNet and the other :class:`~segdist.models.deepmask.DeepMaskConfig` ``settings``
    when None. km, ks: channels of the vertical and horizontal paths (multiples of 16, equal)."""
    if deepmask is None:
        from segdist.models.deepmask import deepmask as build_deepmask

        deepmask = build_deepmask(trunk=trunk, **settings)
    return SharpMask(deepmask, km=km, ks=ks)

"""Running an official SAM / SAM 2 network for the automatic mask generator: encode an image, decode
batches of its point prompts, upsample the masks that survive.

The official predictors (``SamPredictor``, ``SAM2ImagePredictor``) return every mask of a batch of
prompts upsampled to full resolution, and the generators filter afterwards. The runners here use the
same official modules and preprocessing on the same batches of prompts, in the same order of
operations (so the numbers are the same), but the predicted IoU comes out of the transformer before
the masks do: the mask upscaling runs only for prompts with at least one mask above
``pred_iou_thresh``, and only those masks are returned and upsampled. The transformer's first
layer does its image-side work once per image, not once per prompt (``transformer``).

Why a batch never mixes images: on CPU a prompt's outputs differ in the last bits with its position
and the batch's size (measured: ~1e-7 in logits and IoU, MKL kernels pick other code paths), so
prompts batched across images would make an image's proposals depend on its neighbours in the
batch. Batches of one image's (crop's) prompts, cut as the official generators cut them, keep the
proposals a function of the image alone.

Conventions: images enter as uint8 H x W x 3 RGB numpy arrays; points as float64 [N, 2] (x, y) in
the image's pixels; low-resolution mask logits leave as float32 [K, 256, 256] (the model's mask
grid); upsampled logits as float32 [R, M, H, W] in the image's pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from segdist.device import autocast
from segdist.proposers.sam.transformer import (Core, attention_core_sam, attention_core_sam2,
                                               two_way_shared_image)


@dataclass
class Encoded:
    """One image (or crop) as the decoder needs it: ``embed`` [1, C, h, w] on the device,
    ``high_res`` (SAM 2: the two finer feature maps, each [1, C', h', w']), the prompt frame
    (``input_size``: the resized image inside the model's square input; SAM only) and the image's
    own size ``hw``."""

    embed: torch.Tensor
    hw: tuple[int, int]
    input_size: tuple[int, int] | None = None
    high_res: tuple[torch.Tensor, ...] = ()


@dataclass
class Decoded:
    """Decoder outputs of a batch of B prompts: ``iou`` float32 [B, M] predicted IoU (M = 3 masks
    per prompt, or 1), ``keep`` bool [B, M] (iou above the threshold), ``low_res`` float32
    [R, M, h, w] logits of the R prompts with a mask kept (``keep.any(1)``, in order), all M masks
    of each: upsampling them in this layout gives the official generators' numbers (the CPU
    bilinear kernel's last bits depend on the number of channels, measured)."""

    iou: torch.Tensor
    keep: torch.Tensor
    low_res: torch.Tensor

    @property
    def kept(self) -> torch.Tensor:
        """bool [R, M]: which masks of the R returned prompts are kept."""
        return self.keep[self.keep.any(1)]


def _hyper_in(decoder: nn.Module, tokens_out: torch.Tensor) -> torch.Tensor:
    """Hypernetwork weights [B, T, C'] of the T mask tokens [B, T, C] of all B prompts (all of
    them, so each MLP runs on the official batch shape)."""
    return torch.stack([decoder.output_hypernetworks_mlps[i](tokens_out[:, i, :])
                        for i in range(decoder.num_mask_tokens)], dim=1)


def _masks(hyper: torch.Tensor, upscaled: torch.Tensor) -> torch.Tensor:
    """Mask logits [r, T, h, w]: per prompt, its T weight vectors [r, T, C'] times its upscaled
    embedding [r, C', h, w] (MaskDecoder.predict_masks' product)."""
    b, c, h, w = upscaled.shape
    return (hyper @ upscaled.view(b, c, h * w)).view(b, hyper.shape[1], h, w)


def _transformer(transformer: nn.Module, core: Core, embed: torch.Tensor, dense: torch.Tensor,
                 pe: torch.Tensor, tokens: torch.Tensor, *, shared: bool, repeat_one: bool
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder's two-way transformer for B prompts of one image: ``embed`` [1, C, h, w],
    ``dense`` [B, C, h, w] (the prompts' dense embeddings), ``pe`` [1, C, h, w], ``tokens``
    [B, T, C] -> (tokens [B, T, C], image tokens [B, h*w, C]).

    The inputs are laid out in memory as the official decoders lay them out, since the kernels'
    last bits depend on it: the image repeated per prompt (contiguous), except SAM 2's decoder,
    which takes the image as it is for a single prompt (``repeat_one=False``; SAM 2's image
    embedding is a channels-last view). When no prompt has a mask input (``shared``) the dense
    embeddings are all the "no mask" one and the first layer's image-side work runs once
    (:func:`~segdist.proposers.sam.transformer.two_way_shared_image`, bit-identical).
    """
    b = len(tokens)
    if shared and b > 1:
        return two_way_shared_image(transformer, core, (embed + dense[:1]).contiguous(),
                                    pe.contiguous(), tokens)
    src = embed + dense if b == 1 and not repeat_one else \
        torch.repeat_interleave(embed, b, dim=0) + dense                  # B x C x h x w
    return transformer(src, torch.repeat_interleave(pe, b, dim=0), tokens)


def _kept(iou: torch.Tensor, iou_thresh: float | None) -> torch.Tensor:
    # the official filter: strictly above the threshold, and none when it is 0
    if iou_thresh is None or iou_thresh <= 0:
        return torch.ones_like(iou, dtype=torch.bool)
    return iou > iou_thresh


class SamRunner:
    """SAM (segment_anything ``Sam``): ResizeLongestSide to 1024, pad, ViT encoder, two-way
    transformer decoder; upsampling as ``Sam.postprocess_masks`` (to the padded input, crop, to
    the image)."""

    generation = "sam"

    def __init__(self, model: nn.Module, *, precision: str = "fp32"):
        from segment_anything.utils.transforms import ResizeLongestSide

        self.model = model
        self.device = model.device
        self.precision = precision
        self.transform = ResizeLongestSide(model.image_encoder.img_size)

    def encode(self, image: np.ndarray) -> Encoded:
        """Embed one uint8 H x W x 3 RGB image (as SamPredictor.set_image)."""
        resized = self.transform.apply_image(image)                       # h' x w' x 3, long side 1024
        x = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()[None]
        with torch.inference_mode(), autocast(self.device, self.precision):
            embed = self.model.image_encoder(self.model.preprocess(x))    # 1 x 256 x 64 x 64
        return Encoded(embed.float(), (image.shape[0], image.shape[1]), tuple(x.shape[-2:]))

    def prompts(self, image: Encoded, points: np.ndarray) -> torch.Tensor:
        """float64 [N, 2] points in the image's pixels -> the model's input frame (float64, as
        the official generator passes them)."""
        return torch.as_tensor(self.transform.apply_coords(points, image.hw), device=self.device)

    def decode(self, image: Encoded, coords: torch.Tensor, *, iou_thresh: float | None,
               multimask: bool = True, mask_input: torch.Tensor | None = None) -> Decoded:
        """Decode B single-point prompts of one image (``coords`` [B, 2] from :meth:`prompts`).
        SAM's generator always asks for the 3 multimask outputs."""
        m = self.model
        md = m.mask_decoder
        b = len(coords)
        labels = torch.ones(b, 1, dtype=torch.int, device=self.device)
        with torch.inference_mode(), autocast(self.device, self.precision):
            sparse, dense = m.prompt_encoder(points=(coords[:, None, :], labels), boxes=None,
                                             masks=mask_input)
            out_tokens = torch.cat([md.iou_token.weight, md.mask_tokens.weight], dim=0)
            tokens = torch.cat((out_tokens.unsqueeze(0).expand(b, -1, -1), sparse), dim=1)
            # B x T x C tokens, B x hw x C image tokens
            hs, src = _transformer(md.transformer, attention_core_sam, image.embed, dense,
                                   m.prompt_encoder.get_dense_pe(), tokens,
                                   shared=mask_input is None, repeat_one=True)
            c, h, w = image.embed.shape[1:]
            iou_all = md.iou_prediction_head(hs[:, 0, :]).float()         # B x 4
            sl = slice(1, None) if multimask else slice(0, 1)
            iou = iou_all[:, sl]
            keep = _kept(iou, iou_thresh)
            rows = keep.any(1)
            hyper = _hyper_in(md, hs[:, 1:1 + md.num_mask_tokens, :])[rows]
            src = src[rows].transpose(1, 2).reshape(-1, c, h, w)
            low = _masks(hyper, md.output_upscaling(src))[:, sl].float()  # r x M x 256 x 256
        return Decoded(iou, keep, low)

    def upsample(self, low_res: torch.Tensor, image: Encoded) -> torch.Tensor:
        """float32 [R, M, H, W] logits in the image's pixels from [R, M, h, w]
        (``Sam.postprocess_masks``)."""
        with torch.inference_mode():
            return self.model.postprocess_masks(low_res, image.input_size, image.hw)


class Sam2Runner:
    """SAM 2 (sam2 ``SAM2Base``): resize to 1024 x 1024, Hiera encoder + FPN neck, the decoder with
    its high-resolution skip features; upsampling as ``SAM2Transforms.postprocess_masks``
    (holes and islands up to ``min_region_area`` pixels filled or removed on the low-resolution
    logits when the sam2 package's CUDA extension is built, as the official generator does)."""

    generation = "sam2"

    def __init__(self, model: nn.Module, *, min_region_area: int = 0, precision: str = "fp32"):
        from sam2.utils.transforms import SAM2Transforms

        self.model = model
        self.device = model.device
        self.precision = precision
        # the official generator's predictor: mask_threshold 0 for the hole filling, whatever
        # the generator's own mask_threshold
        self.transforms = SAM2Transforms(resolution=model.image_size, mask_threshold=0.0,
                                         max_hole_area=min_region_area,
                                         max_sprinkle_area=min_region_area)
        r = model.image_size
        self._feat_sizes = [(r // 4, r // 4), (r // 8, r // 8), (r // 16, r // 16)]

    def encode(self, image: np.ndarray) -> Encoded:
        """Embed one uint8 H x W x 3 RGB image (as SAM2ImagePredictor.set_image)."""
        m = self.model
        x = self.transforms(image)[None].to(self.device)                  # 1 x 3 x 1024 x 1024
        with torch.inference_mode(), autocast(self.device, self.precision):
            backbone = m.forward_image(x)
            _, feats, _, _ = m._prepare_backbone_features(backbone)      # each HW x 1 x C
            if m.directly_add_no_mem_embed:
                feats[-1] = feats[-1] + m.no_mem_embed
            maps = [f.permute(1, 2, 0).view(1, -1, *size)
                    for f, size in zip(feats[::-1], self._feat_sizes[::-1])][::-1]
        return Encoded(maps[-1].float(), (image.shape[0], image.shape[1]),
                       high_res=tuple(t.float() for t in maps[:-1]))

    def prompts(self, image: Encoded, points: np.ndarray) -> torch.Tensor:
        """float64 [N, 2] points in the image's pixels -> float32 model frame (normalised by the
        image size, times the input resolution, as the official generator does)."""
        pts = torch.as_tensor(points, dtype=torch.float32, device=self.device)
        return self.transforms.transform_coords(pts, normalize=True, orig_hw=image.hw)

    def decode(self, image: Encoded, coords: torch.Tensor, *, iou_thresh: float | None,
               multimask: bool = True, mask_input: torch.Tensor | None = None) -> Decoded:
        """Decode B single-point prompts of one image (``coords`` [B, 2] from :meth:`prompts`;
        ``mask_input`` optional float32 [B, 1, 256, 256] low-resolution logits). Single-mask
        output picks, as the official decoder, the best multimask output where the single mask
        is unstable."""
        m = self.model
        md = m.sam_mask_decoder
        b = len(coords)
        labels = torch.ones(b, 1, dtype=torch.int, device=self.device)
        with torch.inference_mode(), autocast(self.device, self.precision):
            sparse, dense = m.sam_prompt_encoder(points=(coords[:, None, :], labels), boxes=None,
                                                 masks=mask_input)
            s = 1 if md.pred_obj_scores else 0
            first = [md.obj_score_token.weight] if s else []
            out_tokens = torch.cat([*first, md.iou_token.weight, md.mask_tokens.weight], dim=0)
            tokens = torch.cat((out_tokens.unsqueeze(0).expand(b, -1, -1), sparse), dim=1)
            hs, src = _transformer(md.transformer, attention_core_sam2, image.embed, dense,
                                   m.sam_prompt_encoder.get_dense_pe(), tokens,
                                   shared=mask_input is None, repeat_one=False)
            c, h, w = image.embed.shape[1:]
            iou_all = md.iou_prediction_head(hs[:, s, :])                 # B x 4
            hyper = _hyper_in(md, hs[:, s + 1:s + 1 + md.num_mask_tokens, :])
            if multimask:
                iou = iou_all[:, 1:].float()
                keep = _kept(iou, iou_thresh)
                rows = keep.any(1)
                masks = self._masks(md, image, hyper[rows], src[rows], (c, h, w))
                return Decoded(iou, keep, masks[:, 1:].float())
            masks = self._masks(md, image, hyper, src, (c, h, w))
            if md.dynamic_multimask_via_stability and not md.training:
                masks, iou = md._dynamic_multimask_via_stability(masks, iou_all)
            else:
                masks, iou = masks[:, 0:1], iou_all[:, 0:1]
            iou = iou.float()
            keep = _kept(iou, iou_thresh)
            return Decoded(iou, keep, masks[keep.any(1)].float())

    @staticmethod
    def _masks(md: nn.Module, image: Encoded, hyper: torch.Tensor, src: torch.Tensor,
               chw: tuple[int, int, int]) -> torch.Tensor:
        """All 4 mask logits [r, 4, 256, 256] of r prompts (``hyper`` [r, 4, C'], ``src`` the
        transformer's image tokens [r, hw, C]): upscaling with the high-resolution skips."""
        c, h, w = chw
        src = src.transpose(1, 2).reshape(-1, c, h, w)
        if md.use_high_res_features:
            s0, s1 = image.high_res
            dc1, ln1, act1, dc2, act2 = md.output_upscaling
            up = act1(ln1(dc1(src) + s1))
            up = act2(dc2(up) + s0)
        else:
            up = md.output_upscaling(src)
        return _masks(hyper, up)

    def upsample(self, low_res: torch.Tensor, image: Encoded) -> torch.Tensor:
        """float32 [R, M, H, W] logits in the image's pixels from [R, M, h, w]
        (``SAM2Transforms.postprocess_masks``)."""
        with torch.inference_mode():
            return self.transforms.postprocess_masks(low_res, image.hw)


def make_runner(generation: str, model: nn.Module, *, min_region_area: int = 0,
                precision: str = "fp32") -> SamRunner | Sam2Runner:
    """The runner of a model generation ("sam" or "sam2") around its official network (on its
    device, eval mode)."""
    if generation == "sam":
        return SamRunner(model, precision=precision)
    return Sam2Runner(model, min_region_area=min_region_area, precision=precision)

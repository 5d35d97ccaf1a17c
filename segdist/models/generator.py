"""The one proposal interface the job calls: ``build_generator(ModelConfig) -> ProposalGenerator``.

A generator is built once (in a Ray actor's constructor) and then called on batches of decoded
images: ``generator(images: list[uint8 H x W x 3 RGB], image_ids) -> list[ImageProposals]``, at most
``cfg.proposals`` per image, sorted by score, boxes COCO xywh inside the image, masks as COCO RLE
(byte-identical to pycocotools) of the image's size.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from segdist.config import ModelConfig
from segdist.errors import ConfigError
from segdist.proposals.types import ImageProposals

log = logging.getLogger(__name__)

DENSE_KINDS = {"deepmask": "deepmask", "sharpmask": "sharpmask"}  # name prefix -> model kind
MASKRCNN = {"maskrcnn": ("v1", "masks"), "maskrcnn-v2": ("v2", "masks"), "maskrcnn-rpn": ("v1", "rpn")}
RANDOM_SEED = 0  # random weights are deterministic: the same config gives the same proposals


def resolve_device(name: str, field: str = "model.device") -> torch.device:
    """"auto" -> cuda when available else cpu; "cuda" without a CUDA device is a ConfigError
    naming the config ``field`` it came from."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{field} is 'cuda' but torch sees no CUDA device; use 'auto' or 'cpu'")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class ProposalGenerator:
    """A loaded proposal model.

    name: the preset (``ModelConfig.name``). weights_sha256: sha256 of the weights file (None for
    random weights). device: where it runs. Call it with decoded images and their ids.
    """

    name: str
    weights_sha256: str | None
    device: torch.device
    # images (uint8 HxWx3) -> per image (scores, boxes xywh, counts or None, labels or None)
    _run: Callable[[Sequence[np.ndarray]], list[tuple]]
    model: torch.nn.Module | None = None

    def __call__(self, images: Sequence[np.ndarray], image_ids: Sequence[int]) -> list[ImageProposals]:
        """Proposals per image, in input order (see the module docstring)."""
        if len(images) != len(image_ids):
            raise ValueError(f"{len(images)} images but {len(image_ids)} image ids")
        for i, im in enumerate(images):
            if not isinstance(im, np.ndarray) or im.dtype != np.uint8 or im.ndim != 3 or im.shape[2] != 3:
                got = f"{im.dtype} {im.shape}" if isinstance(im, np.ndarray) else type(im).__name__
                raise ValueError(f"image {image_ids[i]}: expected uint8 H x W x 3 RGB, got {got}")
        if not images:
            return []
        out = []
        for im, iid, (scores, boxes, counts, labels) in zip(images, image_ids, self._run(images)):
            out.append(ImageProposals(int(iid), int(im.shape[0]), int(im.shape[1]), scores, boxes,
                                      counts, self.name, labels))
        return out


def _precision(cfg: ModelConfig, device: torch.device) -> tuple[str, bool]:
    if device.type != "cuda" and (cfg.precision != "fp32" or cfg.channels_last):
        log.warning("model.precision=%s / channels_last=%s apply on CUDA only; running fp32 on %s",
                    cfg.precision, cfg.channels_last, device)
        return "fp32", False
    return cfg.precision, cfg.channels_last


def _dense_model(cfg: ModelConfig, kind: str):
    """(model, sha256) for a DeepMask/SharpMask preset: a checkpoint, or seeded random weights."""
    from segdist.models.checkpoint import build_model, load_model
    from segdist.models.deepmask import DeepMaskConfig

    if cfg.weights is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)
            model = build_model(kind, DeepMaskConfig(arch=cfg.trunk or "resnet50"))
        return model.eval(), None
    if cfg.weights == "DEFAULT" or ("/" not in cfg.weights and "." not in cfg.weights):
        raise ConfigError(
            f"model.weights={cfg.weights!r}: {cfg.name} has no downloadable weights enum; pass a "
            "segdist checkpoint URI (train one with `segdist train`), the original's model.t7 "
            "(converted on load; `segdist convert-t7` converts it once), or leave it unset for "
            "random weights")
    if cfg.weights.lower().endswith(".t7"):
        # The original's released model.t7 (e.g. its published URL), converted on load.
        from segdist.models.t7 import load_t7

        converted, sha = load_t7(cfg.weights, cfg.storage_options)
        model, loaded_kind, arch = converted.model, converted.kind, converted.settings["arch"]
    else:
        model, info = load_model(cfg.weights, cfg.storage_options)
        loaded_kind, arch, sha = info.kind, info.config.arch, info.sha256
    if loaded_kind != kind:
        if kind == "deepmask" and loaded_kind == "sharpmask":
            log.info("%s: using the DeepMask inside SharpMask checkpoint %s", cfg.name, cfg.weights)
            model = model.deepmask
        else:
            raise ConfigError(f"model.weights {cfg.weights} is a {loaded_kind} checkpoint; the "
                              f"{cfg.name} preset needs a {kind} checkpoint")
    if cfg.trunk is not None and cfg.trunk != arch:
        raise ConfigError(f"model.trunk={cfg.trunk} but checkpoint {cfg.weights} has a "
                          f"{arch} trunk; leave model.trunk unset to use the checkpoint's")
    return model.eval(), sha


def build_generator(cfg: ModelConfig) -> ProposalGenerator:
    """A ready-to-call generator for ``cfg`` (weights loaded, model on its device, eval mode)."""
    from segdist.models import inference

    device = resolve_device(cfg.device)
    precision, channels_last = _precision(cfg, device)
    if cfg.name in MASKRCNN:
        return _build_maskrcnn(cfg, device, precision)
    kind = DENSE_KINDS[cfg.name.split("-")[0]]
    model, sha = _dense_model(cfg, kind)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.scales is not None:
        exps = inference.scale_exponents(cfg.scales.min, cfg.scales.max, cfg.scales.step)
        scales = tuple(2.0 ** e for e in exps)
    else:
        scales = inference.preset_scales(cfg.name)
    settings = inference.InferenceSettings(
        scales=scales, proposals=cfg.proposals, threshold=cfg.threshold, nms=cfg.nms,
        max_image_side=cfg.max_image_side, memory_budget_mb=cfg.memory_budget_mb,
        precision=precision, channels_last=channels_last)

    def run(images: Sequence[np.ndarray]) -> list[tuple]:
        res = inference.propose_images(model, images, settings, device, cfg.batch_size)
        return [(r.scores, r.boxes, r.counts, None) for r in res]

    return ProposalGenerator(cfg.name, sha, device, run, model)


def _build_maskrcnn(cfg: ModelConfig, device: torch.device, precision: str) -> ProposalGenerator:
    from segdist.models.maskrcnn import MaskRCNNProposer, build_maskrcnn

    version, mode = MASKRCNN[cfg.name]
    size = {}
    if cfg.max_image_side:  # torchvision resizes to short side 800, long side <= 1333: cap both
        size = dict(min_size=min(800, cfg.max_image_side), max_size=min(1333, cfg.max_image_side))
    model, sha = build_maskrcnn(version, cfg.weights, proposals=cfg.proposals,
                                storage_options=cfg.storage_options, seed=RANDOM_SEED, **size)
    model = model.to(device)
    proposer = MaskRCNNProposer(model, mode, cfg.proposals, cfg.memory_budget_mb)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def run(images: Sequence[np.ndarray]) -> list[tuple]:
        out = []
        for s in range(0, len(images), cfg.batch_size):
            batch = [torch.from_numpy(np.ascontiguousarray(im)).to(device).permute(2, 0, 1)
                     for im in images[s:s + cfg.batch_size]]
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                res = proposer(batch)
            out.extend((r.scores, r.boxes, r.counts, r.labels) for r in res)
        return out

    return ProposalGenerator(cfg.name, sha, device, run, model)

"""Training samples as the original's DataSampler.lua makes them, over any COCO-format dataset.

Two kinds of samples, each a ``w_sz x w_sz`` window (``w_sz = i_sz + 32``) resized from a square
region of the image, padded with 0.5 outside the image, then normalised with the ImageNet
mean/std (the same preprocessing as whole-image inference):

- **mask samples** (``mask_sample``): a uniformly chosen category, then one of its annotations
  (crowd, area < 100 and box side < 5 rejected). Scale ``s = log2(maxDim / obj_sz) + U(-j, j)``,
  centre shifted by ``U(-shift, shift) * 2^s``, window side ``w_sz * 2^s`` image pixels. The label
  is the object's mask over the central ``i_sz * 2^s`` region, resampled to ``g_sz x g_sz``,
  binarised at 0.5, as +1 (object) / -1 (background).
- **score samples** (``score_sample``): positives are windows centred exactly on an object whose
  longer side, after scaling, is within 2^(+-j) of ``obj_sz``; negatives use an image scale
  ``2^t`` with t in {-3, -2.75, ..., 2} and a uniform position, and are rejected while any object
  whose canonical scale is within 2.5 octaves of ``t`` has its centre within ``3 * shift`` pixels
  of the window centre, **measured at scale t**. (The original compared positions taken at
  different scales in this test; see docs/training.md.)

Both kinds are flipped horizontally with probability 0.5. Every sample is a pure function of the
``numpy.random.Generator`` it is given, so batches are reproducible from (seed, step, rank).
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from pycocotools import mask as mask_utils

from segdist.data.masks import segmentation_to_rle
from segdist.data.records import Dataset
from segdist.errors import SegdistError
from segdist.imageio import DEFAULT_MAX_PIXELS
from segdist.training.crops import crop_resize

log = logging.getLogger(__name__)

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
NEG_SCALES = tuple(-3 + 0.25 * i for i in range(21))  # log2 image scales of negatives: -3 .. 2
MAX_NEG_TRIES = 100  # per image, as the original; then another image is drawn


@dataclass(frozen=True)
class _Object:
    """One annotation, reduced to what the sampler needs."""

    image_index: int  # position in PatchSampler.records
    ann_index: int  # position in PatchSampler.anns
    xc: float  # box centre, pixel-edge coordinates
    yc: float
    max_dim: float  # longer box side, px
    valid: bool  # usable as a mask sample / positive (not crowd, area >= 100, sides >= 5)


def _is_valid(ann: dict) -> bool:
    x, y, w, h = ann["bbox"]
    return not ann.get("iscrowd", 0) and ann.get("area", w * h) >= 100 and w >= 5 and h >= 5


class PatchSampler:
    """DeepMask/SharpMask training samples from a segdist :class:`Dataset`.

    Args:
        dataset: images (``records`` with fsspec URIs) and COCO-format ground truth.
        i_sz: input region side (multiple of 16); windows are ``i_sz + 32``.
        g_sz: label side of mask samples.
        scale_jitter: +- log2 units of scale jitter (original 0.25).
        shift_jitter: +- centre jitter in pixels at the canonical scale (original 16 at i_sz 160).
        image_cache: decoded images kept (LRU) in each process using the sampler.
        max_pixels: the decoder's pixel limit (the dataset config's ``max_pixels``).

    Raises:
        SegdistError: the dataset has no annotation usable for training.
    """

    def __init__(self, dataset: Dataset, *, i_sz: int, g_sz: int, scale_jitter: float = 0.25,
                 shift_jitter: float = 16.0, image_cache: int = 64,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        self.i_sz, self.g_sz = int(i_sz), int(g_sz)
        self.w_sz = self.i_sz + 32
        self.obj_sz = math.ceil(self.i_sz * 128 / 224)
        self.scale_jitter, self.shift = float(scale_jitter), float(shift_jitter)
        self.storage_options = dict(dataset.storage_options or {})
        self.max_pixels = max_pixels
        self.records = list(dataset.images)
        self.dataset_name = dataset.name
        index_of = {r.image_id: i for i, r in enumerate(self.records)}
        self.anns: list[dict] = []
        self.objects: list[_Object] = []
        self.objects_of_image: list[list[_Object]] = [[] for _ in self.records]
        by_cat: dict[int, list[int]] = {}
        for ann in (dataset.coco_gt or {}).get("annotations", []):
            i = index_of.get(ann.get("image_id"))
            if i is None or "bbox" not in ann or "segmentation" not in ann:
                continue
            x, y, w, h = (float(v) for v in ann["bbox"])
            obj = _Object(i, len(self.anns), x + w / 2, y + h / 2, max(w, h), _is_valid(ann))
            self.anns.append(ann)
            self.objects.append(obj)
            self.objects_of_image[i].append(obj)
            if obj.valid:
                by_cat.setdefault(int(ann.get("category_id", 0)), []).append(len(self.objects) - 1)
        # Categories without a usable annotation would make the original loop forever.
        self.valid_by_category = [np.array(v) for _, v in sorted(by_cat.items())]
        self.positive_images = [i for i, objs in enumerate(self.objects_of_image)
                                if any(o.valid for o in objs)]
        if not self.valid_by_category:
            raise SegdistError(
                f"dataset {dataset.name!r} has no annotation usable for training (each needs a "
                "segmentation, iscrowd 0, area >= 100 and box sides >= 5 px); check the annotation "
                "file and the dataset's image list")
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._cache_size = int(image_cache)

    # ---------------------------------------------------------------- images and masks
    def image(self, index: int) -> torch.Tensor:
        """Decoded image ``index`` as uint8 Tensor[3, H, W] (RGB), through a small LRU cache."""
        img = self._cache.get(index)
        if img is not None:
            self._cache.move_to_end(index)
            return img
        from segdist.imageio import read_image  # imported here: loader workers import lazily

        rec = self.records[index]
        arr = read_image(rec.uri, self.storage_options, self.max_pixels)
        if arr.shape[:2] != (rec.height, rec.width):
            raise SegdistError(
                f"image {rec.uri} decodes to {arr.shape[1]}x{arr.shape[0]} but the annotations say "
                f"{rec.width}x{rec.height}; masks would not line up. Fix the annotation file's "
                "width/height (or the image)")
        img = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)  # 3 x H x W view
        if self._cache_size:
            self._cache[index] = img
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return img

    def mask(self, obj: _Object) -> torch.Tensor:
        """Binary mask of ``obj`` as uint8 Tensor[1, H, W] (1 = object) at the image's size."""
        rec = self.records[obj.image_index]
        seg = self.anns[obj.ann_index]["segmentation"]
        rle = segmentation_to_rle(seg, rec.height, rec.width)
        return torch.from_numpy(mask_utils.decode(rle)).unsqueeze(0)

    def _window(self, image_index: int, xc: float, yc: float, side: float) -> torch.Tensor:
        """Normalised float32 Tensor[3, w_sz, w_sz] of the square window centred at (xc, yc)."""
        img = self.image(image_index)
        win = crop_resize(img, xc - side / 2, yc - side / 2, side, self.w_sz, fill=0.5,
                          scale=1 / 255)
        mean = torch.tensor(MEAN).view(3, 1, 1)
        std = torch.tensor(STD).view(3, 1, 1)
        return (win - mean) / std

    # ---------------------------------------------------------------- samples
    def mask_sample(self, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One jittered mask sample.

        Returns:
            input: float32 Tensor[3, w_sz, w_sz], normalised.
            label: float32 Tensor[g_sz, g_sz] of +1 (object) / -1, covering the central i_sz
            region of the window.
        """
        cat = self.valid_by_category[rng.integers(len(self.valid_by_category))]
        obj = self.objects[int(cat[rng.integers(len(cat))])]
        s = math.log2(obj.max_dim / self.obj_sz) + rng.uniform(-self.scale_jitter, self.scale_jitter)
        k = 2.0 ** s  # image pixels per window pixel
        xc = obj.xc + rng.uniform(-self.shift, self.shift) * k
        yc = obj.yc + rng.uniform(-self.shift, self.shift) * k
        inp = self._window(obj.image_index, xc, yc, self.w_sz * k)
        side = self.i_sz * k
        lbl = crop_resize(self.mask(obj), xc - side / 2, yc - side / 2, side, self.g_sz)[0]
        lbl = torch.where(lbl > 0.5, 1.0, -1.0)
        if rng.random() < 0.5:
            inp, lbl = inp.flip(-1), lbl.flip(-1)
        return inp, lbl

    def score_sample(self, rng: np.random.Generator, positive: bool) -> torch.Tensor:
        """One score sample: float32 Tensor[3, w_sz, w_sz], normalised (label is ``positive``)."""
        if positive:
            i = self.positive_images[rng.integers(len(self.positive_images))]
            objs = [o for o in self.objects_of_image[i] if o.valid]
            obj = objs[rng.integers(len(objs))]
            t = math.log2(self.obj_sz / obj.max_dim) + rng.uniform(-self.scale_jitter,
                                                                    self.scale_jitter)
            xc, yc = obj.xc, obj.yc
        else:
            i, xc, yc, t = self._negative(rng)
        inp = self._window(i, xc, yc, self.w_sz / 2.0 ** t)
        if rng.random() < 0.5:
            inp = inp.flip(-1)
        return inp

    def _negative(self, rng: np.random.Generator) -> tuple[int, float, float, float]:
        """(image index, centre x, centre y in image pixels, log2 image scale) of a negative."""
        radius = 3 * self.shift
        for _ in range(100):  # images
            i = int(rng.integers(len(self.records)))
            rec = self.records[i]
            objs = self.objects_of_image[i]
            canon = np.array([math.log2(self.obj_sz / o.max_dim) if o.max_dim > 0 else 0.0
                              for o in objs])
            centres = np.array([(o.xc, o.yc) for o in objs]).reshape(-1, 2)
            for _ in range(MAX_NEG_TRIES):
                t = NEG_SCALES[rng.integers(len(NEG_SCALES))]
                f = 2.0 ** t
                # Uniform position in the image scaled by 2^t, as the original.
                x, y = rng.uniform(0, rec.width * f), rng.uniform(0, rec.height * f)
                near = np.abs(canon - t) <= 2.5
                d = np.hypot(centres[:, 0] * f - x, centres[:, 1] * f - y)
                if not np.any(near & (d < radius)):
                    return i, x / f, y / f, t
        raise SegdistError(
            f"dataset {self.dataset_name!r}: no negative window found in 100 images (objects "
            "centred everywhere at every scale?); score training needs background regions")

    def batch(self, rng: np.random.Generator, head: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of one head's samples.

        Returns:
            inputs: float32 Tensor[B, 3, w_sz, w_sz].
            labels: float32 Tensor[B, g_sz, g_sz] (head "mask") or Tensor[B] of +-1 ("score").
        """
        if head == "mask":
            pairs = [self.mask_sample(rng) for _ in range(size)]
            return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
        positive = rng.random(size) < 0.5
        inputs = torch.stack([self.score_sample(rng, bool(p)) for p in positive])
        return inputs, torch.from_numpy(np.where(positive, 1.0, -1.0).astype(np.float32))


def head_for_step(seed: int, step: int, hfreq: float) -> str:
    """"score" with probability ``hfreq``, else "mask"; the same on every rank for a given step."""
    if hfreq <= 0:
        return "mask"
    return "score" if np.random.default_rng([seed, step, 7]).random() < hfreq else "mask"


def batch_rng(seed: int, step: int, rank: int) -> np.random.Generator:
    """The generator of rank ``rank``'s batch at ``step`` (independent of loader workers)."""
    return np.random.default_rng([seed, step, rank, 1])


class BatchStream(torch.utils.data.IterableDataset):
    """Endless stream of training batches from ``start_step`` on, for a DataLoader(batch_size=None).

    Batch ``step`` of rank ``rank`` is a pure function of (seed, step, rank), so the stream is the
    same whatever the number of loader workers (worker w of n makes steps start + w, start + w + n,
    ...; the DataLoader returns them in order) and a resumed run sees exactly the batches the
    uninterrupted run would have.

    Yields dicts: ``step`` int, ``head`` "mask" | "score", ``inputs`` float32[B, 3, w_sz, w_sz],
    ``labels`` float32[B, g_sz, g_sz] or [B].
    """

    def __init__(self, sampler: PatchSampler, *, batch_size: int, hfreq: float, seed: int,
                 start_step: int = 0, stop_step: int | None = None, rank: int = 0):
        super().__init__()
        self.sampler, self.batch_size, self.hfreq = sampler, batch_size, hfreq
        self.seed, self.start_step, self.stop_step, self.rank = seed, start_step, stop_step, rank

    def make(self, step: int) -> dict:
        head = head_for_step(self.seed, step, self.hfreq)
        inputs, labels = self.sampler.batch(batch_rng(self.seed, step, self.rank), head,
                                            self.batch_size)
        return {"step": step, "head": head, "inputs": inputs, "labels": labels}

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        step = self.start_step + worker
        while self.stop_step is None or step < self.stop_step:
            yield self.make(step)
            step += workers


def loader_worker_init(_: int) -> None:
    """DataLoader worker init: one torch thread per loader process (they only resample images)."""
    torch.set_num_threads(1)

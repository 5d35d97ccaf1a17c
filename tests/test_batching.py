"""Batching does not change results: an image's proposals are byte-identical whatever window, batch,
slab or order it ran in; batches are sized by the memory budget; the tile planner does not tile
a batch that fits untiled at a smaller size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segdist.models.deepmask import DeepMask, DeepMaskConfig
from segdist.models.sharpmask import SharpMask
from segdist.proposers.dense.proposer import DenseProposer
from segdist.proposers.dense.pyramid import plan_tiles, pyramid_levels
from segdist.proposers.dense.settings import InferenceSettings

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZES = [(40, 56), (56, 40), (40, 56), (33, 61), (40, 56)]


def images():
    rng = np.random.default_rng(11)
    return [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in SIZES]


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(3)
    dm = DeepMask(DeepMaskConfig(arch="resnet18")).eval()
    return {"deepmask": dm, "sharpmask": SharpMask(dm).eval()}


def proposer(model, budget_mb=1024, batch_size=8, nms=None):
    settings = InferenceSettings(scales=(0.5, 2.0 ** 0.5), proposals=12, nms=nms,
                                 memory_budget_mb=budget_mb)
    return DenseProposer("test", model, settings, device=torch.device("cpu"),
                         batch_size=batch_size, weights_sha256=None)


def same(a, b) -> bool:
    return (a.image_id == b.image_id and a.counts == b.counts
            and a.scores.tobytes() == b.scores.tobytes() and a.boxes.tobytes() == b.boxes.tobytes())


@pytest.mark.parametrize("which,nms", [("deepmask", None), ("sharpmask", None), ("deepmask", 0.5)])
def test_proposals_do_not_depend_on_the_batch(models, which, nms):
    model, imgs = models[which], images()
    ids = list(range(100, 100 + len(imgs)))
    whole = proposer(model, nms=nms)(imgs, ids)             # one window: batches of 3, 1, 1
    assert [p.image_id for p in whole] == ids
    assert all(len(p) == 12 if nms is None else 0 < len(p) <= 12 for p in whole)
    alone = [proposer(model, nms=nms)([im], [i])[0] for im, i in zip(imgs, ids)]
    # a budget so small that every batch holds one image, slabs hold a few masks and stage 2 runs
    # image by image (SharpMask's larger working set needs 32 MB not to tile); another order
    tiny = proposer(model, budget_mb=16 if which == "deepmask" else 32, batch_size=1,
                    nms=nms)(imgs, ids)
    order = [3, 2, 0, 4, 1]
    shuffled = proposer(model, nms=nms)([imgs[i] for i in order], [ids[i] for i in order])
    for i in range(len(imgs)):
        assert same(whole[i], alone[i]), i
        assert same(whole[i], tiny[i]), i
        assert same(whole[i], shuffled[order.index(i)]), i


def test_batch_size_follows_the_budget(models):
    model = models["deepmask"]
    gen = proposer(model, budget_mb=1024, batch_size=64)
    pad = model.cfg.i_sz // 2
    largest = max((lv.height + 2 * pad) * (lv.width + 2 * pad)
                  for lv in pyramid_levels(480, 640, gen.settings))
    per_image = largest * model.activation_bytes_per_px
    cap = gen.batch_cap(480, 640)
    assert cap == min(64, 1024 * 2 ** 20 // 2 // per_image) and cap > 1
    assert proposer(model, budget_mb=1024, batch_size=3).batch_cap(480, 640) == 3
    # at the chosen batch no level is tiled; at twice the batch the largest one would be
    for lv in pyramid_levels(480, 640, gen.settings):
        assert len(plan_tiles(lv, model, gen.settings, cap)) == 1
    big = max(pyramid_levels(480, 640, gen.settings), key=lambda lv: lv.height)
    assert len(plan_tiles(big, model, gen.settings, 2 * cap + 2)) > 1


class _Recording:
    """A proposer that records the windows the worker hands it (sizes), then runs the real one."""

    def __init__(self, real):
        self.real, self.calls = real, []
        self.name, self.weights_sha256, self.device = real.name, real.weights_sha256, real.device

    def __call__(self, images, image_ids):
        self.calls.append([im.nbytes for im in images])
        return self.real(images, image_ids)


def test_worker_hands_windows_bounded_by_the_budget(tmp_path, models):
    from PIL import Image

    from segdist.config import model_config
    from segdist.data.records import ImageRecord
    from segdist.job.worker import ChunkWorker, WorkerSettings, window_budget
    import pyarrow.parquet as pq

    from segdist.proposals.parquet import from_table, images_from_metadata

    rng = np.random.default_rng(5)
    records = []
    for i, (h, w) in enumerate([(40, 56), (600, 800), (56, 40), (600, 800), (600, 800), (33, 61)]):
        path = tmp_path / f"im{i}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        records.append(ImageRecord(10 + i, path.name, str(path), h, w))
    cfg = model_config(name="deepmask", trunk="resnet18", proposals=5, device="cpu",
                       memory_budget_mb=16, scales={"min": -4.0, "max": -3.5, "step": 0.5})
    recording = []

    def builder(c):
        from segdist.proposers import build_proposer
        recording.append(_Recording(build_proposer(c)))
        return recording[-1]

    worker = ChunkWorker(WorkerSettings(model=cfg, builder=builder, out_uri=str(tmp_path / "out"),
                                        formats=("parquet",), decode_threads=2))
    rec = worker.process_chunk(0, records)
    assert rec.image_ids == [r.image_id for r in records]
    calls = recording[0].calls
    limit = window_budget(16)
    assert len(calls) > 1 and sum(map(len, calls)) == len(records)
    # every window holds less than the byte budget before its last image
    assert all(sum(c[:-1]) < limit for c in calls)
    # the chunk equals the proposer's output for each image alone (the window does not matter)
    table = pq.read_table(tmp_path / "out" / "parquet" / "chunk-000000.parquet")
    entries = images_from_metadata(table.schema.metadata, "chunk")
    got = {p.image_id: p for p in from_table(table, entries)}
    real = recording[0].real
    for r in records:
        alone = real([np.asarray(Image.open(r.uri).convert("RGB"))], [r.image_id])[0]
        assert same(got[r.image_id], alone)


def test_scores_do_not_depend_on_the_position_in_the_window(tmp_path):
    # Images of distinct sizes (the job test's synthetic set): every window puts an image's
    # logits at another offset of the window's arrays; elementwise kernels with a vectorised body
    # and a scalar tail (sigmoid) gave last-bit differences there (a regression).
    from segdist.config import model_config
    from segdist.data.synthetic import make_synthetic
    from segdist.imageio import read_image
    from segdist.proposers import build_proposer

    make_synthetic(str(tmp_path), 8, seed=5, min_side=48, max_side=96, max_objects=3)
    files = sorted((tmp_path / "images").iterdir())
    imgs = [read_image(str(f)) for f in files]
    gen = build_proposer(model_config(name="deepmask", trunk="resnet18", proposals=12, device="cpu",
                                      scales={"min": -1.0, "max": 0.0, "step": 1.0}, batch_size=2))
    ids = list(range(8))
    windows = gen(imgs[:4], ids[:4]) + gen(imgs[4:], ids[4:])
    pairs = [p for s in range(0, 8, 2) for p in gen(imgs[s:s + 2], ids[s:s + 2])]
    assert len({im.shape for im in imgs}) == 8
    for a, b in zip(windows, pairs):
        assert same(a, b), a.image_id

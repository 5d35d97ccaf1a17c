"""The proposer registry: its API, a proposer registered here running through the real Ray job,
the sliding-window baseline (grid, masks, ``segdist generate`` + ``segdist evaluate``), and a resume
after changing only execution settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import pytest
import yaml
from pycocotools import mask as mask_utils

from segdist.config import ModelConfig, model_config
from segdist.errors import SegdistError
from segdist.job.driver import run_job
from segdist.proposals.store import open_proposals
from segdist.proposals.types import ImageProposals
from segdist.proposers import PROPOSERS, Proposer, build_proposer, config_class
from test_job import ROOT, job_config, make_data, mtimes, pycocotools_segm_stats, read_tree

PRESETS = ["deepmask", "sharpmask", "deepmask-zoom", "sharpmask-zoom", "deepmask-zoom2",
           "sharpmask-zoom2", "maskrcnn", "maskrcnn-v2", "maskrcnn-rpn"]


# -------------------------------------------------------------------------------------------------
# A toy proposer, defined and registered here only. The job's workers are other processes: they
# build it from the builder the driver ships with their settings (they import this module, as a
# user's workers import the package that holds their proposer).


class QuadrantsConfig(ModelConfig):
    """Two proposals per image: the top-left and the bottom-right ``fraction`` of it."""

    FAMILY: ClassVar[str] = "quadrants"
    WEIGHT_KINDS: ClassVar[tuple[str, ...]] = ("random",)

    name: Literal["toy-quadrants"] = "toy-quadrants"
    fraction: float = 0.5


class Quadrants:
    weights_sha256 = None
    device = "cpu"

    def __init__(self, name: str, fraction: float):
        self.name, self.fraction = name, fraction

    def __call__(self, images: Sequence[np.ndarray], image_ids: Sequence[int]) -> list[ImageProposals]:
        from segdist.proposals.rle import encode_boxes

        out = []
        for im, iid in zip(images, image_ids):
            h, w = im.shape[:2]
            bh, bw = max(1, round(h * self.fraction)), max(1, round(w * self.fraction))
            boxes = np.array([[0, 0, bw, bh], [w - bw, h - bh, w, h]])
            xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1)
            out.append(ImageProposals(int(iid), h, w, [0.9, 0.4], xywh,
                                      encode_boxes(boxes, h, w), self.name))
        return out


def build_quadrants(config: QuadrantsConfig) -> Quadrants:
    return Quadrants(config.name, config.fraction)


SAM_PRESETS = ["sam-vit-b", "sam-vit-l", "sam-vit-h", "sam2-hiera-t", "sam2-hiera-s",
               "sam2-hiera-b+", "sam2-hiera-l", "sam2.1-hiera-t", "sam2.1-hiera-s",
               "sam2.1-hiera-b+", "sam2.1-hiera-l"]


def test_registry_api_and_presets():
    assert set(PROPOSERS) == {*PRESETS, "sliding-window", *SAM_PRESETS}
    for name in PRESETS:
        assert config_class(name).FAMILY in ("DeepMask/SharpMask", "Mask R-CNN")
    for name in SAM_PRESETS:
        assert config_class(name).FAMILY in ("Segment Anything", "Segment Anything 2")
    proposer = build_proposer(model_config(name="sliding-window", proposals=5))
    assert isinstance(proposer, Proposer) and proposer.name == "sliding-window"
    assert proposer.weights_sha256 is None and proposer.device == "cpu"


def test_importing_the_registry_and_validating_a_config_load_no_torch():
    code = ("import sys; from segdist.proposers import PROPOSERS; from segdist.config import "
            "model_config; model_config(name='maskrcnn', weights='DEFAULT'); "
            "model_config(name='sharpmask-zoom', trunk='resnet18', scales={'max': 0.5}); "
            "model_config(name='sam2-hiera-t', points_per_side=8); "
            "print(sorted(m for m in ('torch', 'torchvision', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_a_proposer_registered_in_the_test_runs_through_the_job(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.setitem(PROPOSERS, "toy-quadrants", build_quadrants)
    data = make_data(str(tmp_path / "data"), 6)
    out = str(tmp_path / "out")
    cfg = job_config(data, out, model={"name": "toy-quadrants", "fraction": 0.25})
    assert type(cfg.model) is QuadrantsConfig  # its own fields, validated like a built-in's

    result = run_job(cfg, progress=False)

    assert result.complete and result.chunks_written == 2 and result.proposals == 12
    manifest = json.loads(Path(out, "manifest.json").read_text())
    assert manifest["model"]["name"] == "toy-quadrants"
    assert json.loads(Path(out, "_segdist", "run.json").read_text())["settings"]["model"]["fraction"] == 0.25
    gt = {im["id"]: im for im in json.loads(Path(data["annotations"]).read_text())["images"]}
    store = open_proposals(out)
    assert store.image_ids() == sorted(gt)
    for p in store.iter_images():
        h, w = gt[p.image_id]["height"], gt[p.image_id]["width"]
        bh, bw = max(1, round(h * 0.25)), max(1, round(w * 0.25))
        masks = mask_utils.decode(p.rles())
        assert masks[:bh, :bw, 0].all() and masks[..., 0].sum() == bh * bw
        assert masks[h - bh:, w - bw:, 1].all() and masks[..., 1].sum() == bh * bw
        assert np.array_equal(p.scores, np.float32([0.9, 0.4])) and p.model == "toy-quadrants"


# -------------------------------------------------------------------------------------------------
# A proposer another installed package publishes as a ``segdist.proposers`` entry point


def installed_plugin(root: Path, entries: dict[str, str]) -> Path:
    """What installing a package that publishes ``entries`` leaves on its path: a dist-info with
    its METADATA and entry_points.txt (the builders' modules are found on the path as they are)."""
    info = root / "toyplug-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toyplug\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[segdist.proposers]\n" + "".join(f"{k} = {v}\n" for k, v in entries.items()))
    return root


def test_an_installed_plugin_runs_from_the_cli_and_a_broken_one_says_what_to_fix(tmp_path):
    from PIL import Image

    root = installed_plugin(tmp_path / "site", {"toy-quadrants": "test_proposers:build_quadrants",
                                                "toy-broken": "no_such_package.proposer:build",
                                                "deepmask": "test_proposers:build_quadrants"})
    image = tmp_path / "photo.png"
    Image.fromarray(np.full((40, 60, 3), 90, np.uint8)).save(image)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(root), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}

    def show(*args):
        return subprocess.run([sys.executable, "-m", "segdist", "show", str(image), *args],
                              cwd=ROOT, env=env, capture_output=True, text=True)

    out = tmp_path / "overlay.png"
    ok = show("--model", "toy-quadrants", "--set", "fraction=0.25", "--out", str(out))
    assert ok.returncode == 0, ok.stderr
    assert f"{out}: 2 proposals of toy-quadrants drawn over" in ok.stdout
    drawn = np.asarray(Image.open(out).convert("RGB"))
    assert drawn.shape == (40, 60, 3) and (drawn[:10, :15] != 90).any()  # the top-left quarter
    bad = show("--model", "toy-quadrants", "--set", "no_such=1")
    assert bad.returncode == 2 and "model.no_such" in bad.stderr
    broken = show("--model", "toy-broken")
    assert broken.returncode == 2 and "Traceback" not in broken.stderr
    assert "proposer 'toy-broken': cannot import its builder no_such_package.proposer:build" \
        in broken.stderr and "install or fix the package" in broken.stderr
    # a built-in name stays the built-in's (the entry point is skipped, with a warning)
    code = ("from segdist.proposers import PROPOSERS, PluginBuilder; "
            "print(type(PROPOSERS['deepmask']).__name__, sorted(n for n, b in PROPOSERS.items() "
            "if isinstance(b, PluginBuilder)))")
    listed = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                            text=True, check=True)
    assert listed.stdout.split("\n")[0] == "function ['toy-broken', 'toy-quadrants']"
    assert "entry point deepmask = test_proposers:build_quadrants" in listed.stderr


def test_a_plugin_proposer_runs_through_the_job(ray_cluster, tmp_path, monkeypatch):
    """The driver ships the plugin's builder as its entry point (two strings); each worker imports
    the module itself."""
    import pickle

    from segdist.proposers import PluginBuilder, load_plugins

    monkeypatch.syspath_prepend(str(installed_plugin(
        tmp_path / "site", {"toy-quadrants": "test_proposers:build_quadrants"})))
    assert load_plugins() == ["toy-quadrants"]
    try:
        builder = PROPOSERS["toy-quadrants"]
        assert isinstance(builder, PluginBuilder) and config_class("toy-quadrants") is QuadrantsConfig
        assert pickle.loads(pickle.dumps(builder)).__getstate__() == \
            {"name": "toy-quadrants", "value": "test_proposers:build_quadrants", "_builder": None}
        data = make_data(str(tmp_path / "data"), 3)
        out = str(tmp_path / "out")
        result = run_job(job_config(data, out, model={"name": "toy-quadrants", "fraction": 0.5}),
                         progress=False)
        assert result.complete and result.proposals == 6
        for p in open_proposals(out).iter_images():
            assert p.model == "toy-quadrants" and np.array_equal(p.scores, np.float32([0.9, 0.4]))
            assert p.boxes[0].tolist() == [0, 0, round(p.width * 0.5), round(p.height * 0.5)]
    finally:
        PROPOSERS.pop("toy-quadrants", None)


# -------------------------------------------------------------------------------------------------
# The sliding-window baseline


def test_sliding_window_grid_ranks_centre_first_and_masks_are_the_boxes():
    one = build_proposer(model_config(name="sliding-window", sizes=[0.5], aspect_ratios=[1.0],
                                      stride=0.5, proposals=100))
    img = np.zeros((100, 100, 3), np.uint8)
    (p,) = one([img], [7])
    # 50 x 50 windows every 25 px: the centre, then the edges' middles, then the corners
    assert p.boxes.tolist() == [[25, 25, 50, 50], [25, 0, 50, 50], [0, 25, 50, 50], [50, 25, 50, 50],
                                [25, 50, 50, 50], [0, 0, 50, 50], [50, 0, 50, 50], [0, 50, 50, 50],
                                [50, 50, 50, 50]]
    assert np.array_equal(p.scores, ((9 - np.arange(9)) / 9).astype(np.float32))
    assert np.array_equal(mask_utils.toBbox(p.rles()), p.boxes)
    assert (mask_utils.area(p.rles()) == 2500).all()
    # families alternate: the first window of each size, then the second, ...; k cuts the tail
    two = build_proposer(model_config(name="sliding-window", sizes=[0.5, 1.0], aspect_ratios=[1.0],
                                      proposals=3))
    (q,) = two([img, img[:, :60]], [1, 2])[:1]
    assert q.boxes.tolist() == [[25, 25, 50, 50], [0, 0, 100, 100], [25, 0, 50, 50]]


def test_sliding_window_on_any_image_size():
    gen = build_proposer(model_config(name="sliding-window", proposals=300))
    rng = np.random.default_rng(0)
    sizes = [(1, 1), (3, 200), (480, 640), (37, 53)]
    out = gen([rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in sizes], [1, 2, 3, 4])
    for p, (h, w) in zip(out, sizes):
        assert 1 <= len(p) <= 300 and np.all(np.diff(p.scores) < 0) and p.scores[0] == 1
        x, y, bw, bh = p.boxes.T
        assert np.all((x >= 0) & (y >= 0) & (bw >= 1) & (bh >= 1) & (x + bw <= w) & (y + bh <= h))
        assert len(np.unique(p.boxes, axis=0)) == len(p)  # no duplicates
        assert np.array_equal(mask_utils.toBbox(p.rles()).astype(np.float32), p.boxes)
    assert len(out[2]) == 300
    (again,) = gen([np.zeros((480, 640, 3), np.uint8)], [3])  # only the size matters
    assert again.equals(out[2])


def test_sliding_window_generate_and_evaluate_from_the_command_line(ray_cluster, tmp_path):

    from segdist.cli import main

    data = make_data(str(tmp_path / "data"), 8)
    out = tmp_path / "out"
    config = tmp_path / "sliding.yaml"
    config.write_text(yaml.safe_dump({
        "dataset": data, "model": {"name": "sliding-window", "proposals": 200, "device": "cpu"},
        "output": {"uri": str(out), "chunk_size": 4},
        "resources": {"num_workers": 1, "decode_threads": 2}}))

    assert main(["generate", str(config), "--no-progress"]) == 0
    assert main(["evaluate", "--proposals", str(out), "--dataset", str(config), "--no-progress"]) == 0

    (run,) = json.loads((out / "eval" / "eval.json").read_text())["runs"]
    # the same numbers as one pycocotools COCOeval over the proposals the job wrote
    props = list(open_proposals(str(out)).iter_images())
    assert len(props) == 8 and all(len(p) == 200 for p in props)
    stats = pycocotools_segm_stats(data["annotations"], props)
    assert run["segm"]["metrics"]["AR@100"] == pytest.approx(stats[7], abs=1e-12)
    assert run["segm"]["metrics"]["AR@100"] > 0.05  # a baseline, but it does find the shapes


def test_resume_after_changing_only_execution_settings(ray_cluster, tmp_path):
    data = make_data(str(tmp_path / "data"), 12)
    out = str(tmp_path / "out")
    model = {"name": "sliding-window", "proposals": 50, "device": "cpu", "batch_size": 2,
             "memory_budget_mb": 64}
    assert run_job(job_config(data, out, model=model), progress=False).complete
    first = read_tree(out)
    Path(out, "_segdist", "chunks", "chunk-000001.json").unlink()  # as if interrupted there
    before = mtimes(out)

    moved = {**model, "device": "auto", "batch_size": 8, "memory_budget_mb": 512}
    again = run_job(job_config(data, out, model=moved), progress=False)

    assert again.complete and again.written_chunks == [1] and again.chunks_skipped == 2
    assert read_tree(out) == first
    after = mtimes(out)
    kept = [k for k in before if "chunk-" in k and "chunk-000001" not in k]
    assert kept and all(after[k] == before[k] for k in kept)  # the other chunks: not rewritten
    # an output setting is not execution-only: refused, naming it
    with pytest.raises(SegdistError, match=r"model.stride: 0.5 -> 0.25"):
        run_job(job_config(data, out, model={**model, "stride": 0.25}), progress=False)

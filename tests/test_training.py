"""Training: it learns, resumes exactly, keeps a frozen DeepMask frozen; config defaults/errors."""

from __future__ import annotations

import json

import pytest
import torch

from segdist.config import validate
from segdist.data.synthetic import make_synthetic
from segdist.errors import ConfigError
from segdist.models.checkpoint import load_model, save_checkpoint
from segdist.models.deepmask import DeepMask, DeepMaskConfig
from segdist.models.weights import read_state_dict
from segdist.training.config import TrainConfig
from segdist.training.patch_eval import evaluate_patches
from segdist.training.trainer import fit, initial_model, make_sampler


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """A small synthetic COCO dataset (train + held-out val) of small images."""
    root = tmp_path_factory.mktemp("shapes")
    info = make_synthetic(str(root), 24, seed=3, min_side=96, max_side=128, min_objects=1,
                          max_objects=3, crowd_prob=0.0, val_fraction=0.25)
    split = {k: {"format": "coco", "annotations": info["annotations"][k], "images": info["images"]}
             for k in ("train", "val")}
    return split


def _cfg(shapes, out, **over) -> TrainConfig:
    raw = {
        "model": {"arch": "deepmask", "trunk": "resnet18", "i_sz": 32, "o_sz": 16},
        "data": {"train": shapes["train"], "val": None, "loader_workers": 0},
        "optim": {"batch_size": 8, "steps_per_epoch": 3, "epochs": 2,
                  "lr_schedule": [[1, 0.01], [2, 0.005]]},
        "eval": {"patches": 48, "batch_size": 48, "every_epochs": 1},
        "output": {"uri": str(out)},
        # One thread: on a shared, busy CPU two torch threads per process run many times slower.
        "resources": {"torch_threads": 1},
        "seed": 5, "log_every": 1000,
    }
    for dotted, value in over.items():
        cur = raw
        keys = dotted.split("__")
        for k in keys[:-1]:
            cur = cur.setdefault(k, {})
        cur[keys[-1]] = value
    return validate(TrainConfig, raw)


def test_defaults_follow_the_original_and_scale_with_i_sz():
    data = {"train": {"format": "coco", "annotations": "a.json", "images": "im"}}
    dm = validate(TrainConfig, {"data": data, "output": {"uri": "o"}})
    assert (dm.data.g_sz, dm.w_sz, dm.obj_sz, dm.data.shift_jitter) == (112, 192, 92, 16.0)
    assert (dm.optim.batch_size, dm.optim.steps_per_epoch, dm.optim.epochs) == (32, 4000, 300)
    assert (dm.optim.hfreq, dm.optim.momentum, dm.optim.weight_decay) == (0.5, 0.9, 5e-4)
    assert dm.optim.lr_schedule == [(1, 1e-3), (51, 5e-4), (121, 1e-4)]
    sm = validate(TrainConfig, {"model": {"arch": "sharpmask", "deepmask": "dm.safetensors"},
                                "data": data, "output": {"uri": "o"}})
    assert (sm.data.g_sz, sm.optim.hfreq, sm.optim.momentum, sm.optim.weight_decay) == (160, 0, 0, 0)
    assert sm.optim.lr_schedule == [(1, 1e-3), (51, 5e-4), (81, 1e-4)]
    small = validate(TrainConfig, {"model": {"i_sz": 64}, "data": data, "output": {"uri": "o"}})
    assert (small.data.g_sz, small.obj_sz, small.data.shift_jitter) == (45, 37, 6.4)


@pytest.mark.parametrize("raw, message", [
    ({"model": {"i_sz": 100}}, "multiple of 16"),
    ({"model": {"arch": "sharpmask"}}, "model.deepmask"),
    ({"optim": {"lr_schedule": [[2, 0.1]]}}, "start at epoch 1"),
    ({"optim": {"lr_schedule": [[1, 0.1], [1, 0.2]]}}, "increase strictly"),
    ({"optim": {"hfreq": 1.5}}, "optim.hfreq"),
])
def test_config_errors_name_the_field(raw, message):
    base = {"data": {"train": {"format": "coco", "annotations": "a.json", "images": "im"}},
            "output": {"uri": "o"}}
    with pytest.raises(ConfigError, match=message):
        validate(TrainConfig, {**base, **raw})


def test_loss_decreases_and_patch_iou_rises(shapes, tmp_path):
    cfg = _cfg(shapes, tmp_path / "run", optim__steps_per_epoch=15, optim__hfreq=0.2,
               optim__lr_schedule=[[1, 0.01]], data__val=shapes["val"])
    before = evaluate_patches(initial_model(cfg), make_sampler(cfg.data.val, cfg), patches=48,
                              batch_size=48, seed=cfg.eval.seed)
    result = fit(cfg)
    assert result.step == 30
    first, last = result.history
    assert last["mask_loss"] < 0.8 * first["mask_loss"], result.history
    after = last["patch"]
    assert after["mean_iou"] > before.mean_iou + 0.1, (before, after)
    assert after["iou50"] > before.iou50
    # The best model by the IoU >= .7 share is kept, with its numbers.
    best = json.loads((tmp_path / "run" / "best.json").read_text())
    assert best["patch"]["iou70"] == max(r["patch"]["iou70"] for r in result.history)
    model, info = load_model(str(tmp_path / "run" / "best.safetensors"))
    assert info.kind == "deepmask" and info.config.i_sz == 32
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [15, 30]


def test_resumed_run_takes_the_same_steps_as_an_uninterrupted_one(shapes, tmp_path):
    straight = fit(_cfg(shapes, tmp_path / "a", optim__hfreq=0.5, output__checkpoint_every=1))
    cfg_b = _cfg(shapes, tmp_path / "b", optim__hfreq=0.5, output__checkpoint_every=1)
    stopped = fit(cfg_b, stop_at_step=4)
    assert stopped.step == 4 and stopped.final_model is None
    last = json.loads((tmp_path / "b" / "last.json").read_text())
    assert last["step"] == 4
    resumed = fit(cfg_b)  # a new process would do exactly this: read last.json and go on
    assert resumed.step == straight.step == 6
    # Both heads ran (so both momentum buffers and the dropout RNG were exercised).
    assert sum(r["score_batches"] for r in straight.history) > 0
    assert sum(r["mask_batches"] for r in straight.history) > 0
    a, _ = read_state_dict(straight.final_model)
    b, _ = read_state_dict(resumed.final_model)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].double(), b[k].double(), rtol=0, atol=1e-6), k
    # The optimizer state (momentum) was restored too: the histories after resuming agree.
    assert [r["mask_loss"] for r in straight.history[4:]] == pytest.approx(
        [r["mask_loss"] for r in resumed.history[4:]], abs=1e-6)
    # Only `keep` step checkpoints remain.
    assert len(list((tmp_path / "b" / "checkpoints").glob("*.safetensors"))) == 2


def test_sharpmask_training_leaves_every_deepmask_tensor_unchanged(shapes, tmp_path):
    torch.manual_seed(0)
    deepmask = DeepMask(DeepMaskConfig(arch="resnet18", i_sz=32, o_sz=16))
    dm_uri = str(tmp_path / "dm.safetensors")
    save_checkpoint(deepmask, dm_uri)
    before, _ = read_state_dict(dm_uri)
    cfg = _cfg(shapes, tmp_path / "sm", model__arch="sharpmask", model__deepmask=dm_uri,
               optim__lr_schedule=[[1, 0.05]], optim__momentum=0.9)
    assert cfg.optim.hfreq == 0 and cfg.data.g_sz == 32
    result = fit(cfg)
    after, _ = read_state_dict(result.final_model)
    dm_keys = [k for k in after if k.startswith("deepmask.")]
    assert {k[len("deepmask."):] for k in dm_keys} == set(before)  # params and BN buffers
    for k in dm_keys:
        assert torch.equal(after[k], before[k[len("deepmask."):]]), k
    sm0 = initial_model(cfg).state_dict()
    changed = [k for k in after if not k.startswith("deepmask.") and not torch.equal(after[k], sm0[k])]
    assert changed, "the refinement modules did not learn"


@pytest.mark.parametrize("name", ["train-deepmask", "train-sharpmask", "train-synthetic"])
def test_shipped_train_configs_validate(name):
    from pathlib import Path

    from segdist.config import load_config

    path = Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml"
    cfg = load_config(TrainConfig, str(path))
    if name != "train-synthetic":  # the original's settings
        assert (cfg.model.i_sz, cfg.optim.batch_size, cfg.optim.steps_per_epoch) == (160, 32, 4000)
        assert cfg.data.g_sz == (112 if name == "train-deepmask" else 160)

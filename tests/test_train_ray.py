"""Ray Train: two CPU workers (DDP over gloo) train and checkpoint to s3:// on the loopback server."""

from __future__ import annotations

import json

import pytest
import torch

from segdist.config import validate
from segdist.data.synthetic import make_synthetic
from segdist.errors import ConfigError, StorageError
from segdist.models.checkpoint import load_model
from segdist.storage import read_bytes
from segdist.training.config import TrainConfig
from segdist.training.distributed import _user_error, train_on_ray
from segdist.training.trainer import fit


def _config(bucket: str, so: dict, info: dict, tmp_path, **extra) -> TrainConfig:
    def split(name):
        return {"format": "coco", "annotations": info["annotations"][name],
                "images": info["images"], "storage_options": so}

    raw = {
        "model": {"arch": "deepmask", "trunk": "resnet18", "i_sz": 32, "o_sz": 16},
        "data": {"train": split("train"), "val": split("val"), "loader_workers": 0},
        "optim": {"batch_size": 4, "steps_per_epoch": 2, "epochs": 2,
                  "lr_schedule": [[1, 0.01]]},
        "eval": {"patches": 16, "batch_size": 16, "every_epochs": 1},
        "output": {"uri": f"s3://{bucket}/runs/dm", "storage_options": so},
        "resources": {"workers": 2, "cpus_per_worker": 1, "torch_threads": 1,
                      "ray_storage": str(tmp_path / "ray")},
        "seed": 2,
    }
    raw.update(extra)
    return validate(TrainConfig, raw)


def test_two_workers_train_and_checkpoint_to_s3_then_resume_from_there(ray_cluster, s3_bucket, tmp_path):
    bucket, so = s3_bucket
    # The session's Ray cluster may have started before the S3 server set the AWS_* environment,
    # so the workers get the (dummy) credentials through the storage options.
    so = {**so, "key": "testing", "secret": "testing"}
    info = make_synthetic(f"s3://{bucket}/data", 12, seed=4, min_side=96, max_side=128,
                          max_objects=3, crowd_prob=0.0, val_fraction=0.25, storage_options=so)
    cfg = _config(bucket, so, info, tmp_path)

    summary = train_on_ray(cfg, stop_at_step=2)  # 2 of 4 steps, as if interrupted
    assert summary["step"] == 2
    out = f"s3://{bucket}/runs/dm"
    history = [json.loads(x) for x in read_bytes(f"{out}/metrics.jsonl", so).decode().splitlines()]
    assert [r["step"] for r in history] == [2]
    assert history[0]["world_size"] == 2  # both DDP ranks took part
    assert 0.0 <= history[0]["patch"]["mean_iou"] <= 1.0
    model, meta = load_model(f"{out}/checkpoints/step-00000002.safetensors", so)
    assert meta.kind == "deepmask" and meta.extra["step"] == "2"

    # Resume from the s3:// checkpoint (here in this process, with one worker) and finish.
    resumed = fit(cfg.model_copy(update={"resources": cfg.resources.model_copy(
        update={"workers": 1})}))
    assert resumed.step == 4
    last = json.loads(read_bytes(f"{out}/last.json", so))
    assert last["step"] == 4
    assert [r["world_size"] for r in resumed.history] == [2, 1]
    final, _ = load_model(f"{out}/final.safetensors", so)
    changed = [k for k, v in final.state_dict().items()
               if v.is_floating_point() and not torch.equal(v, model.state_dict()[k])]
    assert changed  # steps 3-4 trained on from the step-2 weights
    best = json.loads(read_bytes(f"{out}/best.json", so))
    assert best["patch"]["iou70"] == max(r["patch"]["iou70"] for r in resumed.history)


def test_unreadable_inputs_fail_before_any_worker_starts(tmp_path):
    cfg = validate(TrainConfig, {
        "model": {"trunk": "resnet18", "i_sz": 32},
        "data": {"train": {"format": "coco", "annotations": str(tmp_path / "missing.json"),
                           "images": str(tmp_path)}},
        "optim": {"batch_size": 2, "steps_per_epoch": 1, "epochs": 1},
        "output": {"uri": str(tmp_path / "out")},
    })
    with pytest.raises(StorageError, match="data.train: .*missing.json does not exist"):
        train_on_ray(cfg)


def test_a_worker_user_error_is_found_inside_rays_wrapping():
    from ray.train.v2.api.exceptions import WorkerGroupError

    inner = ConfigError("model.deepmask is not a DeepMask checkpoint")
    wrapped = WorkerGroupError("rank 0 failed", {0: RuntimeError("x"), 1: inner})
    assert _user_error(wrapped) is inner
    assert _user_error(WorkerGroupError("oom", {0: MemoryError()})) is None

"""The shared core: the install gives working torchvision ops, configs validate with clear errors,
overrides apply, secrets are redacted, and the CLI turns user errors into one message."""

from __future__ import annotations

import subprocess
import sys

import pytest

from segdist.config import JobConfig, apply_overrides, load_config, public_dict, validate
from segdist.errors import ConfigError


def test_torchvision_ops_load_and_run():
    # The registry's torchvision is a CUDA build whose C++ ops load only against the matching torch;
    # with the wrong torch, importing torchvision fails ("operator torchvision::nms does not exist").
    import torch
    import torchvision

    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], dtype=torch.float32)
    keep = torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5)
    assert keep.tolist() == [0, 2]
    rois = torchvision.ops.roi_align(torch.ones(1, 1, 8, 8), [torch.tensor([[1.0, 1.0, 5.0, 5.0]])], output_size=2)
    assert rois.shape == (1, 1, 2, 2) and torch.allclose(rois, torch.ones_like(rois))


BASE = {
    "dataset": {"format": "coco", "annotations": "/data/ann.json", "images": "/data/images"},
    "output": {"uri": "/tmp/out"},
}


def test_defaults_are_the_papers():
    cfg = validate(JobConfig, BASE)
    assert cfg.model.proposals == 1000
    assert cfg.output.chunk_size == 500
    assert cfg.model.threshold == pytest.approx(0.2)
    assert cfg.output.formats == ["coco-json", "parquet"]


def test_error_names_field_value_and_allowed_values():
    raw = apply_overrides(BASE, ["model.name=deepmsk"])
    with pytest.raises(ConfigError) as info:
        validate(JobConfig, raw, "run.yaml")
    msg = str(info.value)
    assert "model.name" in msg and "deepmsk" in msg and "sharpmask-zoom" in msg and "run.yaml" in msg


def test_unknown_field_and_missing_location():
    with pytest.raises(ConfigError, match="output.chunksize: unknown field"):
        validate(JobConfig, apply_overrides(BASE, ["output.chunksize=10"]))
    with pytest.raises(ConfigError, match="dataset.root"):
        validate(JobConfig, {"dataset": {"format": "voc"}, "output": {"uri": "x"}})


def test_overrides_parse_yaml_values(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("dataset:\n  format: coco\n  annotations: a.json\n  images: imgs\noutput:\n  uri: out\n")
    cfg = load_config(JobConfig, path, [
        "model.scales.max=1.5", "output.formats=[parquet]", "model.nms=0.7", "dataset.limit=10",
    ])
    assert cfg.model.scales.max == 1.5 and cfg.model.scales.min == -2.5
    assert cfg.output.formats == ["parquet"] and cfg.model.nms == 0.7 and cfg.dataset.limit == 10
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides(BASE, ["model.name"])


def test_bad_yaml_is_a_config_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("dataset: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(JobConfig, path)


def test_secrets_are_redacted():
    raw = apply_overrides(BASE, [
        "output.storage_options={key: AKIAXXX, secret: s3cr3t, client_kwargs: {endpoint_url: http://x}}",
    ])
    shown = public_dict(validate(JobConfig, raw))
    text = repr(shown)
    assert "AKIAXXX" not in text and "s3cr3t" not in text
    assert shown["output"]["storage_options"]["client_kwargs"]["endpoint_url"] == "http://x"


def test_cli_prints_one_clear_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("dataset: {format: coco}\noutput: {uri: out}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "segdist", "generate", str(path)], capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert "dataset.annotations" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_help_lists_every_command():
    proc = subprocess.run([sys.executable, "-m", "segdist", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for name in ("demo", "sample-data", "generate", "submit", "evaluate", "train", "export", "show"):
        assert name in proc.stdout

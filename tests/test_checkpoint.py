"""segdist checkpoints: safetensors + architecture metadata, any fsspec URI, sha256 reported."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from segdist.config import model_config
from segdist.errors import ConfigError, StorageError
from segdist.models.checkpoint import load_model, save_checkpoint
from segdist.models.deepmask import DeepMask, DeepMaskConfig
from segdist.models.sharpmask import SharpMask
from segdist.proposers import build_proposer
from segdist.storage import atomic_write, read_bytes


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _deepmask(seed: int = 0, **kw) -> DeepMask:
    torch.manual_seed(seed)
    m = DeepMask(DeepMaskConfig(arch="resnet18", **kw)).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so that buffers matter too
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    return m


def test_deepmask_round_trip_local(tmp_path):
    model = _deepmask(o_sz=28)
    uri = str(tmp_path / "sub" / "dm.safetensors")
    digest = save_checkpoint(model, uri, metadata={"step": 12}, preset="deepmask")
    loaded, info = load_model(uri)
    assert info.kind == "deepmask" and info.config == model.cfg and info.config.o_sz == 28
    assert info.preset == "deepmask" and info.extra == {"step": 12}
    assert info.sha256 == digest == hashlib.sha256(read_bytes(uri)).hexdigest()
    x = torch.randn(1, 3, 192, 192)
    with torch.no_grad():
        for a, b in zip(model(x), loaded(x)):
            assert torch.equal(a, b)
    assert not loaded.training


def test_sharpmask_round_trip_on_s3(s3_bucket):
    bucket, opts = s3_bucket
    torch.manual_seed(1)
    model = SharpMask(_deepmask(2)).eval()
    uri = f"s3://{bucket}/models/sm.safetensors"
    digest = save_checkpoint(model, uri, storage_options=opts)
    loaded, info = load_model(uri, storage_options=opts)
    assert isinstance(loaded, SharpMask) and info.kind == "sharpmask"
    assert info.sharpmask == {"km": 32, "ks": 32} and info.sha256 == digest
    x = torch.randn(2, 3, 192, 192)
    with torch.no_grad():
        assert torch.equal(model(x)[0], loaded(x)[0])
    # the proposer reports the checkpoint's sha256 with the proposals it makes
    gen = build_proposer(model_config(name="sharpmask", weights=uri, storage_options=opts,
                                      proposals=5, device="cpu"))
    assert gen.weights_sha256 == digest
    img = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    assert len(gen([img], [3])[0]) == 5


def test_proposer_checks_kind_and_trunk(tmp_path):
    dm_uri = str(tmp_path / "dm.safetensors")
    save_checkpoint(_deepmask(), dm_uri)
    with pytest.raises(ConfigError, match="needs a sharpmask checkpoint"):
        build_proposer(model_config(name="sharpmask", weights=dm_uri, device="cpu"))
    with pytest.raises(ConfigError, match="resnet18 trunk"):
        build_proposer(model_config(name="deepmask", weights=dm_uri, trunk="resnet50", device="cpu"))
    # a torchvision enum is refused when the config is validated, before anything loads
    with pytest.raises(ConfigError, match="torchvision weights do not fit the DeepMask/SharpMask"):
        model_config(name="deepmask", weights="DEFAULT", device="cpu")
    gen = build_proposer(model_config(name="deepmask-zoom", weights=dm_uri, device="cpu"))
    assert gen.weights_sha256 == hashlib.sha256(read_bytes(dm_uri)).hexdigest()


def test_bad_files_are_clear_errors(tmp_path):
    from safetensors.torch import save

    junk = str(tmp_path / "junk.bin")
    atomic_write(junk, b"not a checkpoint at all")
    with pytest.raises(ConfigError, match="not a segdist checkpoint"):
        load_model(junk)
    plain = str(tmp_path / "plain.safetensors")
    atomic_write(plain, save({"w": torch.zeros(2)}))
    with pytest.raises(ConfigError, match="convert-t7"):
        load_model(plain)
    with pytest.raises(StorageError, match="does not exist"):
        load_model(str(tmp_path / "missing.safetensors"))
    # right metadata, wrong tensors: a resnet18 file claiming a different head size
    good = str(tmp_path / "dm.safetensors")
    save_checkpoint(_deepmask(), good)
    data = read_bytes(good).replace(b'"o_sz\\": 56', b'"o_sz\\": 28')
    atomic_write(good, data)
    with pytest.raises(ConfigError, match="shape mismatch"):
        load_model(good)


def test_torch_hub_style_file_is_not_mistaken_for_checkpoint(tmp_path):
    path = tmp_path / "sd.pth"
    torch.save(_deepmask().state_dict(), path)
    with pytest.raises(ConfigError, match="not a segdist checkpoint"):
        load_model(str(path))

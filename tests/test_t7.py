"""The .t7 converter: files shaped like the released model.t7, converted and checked against a plain
interpreter of the same Lua module tree (folded BatchNorm as a*x+b, numpy symmetric padding,
Linear viewed as a conv for the dense path)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segdist.models.t7 import T7FormatError, convert_tree, load_t7, read_t7
from t7writer import (HEADS, LuaFunction, LuaObject, Storage, Tensor, Variant, contiguous_strides,
                      deepmask_file, save_t7, sharpmask_file)

C_AFFINE = Variant(affine_shape="C")

# One torch thread: with the cores shared (Ray workers, other tests) more threads only wait.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------------
# a plain interpreter of the Lua modules (eval mode)


def arr(t: Tensor) -> torch.Tensor:
    return torch.from_numpy(t.array().astype(np.float32))


def run(m: LuaObject, x, record: dict | None = None, key: str = ""):
    t, fl = m.typename, m.fields
    if t in ("nn.Sequential",):
        for i, sub in enumerate(fl["modules"], start=1):
            x = run(sub, x, record, f"{key}{i}")
            if record is not None and key == "":
                record[i] = x
        return x
    if t == "nn.ConcatTable":
        return [run(sub, x) for sub in fl["modules"]]
    if t == "nn.ParallelTable":
        return [run(sub, xi) for sub, xi in zip(fl["modules"], x)]
    if t == "nn.CAddTable":
        return x[0] + x[1]
    if t == "nn.SpatialSymmetricPadding":
        p = ((0, 0), (0, 0), (fl["pad_t"], fl["pad_b"]), (fl["pad_l"], fl["pad_r"]))
        return torch.from_numpy(np.pad(x.numpy(), p, mode="symmetric"))
    if t == "nn.SpatialZeroPadding":  # negative pads: a crop
        h, w = x.shape[-2:]
        return x[..., -fl["pad_t"]:h + fl["pad_b"], -fl["pad_l"]:w + fl["pad_r"]]
    if t in ("cudnn.SpatialConvolution", "nn.SpatialConvolutionMM"):
        # MM keeps its weight as a matrix [out, in*kH*kW]; a conv saved after noBias() has none
        w = arr(fl["weight"]).reshape(fl["nOutputPlane"], fl["nInputPlane"], fl["kH"], fl["kW"])
        bias = arr(fl["bias"]) if "bias" in fl else None
        return F.conv2d(x, w, bias, stride=(fl["dH"], fl["dW"]))
    if t in ("nn.SpatialConstDiagonal", "inn.ConstAffine"):
        return x * arr(fl["a"]).reshape(1, -1, 1, 1) + arr(fl["b"]).reshape(1, -1, 1, 1)
    if t == "cudnn.ReLU":
        return torch.relu(x)
    if t == "nn.Threshold":
        return torch.where(x > fl["threshold"], x, torch.full_like(x, fl["val"]))
    if t == "cudnn.SpatialMaxPooling":
        return F.max_pool2d(x, fl["kW"], fl["dW"], fl["padW"])
    if t == "nn.View":
        return x.reshape(x.shape[0], *[int(s) for s in fl["size"].data[1:]])
    if t == "nn.Linear":
        return x @ arr(fl["weight"]).T + arr(fl["bias"])
    if t in ("nn.Dropout", "nn.Identity"):
        return x
    if t == "nn.SpatialUpSamplingNearest":
        return x.repeat_interleave(2, -1).repeat_interleave(2, -2)
    raise NotImplementedError(t)


def dense_reference(trunk: LuaObject, x: torch.Tensor) -> torch.Tensor:
    """The whole-image embedding map: trunk without crop/View, Linear as an f x f conv (what the
    original's linear2convTrunk does; a tree already in that form just runs)."""
    mods = trunk.fields["modules"]
    if mods[11].typename != "nn.Linear":
        return run(trunk, x)
    for m in mods[:7]:
        x = run(m, x)
    x = torch.relu(run(mods[8], x))
    lin = mods[11].fields
    f = HEADS["i_sz"] // 16
    w = arr(lin["weight"]).reshape(HEADS["fc_dim"], HEADS["feat_ch"], f, f)
    return F.conv2d(x, w, arr(lin["bias"]))


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    scale = float(b.abs().max()) + 1e-6
    assert a.shape == b.shape
    assert float((a - b).abs().max()) <= 1e-4 * scale, float((a - b).abs().max()) / scale


# ---------------------------------------------------------------------------------------------
# tests


@pytest.fixture(scope="module")
def windows():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, HEADS["i_sz"] + 32, HEADS["i_sz"] + 32, generator=g)


def check_deepmask(conv, tree: dict, windows: torch.Tensor) -> None:
    """The converted DeepMask computes what the Lua tree computes: training windows (masks and
    scores) and the dense whole-image path on a non-square image (every cell's score and mask)."""
    m = tree["model"].fields
    inference_form = m["trunk"].fields["modules"][11].typename != "nn.Linear"
    with torch.no_grad():
        if not inference_form:  # windows through the crop, View and Linear
            masks, scores = conv.model(windows)
            emb = run(m["trunk"], windows)
            close(masks, run(m["maskBranch"].fields["modules"][0], emb).reshape(masks.shape))
            close(scores, run(m["scoreBranch"], emb)[:, 0])
        img = torch.randn(1, 3, 96, 80, generator=torch.Generator().manual_seed(1))
        dense = conv.model.features(img)
        ref_dense = dense_reference(m["trunk"], img)
        close(dense, ref_dense)
        _, _, h, w = dense.shape
        cells = torch.stack(torch.meshgrid(torch.zeros(1, dtype=torch.long), torch.arange(h),
                                           torch.arange(w), indexing="ij"), -1).reshape(-1, 3)
        got_masks = conv.model.masks_at(dense, cells)  # K x o x o, cells row-major
        if inference_form:  # heads as 1x1 convolutions over the map
            ref_scores = run(m["scoreBranch"], ref_dense)[:, 0]
            ref_masks = run(m["maskBranch"], ref_dense)[0].permute(1, 2, 0)
        else:
            ref_scores = run(m["scoreBranch"], ref_dense.permute(0, 2, 3, 1))[..., 0]
            ref_masks = run(m["maskBranch"].fields["modules"][0], ref_dense[0].permute(1, 2, 0))
        close(conv.model.score_map(dense), ref_scores)
        close(got_masks, ref_masks.reshape(got_masks.shape))


def convert(tree: dict, tmp_path) -> tuple:
    path = tmp_path / "model.t7"
    save_t7(tree, str(path))
    return load_t7(str(path))


@pytest.mark.parametrize("affine_shape", ["1xCx1x1", "C"])
def test_deepmask_resnet18_layout_equals_reference(tmp_path, windows, affine_shape):
    tree = deepmask_file("resnet18", Variant(affine_shape=affine_shape))
    conv, digest = convert(tree, tmp_path)
    assert conv.kind == "deepmask" and len(digest) == 64
    assert conv.settings == {"arch": "resnet18", "layout": "released", **HEADS}
    assert conv.original_config["rundir"] == "exps/" and conv.original_config["batch"] == 32
    check_deepmask(conv, tree, windows)


# Every layout a released model.t7 may have (variant, trunk, the layout it maps onto). The first
# five converted before the converter read blocks by structure; the rest are the forms that
# fb.resnet.torch and the original Caffe ResNets leave open.
VARIANTS = {
    "affine-C-ConstAffine": (Variant(affine_shape="C", affine_type="inn.ConstAffine"),
                             "resnet18", "released"),
    "shortcut-in-Sequential": (Variant(shortcut="seq"), "resnet50", "released"),
    "convs-without-bias": (Variant(bias=False), "resnet18", "released"),
    "SpatialConvolutionMM": (Variant(conv_type="nn.SpatialConvolutionMM"), "resnet18", "released"),
    "inference-form": (Variant(inference_form=True), "resnet18", "released"),
    "stride-on-1x1": (Variant(stride_on="1x1"), "resnet50", "released+stride-1x1"),
    "resnet-lua": (Variant(block="resnet-lua"), "resnet50", "resnet-lua"),
    "resnet-lua-stride-on-1x1": (Variant(block="resnet-lua", stride_on="1x1"), "resnet50",
                                 "resnet-lua+stride-1x1"),
    "resnet-lua-basic": (Variant(block="resnet-lua", affine_shape="C"), "resnet18", "resnet-lua"),
    "released-conv-bn-shortcut": (Variant(shortcut="conv-bn"), "resnet50",
                                  "released+shortcut-affine"),
    "resnet-lua-bare-shortcut": (Variant(block="resnet-lua", shortcut="bare", stride_on="1x1"),
                                 "resnet50", "resnet-lua+shortcut-bare+stride-1x1"),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_every_layout_variant_equals_reference(tmp_path, windows, name):
    variant, arch, layout = VARIANTS[name]
    tree = deepmask_file(arch, variant, seed=5)
    conv, _ = convert(tree, tmp_path)
    assert conv.settings == {"arch": arch, "layout": layout, **HEADS}
    assert conv.model.cfg.layout == layout
    check_deepmask(conv, tree, windows[:1])
    if layout != "released":  # the layout survives a segdist checkpoint
        from segdist.models.checkpoint import load_model, save_checkpoint

        save_checkpoint(conv.model, str(tmp_path / "ckpt.safetensors"))
        again, info = load_model(str(tmp_path / "ckpt.safetensors"))
        assert info.config.layout == layout
        with torch.no_grad():
            assert torch.equal(again.features(windows[:1]), conv.model.features(windows[:1]))


@pytest.mark.parametrize("arch, variant, layout", [
    ("resnet18", C_AFFINE, "released"),
    ("resnet50", Variant(block="resnet-lua", stride_on="1x1"), "resnet-lua+stride-1x1")])
def test_sharpmask_equals_reference(tmp_path, windows, arch, variant, layout):
    tree = sharpmask_file(arch, variant)
    conv, _ = convert(tree, tmp_path)
    assert conv.kind == "sharpmask" and conv.settings["km"] == 16 and conv.settings["ks"] == 16
    assert conv.settings["layout"] == layout
    m = tree["model"].fields
    with torch.no_grad():
        masks, scores = conv.model(windows)
        rec: dict = {}
        emb = run(m["trunk"], windows, rec)
        cur = run(m["refs"][0], emb)
        for k, pos in enumerate((8, 6, 5, 3), start=1):
            cur = run(m["refs"][k], [rec[pos], cur])
        close(masks, cur.reshape(masks.shape))
        close(scores, run(m["scoreBranch"], emb)[:, 0])


def _find(tree, path: list):
    node = tree["model"]
    for key in path:
        node = node.fields[key] if isinstance(key, str) else node.fields["modules"][key]
    return node


def test_unknown_module_is_refused_with_its_path(tmp_path):
    tree = deepmask_file("resnet18", C_AFFINE)
    # layer1 (trunk module 5), block 1, its residual branch: replace the affine after the first conv
    branch = _find(tree, ["trunk", 4, 0, 0, 0])
    branch.fields["modules"][1] = LuaObject("nn.Foo", {"x": 1})
    path = tmp_path / "bad.t7"
    save_t7(tree, str(path))
    with pytest.raises(T7FormatError) as err:
        load_t7(str(path))
    assert str(err.value) == ("model.trunk.modules[5].modules[1].modules[1].modules[1].modules[2]: "
                              "expected nn.SpatialConstDiagonal or inn.ConstAffine, found nn.Foo")


def test_other_malformed_trees_are_refused(tmp_path):
    tree = deepmask_file("resnet18", C_AFFINE)
    conv = _find(tree, ["trunk", 0]).fields["modules"][1]
    conv.fields["padW"] = conv.fields["padH"] = 3  # zero padding instead of symmetric
    with pytest.raises(T7FormatError, match=r"model\.trunk\.modules\[1\]\.modules\[2\]: expected no built-in"):
        convert_tree(read_back(tree, tmp_path))
    tree = deepmask_file("resnet18", C_AFFINE)
    tree["model"].fields["trunk"].fields["modules"][5].fields["modules"].pop()  # layer2 of 1 block
    with pytest.raises(T7FormatError, match=r"basic blocks \[2, 1, 2\]"):
        convert_tree(read_back(tree, tmp_path))
    with pytest.raises(T7FormatError, match="expected nn.DeepMask or nn.SharpMask, found nn.Linear"):
        convert_tree(read_back({"model": LuaObject("nn.Linear", {}), "config": {}}, tmp_path))


def _mix_block_forms(tree):
    # layer2's second block taken from a resnet.lua-style tree of the same shapes
    lua = deepmask_file("resnet18", Variant(block="resnet-lua"), seed=1)
    _find(tree, ["trunk", 5]).fields["modules"][1] = _find(lua, ["trunk", 5, 1])


def _set_stride(conv, s):
    conv.fields["dW"] = conv.fields["dH"] = s


def _identity_projection(tree):
    _find(tree, ["trunk", 5, 0, 0]).fields["modules"][1] = LuaObject("nn.Identity", {})


def _affine_twice(tree):
    # a released block (affine after the addition) whose branch also ends with an affine
    branch = _find(tree, ["trunk", 4, 0, 0, 0])
    branch.fields["modules"].append(_find(tree, ["trunk", 4, 0, 2]))


# Trees that cannot be mapped: (arch, variant, mutation, the whole one-line error)
REFUSED = {
    "mixed-block-forms": ("resnet18", Variant(), _mix_block_forms,
                          "model.trunk.modules[6].modules[2]: this block has its BatchNorm after the "
                          "last convolution (3 modules) but model.trunk.modules[5].modules[1] has "
                          "its BatchNorm after the addition (4 modules); a trunk must use one block "
                          "layout"),
    "stride-on-both-convs": ("resnet50", Variant(stride_on="1x1"),
                             lambda t: _set_stride(_find(t, ["trunk", 5, 0, 0, 0, 3, 1]), 2),
                             "model.trunk.modules[6].modules[1].modules[1].modules[1]: a downsampling "
                             "bottleneck needs stride 2 on its first 1x1 or on its 3x3 convolution "
                             "(one of them), found 2 and 2"),
    "stride-in-a-plain-block": ("resnet50", Variant(),
                                lambda t: _set_stride(_find(t, ["trunk", 5, 1, 0, 0, 0]), 2),
                                "model.trunk.modules[6].modules[2].modules[1].modules[1].modules[1]: "
                                "expected stride 1, found 2x2"),
    "stride-position-mixed": ("resnet50", Variant(), lambda t: (
        _set_stride(_find(t, ["trunk", 6, 0, 0, 0, 0]), 2),
        _set_stride(_find(t, ["trunk", 6, 0, 0, 0, 3, 1]), 1)),
        "model.trunk.modules[7].modules[1]: this block has the stride on the first 1x1 "
        "convolution but model.trunk.modules[6].modules[1] has the stride on the 3x3 convolution; "
        "a trunk must use one block layout"),
    "identity-where-projection-needed": ("resnet18", Variant(), _identity_projection,
                                         "model.trunk.modules[6].modules[1].modules[1].modules[2]: "
                                         "expected a projection shortcut (1x1 convolution, stride 2, "
                                         "bare or in nn.Sequential with a SpatialConstDiagonal after "
                                         "it), found nn.Identity"),
    "affine-before-and-after-the-addition": (
        "resnet18", Variant(), _affine_twice,
        "model.trunk.modules[5].modules[1].modules[1].modules[1]: expected 7 (bottleneck) or 4 "
        "(basic) modules in nn.Sequential, found 5: the block applies its BatchNorm after the "
        "addition, so the branch ends with its last convolution"),
}


@pytest.mark.parametrize("name", REFUSED)
def test_unmappable_trees_are_refused_with_path_and_expectation(tmp_path, name):
    arch, variant, mutate, message = REFUSED[name]
    tree = deepmask_file(arch, variant)
    mutate(tree)
    with pytest.raises(T7FormatError) as err:
        convert_tree(read_back(tree, tmp_path))
    assert str(err.value) == message


def read_back(tree, tmp_path):
    path = tmp_path / "x.t7"
    save_t7(tree, str(path))
    return read_t7(str(path))[0]


def test_truncated_or_foreign_files_give_clear_errors(tmp_path):
    tree = deepmask_file("resnet18", C_AFFINE)
    path = tmp_path / "model.t7"
    save_t7(tree, str(path))
    data = path.read_bytes()
    (tmp_path / "cut.t7").write_bytes(data[: len(data) // 2])
    with pytest.raises(T7FormatError, match="cannot read .*cut.t7"):
        read_t7(str(tmp_path / "cut.t7"))
    (tmp_path / "png.t7").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    with pytest.raises(T7FormatError, match="cannot read"):
        read_t7(str(tmp_path / "png.t7"))
    with pytest.raises(T7FormatError, match="does not exist"):
        read_t7(str(tmp_path / "none.t7"))


def test_writer_round_trip_of_plain_values(tmp_path):
    shared = Storage("torch.FloatStorage", np.arange(12, dtype=np.float32))
    t1 = Tensor(shared, 2, (2, 3), (3, 1), "torch.FloatTensor")
    t2 = Tensor(shared, 0, (3, 2), (1, 3), "torch.FloatTensor")  # a transposed view
    obj = {"n": 3, "x": 0.5, "s": "abc", "b": True, "list": [1, 2], "zero": {0: "a", 1: "b"},
           "t1": t1, "t2": t2, "f": LuaFunction()}
    got = read_back(obj, tmp_path)
    assert got[b"n"] == 3 and got[b"x"] == 0.5 and got[b"s"] == b"abc" and got[b"b"] is True
    assert got[b"list"] == [1, 2] and got[b"zero"][0] == b"a"
    np.testing.assert_array_equal(got[b"t1"], np.arange(2, 8).reshape(2, 3))
    np.testing.assert_array_equal(got[b"t2"], np.arange(6).reshape(2, 3).T)
    assert contiguous_strides((2, 3, 4)) == (12, 4, 1)


def test_convert_t7_command_from_and_to_s3(tmp_path, s3_bucket, capsys, windows):
    import s3fs

    from segdist.cli import main
    from segdist.models.checkpoint import load_model

    bucket, opts = s3_bucket
    tree = deepmask_file("resnet18", seed=3)
    local = tmp_path / "model.t7"
    save_t7(tree, str(local))
    fs = s3fs.S3FileSystem(**opts)
    fs.put_file(str(local), f"{bucket}/orig/model.t7")
    src, out = f"s3://{bucket}/orig/model.t7", f"s3://{bucket}/ckpt/deepmask.safetensors"
    assert main(["convert-t7", src, out]) == 0
    assert "deepmask (resnet18, layout released" in capsys.readouterr().out
    model, info = load_model(out)
    import hashlib

    assert info.kind == "deepmask" and info.config.layout == "released"
    assert info.extra["source"] == src
    assert info.extra["source_sha256"] == hashlib.sha256(local.read_bytes()).hexdigest()
    assert info.extra["original_config"]["iSz"] == HEADS["i_sz"]
    m = tree["model"].fields
    with torch.no_grad():
        masks, scores = model(windows)
        emb = run(m["trunk"], windows)
        close(scores, run(m["scoreBranch"], emb)[:, 0])
        close(masks, run(m["maskBranch"].fields["modules"][0], emb).reshape(masks.shape))
    # An existing output is kept unless --overwrite; a bad source is one clear line, exit 2.
    assert main(["convert-t7", src, out]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    (tmp_path / "junk.t7").write_bytes(b"junk")
    assert main(["convert-t7", str(tmp_path / "junk.t7"), str(tmp_path / "x.safetensors")]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def test_proposer_loads_the_original_t7_directly(tmp_path):
    # model.weights may name the released model.t7 itself (e.g. its published URL): it is
    # converted on load and gives the same proposals as the converted checkpoint; the sha256
    # reported with the proposals is the .t7 file's.
    import hashlib

    from segdist.config import model_config
    from segdist.models.checkpoint import save_checkpoint
    from segdist.proposers import build_proposer

    tree = deepmask_file("resnet18", C_AFFINE, seed=5)
    t7_path = tmp_path / "model.t7"
    save_t7(tree, str(t7_path))
    conv, _ = load_t7(str(t7_path))
    ckpt = tmp_path / "deepmask.safetensors"
    save_checkpoint(conv.model, str(ckpt))
    image = np.random.default_rng(0).integers(0, 255, (70, 90, 3), dtype=np.uint8)
    common = dict(name="deepmask", proposals=20, device="cpu",
                  scales={"min": -0.5, "max": 0.0, "step": 0.5})
    t7_cfg = model_config(weights=str(t7_path), **common)
    assert t7_cfg.weights.kind == "t7"  # parsed once, at validation
    from_t7 = build_proposer(t7_cfg)
    from_ckpt = build_proposer(model_config(weights=str(ckpt), **common))
    assert from_t7.weights_sha256 == hashlib.sha256(t7_path.read_bytes()).hexdigest()
    a, b = from_t7([image], [1])[0], from_ckpt([image], [1])[0]
    assert len(a) == 20 and a.equals(b)


@pytest.mark.parametrize("layout, radius", [("released", 133), ("released+stride-1x1", 145)])
def test_receptive_radius_of_the_stride_positions(layout, radius):
    """``rf_radius`` (the tiling halo) is the exact field of a layer3 cell for both stride
    positions: with positive weights, no bias and the max pool as an average of the same geometry,
    nothing cancels, so the input gradient of one cell is nonzero exactly on its field."""
    from segdist.models.trunk import build_trunk

    trunk = build_trunk("resnet50", layout)
    assert trunk.rf_radius == radius
    with torch.no_grad():
        for name, p in trunk.named_parameters():
            p.copy_(torch.full_like(p, 0.0) if name.endswith("bias")
                    else torch.full_like(p, 1.0 / p[0].numel()))
    trunk.maxpool = torch.nn.AvgPool2d(3, 2, 1)
    x = torch.rand(1, 3, 336, 336, requires_grad=True)
    r = 10  # layer3 cell (10, 10) is centred on pixel (160, 160); its field stays inside the image
    trunk(x)["layer3"][0, :, r, r].sum().backward()
    rows = x.grad[0].abs().sum(dim=(0, 2)).nonzero()[:, 0]
    cols = x.grad[0].abs().sum(dim=(0, 1)).nonzero()[:, 0]
    for found in (rows, cols):
        assert (int(found.min()), int(found.max())) == (16 * r - radius, 16 * r + radius)

"""The .t7 converter: files shaped like the released model.t7, converted and checked against a plain
interpreter of the same Lua module tree (folded BatchNorm as a*x+b, numpy symmetric padding,
Linear viewed as a conv for the dense path)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segdist.models.t7 import T7FormatError, convert_tree, load_t7, read_t7
from t7writer import (LuaFunction, LuaObject, ParamPool, Storage, Tensor, contiguous_strides,
                      empty_tensor, save_t7)

# Small heads so the tests are quick: i_sz 32 (f = 2, window 64), 8x8 mask logits.
HEADS = dict(i_sz=32, feat_ch=8, fc_dim=16, o_sz=8, score_hidden=8)
BLOCKS = {"resnet18": ("basic", (2, 2, 2)), "resnet50": ("bottleneck", (3, 4, 6))}


# ---------------------------------------------------------------------------------------------
# building a module tree as the original code leaves it


class TreeBuilder:
    """nn.X objects with random weights whose tensors are views into shared flat storages
    (weights in one, gradients in another, as getParameters() leaves them)."""

    def __init__(self, seed: int, affine_shape: str):
        self.rng = np.random.default_rng(seed)
        self.affine_shape = affine_shape
        self.new_pools()

    def new_pools(self) -> None:
        self.params, self.grads = ParamPool(), ParamPool()
        self.all_pools = getattr(self, "all_pools", []) + [self.params, self.grads]

    def finish(self) -> None:
        for p in self.all_pools:
            p.finish()

    def module(self, typename: str, **fields) -> LuaObject:
        base = {"output": empty_tensor(), "gradInput": empty_tensor(), "train": False,
                "_type": "torch.CudaTensor"}
        base.update(fields)
        return LuaObject(typename, base)

    def weights(self, array: np.ndarray) -> dict:
        return {"weight": self.params.view(array), "gradWeight": self.grads.view(np.zeros_like(array))}

    def conv(self, n_in: int, n_out: int, k: int, stride: int = 1) -> LuaObject:
        w = self.rng.normal(0, np.sqrt(2.0 / (n_in * k * k)), (n_out, n_in, k, k))
        b = self.rng.normal(0, 0.1, n_out)
        return self.module(
            "cudnn.SpatialConvolution", nInputPlane=n_in, nOutputPlane=n_out, kW=k, kH=k,
            dW=stride, dH=stride, padW=0, padH=0, groups=1, **self.weights(w),
            bias=self.params.view(b), gradBias=self.grads.view(np.zeros(n_out)),
            iSize=Tensor(Storage("torch.LongStorage", np.array([1, n_in, 8, 8])), 0, (4,), (1,),
                         "torch.LongTensor"),
            accUpdateGradParameters=LuaFunction())

    def sympad(self, p: int) -> LuaObject:
        return self.module("nn.SpatialSymmetricPadding", pad_l=p, pad_r=p, pad_t=p, pad_b=p)

    def padded_conv(self, n_in: int, n_out: int, k: int, stride: int = 1) -> LuaObject:
        return self.seq(self.sympad(k // 2), self.conv(n_in, n_out, k, stride))

    def affine(self, c: int) -> LuaObject:
        shape = (1, c, 1, 1) if self.affine_shape == "1xCx1x1" else (c,)
        a = self.rng.uniform(0.5, 1.0, shape)
        b = self.rng.normal(0, 0.1, shape)
        return self.module("nn.SpatialConstDiagonal", a=self.params.view(a), b=self.params.view(b),
                           inplace=True)

    def relu(self) -> LuaObject:
        return self.module("cudnn.ReLU", inplace=True, mode="CUDNN_ACTIVATION_RELU")

    def seq(self, *mods, typename: str = "nn.Sequential") -> LuaObject:
        return self.module(typename, modules=list(mods))

    def linear(self, n_in: int, n_out: int) -> LuaObject:
        w = self.rng.normal(0, np.sqrt(1.0 / n_in), (n_out, n_in))
        return self.module("nn.Linear", **self.weights(w), bias=self.params.view(self.rng.normal(0, 0.1, n_out)),
                           gradBias=self.grads.view(np.zeros(n_out)),
                           accUpdateGradParameters=LuaFunction())

    def view(self, *size) -> LuaObject:
        return self.module("nn.View", size=Storage("torch.LongStorage", np.array(size)),
                           numElements=int(np.prod(size[1:])))

    def block(self, kind: str, n_in: int, planes: int, stride: int) -> tuple[LuaObject, int]:
        if kind == "bottleneck":
            out = planes * 4
            branch = self.seq(self.conv(n_in, planes, 1), self.affine(planes), self.relu(),
                              self.padded_conv(planes, planes, 3, stride), self.affine(planes),
                              self.relu(), self.conv(planes, out, 1))
        else:
            out = planes
            branch = self.seq(self.padded_conv(n_in, planes, 3, stride), self.affine(planes),
                              self.relu(), self.padded_conv(planes, planes, 3))
        short = self.conv(n_in, out, 1, stride) if (stride != 1 or n_in != out) else self.module("nn.Identity")
        cat = self.seq(branch, short, typename="nn.ConcatTable")
        return self.seq(cat, self.module("nn.CAddTable", inplace=True), self.affine(out),
                        self.relu()), out

    def trunk(self, arch: str) -> LuaObject:
        kind, counts = BLOCKS[arch]
        mods = [self.padded_conv(3, 64, 7, 2), self.affine(64), self.relu(),
                self.module("cudnn.SpatialMaxPooling", kW=3, kH=3, dW=2, dH=2, padW=1, padH=1,
                            ceil_mode=False,
                            indices=Tensor(Storage("torch.CudaLongStorage", np.zeros(4, np.int64)),
                                           0, (1, 1, 2, 2), (4, 4, 2, 1), "torch.CudaLongTensor"))]
        n = 64
        for li, (planes, count) in enumerate(zip((64, 128, 256), counts)):
            blocks = []
            for j in range(count):
                blk, n = self.block(kind, n, planes, 2 if li and j == 0 else 1)
                blocks.append(blk)
            mods.append(self.seq(*blocks))
        f = HEADS["i_sz"] // 16
        mods += [self.module("nn.SpatialZeroPadding", pad_l=-1, pad_r=-1, pad_t=-1, pad_b=-1),
                 self.conv(n, HEADS["feat_ch"], 1), self.relu(),
                 self.view(32, HEADS["feat_ch"] * f * f),
                 self.linear(HEADS["feat_ch"] * f * f, HEADS["fc_dim"])]
        return self.seq(*mods)

    def deepmask_parts(self, arch: str) -> dict:
        trunk = self.trunk(arch)
        self.new_pools()  # each branch has its own flat storage
        o = HEADS["o_sz"]
        mask = self.seq(self.seq(self.linear(HEADS["fc_dim"], o * o)),
                        self.seq(self.module("nn.Copy"), self.view(32, o, o),
                                 self.module("nn.SpatialReSamplingEx", owidth=2 * o, oheight=2 * o),
                                 self.view(32, 4 * o * o), self.module("nn.Copy")))
        self.new_pools()
        score = self.seq(self.module("nn.Dropout", p=0.5),
                         self.linear(HEADS["fc_dim"], HEADS["score_hidden"]),
                         self.module("nn.Threshold", threshold=0, val=1e-6),
                         self.module("nn.Dropout", p=0.5), self.linear(HEADS["score_hidden"], 1))
        return {"trunk": trunk, "maskBranch": mask, "scoreBranch": score,
                "fSz": HEADS["i_sz"] // 16}

    def refinement(self, arch: str, km: int) -> tuple[list, dict, dict]:
        self.new_pools()
        f = HEADS["i_sz"] // 16
        exp = 4 if BLOCKS[arch][0] == "bottleneck" else 1
        nhu = [(256 * exp, 64), (128 * exp, 64), (64 * exp, 64), (64, 32)]
        n0 = self.seq(self.linear(HEADS["fc_dim"], f * f * km), self.view(32, km, f, f))
        neths, netvs, refs = [], {0: n0}, {0: n0}
        for i, (nhu1, nhu2) in enumerate(nhu, start=1):
            c = km // 2 ** (i - 1)
            hm = [] if i == 1 else [self.module("nn.SpatialZeroPadding", pad_l=-2 ** (i - 1),
                                                pad_r=-2 ** (i - 1), pad_t=-2 ** (i - 1),
                                                pad_b=-2 ** (i - 1))]
            hm += [self.sympad(1), self.conv(nhu1, nhu2, 3), self.relu(), self.sympad(1),
                   self.conv(nhu2, c, 3), self.relu(), self.sympad(1), self.conv(c, c // 2, 3)]
            h = self.seq(*hm)
            v = self.seq(self.sympad(1), self.conv(c, c, 3), self.relu(), self.sympad(1),
                         self.conv(c, c // 2, 3))
            neths.append(h)
            netvs[i] = v
            ref = self.seq(self.seq(h, v, typename="nn.ParallelTable"),
                           self.module("nn.CAddTable"), self.relu(),
                           self.module("nn.SpatialUpSamplingNearest", scale_factor=2))
            refs[i] = ref
        last = refs[4].fields["modules"]
        last += [self.sympad(1), self.conv(km // 16, 1, 3), self.view(32, HEADS["i_sz"] ** 2)]
        return neths, netvs, refs


def config_table(**extra) -> dict:
    return {"iSz": HEADS["i_sz"], "oSz": HEADS["o_sz"], "gSz": 2 * HEADS["o_sz"], "batch": 32,
            "lr": 0.001, "rundir": "exps/", "hfreq": 0.5, **extra}


def deepmask_file(arch: str, affine_shape: str, seed: int = 0) -> dict:
    b = TreeBuilder(seed, affine_shape)
    model = b.module("nn.DeepMask", **b.deepmask_parts(arch))
    b.finish()
    return {"model": model, "config": config_table()}


def sharpmask_file(arch: str, affine_shape: str, km: int = 16, seed: int = 0) -> dict:
    b = TreeBuilder(seed, affine_shape)
    parts = b.deepmask_parts(arch)
    neths, netvs, refs = b.refinement(arch, km)
    model = b.module("nn.SharpMask", km=km, ks=km, skpos=[8, 6, 5, 3], trunk=parts["trunk"],
                     scoreBranch=parts["scoreBranch"], maskBranchDM=parts["maskBranch"],
                     fSz=parts["fSz"], neths=neths, netvs=netvs, refs=refs, inps={})
    b.finish()
    return {"model": model, "config": config_table(km=km, ks=km, gSz=HEADS["i_sz"], dm="/x")}


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
    if t == "cudnn.SpatialConvolution":
        return F.conv2d(x, arr(fl["weight"]), arr(fl["bias"]), stride=fl["dW"])
    if t == "nn.SpatialConstDiagonal":
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
    """The whole-image embedding map: trunk without crop/View, Linear as an f x f conv."""
    mods = trunk.fields["modules"]
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


@pytest.mark.parametrize("affine_shape", ["1xCx1x1", "C"])
def test_deepmask_resnet18_layout_equals_reference(tmp_path, windows, affine_shape):
    tree = deepmask_file("resnet18", affine_shape)
    path = tmp_path / "model.t7"
    save_t7(tree, str(path))
    conv, digest = load_t7(str(path))
    assert conv.kind == "deepmask" and len(digest) == 64
    assert conv.settings == {"arch": "resnet18", "layout": "released", **HEADS}
    assert conv.original_config["rundir"] == "exps/" and conv.original_config["batch"] == 32
    m = tree["model"].fields
    with torch.no_grad():
        masks, scores = conv.model(windows)
        emb = run(m["trunk"], windows)
        ref_masks = run(m["maskBranch"].fields["modules"][0], emb).reshape(masks.shape)
        ref_scores = run(m["scoreBranch"], emb)[:, 0]
        close(masks, ref_masks)
        close(scores, ref_scores)
        # Dense path on a non-square image: the Linear as an f x f convolution.
        img = torch.randn(1, 3, 96, 80, generator=torch.Generator().manual_seed(1))
        dense = conv.model.features(img)
        ref_dense = dense_reference(m["trunk"], img)
        close(dense, ref_dense)
        close(conv.model.score_map(dense), run(m["scoreBranch"], ref_dense.permute(0, 2, 3, 1))[..., 0])


def test_deepmask_resnet50_structure(tmp_path, windows):
    tree = deepmask_file("resnet50", "1xCx1x1", seed=5)
    path = tmp_path / "model.t7"
    save_t7(tree, str(path))
    conv, _ = load_t7(str(path))
    assert conv.settings["arch"] == "resnet50"
    m = tree["model"].fields
    with torch.no_grad():
        masks, scores = conv.model(windows[:1])
        emb = run(m["trunk"], windows[:1])
        close(masks, run(m["maskBranch"].fields["modules"][0], emb).reshape(masks.shape))
        close(scores, run(m["scoreBranch"], emb)[:, 0])


def test_sharpmask_equals_reference(tmp_path, windows):
    tree = sharpmask_file("resnet18", "C")
    path = tmp_path / "sharp.t7"
    save_t7(tree, str(path))
    conv, _ = load_t7(str(path))
    assert conv.kind == "sharpmask" and conv.settings["km"] == 16 and conv.settings["ks"] == 16
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
    tree = deepmask_file("resnet18", "C")
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
    tree = deepmask_file("resnet18", "C")
    conv = _find(tree, ["trunk", 0]).fields["modules"][1]
    conv.fields["padW"] = conv.fields["padH"] = 3  # zero padding instead of symmetric
    with pytest.raises(T7FormatError, match=r"model\.trunk\.modules\[1\]\.modules\[2\]: expected no built-in"):
        convert_tree(read_back(tree, tmp_path))
    tree = deepmask_file("resnet18", "C")
    tree["model"].fields["trunk"].fields["modules"][5].fields["modules"].pop()  # layer2 of 1 block
    with pytest.raises(T7FormatError, match=r"basic blocks \[2, 1, 2\]"):
        convert_tree(read_back(tree, tmp_path))
    with pytest.raises(T7FormatError, match="expected nn.DeepMask or nn.SharpMask, found nn.Linear"):
        convert_tree(read_back({"model": LuaObject("nn.Linear", {}), "config": {}}, tmp_path))


def read_back(tree, tmp_path):
    path = tmp_path / "x.t7"
    save_t7(tree, str(path))
    return read_t7(str(path))[0]


def test_truncated_or_foreign_files_give_clear_errors(tmp_path):
    tree = deepmask_file("resnet18", "C")
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
    tree = deepmask_file("resnet18", "1xCx1x1", seed=3)
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


def test_generator_loads_the_original_t7_directly(tmp_path):
    # model.weights may name the released model.t7 itself (e.g. its published URL): it is
    # converted on load and gives the same proposals as the converted checkpoint; the sha256
    # reported with the proposals is the .t7 file's.
    import hashlib

    from segdist.config import ModelConfig, ScalesConfig
    from segdist.models.checkpoint import save_checkpoint
    from segdist.models.generator import build_generator

    tree = deepmask_file("resnet18", "C", seed=5)
    t7_path = tmp_path / "model.t7"
    save_t7(tree, str(t7_path))
    conv, _ = load_t7(str(t7_path))
    ckpt = tmp_path / "deepmask.safetensors"
    save_checkpoint(conv.model, str(ckpt))
    image = np.random.default_rng(0).integers(0, 255, (70, 90, 3), dtype=np.uint8)
    common = dict(name="deepmask", proposals=20, device="cpu",
                  scales=ScalesConfig(min=-0.5, max=0.0, step=0.5))
    from_t7 = build_generator(ModelConfig(weights=str(t7_path), **common))
    from_ckpt = build_generator(ModelConfig(weights=str(ckpt), **common))
    assert from_t7.weights_sha256 == hashlib.sha256(t7_path.read_bytes()).hexdigest()
    a, b = from_t7([image], [1])[0], from_ckpt([image], [1])[0]
    assert len(a) == 20 and a.equals(b)

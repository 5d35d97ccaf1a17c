"""Segment Anything presets: the same proposals as the official automatic mask generators
(SamAutomaticMaskGenerator, SAM2AutomaticMaskGenerator) on the same weights and settings, the
official networks of the presets, the config mirroring the official parameters, the errors for a
missing package or checkpoint, and ``segdist generate`` / ``evaluate`` / ``show`` with SAM.

Cost: SAM's image encoders run at 1024 x 1024 whatever the image (ViT-B ~26 CPU-seconds, Hiera-T
~4), so the preset-level checks run a handful of encoder passes on tiny synthetic images and small
point grids; the generator's logic across settings (crops, small-region removal, thresholds) is
checked against the official generator on a tiny network built from the official SAM modules.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import yaml

from segdist.config import WeightsRef, model_config
from segdist.errors import ConfigError, StorageError
from segdist.proposals.types import ImageProposals
from segdist.proposers import PROPOSERS, build_proposer, config_class
from segdist.proposers.sam import SAM2_PRESETS, SAM_PRESETS, Sam2Config, SamConfig
from test_job import make_data, pycocotools_segm_stats

pytestmark = pytest.mark.usefixtures("one_torch_thread")

def official(anns: list[dict]) -> tuple[list[bytes], np.ndarray, np.ndarray]:
    """An official generator's output (output_mode="coco_rle") as segdist ranks it: by predicted
    IoU, descending, stable; boxes as tight COCO boxes (the official "bbox" is x, y, x1 - x0,
    y1 - y0 of inclusive bounds: one pixel less than the tight width and height)."""
    anns = sorted(anns, key=lambda a: -a["predicted_iou"])
    counts = [a["segmentation"]["counts"].encode() for a in anns]
    boxes = np.array([a["bbox"] for a in anns], np.float32).reshape(-1, 4) + [0, 0, 1, 1]
    scores = np.array([a["predicted_iou"] for a in anns], np.float32)
    return counts, boxes.astype(np.float32), scores


def assert_same(ours: ImageProposals, anns: list[dict]) -> None:
    counts, boxes, scores = official(anns)
    assert len(ours) == len(counts)
    assert ours.counts == counts                     # the same masks, byte for byte, same order
    np.testing.assert_array_equal(ours.boxes, boxes)
    np.testing.assert_allclose(ours.scores, scores, rtol=0, atol=1e-6)


def synthetic_images(tmp: Path, n: int, seed: int = 5) -> tuple[list[np.ndarray], list[int]]:
    from segdist.imageio import read_image

    data = make_data(str(tmp), n, seed=seed)
    gt = json.loads(Path(data["annotations"]).read_text())
    return ([read_image(f"{data['images']}/{im['file_name']}") for im in gt["images"]],
            [im["id"] for im in gt["images"]])


# -------------------------------------------------------------------------------------------------
# Presets and config


def test_presets_are_registered_with_their_families():
    for name in SAM_PRESETS:
        assert config_class(name) is SamConfig and PROPOSERS[name].__name__ == "build_sam"
    for name in SAM2_PRESETS:
        assert config_class(name) is Sam2Config and PROPOSERS[name].__name__ == "build_sam2"
    cfg = model_config(name="sam-vit-b", points_per_side=8, weights="/ckpt/sam_vit_b_01ec64.pth")
    assert cfg.weights == WeightsRef("state-dict", "/ckpt/sam_vit_b_01ec64.pth")
    with pytest.raises(ConfigError, match=r"model.use_m2m: not a setting of the Segment Anything "
                                          r"family"):
        model_config(name="sam-vit-b", use_m2m=True)
    with pytest.raises(ConfigError, match=r"checkpoint weights do not fit the Segment Anything 2"):
        model_config(name="sam2-hiera-t", weights="checkpoint:/x.safetensors")
    with pytest.raises(ConfigError, match=r"crop layer 2 without points"):
        model_config(name="sam2-hiera-t", points_per_side=3, crop_n_layers=2,
                     crop_n_points_downscale_factor=2)


@pytest.mark.parametrize("cls,module,generator", [
    (SamConfig, "segment_anything", "SamAutomaticMaskGenerator"),
    (Sam2Config, "sam2.automatic_mask_generator", "SAM2AutomaticMaskGenerator")])
def test_config_has_the_official_parameters_and_defaults(cls, module, generator):
    gen = getattr(pytest.importorskip(module), generator)
    params = inspect.signature(gen.__init__).parameters
    # output_mode and point_grids (explicit grids) are not settings here: outputs are RLE, grids
    # come from points_per_side
    official_names = set(params) - {"self", "model", "output_mode", "point_grids", "kwargs"}
    assert official_names <= set(cls.model_fields)
    for name in official_names:
        assert cls.model_fields[name].default == pytest.approx(params[name].default), name


def test_crops_and_point_grids_match_the_official_ones():
    amg = pytest.importorskip("segment_anything.utils.amg")
    from segdist.proposers.sam.grid import crop_boxes, layer_grids

    for n, layers, down in [(32, 0, 1), (16, 2, 2), (7, 3, 1), (5, 1, 3)]:
        for ours, ref in zip(layer_grids(n, layers, down), amg.build_all_layer_point_grids(n, layers, down)):
            np.testing.assert_array_equal(ours, ref)
    for hw in [(480, 640), (640, 480), (37, 1001), (1, 1), (333, 333)]:
        for layers in range(4):
            for ratio in (512 / 1500, 0.0, 0.5):
                boxes, idx = amg.generate_crop_boxes(hw, layers, ratio)
                assert crop_boxes(*hw, layers, ratio) == [(tuple(b), i) for b, i in zip(boxes, idx)]


# -------------------------------------------------------------------------------------------------
# The generator against the official one, on a tiny network made of the official SAM modules


def tiny_sam(seed: int = 0):
    """A small SAM (2 ViT blocks at 256 px, 32-d prompt space) from the official modules: the
    official generator runs it as it runs ViT-H."""
    import torch
    from segment_anything.modeling import (ImageEncoderViT, MaskDecoder, PromptEncoder, Sam,
                                           TwoWayTransformer)

    torch.manual_seed(seed)
    size, dim = 256, 32
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=2, embed_dim=48, img_size=size, mlp_ratio=2, num_heads=2, patch_size=16,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), qkv_bias=True, use_rel_pos=True,
            global_attn_indexes=[1], window_size=4, out_chans=dim),
        prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(size // 16, size // 16),
                                     input_image_size=(size, size), mask_in_chans=4),
        mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer_dim=dim,
                                 transformer=TwoWayTransformer(depth=2, embedding_dim=dim,
                                                               mlp_dim=64, num_heads=2),
                                 iou_head_depth=3, iou_head_hidden_dim=32),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375]).eval()
    # Freshly initialised, its mask logits are all near 0 (std 0.03), so no mask is stable; scaled
    # up, masks have a stable core and an uncertain rim as a trained model's do.
    with torch.no_grad():
        for mlp in sam.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(100)
    return sam


TINY_CASES = {
    # no filter at all: every prompt's 3 masks, NMS only (at 1.0 nothing overlaps more)
    "unfiltered": dict(points_per_side=6, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                       box_nms_thresh=1.0),
    "thresholds": dict(points_per_side=8, points_per_batch=10, pred_iou_thresh=0.01,
                       stability_score_thresh=0.9, stability_score_offset=0.5, box_nms_thresh=1.0),
    "crops": dict(points_per_side=6, crop_n_layers=1, crop_n_points_downscale_factor=2,
                  crop_overlap_ratio=0.3, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                  box_nms_thresh=0.99, crop_nms_thresh=0.99),
    "small-regions": dict(points_per_side=5, pred_iou_thresh=0.0, stability_score_thresh=0.3,
                          box_nms_thresh=1.0, min_mask_region_area=40),
    "mask-threshold": dict(points_per_side=5, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                           box_nms_thresh=1.0, mask_threshold=0.5, stability_score_offset=0.25),
}


@pytest.mark.parametrize("case", list(TINY_CASES))
def test_generator_equals_the_official_one_on_a_tiny_sam(case, tmp_path):
    pytest.importorskip("segment_anything")
    pytest.importorskip("cv2")
    from segment_anything import SamAutomaticMaskGenerator

    from segdist.proposers.sam.generator import GeneratorSettings, SamProposer
    from segdist.proposers.sam.runners import SamRunner

    settings = TINY_CASES[case]
    sam = tiny_sam()
    images, ids = synthetic_images(tmp_path, 3, seed=11)
    ours = SamProposer("tiny", SamRunner(sam), GeneratorSettings(**settings, proposals=1000))
    got = ours(images, ids)
    ref_settings = dict(settings)
    if "mask_threshold" in ref_settings:  # SAM's generator reads it from the model
        sam.mask_threshold = ref_settings.pop("mask_threshold")
    ref = SamAutomaticMaskGenerator(sam, output_mode="coco_rle", **ref_settings)
    for im, p in zip(images, got):
        assert_same(p, ref.generate(im))
    assert sum(len(p) for p in got) >= 3  # masks did come through
    # one image at a time: the same bytes (an image's proposals depend on it alone)
    assert all(ours([im], [i])[0].equals(p) for im, i, p in zip(images, ids, got))
    if case == "unfiltered":
        assert [len(p) for p in got] == [3 * 36] * 3
    # the case's feature changes the output (so the comparison above covered it)
    off = {"thresholds": dict(pred_iou_thresh=0.0), "crops": dict(crop_n_layers=0),
           "small-regions": dict(min_mask_region_area=0), "mask-threshold": dict(mask_threshold=0.0)}
    if case in off:
        plain = SamProposer("tiny", SamRunner(sam), GeneratorSettings(**{**settings, **off[case]}))
        assert not all(a.equals(b) for a, b in zip(plain(images, ids), got))


def test_the_proposal_cap_keeps_the_best(tmp_path):
    pytest.importorskip("segment_anything")
    from segdist.proposers.sam.generator import GeneratorSettings, SamProposer
    from segdist.proposers.sam.runners import SamRunner

    images, ids = synthetic_images(tmp_path, 1, seed=3)
    settings = TINY_CASES["unfiltered"]
    runner = SamRunner(tiny_sam())
    (full,) = SamProposer("tiny", runner, GeneratorSettings(**settings))(images, ids)
    (top,) = SamProposer("tiny", runner, GeneratorSettings(**settings, proposals=7))(images, ids)
    assert len(full) == 108 and top.equals(full.top(7))
    assert np.all(np.diff(full.scores) <= 0)


# -------------------------------------------------------------------------------------------------
# Errors: missing packages, missing or wrong checkpoints


@pytest.mark.parametrize("name,module,words", [
    ("sam-vit-b", "segment_anything", "segment-anything, which is not installed; install it with: "
                                      "pip install 'segdist[sam]'"),
    ("sam2-hiera-t", "sam2", "sam2, which is not installed; install it with: pip install wheel "
                             "setuptools && SAM2_BUILD_CUDA=0 pip install --no-build-isolation")])
def test_a_missing_package_is_one_line_naming_it_and_the_install(name, module, words, monkeypatch):
    for key in [k for k in sys.modules if k == module or k.startswith(module + ".")]:
        monkeypatch.delitem(sys.modules, key)
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed: import raises
    with pytest.raises(ConfigError) as err:
        build_proposer(model_config(name=name, device="cpu"))
    msg = str(err.value)
    assert "\n" not in msg and words in msg and msg.startswith(f"model.name {name} needs the package")


def test_missing_or_wrong_checkpoints_say_which_file_to_get(tmp_path):
    pytest.importorskip("segment_anything")
    import torch

    from segdist.job import preflight

    url = "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth"
    hint = f"the official sam-vit-b checkpoint is sam_vit_b_01ec64.pth: download {url} and pass " \
           "it as model.weights=/path/or/s3/uri/sam_vit_b_01ec64.pth"
    missing = model_config(name="sam-vit-b", weights=str(tmp_path / "sam_vit_b.pth"), device="cpu")
    with pytest.raises(StorageError) as err:
        preflight.check_weights(missing)
    assert str(err.value) == f"model.weights {tmp_path / 'sam_vit_b.pth'} does not exist; {hint}"
    with pytest.raises(StorageError) as err:
        build_proposer(missing)
    assert "does not exist" in str(err.value) and str(err.value).endswith(hint)
    # offline (nothing listens on port 9): the same hint
    offline = model_config(name="sam-vit-b", weights="http://127.0.0.1:9/sam_vit_b_01ec64.pth",
                           device="cpu")
    with pytest.raises(StorageError) as err:
        build_proposer(offline)
    assert "http://127.0.0.1:9/sam_vit_b_01ec64.pth" in str(err.value)
    assert str(err.value).endswith(hint) and "\n" not in str(err.value)
    # a state dict of something else
    wrong = tmp_path / "other.pth"
    torch.save({"backbone.weight": torch.zeros(3)}, wrong)
    with pytest.raises(ConfigError) as err:
        build_proposer(model_config(name="sam-vit-b", weights=str(wrong), device="cpu"))
    assert "is not a sam-vit-b checkpoint" in str(err.value) and str(err.value).endswith(hint)


# -------------------------------------------------------------------------------------------------
# The presets' networks against the official generators (random weights give SAM's mask logits
# near 0, so no mask is stable: the stability filter is off here and checked on the tiny SAM)


@pytest.fixture
def two_torch_threads():
    """Both generators of a comparison run in this process, so they see the same kernels at any
    thread count: 2 threads halve the wall time on an otherwise idle 2-core CI machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


def test_sam2_hiera_t_equals_the_official_generator_with_weights_from_a_file(tmp_path,
                                                                             two_torch_threads):
    pytest.importorskip("sam2")
    import torch
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
    from sam2.build_sam import build_sam2

    torch.manual_seed(1)
    net = build_sam2("configs/sam2/sam2_hiera_t.yaml", None, device="cpu")
    ckpt = tmp_path / "sam2_hiera_tiny.pt"
    torch.save({"model": net.state_dict()}, ckpt)  # the official file's layout
    images, ids = synthetic_images(tmp_path / "data", 2)  # one image per setting: 4 encoder passes
    settings = dict(points_per_side=3, points_per_batch=4, pred_iou_thresh=0.505,
                    stability_score_thresh=0.0, box_nms_thresh=1.0)
    ours = build_proposer(model_config(name="sam2-hiera-t", weights=str(ckpt), device="cpu",
                                       **settings))
    assert ours.weights_sha256 == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    (p,) = ours(images[:1], ids[:1])
    assert_same(p, SAM2AutomaticMaskGenerator(net, output_mode="coco_rle", **settings)
                .generate(images[0]))
    assert 0 < len(p) < 27  # the IoU filter kept some of the 9 x 3 masks
    # the other image: use_m2m (a second pass on each mask's logits) with single-mask outputs
    # (the best multimask output where the single mask is unstable)
    m2m = dict(settings, points_per_side=2, use_m2m=True, multimask_output=False, pred_iou_thresh=0.3)
    ours = build_proposer(model_config(name="sam2-hiera-t", weights=str(ckpt), device="cpu", **m2m))
    (p,) = ours(images[1:], ids[1:])
    assert_same(p, SAM2AutomaticMaskGenerator(net, output_mode="coco_rle", **m2m).generate(images[1]))
    assert len(p) == 4


# -------------------------------------------------------------------------------------------------
# segdist generate with sam-vit-b (random weights) on the synthetic dataset, through real Ray:
# chunks, manifest, AR, the official generator's masks, a resume


VIT_B = {"name": "sam-vit-b", "device": "cpu", "points_per_side": 3, "pred_iou_thresh": 0.03,
         "stability_score_thresh": 0.0, "box_nms_thresh": 1.0, "proposals": 10}


@pytest.fixture(scope="module")
def vit_b_run(request, tmp_path_factory):
    pytest.importorskip("segment_anything")
    request.getfixturevalue("ray_cluster")  # only once the package is there
    from segdist.cli import main

    root = tmp_path_factory.mktemp("sam-vit-b")
    data = make_data(str(root / "data"), 2)
    config = root / "sam.yaml"
    out = root / "out"
    config.write_text(yaml.safe_dump({
        "dataset": data, "model": VIT_B, "output": {"uri": str(out), "chunk_size": 1},
        "resources": {"num_workers": 2, "decode_threads": 1}}))
    assert main(["generate", str(config), "--no-progress"]) == 0
    return data, config, out


def test_generate_with_sam_vit_b_writes_chunks_manifest_and_ar(vit_b_run):
    from segdist.cli import main
    from segdist.proposals.store import open_proposals

    data, config, out = vit_b_run
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["name"] == "sam-vit-b" and len(manifest["chunks"]) == 2
    assert sorted(p.name for p in (out / "parquet").iterdir()) == [
        "chunk-000000.parquet", "chunk-000001.parquet"]
    props = list(open_proposals(str(out)).iter_images())
    assert max(len(p) for p in props) == 10 and all(p.model == "sam-vit-b" for p in props)
    assert main(["evaluate", "--proposals", str(out), "--dataset", str(config), "--no-progress"]) == 0
    (run,) = json.loads((out / "eval" / "eval.json").read_text())["runs"]
    stats = pycocotools_segm_stats(data["annotations"], props)
    assert run["segm"]["metrics"]["AR@10"] == pytest.approx(stats[6], abs=1e-12)


def test_sam_vit_b_proposals_of_the_job_equal_the_official_generator(vit_b_run):
    import torch
    from segment_anything import SamAutomaticMaskGenerator, sam_model_registry

    from segdist.imageio import read_image
    from segdist.proposals.store import open_proposals

    data, _, out = vit_b_run
    torch.manual_seed(0)  # segdist's seeded random weights: the official builder's init, seed 0
    net = sam_model_registry["vit_b"]().eval()
    store = open_proposals(str(out))
    first = store.image_ids()[0]
    name = store.file_names()[first]
    settings = {k: v for k, v in VIT_B.items() if k not in ("name", "device", "proposals")}
    anns = SamAutomaticMaskGenerator(net, output_mode="coco_rle", **settings).generate(
        read_image(f"{data['images']}/{name}"))
    assert len(anns) > 10  # the cap of 10 cut the official list
    counts, boxes, scores = official(anns)
    p = store.get(first)
    assert p.counts == counts[:10]
    np.testing.assert_array_equal(p.boxes, boxes[:10])
    np.testing.assert_allclose(p.scores, scores[:10], rtol=0, atol=1e-6)


def test_a_sam_resume_skips_committed_chunks(vit_b_run, tmp_path):
    import shutil

    from segdist.cli import main
    from test_job import mtimes, read_tree

    data, config, out = vit_b_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    first = read_tree(str(copy))
    (copy / "_segdist" / "chunks" / "chunk-000001.json").unlink()  # as if interrupted there
    before = mtimes(str(copy))
    assert main(["generate", str(config), "--no-progress", "--set", f"output.uri={copy}"]) == 0
    after = mtimes(str(copy))
    kept = [k for k in before if "chunk-000000" in k]
    assert kept and all(after[k] == before[k] for k in kept)      # chunk 0: not rewritten
    redone = [k for k in before if "chunk-000001" in k and "_segdist" not in k]
    assert redone and all(after[k] != before[k] for k in redone)  # chunk 1: computed again
    again = read_tree(str(copy))
    assert {k: v for k, v in again.items() if "chunk-" in k} == \
           {k: v for k, v in first.items() if "chunk-" in k}     # the same bytes


def test_show_draws_sam_proposals(tmp_path, capsys):
    pytest.importorskip("sam2")
    from PIL import Image

    from segdist.cli import main

    data = make_data(str(tmp_path / "data"), 1)
    image = next(Path(data["images"]).iterdir())
    out = tmp_path / "overlay.png"
    assert main(["show", str(image), "--model", "sam2-hiera-t", "--device", "cpu", "--top", "3",
                 "--out", str(out), "--set", "points_per_side=2", "--set", "pred_iou_thresh=0",
                 "--set", "stability_score_thresh=0", "--set", "box_nms_thresh=1.0"]) == 0
    assert f"{out}: 3 proposals of sam2-hiera-t drawn over" in capsys.readouterr().out
    drawn = np.asarray(Image.open(out).convert("RGB"))
    original = np.asarray(Image.open(image).convert("RGB"))
    assert drawn.shape == original.shape and not np.array_equal(drawn, original)
    assert main(["show", str(image), "--model", "sam2-hiera-t", "--set", "no_such=1"]) == 2
    assert "model.no_such: not a setting of the Segment Anything 2" in capsys.readouterr().err


@pytest.mark.gpu
def test_cuda_equals_the_official_generator_on_cuda(tmp_path):
    """On a GPU: the device path (masks kept on the device, the torch RLE encoder) against the
    official generator on the same GPU, fp32."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    pytest.importorskip("sam2")
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    images, ids = synthetic_images(tmp_path, 2)
    settings = dict(points_per_side=8, pred_iou_thresh=0.5, stability_score_thresh=0.0,
                    box_nms_thresh=1.0)
    ours = build_proposer(model_config(name="sam2-hiera-t", device="cuda", **settings))
    assert ours.device.startswith("cuda")
    ref = SAM2AutomaticMaskGenerator(ours.runner.model, output_mode="coco_rle", **settings)
    for im, p in zip(images, ours(images, ids)):
        assert_same(p, ref.generate(im))


@pytest.mark.parametrize("generation", ["sam", "sam2"])
def test_shared_first_layer_is_bit_identical(generation):
    """The decoder's transformer with the first layer's image-side work once per image gives the
    official transformer's numbers bit for bit (ViT-B's and Hiera-T's decoders, random weights)."""
    import torch

    from segdist.proposers.sam import PRESETS
    from segdist.proposers.sam.nets import construct
    from segdist.proposers.sam.transformer import (attention_core_sam, attention_core_sam2,
                                                   two_way_shared_image)

    pytest.importorskip("segment_anything" if generation == "sam" else "sam2")
    torch.manual_seed(0)
    name = "sam-vit-b" if generation == "sam" else "sam2-hiera-t"
    net = construct(PRESETS[name], name)
    if generation == "sam":
        tr, pe, core = net.mask_decoder.transformer, net.prompt_encoder, attention_core_sam
    else:
        tr, pe, core = net.sam_mask_decoder.transformer, net.sam_prompt_encoder, attention_core_sam2
    with torch.inference_mode():
        image = torch.randn(1, 256, 64, 64) + pe.no_mask_embed.weight.reshape(1, -1, 1, 1)
        tokens = torch.randn(7, 7, 256)                                   # 7 prompts x 7 tokens
        dense_pe = pe.get_dense_pe()
        official = tr(torch.repeat_interleave(image, 7, 0), torch.repeat_interleave(dense_pe, 7, 0),
                      tokens)
        shared = two_way_shared_image(tr, core, image, dense_pe, tokens)
    assert torch.equal(official[0], shared[0]) and torch.equal(official[1], shared[1])

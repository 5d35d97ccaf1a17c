"""The synthetic dataset: determinism, content statistics, COCO export validity, the CLI."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from segdist.cli import main
from segdist.data.synthetic import CATEGORIES, make_scene, make_synthetic, split_of
from segdist.data.voc import voc_image_id
from segdist.errors import ConfigError
from segdist.imageio import read_image

SMALL = dict(min_side=96, max_side=224, max_objects=6)


def _tree_bytes(root) -> dict[str, bytes]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            path = os.path.join(dirpath, f)
            out[os.path.relpath(path, root)] = open(path, "rb").read()
    return out


@pytest.fixture(scope="module")
def scenes():
    """Default-size scenes of seed 0 (what `segdist sample-data` makes)."""
    return [make_scene(0, i) for i in range(30)]


@pytest.fixture(scope="module")
def coco_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("coco")
    return make_synthetic(str(out), 12, seed=5, **SMALL)


@pytest.mark.parametrize("fmt", ["coco", "voc"])
def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, fmt):
    a = make_synthetic(str(tmp_path / "a"), 4, seed=11, fmt=fmt, **SMALL)
    b = make_synthetic(str(tmp_path / "b"), 4, seed=11, fmt=fmt, **SMALL)
    c = make_synthetic(str(tmp_path / "c"), 4, seed=12, fmt=fmt, **SMALL)
    ta, tb, tc = (_tree_bytes(tmp_path / d) for d in "abc")
    assert len(ta) == (4 + 3 if fmt == "coco" else 4 * 4 + 6 + 1)  # images + lists/annotations
    assert ta == tb
    assert a["train"] == b["train"] and a["val"] == b["val"]
    image_files = [k for k in ta if k.endswith((".jpg", ".png")) and "Segmentation" not in k]
    assert all(ta[k] != tc.get(k) for k in image_files)
    assert c["files"] and all(os.path.exists(f) for f in c["files"])


def test_scene_content_covers_sizes_shapes_crowds_formats(scenes):
    areas = np.array([int(x.mask.sum()) for s in scenes for x in s.instances if not x.iscrowd])
    small, large = (areas < 32**2).sum(), (areas > 96**2).sum()
    medium = len(areas) - small - large
    assert min(small, medium, large) >= 0.1 * len(areas), (small, medium, large)
    assert {x.category for s in scenes for x in s.instances} == set(CATEGORIES)
    crowds = [x for s in scenes for x in s.instances if x.iscrowd]
    assert 1 <= len(crowds) <= len(scenes) // 2  # a few, not everywhere
    assert {s.ext for s in scenes} == {"jpg", "png"}
    sizes = {(s.height, s.width) for s in scenes}
    assert len(sizes) == len(scenes)
    for s in scenes:
        assert 160 <= min(s.height, s.width) and max(s.height, s.width) <= 640
        assert max(s.height, s.width) <= 2 * min(s.height, s.width)
        assert s.image.dtype == np.uint8 and s.image.shape == (s.height, s.width, 3)
        assert s.image_id == voc_image_id(s.name) == 2026_000_000 + s.index + 1
    ratios = [s.width / s.height for s in scenes]
    assert min(ratios) < 0.8 and max(ratios) > 1.25  # portrait and landscape


def test_visible_masks_partition_pixels_and_occlusion_happens(scenes):
    occluded = 0
    for s in scenes:
        cover = np.zeros((s.height, s.width), np.int32)
        for x in s.instances:
            cover += x.mask
            visible = int(x.mask.sum())
            assert 40 <= visible <= x.full_area
            assert visible >= 0.5 * x.full_area  # nothing hidden more than half
            occluded += visible < x.full_area
        assert cover.max() <= 1  # each pixel belongs to at most one object (the top one)
    assert occluded >= 5


def _edge_contrast(image: np.ndarray, mask: np.ndarray) -> float:
    """Median RGB distance between mask pixels and their 4-neighbours outside the mask."""
    ys, xs = np.nonzero(mask)
    y0, x0 = max(ys.min() - 1, 0), max(xs.min() - 1, 0)
    window = (slice(y0, ys.max() + 2), slice(x0, xs.max() + 2))  # the mask's box, 1 px margin
    img, mask = image[window].astype(np.float64), mask[window]
    dists = []
    for axis in (0, 1):
        for shift in (1, -1):
            inside_edge = mask & ~np.roll(mask, shift, axis=axis)
            edge = [slice(None), slice(None)]
            edge[axis] = 0 if shift == 1 else -1
            inside_edge[tuple(edge)] = False  # np.roll wraps around
            neighbour = np.roll(img, shift, axis=axis)
            dists.append(np.linalg.norm(img[inside_edge] - neighbour[inside_edge], axis=1))
    return float(np.median(np.concatenate(dists)))


def test_objects_are_separable_from_what_surrounds_them(scenes):
    # The GT boundary must be a visible edge in the pixels (what a DeepMask learns from): a mask
    # that included occluded or background pixels would have low contrast across its boundary.
    for s in scenes:
        for x in s.instances:
            if not x.iscrowd:
                assert _edge_contrast(s.image, x.mask) > 40, (s.name, x.category)
    s = next(s for s in scenes if any(not x.iscrowd and x.mask.sum() > 2000 for x in s.instances))
    x = next(x for x in s.instances if not x.iscrowd and x.mask.sum() > 2000)
    shifted = np.roll(x.mask, (7, 7), axis=(0, 1))  # control: a misplaced mask is not an edge
    assert _edge_contrast(s.image, shifted) < 0.5 * _edge_contrast(s.image, x.mask)


def test_coco_export_loads_in_pycocotools_and_annotations_are_exact(coco_export):
    gt = COCO(coco_export["annotations"]["all"])
    assert sorted(gt.getImgIds()) == sorted(coco_export["train"] + coco_export["val"])
    assert {c["name"] for c in gt.loadCats(gt.getCatIds())} == set(CATEGORIES)
    exts = set()
    for img in gt.loadImgs(gt.getImgIds()):
        pixels = read_image(os.path.join(coco_export["images"], img["file_name"]))
        assert pixels.shape == (img["height"], img["width"], 3)
        exts.add(img["file_name"].rsplit(".", 1)[1])
        for ann in gt.loadAnns(gt.getAnnIds(imgIds=img["id"])):
            assert isinstance(ann["segmentation"]["counts"], str)
            assert ann["segmentation"]["size"] == [img["height"], img["width"]]
            m = gt.annToMask(ann)
            assert ann["area"] == int(m.sum()) > 0
            assert ann["bbox"] == mask_utils.toBbox(ann["segmentation"]).tolist()
            ys, xs = np.nonzero(m)
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert ann["iscrowd"] in (0, 1)
    assert exts == {"jpg", "png"}


def test_train_and_val_files_split_the_images(coco_export):
    docs = {k: json.load(open(v)) for k, v in coco_export["annotations"].items()}
    ids = {k: {im["id"] for im in d["images"]} for k, d in docs.items()}
    assert ids["train"] and ids["val"] and not ids["train"] & ids["val"]
    assert ids["train"] | ids["val"] == ids["all"]
    assert sorted(ids["val"]) == coco_export["val"]
    assert len(ids["val"]) == round(12 * 0.2)
    for k in ("train", "val"):
        ann_ids = {a["id"] for a in docs[k]["annotations"]}
        assert ann_ids == {a["id"] for a in docs["all"]["annotations"] if a["image_id"] in ids[k]}


def test_ground_truth_as_proposals_gives_full_recall(coco_export):
    # The GT is self-consistent for COCOeval (areas, sizes, crowd handling): its own masks recall 1.
    gt = COCO(coco_export["annotations"]["val"])
    results = [{"image_id": a["image_id"], "category_id": 1, "score": 1.0,
                "segmentation": a["segmentation"]} for a in gt.dataset["annotations"]]
    ev = COCOeval(gt, gt.loadRes(results), "segm")
    ev.params.useCats = 0
    ev.params.maxDets = [10, 100, 1000]
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert ev.stats[8] == pytest.approx(1.0)


@pytest.mark.parametrize("sides, objects", [((32, 32), (0, 3)), ((48, 160), (0, 6)), ((400, 560), (8, 12))])
def test_extreme_options_render_valid_scenes(sides, objects):
    for i in range(4):
        s = make_scene(1, i, min_side=sides[0], max_side=sides[1], min_objects=objects[0],
                       max_objects=objects[1], crowd_prob=0.5)
        assert sides[0] <= min(s.height, s.width) and max(s.height, s.width) <= sides[1]
        assert len(s.instances) <= objects[1] + 1  # + the crowd region
        assert all(x.mask.shape == (s.height, s.width) and x.mask.sum() >= 40 for x in s.instances)


def test_split_is_deterministic_and_bounded():
    assert split_of(3, 10, 0.2) == split_of(3, 10, 0.2)
    assert split_of(3, 10, 0.2).count("val") == 2
    assert split_of(3, 2, 0.01).count("val") == 1  # at least one held-out image
    assert split_of(3, 5, 0.0).count("val") == 0


@pytest.mark.parametrize("kwargs, word", [
    (dict(n_images=0), "number of images"),
    (dict(fmt="yolo"), "format"),
    (dict(min_side=300, max_side=200), "min_side"),
    (dict(min_objects=5, max_objects=2), "objects"),
    (dict(val_fraction=1.0), "val_fraction"),
])
def test_bad_options_are_config_errors(tmp_path, kwargs, word):
    args = dict(n_images=2, fmt="coco") | kwargs
    with pytest.raises(ConfigError, match=word):
        make_synthetic(str(tmp_path), args.pop("n_images"), seed=0, **args)
    assert not os.listdir(tmp_path)


def test_cli_writes_dataset_and_refuses_bad_arguments(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["sample-data", "--out", str(out), "--images", "3", "--seed", "4", "--format", "voc",
               "--min-side", "96", "--max-side", "160", "--val-fraction", "0.34"])
    assert rc == 0
    root = out / "VOC2012"
    val = (root / "ImageSets" / "Main" / "val.txt").read_text().split()
    train = (root / "ImageSets" / "Main" / "train.txt").read_text().split()
    assert len(val) == 1 and sorted(val + train) == ["2026_000001", "2026_000002", "2026_000003"]
    assert len(os.listdir(root / "JPEGImages")) == 3
    assert "wrote 3 images" in capsys.readouterr().out
    assert main(["sample-data", "--out", str(out), "--images", "-1"]) == 2
    assert "number of images" in capsys.readouterr().err
    assert main(["sample-data", "--out", str(out), "--storage-options", "{nope"]) == 2
    assert "storage-options" in capsys.readouterr().err

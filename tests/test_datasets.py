"""COCO and VOC readers: conversion rules, equivalence of the two synthetic exports, errors, s3://."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from segdist.config import DatasetConfig
from segdist.data import load_dataset
from segdist.data.coco import load_coco
from segdist.data.synthetic import make_synthetic
from segdist.data.voc import VOC_CLASSES, load_voc, voc_image_id
from segdist.errors import DatasetError, StorageError
from segdist.imageio import read_image

SMALL = dict(min_side=96, max_side=224, max_objects=6, crowd_prob=0.5)  # crowds in both exports
SEED = 5
N = 10


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """The COCO and the VOC export of the same seed."""
    base = tmp_path_factory.mktemp("exports")
    coco = make_synthetic(str(base / "coco"), N, seed=SEED, **SMALL)
    voc = make_synthetic(str(base / "voc"), N, seed=SEED, fmt="voc", **SMALL)
    return coco, voc


def _masks(gt: dict, image_id: int) -> list[np.ndarray]:
    return [mask_utils.decode(a["segmentation"]) for a in gt["annotations"] if a["image_id"] == image_id]


def _coco_api(gt: dict) -> COCO:
    api = COCO()
    api.dataset = gt
    api.createIndex()
    return api


# --- COCO ----------------------------------------------------------------------------------------

def test_load_coco_records_match_files(exports):
    coco, _ = exports
    ds = load_coco(coco["annotations"]["all"], coco["images"])
    assert ds.name == "instances_all"
    assert [r.image_id for r in ds.images] == sorted(coco["train"] + coco["val"])
    for r in ds.images:
        assert r.uri == os.path.join(coco["images"], r.file_name)
        assert read_image(r.uri).shape == (r.height, r.width, 3)
    assert {a["image_id"] for a in ds.coco_gt["annotations"]} <= {r.image_id for r in ds.images}
    _coco_api(ds.coco_gt)  # pycocotools accepts the dict


def test_load_coco_selection_and_gzip(exports, tmp_path):
    coco, _ = exports
    full = load_coco(coco["annotations"]["all"], coco["images"])
    ids = [r.image_id for r in full.images]
    first3 = load_coco(coco["annotations"]["all"], coco["images"], limit=3)
    assert [r.image_id for r in first3.images] == ids[:3]
    assert {a["image_id"] for a in first3.coco_gt["annotations"]} <= set(ids[:3])
    assert [im["id"] for im in first3.coco_gt["images"]] == ids[:3]
    picked = load_coco(coco["annotations"]["all"], coco["images"], image_ids=[ids[7], ids[2], ids[5]],
                       limit=2)
    assert [r.image_id for r in picked.images] == [ids[2], ids[5]]
    n_ann = sum(a["image_id"] in (ids[2], ids[5]) for a in full.coco_gt["annotations"])
    assert len(picked.coco_gt["annotations"]) == n_ann > 0

    gz = tmp_path / "instances_all.json.gz"
    gz.write_bytes(gzip.compress(open(coco["annotations"]["all"], "rb").read()))
    zipped = load_coco(str(gz), coco["images"])
    assert zipped.name == "instances_all"
    assert zipped.images == full.images and zipped.coco_gt == full.coco_gt


def _coco_doc(**changes) -> dict:
    doc = {
        "images": [{"id": 3, "file_name": "a.jpg", "height": 4, "width": 6},
                   {"id": 1, "file_name": "b.jpg", "height": 5, "width": 5}],
        "annotations": [{"id": 1, "image_id": 3, "category_id": 1, "bbox": [1, 1, 2, 2],
                         "segmentation": [[1, 1, 3, 1, 3, 3, 1, 3]], "area": 4.0, "iscrowd": 0}],
        "categories": [{"id": 1, "name": "thing"}],
    }
    doc.update(changes)
    return doc


@pytest.mark.parametrize("content, words", [
    (b"{not json", ["not valid JSON", "line 1"]),
    (json.dumps([1, 2]).encode(), ["got a JSON list"]),
    (json.dumps({"annotations": []}).encode(), ["missing key 'images'"]),
    (json.dumps(_coco_doc(images=[{"id": 1, "height": 2, "width": 2}])).encode(),
     ["images[0]", "missing key 'file_name'"]),
    (json.dumps(_coco_doc(images=[{"id": 1, "file_name": "x", "height": 0, "width": 2}])).encode(),
     ["'height' must be a positive integer"]),
    (json.dumps(_coco_doc(annotations=[{"id": 9, "image_id": 3, "bbox": [0, 0, 1, 1]}])).encode(),
     ["annotations[0]", "missing key 'category_id'"]),
    (json.dumps(_coco_doc(annotations=[{"id": 9, "image_id": 77, "category_id": 1,
                                        "bbox": [0, 0, 1, 1]}])).encode(),
     ["annotation id 9", "image_id 77"]),
    (json.dumps(_coco_doc(images=[{"id": 1, "file_name": "x", "height": 2, "width": 2}] * 2)).encode(),
     ["image id 1 appears twice"]),
])
def test_load_coco_bad_files_name_the_problem(tmp_path, content, words):
    path = tmp_path / "instances.json"
    path.write_bytes(content)
    with pytest.raises(DatasetError) as info:
        load_coco(str(path), str(tmp_path))
    for word in words:
        assert word in str(info.value)
    assert str(path) in str(info.value)


def test_load_coco_missing_file_and_unknown_ids(tmp_path):
    with pytest.raises(StorageError, match="nope.json"):
        load_coco(str(tmp_path / "nope.json"), str(tmp_path))
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(_coco_doc()))
    with pytest.raises(DatasetError, match=r"image_ids not in the file: \[2\]"):
        load_coco(str(path), str(tmp_path), image_ids=[1, 2])
    bad_gz = tmp_path / "x.json.gz"
    bad_gz.write_bytes(b"plain text")
    with pytest.raises(DatasetError, match="gzip"):
        load_coco(str(bad_gz), str(tmp_path))


def test_load_coco_fills_area_and_iscrowd_like_coco_tools(tmp_path):
    ann = {"id": 1, "image_id": 3, "category_id": 1, "bbox": [1, 1, 2, 2],
           "segmentation": [[1, 1, 3, 1, 3, 3, 1, 3]]}
    boxonly = {"id": 2, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 3]}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(_coco_doc(annotations=[ann, boxonly])))
    ds = load_coco(str(path), str(tmp_path))
    got = {a["id"]: a for a in ds.coco_gt["annotations"]}
    ref = mask_utils.area(mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], 4, 6)))
    assert got[1]["area"] == float(ref) and got[1]["iscrowd"] == 0
    assert got[2]["area"] == 6.0
    assert [r.image_id for r in ds.images] == [1, 3]  # sorted by id, whatever the file order


# --- VOC -----------------------------------------------------------------------------------------

def test_voc_image_id_rule():
    assert voc_image_id("2008_000123") == 2008000123
    assert voc_image_id("2026_000001") == 2026000001
    assert voc_image_id("000123") == 123
    assert voc_image_id("009963") == 9963
    others = ["0999_000001", "2008_00012", "img 1", "snapshot-a", "", "1234567"]
    ids = [voc_image_id(n) for n in others]
    assert all(10**10 <= i < 2**53 for i in ids)
    assert len(set(ids)) == len(ids)
    # Stable across processes (not Python's salted hash()).
    code = "from segdist.data.voc import voc_image_id as f; print([f(n) for n in %r])" % others
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True).stdout
    assert json.loads(out) == ids


def _xml(size, objects, filename=None) -> str:
    w, h = size
    objs = "".join(
        f"<object><name>{name}</name><difficult>{int(diff)}</difficult><truncated>0</truncated>"
        f"<bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax>"
        "</bndbox></object>"
        for name, b, diff in objects
    )
    fn = f"<filename>{filename}</filename>" if filename else ""
    return (f"<annotation>{fn}<size><width>{w}</width><height>{h}</height><depth>3</depth></size>"
            f"{objs}</annotation>")


def _palette_png(indices: np.ndarray) -> bytes:
    import io

    im = Image.fromarray(indices.astype(np.uint8), "P")
    im.putpalette([(i * 37) % 256 for i in range(768)])
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def _make_voc(root, xmls: dict[str, str], masks: dict[str, np.ndarray], lists: dict[str, list[str]],
              image_set="Main"):
    for sub in ("Annotations", "SegmentationObject", f"ImageSets/{image_set}", "JPEGImages"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    for name, xml in xmls.items():
        with open(os.path.join(root, "Annotations", f"{name}.xml"), "w") as f:
            f.write(xml)
    for name, m in masks.items():
        with open(os.path.join(root, "SegmentationObject", f"{name}.png"), "wb") as f:
            f.write(_palette_png(m))
    for split, names in lists.items():
        with open(os.path.join(root, "ImageSets", image_set, f"{split}.txt"), "w") as f:
            f.write("".join(f"{n}\n" for n in names))
    return str(root)


def _handmade_voc(tmp_path):
    mask = np.zeros((6, 8), np.uint8)
    mask[1:5, 1:4] = 1      # the dog: rows 1..4, cols 1..3
    mask[1, 1] = 255        # void pixels are no object's
    mask[4, 3] = 255
    mask[0:3, 4:8] = 2      # the difficult person
    xmls = {
        "2007_000001": _xml((8, 6), [("dog", (2, 2, 4, 5), False), ("person", (5, 1, 8, 3), True)],
                            filename="2007_000001.jpg"),
        "000005": _xml((10, 7), [("cat", (1, 1, 10, 7), False)]),
        "snapshot-a": _xml((4, 4), [("bird", (2.5, 1, 3, 4), False)]),
    }
    return _make_voc(tmp_path / "VOC2012", xmls, {"2007_000001": mask},
                     {"val": ["2007_000001", "000005", "snapshot-a"], "train": ["000005"]})


def test_voc_conversion_rules(tmp_path):
    root = _handmade_voc(tmp_path)
    ds = load_voc(root, split="val")
    ids = {"2007_000001": 2007000001, "000005": 5, "snapshot-a": voc_image_id("snapshot-a")}
    assert [r.image_id for r in ds.images] == sorted(ids.values())
    rec = ds.by_id()
    assert rec[2007000001].file_name == "2007_000001.jpg"
    assert rec[5].file_name == "000005.jpg"  # no <filename>: <name>.jpg
    assert rec[5].uri == os.path.join(root, "JPEGImages", "000005.jpg")
    assert (rec[5].height, rec[5].width) == (7, 10)

    gt = ds.coco_gt
    cats = {c["name"]: c["id"] for c in gt["categories"]}
    assert cats == {n: i for i, n in enumerate(VOC_CLASSES, start=1)}
    assert gt["segm_image_ids"] == [2007000001]
    assert {im["id"]: im["has_segm"] for im in gt["images"]} == {
        5: False, 2007000001: True, ids["snapshot-a"]: False}
    anns = {a["id"]: a for a in gt["annotations"]}
    assert sorted(anns) == [1, 2, 3, 4]  # in image id order, then XML order
    cat, dog, person, bird = anns[1], anns[2], anns[3], anns[4]
    assert cat["image_id"] == 5 and cat["bbox"] == [0, 0, 10, 7] and cat["area"] == 70
    assert "segmentation" not in cat
    assert dog["category_id"] == cats["dog"] and dog["bbox"] == [1, 1, 3, 4]
    expected_dog = np.zeros((6, 8), np.uint8)
    expected_dog[1:5, 1:4] = 1
    expected_dog[1, 1] = expected_dog[4, 3] = 0
    np.testing.assert_array_equal(mask_utils.decode(dog["segmentation"]), expected_dog)
    assert dog["area"] == 10 and dog["iscrowd"] == 0
    assert isinstance(dog["segmentation"]["counts"], str)
    assert person["iscrowd"] == 1 and person["difficult"] == 1 and person["area"] == 12
    assert person["bbox"] == [4, 0, 4, 3]
    assert bird["bbox"] == [1.5, 0, 1.5, 4]  # decimals kept: x = 2.5 - 1, w = 3 - 2.5 + 1

    api = _coco_api(gt)
    assert api.annToMask(dog).sum() == 10
    assert len(load_voc(root, split="train")) == 1
    only = load_voc(root, split="val", image_ids=[5, 2007000001], limit=1)
    assert [r.image_id for r in only.images] == [5]
    assert [a["image_id"] for a in only.coco_gt["annotations"]] == [5]


@pytest.mark.parametrize("case, words", [
    ("missing split", ["test.txt", "does not exist", "train", "val"]),
    ("unknown class", ["'unicorn'", "classes.txt"]),
    ("no size", ["<size>", "x1.xml"]),
    ("bad xml", ["not valid XML", "x1.xml"]),
    ("index beyond objects", ["instance indices [2]", "1 objects"]),
    ("mask size", ["SegmentationObject is 5 x 5", "6 x 4"]),
    ("missing xml", ["x2.xml", "does not exist"]),
    ("rgb mask", ["colour mode RGB"]),
])
def test_voc_errors_name_the_problem(tmp_path, case, words):
    good = _xml((6, 4), [("dog", (1, 1, 3, 3), False)])
    xmls, masks, lists = {"x1": good}, {}, {"val": ["x1"], "train": ["x1"]}
    split = "val"
    if case == "missing split":
        split = "test"
    elif case == "unknown class":
        xmls["x1"] = _xml((6, 4), [("unicorn", (1, 1, 3, 3), False)])
    elif case == "no size":
        xmls["x1"] = "<annotation><object><name>dog</name></object></annotation>"
    elif case == "bad xml":
        xmls["x1"] = "<annotation><size>"
    elif case == "index beyond objects":
        m = np.zeros((4, 6), np.uint8)
        m[0, 0] = 2
        masks["x1"] = m
    elif case == "mask size":
        masks["x1"] = np.zeros((5, 5), np.uint8)
    elif case == "missing xml":
        lists["val"] = ["x1", "x2"]
    root = _make_voc(tmp_path / "VOC", xmls, masks, lists)
    if case == "rgb mask":
        Image.new("RGB", (6, 4)).save(os.path.join(root, "SegmentationObject", "x1.png"))
    with pytest.raises(DatasetError) as info:
        load_voc(root, split=split)
    for word in words:
        assert word in str(info.value), str(info.value)


def test_voc_export_equals_coco_export(exports):
    """Same seed, two layouts: the same images, boxes, masks, crowd flags and class names."""
    coco, voc = exports
    c = load_coco(coco["annotations"]["all"], coco["images"])
    v = load_voc(voc["root"], split="trainval")
    assert [(r.image_id, r.height, r.width) for r in c.images] == \
        [(r.image_id, r.height, r.width) for r in v.images]
    assert [r.image_id for r in load_voc(voc["root"], split="val").images] == coco["val"]
    assert v.coco_gt["segm_image_ids"] == [r.image_id for r in v.images]
    c_names = {x["id"]: x["name"] for x in c.coco_gt["categories"]}
    v_names = {x["id"]: x["name"] for x in v.coco_gt["categories"]}
    n_compared = n_crowd = 0
    for rec in c.images:
        ca = [a for a in c.coco_gt["annotations"] if a["image_id"] == rec.image_id]
        va = [a for a in v.coco_gt["annotations"] if a["image_id"] == rec.image_id]
        assert len(ca) == len(va) > 0
        for a, b in zip(ca, va):
            assert c_names[a["category_id"]] == v_names[b["category_id"]]
            assert [float(x) for x in a["bbox"]] == b["bbox"]
            assert a["iscrowd"] == b["iscrowd"] and a["area"] == b["area"]
            n_crowd += a["iscrowd"]
        for ma, mb in zip(_masks(c.coco_gt, rec.image_id), _masks(v.coco_gt, rec.image_id)):
            np.testing.assert_array_equal(ma, mb)
            n_compared += 1
        # The pixels agree too, up to JPEG (VOC images are all JPEG).
        diff = np.abs(read_image(rec.uri).astype(int) - read_image(v.by_id()[rec.image_id].uri))
        assert diff.mean() < 10  # JPEG q90 of a noisy image; another image is far off
    assert n_compared >= 2 * N
    assert n_crowd >= 1  # crowd regions survive the VOC round trip (difficult -> iscrowd)


def test_load_dataset_dispatches_on_config(exports):
    coco, voc = exports
    c = load_dataset(DatasetConfig(format="coco", annotations=coco["annotations"]["val"],
                                   images=coco["images"], limit=1))
    assert [r.image_id for r in c.images] == coco["val"][:1]
    v = load_dataset(DatasetConfig(format="voc", root=voc["root"], split="train",
                                   image_set="Segmentation", image_ids=coco["train"][:2]))
    assert [r.image_id for r in v.images] == coco["train"][:2]


# --- object storage ------------------------------------------------------------------------------

def test_coco_and_voc_on_s3_match_local(s3_bucket, exports):
    bucket, opts = s3_bucket
    coco_local, voc_local = exports
    base = f"s3://{bucket}/synthetic"
    coco = make_synthetic(base + "/coco", N, seed=SEED, storage_options=opts, **SMALL)
    voc = make_synthetic(base + "/voc", N, seed=SEED, fmt="voc", storage_options=opts, **SMALL)
    assert coco["annotations"]["all"] == f"{base}/coco/annotations/instances_all.json"

    remote = load_coco(coco["annotations"]["all"], coco["images"], storage_options=opts)
    local = load_coco(coco_local["annotations"]["all"], coco_local["images"])
    assert remote.coco_gt == local.coco_gt
    assert remote.storage_options == opts
    for r, l in zip(remote.images[:3], local.images[:3]):
        assert r.uri == f"{base}/coco/images/{l.file_name}"
        np.testing.assert_array_equal(read_image(r.uri, opts), read_image(l.uri))

    remote_voc = load_voc(voc["root"], split="val", storage_options=opts)
    local_voc = load_voc(voc_local["root"], split="val")
    assert remote_voc.coco_gt["annotations"] == local_voc.coco_gt["annotations"]
    assert [r.image_id for r in remote_voc.images] == coco["val"]
    with pytest.raises(StorageError, match="does not exist"):
        load_coco(f"{base}/nothing.json", base, storage_options=opts)

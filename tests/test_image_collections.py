"""Image folders and list files without annotations, LVIS files, hashed ids, the incremental plan,
file names in the outputs, and ``segdist show`` on a folder (no Ray here: tests/test_job_images.py
runs the job)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from segdist.cli import main
from segdist.config import DatasetConfig, JobConfig, validate
from segdist.data import load_dataset
from segdist.data import ids as ids_module
from segdist.data.coco import load_coco
from segdist.data.ids import HASH_ID_BASE, assign_ids, hashed_id
from segdist.data.images import load_images
from segdist.data.records import ImageRecord
from segdist.errors import ConfigError, DatasetError, StorageError
from segdist.export.mmdet import mmdet_key
from segdist.job.plan import plan_chunks, plan_incremental
from segdist.proposals import layout
from segdist.proposals.store import MissingImageError, open_proposals
from segdist.proposals.types import ImageProposals
from segdist.storage import join


def write_image(path: Path, fmt: str, h: int = 24, w: int = 32, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, fmt)


def make_folder(root: Path) -> dict[str, str]:
    """Nested JPEG/PNG/WebP images plus what a real photo folder also holds; returns
    {relative path: what it is}."""
    write_image(root / "a.jpg", "JPEG")
    write_image(root / "sub" / "b.png", "PNG", seed=1)
    write_image(root / "sub" / "deeper" / "c.webp", "WEBP", seed=2)
    write_image(root / "sub" / "deeper" / "D.JPEG", "JPEG", seed=3)
    write_image(root / ".hidden.jpg", "JPEG", seed=4)
    write_image(root / ".thumbnails" / "t.jpg", "JPEG", seed=5)
    (root / "notes.txt").write_text("not an image")
    (root / "sub" / "README").write_text("no extension")
    (root / "empty.jpg").write_bytes(b"")
    return {"a.jpg": "image", "sub/b.png": "image", "sub/deeper/c.webp": "image",
            "sub/deeper/D.JPEG": "image", "empty.jpg": "zero bytes"}


def add_rotated_jpeg(root: Path) -> None:
    """A JPEG stored 24 x 32 (h x w) with EXIF orientation 6: upright it is 32 x 24."""
    exif = Image.Exif()
    exif[0x0112] = 6
    pixels = np.random.default_rng(8).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "rotated.jpg", "JPEG", exif=exif.tobytes())


def upright_size(path: Path) -> tuple[int, int]:
    from segdist.imageio import read_image

    h, w, _ = read_image(str(path)).shape
    return h, w


# -- ids ------------------------------------------------------------------------------------------


def test_hashed_ids_are_fixed_values_in_range_and_unicode_normalised():
    # Fixed values: the same on every machine and Python version (not the salted hash()).
    assert hashed_id("a.jpg") == 10**10 + int.from_bytes(
        __import__("hashlib").sha256(b"a.jpg").digest()[:8], "big") % (2**53 - 10**10)
    names = [f"dir{k % 7}/img_{k}.jpg" for k in range(2000)]
    ids = [hashed_id(n) for n in names]
    assert all(HASH_ID_BASE <= i < 2**53 for i in ids) and len(set(ids)) == len(ids)
    composed, decomposed = "caf\u00e9.jpg", "cafe\u0301.jpg"  # Linux vs macOS spelling
    assert composed != decomposed and hashed_id(composed) == hashed_id(decomposed)


def test_assign_ids_resolves_collisions_deterministically(monkeypatch):
    def fake_hash(name: str) -> int:  # names of equal length collide; probe k adds k
        base, _, k = name.partition("\x00")
        return 1000 * len(base) + (int(k) if k else 0)

    monkeypatch.setattr(ids_module, "hashed_id", fake_hash)
    names = ["b.jpg", "a.jpg", "c.png", "long-name.jpg"]
    first = ids_module.assign_ids(names)
    # Sorted order decides: a.jpg keeps its hash, b.jpg and c.png probe to the next free ids.
    assert first == {"a.jpg": 5000, "b.jpg": 5001, "c.png": 5002, "long-name.jpg": 13000}
    assert ids_module.assign_ids(list(reversed(names))) == first  # listing order is irrelevant
    # A new file that sorts after the colliding ones leaves the old ids alone; one that sorts
    # before them takes the plain hash and shifts them (the documented exception).
    assert ids_module.assign_ids([*names, "z.jpg"]) == {**first, "z.jpg": 5003}
    shifted = ids_module.assign_ids([*names, "0.jpg"])
    assert shifted["0.jpg"] == 5000 and shifted["a.jpg"] == 5001
    assert shifted["long-name.jpg"] == 13000
    monkeypatch.undo()
    assert assign_ids(names) == {n: hashed_id(n) for n in names}  # no real collision here


# -- folders and lists ----------------------------------------------------------------------------


def test_folder_lists_images_recursively_and_skips_the_rest(tmp_path):
    root = tmp_path / "photos"
    expected = make_folder(root)
    ds = load_images(str(root))
    assert ds.name == "photos"
    assert {r.file_name for r in ds.images} == set(expected)
    assert [r.image_id for r in ds.images] == sorted(hashed_id(f) for f in expected)
    for r in ds.images:
        assert r.image_id == hashed_id(r.file_name) and r.uri == str(root / r.file_name)
        assert (r.height, r.width) == (0, 0)  # not read on the driver
    assert ds.skipped == {"hidden": 2, "not an image extension": 2}
    assert ds.coco_gt["annotations"] == [] and len(ds.coco_gt["images"]) == 5

    # A new file: every old id stays.
    write_image(root / "sub" / "new.png", "PNG", seed=9)
    grown = load_images(str(root))
    old = {r.file_name: r.image_id for r in ds.images}
    assert {r.file_name: r.image_id for r in grown.images if r.file_name in old} == old
    assert len(grown) == 6

    # Filters, selection.
    only = load_images(str(root), extensions=[".PNG"], glob="sub/*")
    assert [r.file_name for r in only.images] == sorted(["sub/b.png", "sub/new.png"],
                                                         key=hashed_id)
    assert only.skipped == {"hidden": 2, "not an image extension": 6}
    deep = load_images(str(root), glob="sub/deeper/*")
    assert {r.file_name for r in deep.images} == {"sub/deeper/c.webp", "sub/deeper/D.JPEG"}
    assert deep.skipped["outside dataset.glob"] == 4
    assert len(load_images(str(root), limit=2)) == 2
    pick = hashed_id("a.jpg")
    assert [r.file_name for r in load_images(str(root), image_ids=[pick]).images] == ["a.jpg"]
    with pytest.raises(DatasetError, match=r"image_ids not in the collection: \[5\]"):
        load_images(str(root), image_ids=[5])
    with pytest.raises(StorageError, match="does not exist.*dataset.images"):
        load_images(str(tmp_path / "nowhere"))


# Run as a user the file permissions apply to: the test's own user, or (when it is root, whom
# permissions do not stop) "nobody", switched to after everything is imported.
_AS_UNPRIVILEGED = """
import json, os, sys
from segdist.data.images import load_images
from segdist.errors import StorageError
from segdist.storage import url_to_fs
url_to_fs(sys.argv[1])  # import the local filesystem before the switch
if os.geteuid() == 0:
    os.setgroups([]); os.setgid(65534); os.setuid(65534)
out = {}
for path in sys.argv[1:]:
    try:
        out[path] = f"{len(load_images(path))} images"
    except StorageError as exc:
        out[path] = str(exc)
print(json.dumps(out))
"""


def test_a_folder_that_cannot_be_read_is_not_readable_not_missing():
    import shutil
    import subprocess
    import sys
    import tempfile

    # Outside pytest's tmp_path: its parents are private to the test's user.
    top = Path(tempfile.mkdtemp(prefix="sd-perm-", dir="/tmp"))
    try:
        top.chmod(0o755)
        closed = top / "closed"  # a folder no one else may list
        make_folder(closed)
        behind = top / "locked" / "photos"  # a folder inside one no one else may enter
        make_folder(behind)
        inner = top / "inner"  # a readable folder with an unreadable subfolder
        make_folder(inner)
        for p in (top / "locked", inner, inner / "sub", inner / "sub" / "deeper", behind,
                  behind / "sub", behind / "sub" / "deeper"):
            p.chmod(0o755)
        closed.chmod(0o000)
        (top / "locked").chmod(0o000)
        (inner / "sub").chmod(0o000)
        proc = subprocess.run([sys.executable, "-c", _AS_UNPRIVILEGED, str(closed), str(behind),
                               str(inner), str(top / "missing")],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr[-3000:]
        said = json.loads(proc.stdout)
    finally:
        for p in (closed, top / "locked", inner / "sub"):
            p.chmod(0o755)
        shutil.rmtree(top)
    for folder in (closed, behind):
        assert said[str(folder)] == (f"the image folder {folder} is not readable (Permission "
                                     "denied); check its permissions or the storage credentials")
    assert said[str(inner)] == (f"{inner / 'sub'} (under the image folder {inner}) is not readable "
                                "(Permission denied); check its permissions or the storage "
                                "credentials")
    assert said[str(top / "missing")] == (f"the image folder {top / 'missing'} does not exist; "
                                          "check dataset.images")


def test_list_file_lines_relative_absolute_and_comments(tmp_path):
    root = tmp_path / "photos"
    make_folder(root)
    other = tmp_path / "elsewhere" / "x.jpg"
    write_image(other, "JPEG", seed=7)
    listing = tmp_path / "lists" / "batch1.txt"
    listing.parent.mkdir()
    listing.write_text("# my batch\n\na.jpg\n./sub/b.png\n"
                       f"{root}/sub/deeper/c.webp\n{other}\na.jpg\n.hidden.jpg\nno-such.jpg\n")
    ds = load_images(str(root), str(listing))
    assert ds.name == "batch1"
    names = {r.file_name: r.uri for r in ds.images}
    # Relative lines and absolute ones inside the folder are named relative to it; a line
    # elsewhere keeps its full path; a missing file stays (the worker records it as failed).
    assert names == {"a.jpg": str(root / "a.jpg"), "sub/b.png": str(root / "sub" / "b.png"),
                     "sub/deeper/c.webp": str(root / "sub" / "deeper" / "c.webp"),
                     str(other): str(other), "no-such.jpg": str(root / "no-such.jpg")}
    assert ds.skipped == {"listed twice": 1, "hidden": 1}
    # Without a folder, relative lines resolve beside the list file.
    beside = load_images(None, str(listing))
    assert beside.by_id()[hashed_id("a.jpg")].uri == str(listing.parent / "a.jpg")
    listing.write_text("../outside.jpg\n")
    with pytest.raises(DatasetError, match="outside.*full URI"):
        load_images(str(root), str(listing))


def test_images_config_validation_and_dispatch(tmp_path):
    root = tmp_path / "photos"
    make_folder(root)
    cfg = validate(DatasetConfig, {"format": "images", "images": str(root), "glob": "sub/*"})
    assert {r.file_name for r in load_dataset(cfg).images} == {
        "sub/b.png", "sub/deeper/c.webp", "sub/deeper/D.JPEG"}
    with pytest.raises(ConfigError, match="needs dataset.images .* or dataset.image_list"):
        validate(DatasetConfig, {"format": "images"})
    with pytest.raises(ConfigError, match="dataset.images is still the placeholder"):
        validate(DatasetConfig, {"format": "images", "images": "s3://SET-ME/photos"})
    with pytest.raises(ConfigError, match="format.*must be one of"):
        validate(DatasetConfig, {"format": "folder", "images": str(root)})
    with pytest.raises(ConfigError, match="dataset.extensions must name"):
        validate(DatasetConfig, {"format": "images", "images": str(root), "extensions": []})


def test_images_on_s3_match_local(s3_bucket, tmp_path):
    import fsspec

    bucket, so = s3_bucket
    root = tmp_path / "photos"
    make_folder(root)
    fs = fsspec.filesystem("s3", **so)
    for path in root.rglob("*"):
        if path.is_file():
            fs.pipe_file(f"{bucket}/data/photos/{path.relative_to(root).as_posix()}",
                         path.read_bytes())
    local = load_images(str(root))
    remote = load_images(f"s3://{bucket}/data/photos", storage_options=so)
    assert [(r.image_id, r.file_name) for r in remote.images] == [
        (r.image_id, r.file_name) for r in local.images]
    assert remote.images[0].uri == f"s3://{bucket}/data/photos/{remote.images[0].file_name}"
    assert remote.skipped == local.skipped


# -- LVIS -----------------------------------------------------------------------------------------


def lvis_doc() -> dict:
    return {
        "images": [
            {"id": 397133, "height": 4, "width": 6, "neg_category_ids": [3],
             "not_exhaustive_category_ids": [1],
             "coco_url": "http://images.cocodataset.org/val2017/000000397133.jpg"},
            {"id": 155379, "height": 5, "width": 5, "neg_category_ids": [],
             "not_exhaustive_category_ids": [],
             "coco_url": "http://images.cocodataset.org/train2017/000000155379.jpg"},
        ],
        "annotations": [{"id": 1, "image_id": 397133, "category_id": 1, "bbox": [1, 1, 2, 2],
                         "segmentation": [[1, 1, 3, 1, 3, 3, 1, 3]], "area": 4.0}],
        "categories": [{"id": 1, "name": "thing", "frequency": "f"},
                       {"id": 3, "name": "other", "frequency": "r"}],
    }


def test_lvis_file_names_from_coco_url(tmp_path):
    path = tmp_path / "lvis_v1_val.json"
    path.write_text(json.dumps(lvis_doc()))
    ds = load_coco(str(path), "s3://bucket/coco")
    assert ds.name == "lvis_v1_val"
    assert [(r.image_id, r.file_name, r.uri) for r in ds.images] == [
        (155379, "train2017/000000155379.jpg", "s3://bucket/coco/train2017/000000155379.jpg"),
        (397133, "val2017/000000397133.jpg", "s3://bucket/coco/val2017/000000397133.jpg")]
    flat = load_coco(str(path), "/data/lvis-images", coco_url_layout="flat")
    assert flat.images[0].uri == "/data/lvis-images/000000155379.jpg"
    # LVIS keys are carried, iscrowd defaults to 0, and pycocotools takes the result.
    img = next(im for im in ds.coco_gt["images"] if im["id"] == 397133)
    assert img["neg_category_ids"] == [3] and img["not_exhaustive_category_ids"] == [1]
    assert ds.coco_gt["annotations"][0]["iscrowd"] == 0
    gt = COCO()
    gt.dataset = ds.coco_gt
    gt.createIndex()
    assert gt.getAnnIds(imgIds=[397133]) == [1]
    # The config names it.
    cfg = validate(DatasetConfig, {"format": "lvis", "annotations": str(path),
                                   "images": "s3://bucket/coco"})
    assert load_dataset(cfg).images == ds.images
    doc = lvis_doc()
    del doc["images"][1]["coco_url"]
    path.write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match=r"images\[1\]: missing key 'file_name' .* 'coco_url'"):
        load_coco(str(path), "/x")


# -- the plan -------------------------------------------------------------------------------------


def records(ids) -> list[ImageRecord]:
    return [ImageRecord(i, f"{i}.jpg", f"/x/{i}.jpg", 0, 0) for i in ids]


def test_incremental_plan_keeps_chunks_and_adds_new_images():
    ids = [10, 20, 30, 40, 50, 60, 70]
    fresh = plan_incremental(records(ids), 3, {})
    assert [c.image_ids for c in fresh] == [c.image_ids for c in plan_chunks(records(ids), 3)]

    # Resumed after chunks 0 and 2 committed: the same plan back.
    done = {0: [10, 20, 30], 2: [70]}
    assert [c.image_ids for c in plan_incremental(records(ids), 3, done)] == \
        [[10, 20, 30], [40, 50, 60], [70]]

    # New images sort between old ones: old chunks keep their images, the new ones get a chunk.
    every = {0: [10, 20, 30], 1: [40, 50, 60], 2: [70]}
    grown = plan_incremental(records([*ids, 15, 55, 80]), 3, every)
    assert [c.image_ids for c in grown] == [[10, 20, 30], [40, 50, 60], [70], [15, 55, 80]]
    assert [c.index for c in grown] == [0, 1, 2, 3]
    more = plan_incremental(records([*ids, 15, 55, 80, 5]), 2, every)
    assert [c.image_ids for c in more][3:] == [[5, 15], [55, 80]]

    # A removed image: its chunk shrinks (the job redoes it); a chunk whose images are all gone
    # and an uncommitted index without images stay as empty chunks.
    shrunk = plan_incremental(records([10, 30, 40, 50, 60]), 3, {0: [10, 20, 30], 1: [40, 50, 60],
                                                                  3: [70]})
    assert [c.image_ids for c in shrunk] == [[10, 30], [40, 50, 60], [], []]
    with pytest.raises(ConfigError, match="twice"):
        plan_incremental(records([1, 1]), 3, {})


# -- outputs: file names ------------------------------------------------------------------------


def props(image_id: int, n: int = 3) -> ImageProposals:
    from pycocotools import mask as mask_utils

    m = np.zeros((8, 10, n), np.uint8, order="F")
    for k in range(n):
        m[k:k + 3, k:k + 4, k] = 1
    rles = mask_utils.encode(m)
    return ImageProposals(image_id, 8, 10, np.linspace(0.9, 0.5, n, dtype=np.float32),
                          mask_utils.toBbox(rles), [r["counts"] for r in rles], "test")


def test_parquet_and_coco_json_look_up_by_file_name(tmp_path):
    out = str(tmp_path / "run")
    names = {hashed_id("sub/b.png"): "sub/b.png", hashed_id("a.jpg"): "a.jpg",
             hashed_id("été/ç.jpg"): "été/ç.jpg"}
    ps = [props(i) for i in names]
    layout.write_chunk(out, 0, ps[:2], ["coco-json", "parquet"], file_names=names)
    layout.write_chunk(out, 1, ps[2:], ["coco-json", "parquet"], file_names=names)
    layout.write_images_index(out, [{"id": i, "file_name": n, "height": 8, "width": 10}
                                    for i, n in names.items()])
    store = open_proposals(out)
    assert store.kind == "parquet" and store.file_names() == names
    p = store.get_by_file_name("été/ç.jpg")
    assert p.equals(ps[2]) and store.image_id_of("a.jpg") == hashed_id("a.jpg")
    with pytest.raises(MissingImageError, match="no image named 'b.png'"):
        store.get_by_file_name("b.png")
    coco = open_proposals(os.path.join(out, "coco-json"), model="test")
    assert coco.kind == "coco-json" and coco.file_names() == names
    assert coco.get_by_file_name("sub/b.png").equals(store.get_by_file_name("sub/b.png"))
    # images.json is a COCO dataset that pycocotools joins results with.
    gt = COCO(os.path.join(out, "coco-json", "images.json"))
    res = gt.loadRes(os.path.join(out, "coco-json", "chunk-000000.segm.json"))
    first = res.anns[1]
    assert gt.imgs[first["image_id"]]["file_name"] == names[first["image_id"]]
    # Files written without names (or the original layout) have none.
    layout.write_chunk(str(tmp_path / "plain"), 0, ps, ["parquet"])
    assert open_proposals(str(tmp_path / "plain")).file_names() == {}


def test_box_only_coco_json_takes_image_sizes_from_images_json(tmp_path):
    """COCO box results carry no image size; segdist's images.json beside them has the size the
    job decoded (an image folder lists none), so a reader gets it even without the masks."""
    out = str(tmp_path / "run")
    sizes = {7: (8, 10), 9: (30, 20)}
    boxes = [ImageProposals(i, 0, 0, [0.9, 0.4], [[1, 1, 3, 4], [0, 0, 2, 2]], None, "test")
             for i in sizes]
    layout.write_chunk(out, 0, boxes, ["coco-json"])
    coco = os.path.join(out, "coco-json")
    assert [(p.height, p.width) for p in open_proposals(coco, model="test").iter_images()] == \
        [(0, 0), (0, 0)]  # results alone: no size anywhere
    layout.write_images_index(out, [{"id": i, "file_name": f"{i}.jpg", "height": h, "width": w}
                                    for i, (h, w) in sizes.items()])
    store = open_proposals(coco, model="test")
    got = {p.image_id: (p.height, p.width) for p in store.iter_images()}
    assert got == sizes and store.get(9).boxes.tolist() == [[1, 1, 3, 4], [0, 0, 2, 2]]
    assert [(p.height, p.width) for s in store.shards() for p in s.read(masks=False)] == \
        list(sizes.values())
    # Chunks with masks read without them (bbox evaluation) do not read images.json at all.
    masked = str(tmp_path / "masked")
    layout.write_chunk(masked, 0, [props(7)], ["coco-json"])
    layout.write_images_index(masked, [{"id": 7, "file_name": "7.jpg", "height": 8, "width": 10}])
    store = open_proposals(os.path.join(masked, "coco-json"), model="test")
    assert [p.counts for c in store.iter_chunks(masks=False) for p in c] == [None]
    assert store._images is None


def test_chained_uris_join_and_mmdet_keys():
    assert join("simplecache::s3://bucket/photos", "sub/a.jpg") == \
        "simplecache::s3://bucket/photos/sub/a.jpg"
    assert join("tar://VOC2012::simplecache::http://host/x.tar", "JPEGImages", "a.jpg") == \
        "tar://VOC2012/JPEGImages/a.jpg::simplecache::http://host/x.tar"
    for uri in ("simplecache::s3://bucket/coco/val2017/000000000139.jpg",
                "filecache::simplecache::gs://b/val2017/000000000139.jpg",
                "zip://val2017/000000000139.jpg::s3://bucket/val2017.zip",
                "s3://bucket/coco/val2017/000000000139.jpg"):
        record = ImageRecord(139, "000000000139.jpg", uri, 1, 1)
        assert mmdet_key(record) == "val2017/000000000139.jpg", uri


def test_shipped_folder_config_needs_both_locations():
    root = Path(__file__).resolve().parents[1]
    path = root / "configs" / "generate" / "images-folder-sharpmask-zoom.yaml"
    from segdist.config import load_config

    with pytest.raises(ConfigError) as err:
        load_config(JobConfig, str(path))
    assert "dataset.images is still the placeholder" in str(err.value)
    assert "output.uri is still the placeholder" in str(err.value)
    cfg = load_config(JobConfig, str(path), ["dataset.images=s3://b/photos",
                                             "output.uri=s3://b/out"])
    assert cfg.dataset.format == "images" and cfg.dataset.images == "s3://b/photos"


# -- segdist show on a folder ---------------------------------------------------------------


def test_show_on_a_folder_writes_one_overlay_per_image(tmp_path, capsys, one_torch_thread):
    root = tmp_path / "photos"
    make_folder(root)
    add_rotated_jpeg(root)
    out = tmp_path / "overlays"
    rc = main(["show", str(root), "--model", "deepmask", "--limit", "3", "--top", "3",
               "--out", str(out), "--device", "cpu"])
    printed, err = capsys.readouterr()
    assert rc == 0
    assert "no --weights given, so deepmask runs with random weights" in err
    # The first three by path: a.jpg, empty.jpg (reported, skipped), rotated.jpg.
    assert "skipped empty.jpg: empty file (0 bytes)" in printed
    assert sorted(os.listdir(out)) == ["a.jpg.png", "rotated.jpg.png"]
    for name, source in (("a.jpg.png", "a.jpg"), ("rotated.jpg.png", "rotated.jpg")):
        with Image.open(io.BytesIO((out / name).read_bytes())) as im:
            assert (im.height, im.width) == upright_size(root / source)
    assert main(["show", str(root), "--out", str(tmp_path / "x.png")]) == 2
    assert "--out" in capsys.readouterr().err
    # A proposer without weights at all has nothing to warn about.
    assert main(["show", str(root / "a.jpg"), "--model", "sliding-window", "--top", "2",
                 "--out", str(tmp_path / "sw.png")]) == 0
    assert "random weights" not in capsys.readouterr().err

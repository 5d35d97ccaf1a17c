"""Proposal formats on the local filesystem: COCO-JSON and Parquet chunks, the reading API,
pycocotools evaluation of written files, pyarrow.dataset and DuckDB access, edge cases, and
writers killed mid-write."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from conftest import coco_result_records
from segdist import storage
from segdist.errors import SegdistError
from segdist.proposals import cocojson, layout
from segdist.proposals import parquet as parquet_format
from segdist.proposals.store import MissingImageError, ParquetStore, open_proposals
from segdist.proposals.types import ImageProposals

BOTH = ["coco-json", "parquet"]


def random_masks(rng, h, w, n):
    """n random rectangles-with-holes as a Fortran uint8 H x W x n array (pycocotools' layout)."""
    masks = np.zeros((h, w, n), dtype=np.uint8, order="F")
    for k in range(n):
        y0, x0 = rng.integers(0, h), rng.integers(0, w)
        y1, x1 = rng.integers(y0 + 1, h + 1), rng.integers(x0 + 1, w + 1)
        masks[y0:y1, x0:x1, k] = 1
        if y1 - y0 > 2 and x1 - x0 > 2:
            masks[y0 + 1, x0 + 1, k] = 0
    return masks


def make_proposals(rng, image_id, h, w, n, model="sharpmask-zoom", labels=False, masks=True):
    m = random_masks(rng, h, w, n)
    rles = mask_utils.encode(m) if n else []
    boxes = mask_utils.toBbox(rles) if n else np.zeros((0, 4))
    scores = np.sort(rng.random(n).astype(np.float32))[::-1]
    return ImageProposals(
        image_id, h, w, scores, boxes, [r["counts"] for r in rles] if masks else None, model,
        rng.integers(1, 80, n).astype(np.int32) if labels else None)


def edge_case_chunk(rng):
    """Images covering the edge cases: zero proposals, 1000 proposals, empty and full masks,
    a 1x1 image, non-square images, ties in score."""
    out = [
        make_proposals(rng, 7, 48, 64, 1000),                                  # 1000 proposals
        ImageProposals(3, 20, 30, [], np.zeros((0, 4)), [], "sharpmask-zoom"),  # zero proposals
        make_proposals(rng, 11, 1, 1, 3),                                      # 1x1 image
        make_proposals(rng, 5, 9, 200, 4),                                     # very wide
        make_proposals(rng, 2, 150, 7, 4),                                     # very tall
    ]
    # An empty mask and a full mask, with equal scores (tie order must survive).
    empty = np.zeros((13, 17, 1), np.uint8, order="F")
    full = np.ones((13, 17, 1), np.uint8, order="F")
    rles = mask_utils.encode(np.asfortranarray(np.concatenate([full, empty], axis=2)))
    out.append(ImageProposals(13, 13, 17, [0.5, 0.5], mask_utils.toBbox(rles),
                              [r["counts"] for r in rles], "sharpmask-zoom"))
    return out


def assert_same(expected, got, ignore_model=False):
    by_id = {p.image_id: p for p in got}
    assert sorted(by_id) == sorted(p.image_id for p in expected)
    for p in expected:
        q = by_id[p.image_id]
        if ignore_model:
            q.model = p.model
        assert p.equals(q), f"image {p.image_id} differs after the round trip"


# ---------------------------------------------------------------------------------------------
# Layout


def test_chunk_names_and_uris():
    assert layout.chunk_name(12) == "chunk-000012"
    uris = layout.chunk_uris("s3://b/run", 12, BOTH, gzip=True)
    assert uris == {
        "segm": "s3://b/run/coco-json/chunk-000012.segm.json.gz",
        "bbox": "s3://b/run/coco-json/chunk-000012.bbox.json.gz",
        "parquet": "s3://b/run/parquet/chunk-000012.parquet",
    }
    assert set(layout.chunk_uris("/x", 0, ["coco-json"], masks=False)) == {"bbox"}
    with pytest.raises(ValueError, match="formats"):
        layout.chunk_uris("/x", 0, ["csv"])


def test_write_chunk_info_and_committed(tmp_path):
    rng = np.random.default_rng(0)
    props = edge_case_chunk(rng)
    out = str(tmp_path / "run")
    assert not layout.chunk_committed(out, 0, BOTH)
    info = layout.write_chunk(out, 0, props, BOTH)
    assert set(info) == {"segm", "bbox", "parquet"}
    n = sum(len(p) for p in props)
    for key, f in info.items():
        assert os.path.getsize(f["uri"]) == f["bytes"] > 0
        assert f["proposals"] == n
    assert info["parquet"]["images"] == len(props)
    assert info["segm"]["images"] == len(props) - 1  # the zero-proposal image has no results
    assert layout.chunk_committed(out, 0, BOTH)
    os.unlink(info["bbox"]["uri"])  # a chunk with a missing file is not written
    assert not layout.chunk_committed(out, 0, BOTH)
    assert layout.chunk_committed(out, 0, ["parquet"])


def test_write_chunk_rejects_bad_chunks(tmp_path):
    rng = np.random.default_rng(1)
    a = make_proposals(rng, 1, 10, 10, 3)
    with pytest.raises(ValueError, match="twice"):
        layout.write_chunk(str(tmp_path), 0, [a, a], BOTH)
    unsorted = ImageProposals(2, 10, 10, [0.1, 0.9], a.boxes[:2], a.counts[:2], "m")
    with pytest.raises(ValueError, match="descending"):
        layout.write_chunk(str(tmp_path), 0, [unsorted], BOTH)
    boxonly = make_proposals(rng, 3, 10, 10, 2, masks=False)
    with pytest.raises(ValueError, match="mixes"):
        layout.write_chunk(str(tmp_path), 0, [a, boxonly], BOTH)
    assert not os.listdir(tmp_path)  # validation happens before anything is written


@pytest.mark.parametrize("size", [(0, 0), (0, 10), (10, 0)])
def test_write_chunk_rejects_masks_of_a_zero_size_image(tmp_path, size):
    # A mask of a 0-pixel image is meaningless (its RLE is empty); such a chunk would read back and
    # only fail later, far from the cause. Box-only images keep 0 x 0 (size unknown, bbox results).
    empty = ImageProposals(4, *size, [0.5], [[0, 0, 0, 0]], [b""], "m")
    with pytest.raises(ValueError, match=r"image 4: .*size"):
        layout.write_chunk(str(tmp_path), 0, [empty], BOTH)
    assert not os.listdir(tmp_path)
    boxonly = ImageProposals(5, 0, 0, [0.5], [[1, 1, 2, 2]], None, "m")
    layout.write_chunk(str(tmp_path), 0, [boxonly], BOTH)


# ---------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("gz", [False, True])
def test_round_trip_both_formats(tmp_path, gz):
    rng = np.random.default_rng(2)
    chunks = [edge_case_chunk(rng),
              [make_proposals(rng, i, 40 + i, 30, 20, labels=True) for i in (101, 102, 104)]]
    out = str(tmp_path / "run")
    for i, chunk in enumerate(chunks):
        layout.write_chunk(out, i, chunk, BOTH, gzip=gz)
    everything = [p for c in chunks for p in c]

    store = open_proposals(out)
    assert store.kind == "parquet" and isinstance(store, ParquetStore)
    assert store.image_ids() == sorted(p.image_id for p in everything)
    assert store.num_images == len(everything)
    assert_same(everything, [store.get(p.image_id) for p in everything])
    assert [p.image_id for p in store.iter_images()] == store.image_ids()
    read_chunks = list(store.iter_chunks())
    assert [len(c) for c in read_chunks] == [len(c) for c in chunks]
    assert_same(everything, [p for c in read_chunks for p in c])
    assert 3 in store and len(store.get(3)) == 0
    with pytest.raises(MissingImageError, match="image 4 is not in"):
        store.get(4)

    # COCO-JSON keeps everything but the zero-proposal image, the model name and the labels;
    # the model name comes from the job's manifest.
    assert open_proposals(os.path.join(out, "coco-json")).get(7).model == "unknown"
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump({"model": {"name": "sharpmask-zoom", "weights": None}}, f)
    coco = open_proposals(os.path.join(out, "coco-json"))
    assert coco.kind == "coco-json"
    kept = [ImageProposals(p.image_id, p.height, p.width, p.scores, p.boxes, p.counts, p.model)
            for p in everything if len(p)]
    assert_same(kept, list(coco.iter_images()))
    assert coco.get(7).equals(next(p for p in kept if p.image_id == 7))


def test_box_only_proposals_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    props = [make_proposals(rng, i, 32, 48, 10, masks=False, model="maskrcnn-rpn") for i in (1, 2)]
    out = str(tmp_path / "rpn")
    info = layout.write_chunk(out, 0, props, BOTH)
    assert set(info) == {"bbox", "parquet"}  # no segm file for box-only proposals
    assert layout.chunk_committed(out, 0, BOTH, masks=False)
    assert_same(props, list(open_proposals(out).iter_images()))
    # From the bbox file alone: scores and boxes; masks None, size unknown (0).
    got = open_proposals(info["bbox"]["uri"], model="maskrcnn-rpn").get(2)
    assert got.counts is None and (got.height, got.width) == (0, 0)
    assert np.array_equal(got.boxes, props[1].boxes) and np.array_equal(got.scores, props[1].scores)


def test_segm_only_reader_recomputes_tight_boxes(tmp_path):
    rng = np.random.default_rng(4)
    props = [make_proposals(rng, 9, 25, 35, 30)]
    uris = layout.write_chunk(str(tmp_path), 0, props, ["coco-json"], gzip=True)
    store = open_proposals(uris["segm"]["uri"], model=props[0].model)
    assert store.kind == "coco-results"
    assert props[0].equals(store.get(9))


def test_original_layout_and_foreign_results_file(tmp_path):
    """props-<start>-<end>.json as evalPerImage.lua wrote them (no bbox, arbitrary order within the
    file), and a single results file with both segmentation and bbox (a detector's output)."""
    rng = np.random.default_rng(5)
    a, b = make_proposals(rng, 10, 20, 20, 5), make_proposals(rng, 20, 30, 20, 6)
    ra, rb = json.loads(cocojson.encode_segm([a])), json.loads(cocojson.encode_segm([b]))
    rng.shuffle(ra)  # the Lua writer iterated a hash: no order guaranteed within a file
    rng.shuffle(rb)
    (tmp_path / "orig" / "jsons").mkdir(parents=True)
    (tmp_path / "orig" / "jsons" / "props-1-500.json").write_text(json.dumps(ra))
    (tmp_path / "orig" / "jsons" / "props-501-1000.json").write_text(json.dumps(rb))
    store = open_proposals(str(tmp_path / "orig"), model=a.model)
    assert store.kind == "original"
    assert_same([a, b], [store.get(10), store.get(20)])

    both = [dict(r, bbox=[1.0, 2.0, 3.0, 4.0]) for r in json.loads(cocojson.encode_segm([a]))]
    (tmp_path / "det.json").write_text(json.dumps(both))
    got = open_proposals(str(tmp_path / "det.json")).get(10)
    assert got.counts == a.counts and np.all(got.boxes == [1, 2, 3, 4])


def test_open_errors(tmp_path):
    with pytest.raises(SegdistError, match="does not exist"):
        open_proposals(str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SegdistError, match="no proposals found"):
        open_proposals(str(tmp_path / "empty"))
    (tmp_path / "bad.json").write_text('{"not": "a list"}')
    with pytest.raises(SegdistError, match="JSON list"):
        open_proposals(str(tmp_path / "bad.json")).image_ids()
    (tmp_path / "pq").mkdir()
    (tmp_path / "pq" / "x.parquet").write_bytes(b"PAR1 garbage")
    with pytest.raises(SegdistError, match="not a readable Parquet"):
        open_proposals(str(tmp_path / "pq"))


# ---------------------------------------------------------------------------------------------
# COCO-JSON: format details and pycocotools evaluation


def test_coco_json_file_contents(tmp_path):
    rng = np.random.default_rng(6)
    props = [make_proposals(rng, 4, 60, 80, 50)]
    info = layout.write_chunk(str(tmp_path), 0, props, ["coco-json"], gzip=True)
    segm = json.loads(gzip.decompress(open(info["segm"]["uri"], "rb").read()))
    bbox = json.loads(gzip.decompress(open(info["bbox"]["uri"], "rb").read()))
    assert len(segm) == len(bbox) == 50
    assert all("bbox" not in r for r in segm)  # the loadRes bbox trap
    assert {r["category_id"] for r in segm + bbox} == {1}
    assert all(isinstance(r["segmentation"]["counts"], str) for r in segm)
    assert [r["segmentation"]["size"] for r in segm] == [[60, 80]] * 50
    assert [r["score"] for r in segm] == sorted((r["score"] for r in segm), reverse=True)
    np.testing.assert_array_equal(np.asarray([r["bbox"] for r in bbox], np.float32), props[0].boxes)
    # Deterministic bytes: a retried chunk writes the same file (gzip mtime fixed).
    assert cocojson.encode_segm(props, gzip_output=True) == open(info["segm"]["uri"], "rb").read()


def _reference_json(props, kind: str) -> bytes:
    """The COCO results text written record by record with json.dumps (what the bulk encoder must
    reproduce byte for byte)."""
    records = [json.dumps(r, separators=(",", ":")) for r in coco_result_records(props, kind)]
    return ("[" + ",\n".join(records) + "]\n").encode("ascii")


def test_coco_json_bytes_equal_a_record_by_record_writer():
    rng = np.random.default_rng(8)
    props = []
    for i in range(12):
        n = 0 if i % 4 == 0 else int(rng.integers(1, 40))
        scores = np.sort(rng.random(n).astype(np.float32) * 10.0 ** int(rng.integers(-9, 9)))[::-1]
        boxes = rng.random((n, 4)).astype(np.float32) * 700
        if i % 2:
            boxes = np.round(boxes)  # tight boxes of masks: whole numbers, written as ints + ".0"
        if i % 3 == 1 and n:
            boxes[0, 1] = -0.0
        # every character RLE strings use (48..111), backslash (92) included
        counts = [bytes(rng.integers(48, 112, int(rng.integers(1, 25))).astype(np.uint8))
                  for _ in range(n)]
        props.append(ImageProposals(1000 + i, int(rng.integers(1, 900)), int(rng.integers(1, 900)),
                                    scores.copy(), boxes, counts, "deepmask"))
    assert any(b"\\" in c for p in props for c in p.counts)
    for kind, encode in (("segm", cocojson.encode_segm), ("bbox", cocojson.encode_bbox)):
        assert encode(props) == _reference_json(props, kind)
        assert encode(props[:1]) == encode([]) == b"[]\n"  # no proposals: an empty list


def _ellipse(h, w, cy, cx, ry, rx):
    y, x = np.mgrid[:h, :w]
    return (((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1).astype(np.uint8)


def _gt_dataset():
    """Two images with objects in COCO's small (< 32^2), medium and large (> 96^2) ranges."""
    shapes = {
        1: (160, 240, [(20, 20, 4, 5), (60, 60, 20, 25), (90, 150, 60, 80)]),
        2: (200, 130, [(10, 10, 3, 3), (150, 40, 30, 20), (100, 65, 90, 60), (40, 100, 6, 12)]),
    }
    images, anns, gt_masks = [], [], {}
    for image_id, (h, w, objs) in shapes.items():
        images.append({"id": image_id, "height": h, "width": w, "file_name": f"{image_id}.png"})
        masks = np.asfortranarray(np.stack([_ellipse(h, w, *o) for o in objs], axis=2))
        rles = mask_utils.encode(masks)
        gt_masks[image_id] = (masks, rles)
        for k, r in enumerate(rles):
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                         "area": float(mask_utils.area(r)),
                         "bbox": mask_utils.toBbox(r).tolist(),
                         "segmentation": {"size": r["size"], "counts": r["counts"].decode()}})
    gt = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "object"}]}
    return gt, gt_masks


def _coco(gt_dict):
    coco = COCO()
    coco.dataset = gt_dict
    coco.createIndex()
    return coco


def _ar(gt, results_file, iou_type):
    res = gt.loadRes(results_file)
    E = COCOeval(gt, res, iou_type)
    E.params.useCats = 0
    E.params.maxDets = [10, 100, 1000]
    E.params.imgIds = sorted(gt.getImgIds())
    E.evaluate()
    E.accumulate()
    E.summarize()
    return E.stats[6:12]


def test_gt_masks_as_proposals_give_ar_one(tmp_path):
    gt_dict, gt_masks = _gt_dataset()
    areas = [a["area"] for a in gt_dict["annotations"]]
    assert min(areas) < 32 ** 2 and any(32 ** 2 < a < 96 ** 2 for a in areas) and max(areas) > 96 ** 2
    props = []
    for image_id, (masks, rles) in gt_masks.items():
        n = masks.shape[2]
        props.append(ImageProposals(image_id, masks.shape[0], masks.shape[1],
                                    np.linspace(0.9, 0.5, n), mask_utils.toBbox(rles),
                                    [r["counts"] for r in rles], "gt"))
    info = layout.write_chunk(str(tmp_path), 0, props, ["coco-json"])
    gt = _coco(gt_dict)
    # loadRes reads our files by name, as users do.
    segm = _ar(gt, info["segm"]["uri"], "segm")
    bbox = _ar(gt, info["bbox"]["uri"], "bbox")
    np.testing.assert_array_equal(segm, np.ones(6))  # AR@10/100/1000, small/medium/large
    np.testing.assert_array_equal(bbox, np.ones(6))
    # A control: dropping the large objects' proposals must lower AR large to 0.
    partial = [p.top(len(p) - 1) if p.image_id == 1 else p for p in props]
    partial[1] = ImageProposals(2, 200, 130, props[1].scores[[0, 1, 3]], props[1].boxes[[0, 1, 3]],
                                [props[1].counts[k] for k in (0, 1, 3)], "gt")
    info = layout.write_chunk(str(tmp_path / "p"), 0, partial, ["coco-json"])
    stats = _ar(_coco(gt_dict), info["segm"]["uri"], "segm")
    assert stats[5] == 0.0 and stats[3] == 1.0 and stats[4] == 1.0


# ---------------------------------------------------------------------------------------------
# Parquet: schema, predicate pushdown, DuckDB


def _many_images(rng, ids, n=1000, h=24, w=32):
    return [make_proposals(rng, i, h, w, n) for i in ids]


def test_parquet_schema_sorting_and_metadata(tmp_path):
    rng = np.random.default_rng(7)
    props = edge_case_chunk(rng)
    info = layout.write_chunk(str(tmp_path), 0, props, ["parquet"])
    pf = pq.ParquetFile(info["parquet"]["uri"])
    schema = pf.schema_arrow
    assert schema.field("image_id").type == pa.int64()
    assert schema.field("rank").type == pa.int32()
    assert schema.field("score").type == pa.float32()
    assert schema.field("bbox").type == pa.list_(pa.field("item", pa.float32(), False), 4)
    assert schema.field("counts").type == pa.string()
    assert schema.field("model").type == pa.dictionary(pa.int32(), pa.string())
    assert schema.field("label").type == pa.int32()
    assert pf.metadata.row_group(0).column(0).compression == "ZSTD"
    table = pf.read()
    keys = list(zip(table["image_id"].to_pylist(), table["rank"].to_pylist()))
    assert keys == sorted(keys) and table.num_rows == sum(len(p) for p in props)
    entries = parquet_format.images_from_metadata(pf.metadata.metadata, "f")
    assert [e["id"] for e in entries] == sorted(p.image_id for p in props)
    assert {e["id"]: e["n"] for e in entries}[3] == 0  # the zero-proposal image is listed


def test_parquet_random_access_reads_one_row_group(tmp_path):
    rng = np.random.default_rng(8)
    ids = list(range(100, 120))
    props = _many_images(rng, ids)
    info = layout.write_chunk(str(tmp_path), 0, props, ["parquet"], row_group_rows=1000)
    path = info["parquet"]["uri"]
    assert pq.ParquetFile(path).metadata.num_row_groups == 20

    store = open_proposals(str(tmp_path))
    for k in (0, 7, 19):
        f, groups = store.row_groups_for(ids[k])
        assert f.endswith("chunk-000000.parquet") and groups == [k]
        assert props[k].equals(store.get(ids[k]))

    # The same pruning through pyarrow.dataset, as docs/formats.md shows it.
    dataset = ds.dataset(str(tmp_path / "parquet"), format="parquet")
    expr = pc.field("image_id") == 107
    fragment = next(iter(dataset.get_fragments()))
    assert len(fragment.split_by_row_group(expr)) == 1
    t = dataset.to_table(filter=expr, columns=["rank", "score"])
    assert t.num_rows == 1000
    np.testing.assert_array_equal(t["score"].to_numpy(), props[7].scores)


def test_duckdb_reads_the_parquet_files(tmp_path):
    duckdb = pytest.importorskip("duckdb")
    rng = np.random.default_rng(9)
    chunks = [[make_proposals(rng, i, 30, 40, 5 + i) for i in ids] for ids in ([1, 2, 3], [4, 5])]
    for i, c in enumerate(chunks):
        layout.write_chunk(str(tmp_path), i, c, ["parquet"])
    glob = str(tmp_path / "parquet" / "*.parquet")
    rows = duckdb.sql(
        f"SELECT image_id, count(*) AS n, max(score) AS top, min(rank) AS r0, "
        f"any_value(model) AS model FROM read_parquet('{glob}') GROUP BY image_id ORDER BY image_id"
    ).fetchall()
    flat = [p for c in chunks for p in c]
    assert [r[0] for r in rows] == [p.image_id for p in flat]
    assert [r[1] for r in rows] == [len(p) for p in flat]
    assert [np.float32(r[2]) for r in rows] == [p.scores[0] for p in flat]
    assert {r[3] for r in rows} == {0} and {r[4] for r in rows} == {"sharpmask-zoom"}
    box = duckdb.sql(f"SELECT bbox[3], counts FROM read_parquet('{glob}') "
                     "WHERE image_id = 4 AND rank = 2").fetchall()[0]
    assert np.float32(box[0]) == flat[3].boxes[2, 2] and box[1] == flat[3].counts[2].decode()


# ---------------------------------------------------------------------------------------------
# Interrupted writers


def test_exception_inside_atomic_open_leaves_nothing(tmp_path):
    target = str(tmp_path / "parquet" / "chunk-000000.parquet")
    with pytest.raises(RuntimeError):
        with storage.atomic_open(target) as f:
            f.write(b"half a file")
            raise RuntimeError("writer failed")
    assert not os.path.exists(target)
    assert not layout.chunk_committed(str(tmp_path), 0, ["parquet"])


_KILL_SCRIPT = textwrap.dedent("""
    import os, sys, time
    import numpy as np
    from segdist.proposals import layout
    from segdist.proposals.types import ImageProposals
    out = sys.argv[1]
    real_replace = os.replace
    def stalled_replace(src, dst):
        # The temp file is fully written; stop right before it is renamed into place.
        if dst.endswith(".parquet"):
            print("READY", src, flush=True)
            time.sleep(600)
        real_replace(src, dst)
    os.replace = stalled_replace
    rng = np.random.default_rng(0)
    props = [ImageProposals(i, 8, 8, np.sort(rng.random(50))[::-1].astype(np.float32),
                            rng.random((50, 4)), None, "m") for i in range(40)]
    layout.write_chunk(out, 0, props, ["coco-json", "parquet"])
""")


def test_killed_writer_leaves_nothing_at_the_final_name(tmp_path):
    out = str(tmp_path / "run")
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, out], stdout=subprocess.PIPE,
                            text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("READY"), line
        tmp = line.split()[1]
        assert os.path.getsize(tmp) > 0  # the bytes were on disk, under a temporary name
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    final = layout.chunk_uris(out, 0, BOTH, masks=False)
    assert os.path.exists(final["bbox"])  # written before the kill
    assert not os.path.exists(final["parquet"])
    assert not layout.chunk_committed(out, 0, BOTH, masks=False)
    # The reader ignores the leftover temp file and still reads what was committed.
    assert open_proposals(out).kind == "coco-json"
    # A retry completes the chunk and produces the same bbox file again.
    before = open(final["bbox"], "rb").read()
    rng = np.random.default_rng(0)
    props = [ImageProposals(i, 8, 8, np.sort(rng.random(50))[::-1].astype(np.float32),
                            rng.random((50, 4)), None, "m") for i in range(40)]
    layout.write_chunk(out, 0, props, BOTH)
    assert layout.chunk_committed(out, 0, BOTH, masks=False)
    assert open(final["bbox"], "rb").read() == before
    assert open_proposals(out).num_images == 40


def test_docs_snippets_run(tmp_path):
    """Every python block of docs/formats.md runs against a real output (GT masks as proposals)."""
    import re

    gt_dict, gt_masks = _gt_dataset()
    props = [ImageProposals(i, m.shape[0], m.shape[1], np.linspace(0.9, 0.5, m.shape[2]),
                            mask_utils.toBbox(r), [x["counts"] for x in r], "gt")
             for i, (m, r) in gt_masks.items()]
    out = str(tmp_path / "run")
    file_names = {1: "2024/day 1/IMG_0001.jpg", 2: "b.png"}
    layout.write_chunk(out, 0, props, BOTH, file_names=file_names)
    layout.write_images_index(out, [{"id": p.image_id, "file_name": file_names[p.image_id],
                                     "height": p.height, "width": p.width} for p in props])
    (tmp_path / "gt.json").write_text(json.dumps(gt_dict))
    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "formats.md")).read()
    blocks = re.findall(r"```python\n(.*?)```", doc, flags=re.S)
    assert len(blocks) == 5
    ns = {"OUT": out, "ANNOTATIONS": str(tmp_path / "gt.json"), "IMAGE_ID": 2}
    for block in blocks:
        exec(compile(block, "docs/formats.md", "exec"), ns)
    assert ns["ids"] == [1, 2] and ns["store"].get(1).equals(props[0])
    assert ns["file_of"] == file_names and ns["names"] == file_names and ns["p"].equals(props[0])
    assert ns["ar_1000"] == 1.0
    np.testing.assert_array_equal(ns["boxes_xywh"], props[1].boxes)
    assert [(r[0], r[1]) for r in ns["top5"]] == [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2),
                                                  (2, 3)]

"""Proposal chunks on s3:// against a real S3-compatible server on loopback (moto), read back with
segdist's reader (s3fs) and with an independent client (pyarrow's own S3FileSystem)."""

from __future__ import annotations

import pickle
from urllib.parse import urlparse

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from pycocotools import mask as mask_utils

from segdist import storage
from segdist.proposals import cocojson, layout
from segdist.proposals import parquet as parquet_format
from segdist.proposals.store import open_proposals
from segdist.proposals.types import ImageProposals

BOTH = ["coco-json", "parquet"]


def make_proposals(rng, image_id, h, w, n, model="sharpmask"):
    masks = np.zeros((h, w, n), dtype=np.uint8, order="F")
    for k in range(n):
        y0, x0 = rng.integers(0, h), rng.integers(0, w)
        masks[y0:rng.integers(y0 + 1, h + 1), x0:rng.integers(x0 + 1, w + 1), k] = 1
    rles = mask_utils.encode(masks) if n else []
    return ImageProposals(image_id, h, w, np.sort(rng.random(n).astype(np.float32))[::-1],
                          mask_utils.toBbox(rles) if n else np.zeros((0, 4)),
                          [r["counts"] for r in rles], model)


def chunks_for_test(rng):
    return [
        [make_proposals(rng, 1, 40, 60, 30), make_proposals(rng, 2, 1, 1, 2),
         ImageProposals(3, 10, 10, [], np.zeros((0, 4)), [], "sharpmask")],
        [make_proposals(rng, 8, 64, 48, 1000), make_proposals(rng, 9, 17, 90, 12)],
    ]


def pyarrow_s3(endpoint: str) -> pafs.S3FileSystem:
    u = urlparse(endpoint)
    return pafs.S3FileSystem(endpoint_override=f"{u.hostname}:{u.port}", scheme="http",
                             access_key="testing", secret_key="testing", region="us-east-1")


@pytest.mark.parametrize("gz", [False, True])
def test_round_trip_on_s3(s3_bucket, s3_server, gz):
    bucket, so = s3_bucket
    rng = np.random.default_rng(10)
    chunks = chunks_for_test(rng)
    out = f"s3://{bucket}/runs/a"
    infos = [layout.write_chunk(out, i, c, BOTH, gzip=gz, storage_options=so, row_group_rows=256)
             for i, c in enumerate(chunks)]
    assert all(layout.chunk_committed(out, i, BOTH, gz, so) for i in range(2))
    assert not layout.chunk_committed(out, 2, BOTH, gz, so)
    flat = [p for c in chunks for p in c]

    store = open_proposals(out, so)
    assert store.kind == "parquet" and store.image_ids() == [1, 2, 3, 8, 9]
    for p in flat:
        assert p.equals(store.get(p.image_id))
    assert all(a.equals(b) for a, b in zip(flat, store.iter_images()))
    # The store crosses process boundaries by pickling (DataLoader workers, Ray tasks).
    clone = pickle.loads(pickle.dumps(store))
    assert clone.get(8).equals(flat[3])

    coco = open_proposals(out + "/coco-json", so, model="sharpmask")
    assert coco.kind == "coco-json"
    for p in flat:
        if len(p):
            assert p.equals(coco.get(p.image_id))

    # Second client: pyarrow's S3FileSystem, talking to the same server on its own.
    s3 = pyarrow_s3(s3_server)
    key = infos[1]["parquet"]["uri"].removeprefix("s3://")
    assert s3.get_file_info(key).size == infos[1]["parquet"]["bytes"]
    table = pq.read_table(key, filesystem=s3)
    entries = parquet_format.images_from_metadata(table.schema.metadata, key)
    for p, q in zip(chunks[1], parquet_format.from_table(table, entries)):
        assert p.equals(q)
    dataset = ds.dataset(f"{bucket}/runs/a/parquet", format="parquet", filesystem=s3)
    t = dataset.to_table(filter=pc.field("image_id") == 9)
    assert t.num_rows == 12
    np.testing.assert_array_equal(t.sort_by("rank")["score"].to_numpy(), flat[4].scores)
    with s3.open_input_stream(infos[0]["segm"]["uri"].removeprefix("s3://"),
                              compression=None) as f:
        segm = cocojson.load_results(f.read())
    got = cocojson.decode(segm, None, model="sharpmask")
    assert [p.image_id for p in got] == [1, 2]
    assert got[0].equals(flat[0]) and got[1].equals(flat[1])


def test_s3_errors_are_clear(s3_bucket):
    bucket, so = s3_bucket
    from segdist.errors import SegdistError

    with pytest.raises(SegdistError, match="does not exist"):
        open_proposals(f"s3://{bucket}/nothing-here", so)


def test_interrupted_upload_leaves_nothing_on_s3(s3_bucket):
    bucket, so = s3_bucket
    uri = f"s3://{bucket}/run/parquet/chunk-000000.parquet"
    with pytest.raises(RuntimeError):
        with storage.atomic_open(uri, so) as f:
            f.write(b"partial")
            raise RuntimeError("writer died")
    assert not storage.exists(uri, so)
    storage.atomic_write(uri, b"complete", so)
    with pytest.raises(RuntimeError):
        with storage.atomic_open(uri, so) as f:
            f.write(b"replacement that never finishes")
            raise RuntimeError("writer died again")
    assert storage.read_bytes(uri, so) == b"complete"  # the old object is untouched

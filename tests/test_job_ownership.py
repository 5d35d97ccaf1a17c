"""Who owns an output: the driver's lease (conditional create on S3 and locally, stale leases taken
over), and what a resume trusts: a committed chunk's files must still have the size and, on S3, the
ETag its record holds. Against moto's S3 server on loopback and the local filesystem; no Ray
(the job's own runs with a lease held are in test_job_faults.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest

from segdist import storage
from segdist.errors import SegdistError
from segdist.job import lease, state
from segdist.proposals import layout
from test_evaluation import hard_case


def test_lease_on_s3_is_exclusive_and_a_stale_one_is_taken_over(s3_bucket):
    bucket, so = s3_bucket
    out = f"s3://{bucket}/run"
    first = lease.Lease(out, so)
    first.take()
    held = json.loads(storage.read_bytes(lease.lease_uri(out), so))
    assert held["id"] == first.id and held["holder"] == f"{socket.gethostname()}:{os.getpid()}"

    # A second driver is refused, naming the holder (this process holds both: not "gone").
    with pytest.raises(SegdistError) as err:
        lease.Lease(out, so).take()
    assert f"another segdist driver: {held['holder']} (since {held['acquired']}" in str(err.value)
    assert "last heartbeat" in str(err.value) and lease.lease_uri(out) in str(err.value)
    # The store refuses the conditional create itself (S3 If-None-Match).
    assert storage.create_new(lease.lease_uri(out), b"{}", so) is False

    # A driver on another machine that stopped beating 10 minutes ago: its lease is stale.
    old = (datetime.now(timezone.utc) - timedelta(minutes=10)).isoformat(timespec="seconds")
    storage.atomic_write(lease.lease_uri(out), json.dumps(
        {**held, "host": "elsewhere", "holder": "elsewhere:1", "heartbeat": old}).encode(), so)
    stale_etag = storage.etag_of(lease.lease_uri(out), so)
    second = lease.Lease(out, so)
    second.take()
    assert json.loads(storage.read_bytes(lease.lease_uri(out), so))["id"] == second.id
    # A third driver that read the same stale lease loses the race (S3 If-Match on its ETag).
    assert storage.replace_if(lease.lease_uri(out), b"{}", stale_etag, so) is False
    # The first driver's release leaves the new holder's lease alone; the holder's removes it.
    first.release()
    assert storage.exists(lease.lease_uri(out), so)
    second.release()
    assert not storage.exists(lease.lease_uri(out), so)


def test_local_lease_of_a_process_gone_from_this_machine_is_taken_at_once(tmp_path):
    out = str(tmp_path / "out")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    holder = lease.Lease(out, None)
    body = json.loads(holder.body())
    body.update(pid=int(gone.stdout), holder=f"{body['host']}:{int(gone.stdout)}", pid_start=None)
    storage.atomic_write(lease.lease_uri(out), json.dumps(body).encode())
    assert "no longer running on this machine" in lease.stale_reason(body)

    taker = lease.acquire(out, None)  # no wait: its heartbeat is fresh, but its driver is gone
    assert json.loads(open(lease.lease_uri(out)).read())["id"] == taker.id
    with pytest.raises(SegdistError, match="another segdist driver"):
        lease.Lease(out, None).take()  # O_EXCL-like: the live lease stays
    taker.release()
    assert not os.path.exists(lease.lease_uri(out))


def test_resume_on_s3_redoes_a_chunk_whose_file_changed_behind_its_record(s3_bucket):
    bucket, so = s3_bucket
    out = f"s3://{bucket}/run"
    _, props = hard_case(3, n_images=8)
    ids = sorted(props)
    for i in range(2):
        chunk = [props[k] for k in ids[4 * i:4 * i + 4]]
        files = layout.write_chunk(out, i, chunk, ["parquet"], storage_options=so)
        assert files["parquet"]["etag"]  # S3 returns it with the PUT: recorded at no cost
        rec = state.ChunkRecord(
            index=i, name=layout.chunk_name(i), image_ids=[p.image_id for p in chunk],
            proposals=sum(len(p) for p in chunk),
            files={k: {"path": state.relative_to(out, v["uri"]), "bytes": v["bytes"],
                       "etag": v["etag"]} for k, v in files.items()})
        storage.atomic_write(state.chunk_record_uri(out, i), rec.to_json(), so)
    assert sorted(state.scan_committed(out, 2, so).committed) == [0, 1]

    # Same size, other bytes (a copy from another run, a bit flip): only the ETag tells.
    uri = f"{out}/parquet/chunk-000001.parquet"
    data = storage.read_bytes(uri, so)
    storage.atomic_write(uri, data[:-1] + bytes([data[-1] ^ 1]), so)
    scan = state.scan_committed(out, 2, so)
    assert sorted(scan.committed) == [0]
    assert list(scan.damaged) == [1]
    assert scan.damaged[1].startswith("parquet/chunk-000001.parquet changed since it was written")

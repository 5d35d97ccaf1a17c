"""Shared fixtures: a real S3-compatible server on loopback (moto) and a real local Ray cluster.

Nothing here mocks a client: s3fs, pyarrow and boto3 talk HTTP to moto's server on 127.0.0.1, and
Ray runs real worker processes.
"""

from __future__ import annotations

import os
import socket

import pytest

# Ray workers and CLI subprocesses started by the tests import the tests' helper modules (a toy
# proposer, a fault-injecting one), as a user's workers import the package that holds their own
# proposer: tests/ goes on the path every process of the session inherits.
_TESTS = os.path.dirname(os.path.abspath(__file__))
os.environ["PYTHONPATH"] = os.pathsep.join(
    [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p] + [_TESTS])

# Under pytest-xdist (``-n 2``) two test processes share the machine's cores: one torch intra-op
# thread each, or every small op waits on an oversubscribed thread pool.
if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    torch.set_num_threads(1)


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (the sockets are held until all are picked: one at a
    time, the system may hand out the same port twice)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def coco_result_records(props, kind: str) -> list[dict]:
    """COCO results dicts (``kind``: "segm" or "bbox") of ImageProposals, one per proposal,
    built field by field, independently of segdist's encoders."""
    records = []
    for p in props:
        for k in range(len(p)):
            rec = {"image_id": p.image_id, "category_id": 1, "score": float(p.scores[k])}
            if kind == "segm":
                rec["segmentation"] = {"size": [p.height, p.width], "counts": p.counts[k].decode()}
            else:
                rec["bbox"] = [float(v) for v in p.boxes[k]]
            records.append(rec)
    return records


@pytest.fixture(scope="session")
def s3_server():
    """Endpoint URL of a moto S3 server on loopback, with dummy credentials in the environment."""
    from moto.server import ThreadedMotoServer

    os.environ.update({
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    })
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    # Processes started later (Ray workers, CLI subprocesses) find the server through these.
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    os.environ["AWS_ENDPOINT_URL_S3"] = endpoint
    yield endpoint
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket on the loopback server; returns (bucket_name, storage_options for s3fs)."""
    import boto3
    import s3fs

    name = "t-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:40]
    name = "".join(c for c in name if c.isalnum() or c == "-").strip("-")
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.create_bucket(Bucket=name)
    s3fs.S3FileSystem.clear_instance_cache()
    yield name, {"client_kwargs": {"endpoint_url": s3_server}}
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster for the whole session (4 logical CPUs on loopback)."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not ray.is_initialized():
        ray.init(
            address="local", num_cpus=4, num_gpus=0, include_dashboard=False,
            object_store_memory=256 * 1024 * 1024, log_to_driver=False,
            _node_ip_address="127.0.0.1",
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch intra-op thread for a test module, restored afterwards.

    The CI machine's 2 cores are shared with Ray workers and servers; with more torch threads than
    free cores every small op waits on the thread pool (measured 15x slower here).
    """
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

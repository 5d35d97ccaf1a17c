"""Storage failures during the job, against moto's real S3 server on loopback.

- Outages: the test's own moto server goes down for 20 s (stopped, then started again on the same
  port with its state: moto keeps its backend in this process) at a chosen request: when a worker
  first writes a chunk file, and when the driver writes the manifest. The run rides through both:
  exit code 0, the output byte-identical to a single-process run, and every image through the
  model exactly once (no chunk recomputed because a write failed).
- Preflight: no credentials, or an endpoint where nothing listens: exit code 2 and one line
  saying what to check, before Ray is contacted.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import free_port
from fault_proposer import FaultyBuilder, read_calls
from segdist.cli import main as cli_main
from segdist.proposers import PROPOSERS
from test_job import ROOT, TINY_MODEL, config_file, job_config, make_data, read_tree, reference_files

OUTAGE_S = 20.0
_UNAVAILABLE = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>ServiceUnavailable</Code>'
                b"<Message>the test took the server down</Message></Error>")


class OutageServer:
    """moto's S3 application on 127.0.0.1:``port`` (werkzeug's threaded server, as moto's own
    ThreadedMotoServer runs it), taken down for ``outage_s`` seconds the first time a request
    matches each trigger ``(method, path substring[, seconds or action])``: that request gets a
    503, and until the server is started again on the same port every connection is refused. An
    action (a callable) is run instead, and the request then answered as usual."""

    def __init__(self, port: int, triggers: list[tuple], outage_s: float):
        self.port, self.triggers, self.outage_s = port, list(triggers), outage_s
        self.outages: list[dict] = []  # {"path", "down", "up"} per outage
        self.outage_threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._server = None
        self._thread: threading.Thread | None = None

    def _app(self):
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

        app = DomainDispatcherApplication(create_backend_app)

        def wrapped(environ, start_response):
            method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
            with self._lock:
                hit = next((t for t in self.triggers if t[0] == method and t[1] in path), None)
                if hit is not None:
                    self.triggers.remove(hit)
            if hit is None:
                return app(environ, start_response)
            if len(hit) > 2 and callable(hit[2]):
                hit[2]()
                return app(environ, start_response)
            down = threading.Event()
            seconds = hit[2] if len(hit) > 2 else self.outage_s
            outage = threading.Thread(target=self._outage, args=(path, down, seconds), daemon=True)
            self.outage_threads.append(outage)
            outage.start()
            down.wait()  # the listening socket is closed: this request fails, and all after it
            start_response("503 Service Unavailable", [("Content-Type", "application/xml")])
            return [_UNAVAILABLE]

        return wrapped

    def start(self) -> None:
        from moto.moto_server.werkzeug_app import MotoRequestHandler
        from werkzeug.serving import make_server

        self._server = make_server("127.0.0.1", self.port, self._app(), threaded=True,
                                   request_handler=MotoRequestHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def _outage(self, path: str, down: threading.Event, seconds: float) -> None:
        entry = {"path": path, "down": time.monotonic()}
        self.stop()
        down.set()
        time.sleep(seconds)
        self.start()  # moto's backend (buckets, objects) lives on in this process
        entry["up"] = time.monotonic()
        self.outages.append(entry)


@pytest.fixture
def outage_s3(s3_server):
    """An OutageServer on a free port (triggers set by the test), sharing the session's moto
    backend; stopped at the end."""
    server = OutageServer(free_port(), [], OUTAGE_S)
    server.start()
    yield server, f"http://127.0.0.1:{server.port}"
    for outage in server.outage_threads:
        outage.join()  # the server is up again
    server.stop()


def test_storage_outages_mid_run_and_at_the_manifest_are_ridden_through(
        ray_cluster, outage_s3, tmp_path, monkeypatch, capsys):
    import boto3
    import s3fs

    server, endpoint = outage_s3
    bucket = "outages"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    s3fs.S3FileSystem.clear_instance_cache()
    # Explicit credentials and endpoint: the session's Ray workers may predate the environment's.
    # One attempt per request in botocore (a user setting): what rides through the outages is
    # segdist's own retrying, not botocore's few seconds of it.
    opts = {"client_kwargs": {"endpoint_url": endpoint}, "key": "testing", "secret": "testing",
            "config_kwargs": {"retries": {"max_attempts": 1}}}
    data = make_data(f"s3://{bucket}/data", 12, opts)
    out = f"s3://{bucket}/run"
    calls = str(tmp_path / "calls.jsonl")
    monkeypatch.setitem(PROPOSERS, "deepmask", FaultyBuilder(calls=calls))
    cfg = job_config(data, out, opts)
    config = config_file(cfg, tmp_path)
    # Down when a worker first writes a chunk file (mid-run), and when the driver writes the
    # manifest (after every chunk committed).
    server.triggers = [("PUT", "/run/parquet/chunk-"), ("PUT", "/run/manifest.json")]

    rc = cli_main(["generate", str(config), "--no-progress"])

    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert printed.startswith("complete: 3/3 chunks committed (3 written now")
    paths = [o["path"] for o in server.outages]  # both outages happened, where they should
    assert len(paths) == 2 and "/run/parquet/chunk-" in paths[0], paths
    assert paths[1].endswith("/run/manifest.json"), paths
    assert all(o["up"] - o["down"] >= OUTAGE_S for o in server.outages)
    # Every image went through the model exactly once: the failed writes were retried with the
    # computed chunk in memory, never recomputed.
    counts = collections.Counter(i for call in read_calls(calls) for i in call["ids"])
    ids = sorted(im["id"] for im in json.loads(
        s3fs.S3FileSystem(**opts).cat_file(f"{bucket}/data/annotations/instances_all.json"))["images"])
    assert sorted(counts) == ids and set(counts.values()) == {1}
    fs = s3fs.S3FileSystem(**opts)
    fs.invalidate_cache()
    manifest = json.loads(fs.cat_file(f"{bucket}/run/manifest.json"))
    assert manifest["complete"] is True and manifest["timings"]["failed_attempts"] == 0
    assert read_tree(out, opts) == reference_files(cfg, str(tmp_path / "ref"))

    # An outage longer than resources.storage_retry_s at the manifest (a no-op re-run: every chunk
    # is committed, no Ray): the run does not crash; its summary says what could not be written.
    server.triggers = [("PUT", "/run/manifest.json", 3.0)]
    rc = cli_main(["generate", str(config), "--no-progress", "--set", "resources.storage_retry_s=1"])
    printed = capsys.readouterr().out
    assert rc == 1, printed
    assert printed.startswith("INCOMPLETE: 3/3 chunks committed (0 written now, 3 already")
    assert "\nthe manifest could not be written (cannot write s3://outages/run/manifest.json: " \
        in printed and "re-run the same command to write it" in printed


def _preflight_cli(config: Path, env: dict) -> subprocess.Popen:
    # --address where nothing listens: reaching Ray before the check would fail differently.
    return subprocess.Popen(
        [sys.executable, "-m", "segdist", "generate", str(config), "--address", "127.0.0.1:9",
         "--no-progress"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)


def test_missing_credentials_and_unreachable_endpoint_fail_at_preflight_in_one_line(
        s3_server, s3_bucket, tmp_path):
    bucket, _ = s3_bucket
    data = make_data(str(tmp_path / "data"), 2)
    no_creds = {k: v for k, v in os.environ.items()
                if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")}
    no_creds.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
                    AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_EC2_METADATA_DISABLED="true")
    cases = {
        "no-credentials": (s3_server, no_creds,
                           "no usable credentials (NoCredentialsError); check the credentials"),
        "unreachable": (f"http://127.0.0.1:{free_port()}", dict(os.environ),
                        "cannot connect to the store (EndpointConnectionError"),
    }
    # botocore's default retries take about 10 s to report a refused connection: one attempt here.
    one_attempt = {"retries": {"max_attempts": 1}}
    procs = {}
    for name, (endpoint, env, _) in cases.items():
        config = tmp_path / f"{name}.yaml"
        config.write_text(json.dumps({
            "dataset": data, "model": TINY_MODEL,
            "output": {"uri": f"s3://{bucket}/{name}",
                       "storage_options": {"client_kwargs": {"endpoint_url": endpoint},
                                           "config_kwargs": one_attempt}}}))
        procs[name] = _preflight_cli(config, env)  # both at once: each waits on its client
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 2, (name, err[-2000:])
        assert "Traceback" not in err, (name, err[-2000:])
        errors = [line for line in err.splitlines() if "error:" in line]
        assert len(errors) == 1, (name, err[-2000:])
        assert errors[0].startswith(f"segdist generate: error: output location s3://{bucket}/{name} "
                                    "is not writable: ") and cases[name][2] in errors[0], errors[0]


def test_bucket_deleted_mid_run_fails_fast_with_the_reason(ray_cluster, outage_s3, tmp_path,
                                                           monkeypatch, capsys):
    import boto3

    server, endpoint = outage_s3
    bucket = "vanishing"
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    opts = {"client_kwargs": {"endpoint_url": endpoint}, "key": "testing", "secret": "testing"}
    data = make_data(str(tmp_path / "data"), 8)
    calls = str(tmp_path / "calls.jsonl")
    monkeypatch.setitem(PROPOSERS, "deepmask", FaultyBuilder(calls=calls))
    cfg = job_config(data, f"s3://{bucket}/run", opts, num_workers=1)
    config = config_file(cfg, tmp_path)

    def delete_bucket() -> None:
        for _ in range(100):  # the other chunk in flight may add a file meanwhile
            for obj in client.list_objects_v2(Bucket=bucket).get("Contents", []):
                client.delete_object(Bucket=bucket, Key=obj["Key"])
            try:
                client.delete_bucket(Bucket=bucket)
                return
            except client.exceptions.ClientError:
                continue

    # The bucket goes away as the first chunk file is written: a permanent error.
    server.triggers = [("PUT", "/run/coco-json/chunk-", delete_bucket)]

    rc = cli_main(["generate", str(config), "--no-progress"])

    printed = capsys.readouterr().out
    assert rc == 1, printed
    assert printed.startswith("INCOMPLETE: 0/2 chunks committed"), printed
    # Each chunk failed on its first attempt, with the reason and what to check.
    for index in (0, 1):
        assert f"\nfailed chunk {index} after 1 attempts: StorageError: cannot write s3://{bucket}" \
            in printed and "check the bucket name" in printed, printed
    assert "\nthe manifest could not be written (cannot write s3://" in printed
    # Each image through the model once: no attempt recomputed it.
    counts = collections.Counter(i for call in read_calls(calls) for i in call["ids"])
    assert set(counts.values()) == {1} and len(counts) == 8

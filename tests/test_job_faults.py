"""Faults during the proposal job: a worker that dies mid-chunk, a chunk that keeps failing, a hung
worker, and a driver killed mid-run and started again. After each, every image is in the output
exactly once and the files equal an uninterrupted single-process run's.

The faults come from :mod:`fault_proposer` (tests/): the real proposer, wrapped to end or stall
its worker process in the model call on a chosen image, put in PROPOSERS for the test's run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fault_proposer import Fault, FaultyBuilder, read_calls
from segdist.cli import main as cli_main
from segdist.errors import SegdistError
from segdist.job import state
from segdist.job.driver import run_job
from segdist.proposals.store import open_proposals
from segdist.proposers import PROPOSERS
from test_job import (CHUNK, ROOT, config_file, job_config, make_data, mtimes, read_tree,
                      reference_files)


def _ids(data: dict) -> list[int]:
    return sorted(im["id"] for im in json.loads(Path(data["annotations"]).read_text())["images"])


def _every_image_once(out: str, ids: list[int]) -> None:
    store = open_proposals(out)
    assert [p.image_id for chunk in store.iter_chunks() for p in chunk] == ids


@pytest.fixture
def fault(monkeypatch):
    """``fault(action, data, chunk, marker=None)``: the job's deepmask proposer fires ``action`` on
    the first image of ``chunk`` (see fault_proposer), for this test only."""
    def install(action: str, data: dict, chunk: int, marker: Path | None = None) -> None:
        image_id = _ids(data)[chunk * CHUNK]
        monkeypatch.setitem(PROPOSERS, "deepmask",
                            FaultyBuilder(Fault(action, image_id, marker and str(marker))))
    return install


def test_worker_killed_mid_chunk_is_replaced_and_its_chunk_retried(ray_cluster, tmp_path, fault):
    data = make_data(str(tmp_path / "data"), 12)
    out = str(tmp_path / "out")
    marker = tmp_path / "killed-once"
    # The worker that reaches chunk 1 first ends its process (os._exit) in the model call, once.
    fault("exit", data, 1, marker)
    cfg = job_config(data, out)

    result = run_job(cfg, progress=False)

    assert marker.exists()  # the fault did fire
    assert result.complete and result.chunks_written == 3 and not result.chunks_failed
    manifest = json.loads(Path(out, "manifest.json").read_text())
    assert manifest["timings"]["workers_replaced"] >= 1 and manifest["timings"]["failed_attempts"] >= 1
    record = json.loads(Path(state.chunk_record_uri(out, 1)).read_text())
    assert record["attempt"] >= 2
    _every_image_once(out, _ids(data))
    assert read_tree(out) == reference_files(cfg, str(tmp_path / "ref"))


def test_chunk_that_keeps_failing_is_reported_and_the_rest_completes(ray_cluster, tmp_path, monkeypatch,
                                                                      fault, capsys):
    data = make_data(str(tmp_path / "data"), 16)
    out = str(tmp_path / "out")
    cfg = job_config(data, out, num_workers=1, max_chunk_attempts=2, max_actor_restarts=5)
    config = config_file(cfg, tmp_path)
    fault("exit", data, 2)  # every attempt at chunk 2 kills its worker

    rc = cli_main(["generate", str(config), "--no-progress"])

    assert rc == 1  # incomplete
    printed = capsys.readouterr().out
    assert "INCOMPLETE: 3/4 chunks committed" in printed and "failed chunk 2 after 2 attempts" in printed
    manifest = json.loads(Path(out, "manifest.json").read_text())
    assert manifest["complete"] is False
    assert [c["index"] for c in manifest["chunks"]] == [0, 1, 3]
    (failed,) = manifest["failed_chunks"]
    assert failed["index"] == 2 and failed["attempts"] == 2 and len(failed["errors"]) == 2
    assert "ActorDiedError" in failed["errors"][0]
    assert not Path(state.chunk_record_uri(out, 2)).exists()
    ids = _ids(data)
    assert open_proposals(out).image_ids() == ids[:8] + ids[12:]

    # Once the cause is gone, a re-run does just the failed chunk.
    monkeypatch.undo()
    before = mtimes(out)
    rc = cli_main(["generate", str(config), "--no-progress"])
    assert rc == 0
    after = mtimes(out)
    assert all(after[k] == v for k, v in before.items()
               if "chunk-000002" not in k and k not in ("manifest.json", "coco-json/images.json"))
    assert json.loads(Path(out, "manifest.json").read_text())["complete"] is True
    _every_image_once(out, ids)


def test_driver_killed_mid_run_then_rerun_skips_committed_chunks(ray_cluster, tmp_path):
    data = make_data(str(tmp_path / "data"), 16)
    out = str(tmp_path / "out")
    cfg = job_config(data, out, num_workers=1)
    config = config_file(cfg, tmp_path)
    # A separate driver process (with the fault installed) joins the session's cluster; its worker
    # stalls forever in chunk 2, so the driver is certainly mid-run when it is killed. Chunk 2 is
    # handed out once chunk 0 or 1 has committed; the stall holds the worker's model lock, so the
    # chunks beside it may or may not commit first, depending on which took the model first.
    address = ray_cluster.get_runtime_context().gcs_address
    driver = subprocess.Popen(
        [sys.executable, "-c", "import fault_proposer; fault_proposer.main()",
         "hang", str(_ids(data)[2 * CHUNK]), "--",
         "generate", str(config), "--address", address, "--no-progress"],
        cwd=ROOT, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    records = [Path(state.chunk_record_uri(out, i)) for i in range(4)]
    try:
        deadline = time.monotonic() + 180
        while not any(r.exists() for r in records):
            assert driver.poll() is None, driver.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "the first driver committed no chunks"
            time.sleep(0.3)
        # A second driver into the same output while the first runs: refused, naming the holder.
        with pytest.raises(SegdistError) as err:
            run_job(cfg, progress=False)
        assert f"being written by another segdist driver: {socket.gethostname()}:{driver.pid} " \
            in str(err.value)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
        driver.stdout.close()
    assert not Path(out, "manifest.json").exists()
    assert not records[2].exists()
    committed = [i for i, r in enumerate(records) if r.exists()]
    # As if a worker had died between two files of the first committed chunk: a file is missing,
    # that chunk is redone.
    victim, kept = committed[0], committed[1:]
    Path(out, "parquet", f"chunk-{victim:06d}.parquet").unlink()
    before = mtimes(out)

    result = run_job(cfg, progress=False)

    assert result.complete and {victim, 2} <= set(result.written_chunks)
    assert not set(kept) & set(result.written_chunks)
    assert result.chunks_skipped == 4 - len(result.written_chunks)
    after = mtimes(out)
    for name, t in before.items():
        if any(f"chunk-{i:06d}" in name for i in kept):
            assert after[name] == t, name  # committed chunks were not rewritten
    _every_image_once(out, _ids(data))
    assert read_tree(out) == reference_files(cfg, str(tmp_path / "ref"))


def test_hung_worker_is_killed_after_chunk_timeout_and_its_chunk_retried(ray_cluster, tmp_path,
                                                                         fault):
    data = make_data(str(tmp_path / "data"), 6)
    out = str(tmp_path / "out")
    marker = tmp_path / "hung-once"
    # The first attempt at chunk 1 stalls forever in the model call; the retry goes through.
    fault("hang", data, 1, marker)
    cfg = job_config(data, out, num_workers=1, chunk_timeout_s=3)

    t0 = time.monotonic()
    result = run_job(cfg, progress=False)

    assert marker.exists()  # the fault did fire
    assert time.monotonic() - t0 < 60
    assert result.complete and result.chunks_written == 2 and not result.chunks_failed
    manifest = json.loads(Path(out, "manifest.json").read_text())
    assert manifest["timings"]["workers_replaced"] == 1 and manifest["timings"]["failed_attempts"] == 1
    # The stall holds the worker's model lock: chunk 0, in flight beside it, may be the oldest
    # chunk when the timeout fires (and take the failed attempt); one of them ran twice.
    attempts = [json.loads(Path(state.chunk_record_uri(out, i)).read_text())["attempt"] for i in (0, 1)]
    assert sorted(attempts) == [1, 2]
    _every_image_once(out, _ids(data))
    assert read_tree(out) == reference_files(cfg, str(tmp_path / "ref"))


def test_sigterm_stops_the_run_like_ctrl_c_and_the_rerun_completes(ray_cluster, tmp_path):
    data = make_data(str(tmp_path / "data"), 20)
    out = str(tmp_path / "out")
    cfg = job_config(data, out, num_workers=1)
    config = config_file(cfg, tmp_path)
    # The CLI as a user runs it, on its own embedded Ray (what `timeout`, Kubernetes or Slurm would
    # stop with SIGTERM); stopped once its first chunk is committed, with four chunks to go (the
    # chunk in flight beside it may still commit before its worker is stopped).
    driver = subprocess.Popen([sys.executable, "-m", "segdist", "generate", str(config)], cwd=ROOT,
                              env=dict(os.environ), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    records = [Path(state.chunk_record_uri(out, i)) for i in range(5)]
    try:
        deadline = time.monotonic() + 180
        while not any(r.exists() for r in records):
            assert driver.poll() is None, driver.communicate()
            assert time.monotonic() < deadline, "the driver committed no chunk"
            time.sleep(0.05)
        driver.send_signal(signal.SIGTERM)
        stdout, stderr = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.communicate()

    assert driver.returncode == 143, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == "segdist generate: interrupted (SIGTERM)"
    # No Ray C++ stack dump, no traceback, no raylet messages, no Ray start-up lines.
    assert stdout == ""
    for noise in ("SIGTERM received", "logging.cc", "Traceback", "(raylet)", "Started a local Ray",
                  "Token authentication is enabled"):
        assert noise not in stderr, stderr[-3000:]
    assert not Path(out, "manifest.json").exists()  # nothing claimed complete
    committed = [i for i, r in enumerate(records) if r.exists()]
    assert 1 <= len(committed) < 5

    result = run_job(cfg, progress=False)

    assert result.complete and result.chunks_skipped == len(committed)
    assert set(result.written_chunks) == set(range(5)) - set(committed)
    _every_image_once(out, _ids(data))


_SIGNAL_IN_A_FINALISER = """
import os, signal, time
from segdist.cli import _Interrupts

class Finalised:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        start = time.monotonic()
        while time.monotonic() - start < 0.2:  # the handler runs here, inside __del__
            pass

with _Interrupts() as interrupts:
    try:
        Finalised()  # dropped at once: its __del__ runs
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            time.sleep(0.01)
        print("lost")
    except KeyboardInterrupt:
        print("interrupted", interrupts.received)
"""


def test_a_sigterm_that_lands_in_a_finaliser_still_interrupts():
    # Python drops an exception raised inside __del__ (Ray's ObjectRefGenerator.__del__ is where a
    # SIGTERM once landed, and the job then ran to its end): the signal is delivered again after.
    got = subprocess.run([sys.executable, "-c", _SIGNAL_IN_A_FINALISER], cwd=ROOT, text=True,
                         capture_output=True, timeout=60)
    assert got.stdout.split() == ["interrupted", str(int(signal.SIGTERM))], got.stderr
    assert "Exception ignored" not in got.stderr


def _wait_for(what: str, condition, alive: threading.Thread):
    """Poll ``condition()`` until it returns something true (returned) while the run is going."""
    deadline = time.monotonic() + 180
    while True:
        got = condition()
        if got:
            return got
        assert alive.is_alive(), f"the run ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_workers_killed_twice_all_at_once_fail_no_chunk(ray_cluster, tmp_path, monkeypatch):
    # Two workers, three chunks: one worker holds chunks 0 and 1, the other chunk 2. Kill both
    # when the second has committed its chunk and sits idle (the first still busy), then kill
    # both replacements once one of them is in a chunk. The idle worker's death goes unnoticed
    # until a chunk is sent to it: that chunk never started, and must not lose an attempt there
    # (segdist used to count one, and the second kill then failed the chunk after
    # max_chunk_attempts=3).
    data = make_data(str(tmp_path / "data"), 12)
    out = str(tmp_path / "out")
    calls = str(tmp_path / "calls.jsonl")
    # Slow model calls (1 s each, 2 per chunk): the kills land while chunks are in flight.
    monkeypatch.setitem(PROPOSERS, "deepmask", FaultyBuilder(calls=calls, delay_s=1.0))
    cfg = job_config(data, out, num_workers=2, max_chunk_attempts=3, max_actor_restarts=3)
    ids = _ids(data)
    chunk_of = {image_id: k // CHUNK for k, image_id in enumerate(ids)}
    records = [Path(state.chunk_record_uri(out, i)) for i in range(3)]
    idle_chunks: set[int] = set()  # what the idle worker had committed before the first kill

    def one_idle_one_busy() -> set[int] | None:
        held: dict[int, set[int]] = {}
        for call in read_calls(calls):
            held.setdefault(call["pid"], set()).update(chunk_of[i] for i in call["ids"])
        done = {i for i, r in enumerate(records) if r.exists()}
        idle = [pid for pid, chunks in held.items() if chunks and chunks <= done]
        busy = [pid for pid, chunks in held.items() if chunks - done]
        if len(held) == 2 and idle and busy:
            idle_chunks.update(held[idle[0]])
            return set(held)
        return None

    def replacements_built_one_in_a_chunk(first: set[int]) -> set[int] | None:
        built = {c["pid"] for c in read_calls(calls) if c.get("built")} - first
        working = {c["pid"] for c in read_calls(calls) if c["ids"]} - first
        return built if len(built) == 2 and working else None

    result = {}
    run = threading.Thread(target=lambda: result.update(r=run_job(cfg, progress=False)))
    run.start()
    try:
        first = _wait_for("one worker idle, one busy", one_idle_one_busy, run)
        for pid in first:  # this test's own Ray workers
            os.kill(pid, signal.SIGKILL)
        second = _wait_for("both replacements built, one in a chunk",
                           lambda: replacements_built_one_in_a_chunk(first), run)
        for pid in second:
            os.kill(pid, signal.SIGKILL)
    finally:
        run.join(timeout=300)
    r = result["r"]
    assert r.complete and r.chunks_written == 3 and not r.chunks_failed, r.summary()
    manifest = json.loads(Path(out, "manifest.json").read_text())
    assert manifest["timings"]["workers_replaced"] == 4
    attempts = [json.loads(rec.read_text())["attempt"] for rec in records]
    # The idle worker's chunk: one attempt. An attempt is charged only to a chunk that had started
    # on a killed worker: at the first kill the busy worker's (its second chunk may still have been
    # queued), at the second the one a replacement was in (and the other's, if it had started);
    # none to a dead worker a chunk was merely sent to. So 2 to 4 failed attempts in all.
    assert len(idle_chunks) == 1 and all(attempts[i] == 1 for i in idle_chunks), (idle_chunks, attempts)
    assert 2 <= sum(attempts) - 3 <= 4, attempts
    assert manifest["timings"]["failed_attempts"] == sum(attempts) - 3
    _every_image_once(out, ids)
    assert read_tree(out) == reference_files(cfg, str(tmp_path / "ref"))

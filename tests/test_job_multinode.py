"""The job on a multi-node Ray cluster on this machine (``ray.cluster_utils.Cluster``: a head and
two worker nodes with their own CPUs and fake GPUs, on loopback; tests/multinode_cluster.py).

- A local output without ``output.shared_filesystem`` is refused (exit 2, one line): each node
  would write to its own disk.
- GPU workers are spread over both nodes; one node is removed mid-run (its raylet, object store
  and worker killed): the job completes, exit 0, byte-identical to a one-node single-process run,
  and the manifest names the workers' hosts and nodes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from fault_proposer import read_calls
from test_job import ROOT, job_config, make_data, read_tree, reference_files

HERE = Path(__file__).resolve().parent


@pytest.fixture
def cluster():
    """The multi-node cluster (see the module docstring): ``(address, {name: node id}, remove)``,
    ``remove(name)`` taking a worker node away."""
    temp = tempfile.mkdtemp(prefix="segdist-mn-", dir="/tmp")  # short: Ray's socket paths
    proc = subprocess.Popen([sys.executable, str(HERE / "multinode_cluster.py"), temp],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        line = proc.stdout.readline()
        assert line, "the multi-node cluster did not start"
        info = json.loads(line)

        def remove(name: str) -> None:
            proc.stdin.write(f"remove {name}\n")
            proc.stdin.flush()
            assert proc.stdout.readline().strip() == f"removed {name}"

        yield info["address"], info["nodes"], remove
    finally:
        proc.stdin.close()  # the helper shuts its cluster down
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()  # its node processes have a reaper that follows it
            proc.wait()
        shutil.rmtree(temp, ignore_errors=True)


def _driver(config: Path, address: str, calls: Path, delay_s: float) -> subprocess.Popen:
    """``segdist generate CONFIG --address ADDRESS`` in its own process, its model calls logged
    (tests/fault_proposer.py). RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps Ray from rewriting the
    loopback address into the machine's own (where this cluster does not listen)."""
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    return subprocess.Popen(
        [sys.executable, "-c", "import fault_proposer; fault_proposer.main()", "count",
         str(calls), str(delay_s), "--", "generate", str(config), "--address", address,
         "--no-progress"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_node_lost_mid_run_and_local_output_refused_without_shared_filesystem(cluster, tmp_path):
    address, nodes, remove = cluster
    data = make_data(str(tmp_path / "data"), 24)
    out = tmp_path / "out"
    calls = tmp_path / "calls.jsonl"
    # model.device auto: the nodes' (fake) GPUs make these GPU workers, one GPU each, two of
    # them; spread, one lands on each node. (Without a real GPU the model runs on the CPU.)
    cfg = job_config(data, str(out), num_workers=2)
    raw = cfg.model_dump(mode="json")
    raw["model"]["device"] = "auto"

    # A local path on two nodes, not declared shared: refused before any worker.
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(raw))
    refused = _driver(config, address, calls, 0)
    _, err = refused.communicate(timeout=180)
    assert refused.returncode == 2, err[-3000:]
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    assert f"output.uri {out} is a local path, but the Ray cluster has 3 nodes" in errors[0]
    assert "output.shared_filesystem=true" in errors[0]
    assert not out.exists() or not any(out.rglob("*.json"))  # nothing claimed

    # Declared shared (it is: one machine): the run goes, and node w2 is lost mid-run.
    raw["output"]["shared_filesystem"] = True
    config.write_text(yaml.safe_dump(raw))
    driver = _driver(config, address, calls, 0.3)
    try:
        deadline = time.monotonic() + 180
        while not any(c["node"] == nodes["w2"] and c["ids"] for c in read_calls(str(calls))):
            assert driver.poll() is None, driver.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no worker ran on node w2"
            time.sleep(0.05)
        remove("w2")
        printed, err = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.communicate()
    assert driver.returncode == 0, err[-3000:]
    # (Ray prints its own lines about the lost node to the driver's stdout too.)
    assert "\ncomplete: 6/6 chunks committed" in "\n" + printed, printed
    manifest = json.loads((out / "manifest.json").read_text())
    timings = manifest["timings"]
    # The workers ran on both nodes (w2's until it was lost), and the manifest says where.
    assert {w["node_id"] for w in timings["workers"]} == set(nodes.values())
    assert timings["workers_replaced"] >= 1
    assert manifest["hosts"] and all(w["host"] in manifest["hosts"] for w in timings["workers"]
                                     if w["node_id"] == nodes["w1"])
    ref_cfg = job_config(data, str(tmp_path / "unused"), num_workers=2)
    assert read_tree(str(out)) == reference_files(ref_cfg, str(tmp_path / "ref"))

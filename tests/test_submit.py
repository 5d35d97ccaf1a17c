"""``segdist submit`` / ``segdist jobs`` against a real Ray head on loopback with token auth on.

The test starts its own head (``ray start --head`` on 127.0.0.1, every port picked free, its own
temp dir) and stops exactly that cluster afterwards by the process ids under its temp dir: plain
``ray stop`` would stop every Ray on the machine, including the test session's own.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fsspec
import pytest
import yaml

from conftest import free_ports
from segdist.job import submission
from test_job import CHUNK, ROOT, TINY_MODEL, make_data

VENV_BIN = str(Path(sys.executable).parent)
PORT_FLAGS = ("--port", "--dashboard-port", "--node-manager-port", "--object-manager-port",
              "--ray-client-server-port", "--dashboard-agent-listen-port",
              "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port")


def _processes_under(marker: str) -> set[int]:
    """Pids whose command line mentions ``marker``, and all their descendants."""
    def cmdline(pid: int) -> str:
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            return ""

    def parent(pid: int) -> int | None:
        try:
            return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return None

    pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    found = {p for p in pids if marker in cmdline(p)}
    parents = {p: parent(p) for p in pids}
    grew = True
    while grew:
        grew = False
        for p, pp in parents.items():
            if pp in found and p not in found:
                found.add(p)
                grew = True
    found.discard(os.getpid())
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _stop_cluster(temp_dir: str) -> None:
    pids = _processes_under(temp_dir)
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.1)


@pytest.fixture
def ray_head(s3_server):
    """A token-auth Ray head on loopback: (Jobs API URL, client env with the token, GCS address)."""
    if not shutil.which("ray", path=VENV_BIN):
        pytest.skip("the ray CLI is not installed in this environment")
    # A short path: Ray's unix sockets live under it (108-byte limit).
    temp_dir = tempfile.mkdtemp(prefix="sdray-", dir="/tmp")
    token = secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
                "PATH": VENV_BIN + os.pathsep + env.get("PATH", ""), "RAY_USAGE_STATS_ENABLED": "0"})
    ports = {flag: str(port) for flag, port in zip(PORT_FLAGS, free_ports(len(PORT_FLAGS)))}
    cmd = [str(Path(VENV_BIN, "ray")), "start", "--head", "--node-ip-address", "127.0.0.1",
           "--dashboard-host", "127.0.0.1", "--num-cpus", "2", "--num-gpus", "0",
           "--temp-dir", temp_dir, "--include-dashboard", "true", "--disable-usage-stats",
           "--object-store-memory", str(200 * 1024 * 1024)]
    for flag, port in ports.items():
        cmd += [flag, port]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        yield (f"http://127.0.0.1:{ports['--dashboard-port']}", env,
               f"127.0.0.1:{ports['--port']}")
    finally:
        _stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _cli(env: dict, *args: str, timeout: float = 420) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "segdist", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_submit_runs_a_job_on_a_token_auth_cluster(ray_head, s3_bucket, tmp_path):
    address, env, gcs = ray_head
    bucket, opts = s3_bucket
    data = make_data(f"s3://{bucket}/data", 8, opts)
    out = f"s3://{bucket}/proposals"
    config = {"dataset": data, "model": TINY_MODEL,
              "output": {"uri": out, "chunk_size": CHUNK, "storage_options": opts},
              "resources": {"num_workers": 1, "cpus_per_worker": 1, "decode_threads": 2}}
    fs = fsspec.filesystem("s3", **opts)
    # The config lives in object storage, as it would for a remote cluster.
    fs.pipe_file(f"{bucket}/configs/job.yaml", yaml.safe_dump(config).encode())

    # --no-wait prints just the id (for JOB=$(segdist submit ... --no-wait)); then it is followed.
    proc = _cli(env, "submit", f"s3://{bucket}/configs/job.yaml", "--address", address,
                "--no-wait")

    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    job_id = proc.stdout.strip()
    assert proc.stdout == job_id + "\n" and job_id.startswith("segdist-generate-")
    assert f"submitted job {job_id} to {address}" in proc.stderr
    followed = _cli(env, "jobs", "logs", job_id, "--follow", "--address", address)
    assert followed.returncode == 0, followed.stdout[-4000:] + followed.stderr[-4000:]
    assert "complete: 2/2 chunks committed" in followed.stdout  # the job's own log, streamed
    assert followed.stdout.rstrip().endswith(f"job {job_id}: SUCCEEDED")
    fs.invalidate_cache()
    manifest = json.loads(fs.cat_file(f"{bucket}/proposals/manifest.json"))
    assert manifest["complete"] and manifest["totals"]["images"] == 8
    for entry in manifest["chunks"]:
        for path in entry["files"].values():
            assert fs.exists(f"{bucket}/proposals/{path}")

    status = _cli(env, "jobs", "status", job_id, "--address", address, timeout=120)
    assert status.returncode == 0 and json.loads(status.stdout)["status"] == "SUCCEEDED"
    assert "jobs/generate.py" in json.loads(status.stdout)["entrypoint"]
    logs = _cli(env, "jobs", "logs", job_id, "--address", address, timeout=120)
    assert "complete: 2/2 chunks committed" in logs.stdout
    waited = _cli(env, "jobs", "wait", job_id, "--address", address, timeout=120)
    assert waited.returncode == 0 and waited.stdout == f"job {job_id}: SUCCEEDED\n"

    # A wrong token is refused with a message that says what to set.
    refused = _cli({**env, "RAY_AUTH_TOKEN": "not-the-token"}, "jobs", "list", "--address", address,
                   timeout=120)
    assert refused.returncode == 2
    assert "refused" in refused.stderr and "RAY_AUTH_TOKEN" in refused.stderr

    # A driver joining the cluster without RAY_AUTH_MODE=token (and no token file in its home)
    # gets the same line, saying to set the mode too; once the config has passed its checks.
    no_token = {k: v for k, v in env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    joined = _cli({**no_token, "HOME": str(tmp_path)}, "generate",
                  f"s3://{bucket}/configs/job.yaml", "--address", gcs, "--no-progress",
                  "--set", "output.uri=" + f"s3://{bucket}/other", timeout=120)
    assert joined.returncode == 2, joined.stderr[-3000:]
    assert joined.stderr.strip().splitlines()[-1] == (
        f"segdist generate: error: the Ray cluster at {gcs} refused the request (InvalidAuthToken: "
        "Authentication token is missing or incorrect); set RAY_AUTH_MODE=token and "
        "RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the cluster's token")


def test_jobs_help_lists_every_action_and_each_has_its_own(capsys):
    from segdist.cli import main
    from segdist.commands.jobs import ACTIONS

    with pytest.raises(SystemExit) as done:
        main(["jobs", "--help"])
    assert done.value.code == 0
    listing = " ".join(capsys.readouterr().out.split())
    for action, text in ACTIONS.items():
        assert f"{action} {text}" in listing, action
    for action in ACTIONS:
        with pytest.raises(SystemExit):
            main(["jobs", action, "--help"])
        text = capsys.readouterr().out
        assert text.startswith(f"usage: segdist jobs {action} ") and "--address" in text
        assert ("job_id" in text) == (action != "list")
        assert ("--follow" in text) == (action == "logs") and ("--timeout" in text) == (action == "wait")


def test_entrypoint_and_runtime_env(tmp_path):
    # The command the cluster runs: the thin script in the uploaded working dir, quoted overrides.
    cmd = submission.build_entrypoint("generate", str(ROOT / "configs" / "demo.yaml"),
                                      ["output.uri=s3://b/my run"], ROOT)
    assert cmd == "python jobs/generate.py configs/demo.yaml --set 'output.uri=s3://b/my run'"
    # Without an upload the cluster runs the installed package, and a local file is refused.
    assert submission.build_entrypoint("train", "s3://b/t.yaml", [], None) == \
        "python -m segdist train s3://b/t.yaml"
    with pytest.raises(Exception, match="cannot see a local file"):
        submission.build_entrypoint("generate", "configs/demo.yaml", [], None)
    with pytest.raises(Exception, match="outside the uploaded working dir"):
        submission.build_entrypoint("generate", str(tmp_path / "x.yaml"), [], ROOT)
    env = submission.build_runtime_env(ROOT, "torch>=2,pyyaml", {"A": "1"})
    assert env["working_dir"] == str(ROOT) and ".venv" in env["excludes"]
    assert env["pip"] == ["torch>=2", "pyyaml"] and env["env_vars"]["A"] == "1"
    assert submission.resolve_address("10.0.0.1:8265") == "http://10.0.0.1:8265"
    with pytest.raises(Exception, match="dashboard's HTTP address"):
        submission.resolve_address("ray://10.0.0.1:10001")


def test_auth_token_lookup_order(tmp_path, monkeypatch):
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert submission.auth_token() == "from-env"
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    assert submission.auth_token() == "from-file"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert submission.auth_token() is None


def test_upload_excludes_match_what_they_name():
    # Matched the way Ray matches runtime_env excludes (gitwildmatch, relative to the working dir).
    from ray._private.thirdparty.pathspec import PathSpec

    from segdist.job.submission import UPLOAD_EXCLUDES

    spec = PathSpec.from_lines("gitwildmatch", UPLOAD_EXCLUDES)
    for path in ("torch-2.15.0-cp311-cp311-linux_x86_64.whl", "dist/segdist-0.1.0-py3-none-any.whl",
                 ".venv/bin/python", "segdist/__pycache__/cli.cpython-311.pyc", "segdist-demo/x.png"):
        assert spec.match_file(path), path
    for path in ("segdist/cli.py", "jobs/generate.py", "configs/demo.yaml"):
        assert not spec.match_file(path), path

"""Submitting runs to a Ray cluster through the Jobs API, and following them.

The entry points Ray runs are the thin scripts in ``jobs/`` (``python jobs/generate.py CONFIG
--set ...``), shipped with the project folder as the job's ``working_dir``. A cluster that already
has segdist installed can skip the upload (``runtime_env=False``): the entry point is then
``python -m segdist <entry> ...``.

Authentication: the Jobs API runs arbitrary code, so clusters run with token auth
(``RAY_AUTH_MODE=token``). The client sends ``Authorization: Bearer <token>`` with the token from
RAY_AUTH_TOKEN, the file named by RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token (Ray's own order),
unless RAY_AUTH_MODE=disabled.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from segdist.errors import ConfigError, SegdistError
from segdist.ray_connect import auth_token, token_refused

ENTRIES = ("generate", "evaluate", "train")
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Never uploaded with the working dir: environments, caches, VCS data, local outputs.
UPLOAD_EXCLUDES = [".venv", ".git", "**/__pycache__", "*.pyc", ".pytest_cache", "segdist-demo",
                   "*.egg-info", "build", "*.whl"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def resolve_address(address: str | None) -> str:
    """The Jobs API URL: ``address``, else RAY_API_SERVER_ADDRESS / RAY_ADDRESS if they are HTTP
    URLs, else the local default; a bare ``host:port`` gets ``http://``."""
    if not address:
        for var in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
            value = os.environ.get(var, "")
            if value.startswith(("http://", "https://")):
                address = value
                break
    address = address or DEFAULT_ADDRESS
    if "://" not in address:
        address = "http://" + address
    if not address.startswith(("http://", "https://")):
        raise ConfigError(f"--address {address!r}: the Jobs API needs the dashboard's HTTP address, "
                          "e.g. http://127.0.0.1:8265 (not ray:// or the GCS port 6379)")
    return address.rstrip("/")


def client(address: str | None = None):
    """A connected ``JobSubmissionClient``; raises SegdistError with what to check if it is not."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    token = auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(url, headers=headers)
    except AuthenticationError as exc:
        raise SegdistError(token_refused(url, str(exc).splitlines()[0])) from None
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise SegdistError(
            f"cannot reach the Ray Jobs API at {url} ({exc}); check --address (the dashboard port, "
            "8265 by default) and that the cluster is up (for a remote cluster: `ray dashboard "
            "CLUSTER.yaml` or `kubectl port-forward`)") from None


def _config_argument(config: str, working_dir: Path | None) -> str:
    """How the job on the cluster names the config: a path inside the uploaded working dir, or a URI."""
    if "://" in config:
        return config
    if working_dir is None:
        raise ConfigError(f"{config}: without a working-dir upload the cluster cannot see a local "
                          "file; pass a URI (s3://...) or drop --no-runtime-env")
    path = Path(config).resolve()
    try:
        return path.relative_to(working_dir.resolve()).as_posix()
    except ValueError:
        raise ConfigError(f"{config} is outside the uploaded working dir {working_dir}; move it there, "
                          "use --working-dir, or put it in object storage and pass its URI") from None


def build_entrypoint(entry: str, config: str, overrides: Sequence[str], working_dir: Path | None) -> str:
    """The shell command the cluster runs for ``entry`` (generate, evaluate, train)."""
    if entry not in ENTRIES:
        raise ConfigError(f"--entry {entry!r}: must be one of {', '.join(ENTRIES)}")
    arg = _config_argument(config, working_dir)
    sets = " ".join(f"--set {shlex.quote(o)}" for o in overrides)
    if working_dir is not None:
        script = working_dir / "jobs" / f"{entry}.py"
        if not script.is_file():
            raise ConfigError(f"{script} does not exist: the working dir must be the segdist project "
                              "folder (the one with jobs/)")
        cmd = f"python jobs/{entry}.py {shlex.quote(arg)}"
    else:
        cmd = f"python -m segdist {entry} {shlex.quote(arg)}"
    return f"{cmd} {sets}".strip()


def build_runtime_env(working_dir: Path | None, pip: str | None = None,
                      env: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """``runtime_env`` for the job: the project folder, optional pip requirements, env vars."""
    runtime_env: dict[str, Any] = {}
    if working_dir is not None:
        runtime_env["working_dir"] = str(working_dir)
        runtime_env["excludes"] = list(UPLOAD_EXCLUDES)
    if pip:
        req = Path(pip)
        runtime_env["pip"] = str(req) if req.is_file() else [p for p in pip.split(",") if p]
    env_vars = {"PYTHONUNBUFFERED": "1", **dict(env or {})}
    runtime_env["env_vars"] = env_vars
    return runtime_env


def submit(config: str, *, address: str | None = None, entry: str = "generate",
           overrides: Sequence[str] = (), working_dir: str | Path | None = ".",
           pip: str | None = None, env: Mapping[str, str] | None = None,
           entrypoint_num_gpus: float | None = None, submission_id: str | None = None,
           agent_wait_s: float = 120.0) -> str:
    """Submit one run; returns the job's submission id. ``working_dir=None``: no upload."""
    wd = Path(working_dir).resolve() if working_dir is not None else None
    if wd is not None and not wd.is_dir():
        raise ConfigError(f"--working-dir {working_dir}: not a folder")
    if entry == "generate" and "://" not in config:
        # Fail here, on the laptop, not minutes later in the cluster's log.
        from segdist.config import JobConfig, load_config

        load_config(JobConfig, config, list(overrides))
    entrypoint = build_entrypoint(entry, config, overrides, wd)
    job_id = submission_id or f"segdist-{entry}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    c = client(address)
    kwargs: dict[str, Any] = {}
    if entrypoint_num_gpus:
        kwargs["entrypoint_num_gpus"] = entrypoint_num_gpus
    runtime_env = build_runtime_env(wd, pip, env)
    deadline = time.monotonic() + agent_wait_s
    while True:
        try:
            return c.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=job_id,
                                metadata={"segdist_entry": entry}, **kwargs)
        except (RuntimeError, ValueError) as exc:
            # A head that has just started answers before its job agent is up: wait for it.
            if "No available agent" in str(exc) and time.monotonic() < deadline:
                time.sleep(2.0)
                continue
            raise SegdistError(f"the cluster refused the job: {exc}") from None


def follow(job_id: str, address: str | None = None, write: Callable[[str], Any] = sys.stdout.write) -> str:
    """Stream the job's logs until it ends; returns its final status name."""
    c = client(address)

    async def tail() -> None:
        async for lines in c.tail_job_logs(job_id):
            write(lines)
            if hasattr(sys.stdout, "flush"):
                sys.stdout.flush()

    asyncio.run(tail())
    # The log stream closes when the job ends; its status may lag by a moment.
    status = status_of(job_id, address, c)
    deadline = time.monotonic() + 30
    while status not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.5)
        status = status_of(job_id, address, c)
    return status


def wait(job_id: str, address: str | None = None, timeout: float = 3600.0, poll: float = 1.0) -> str:
    """Wait (without logs) until the job ends or ``timeout`` passes; returns its status name."""
    c = client(address)
    deadline = time.monotonic() + timeout
    status = status_of(job_id, address, c)
    while status not in TERMINAL and time.monotonic() < deadline:
        time.sleep(poll)
        status = status_of(job_id, address, c)
    return status


def status_of(job_id: str, address: str | None = None, c=None) -> str:
    c = c or client(address)
    try:
        return str(c.get_job_status(job_id).value)
    except RuntimeError as exc:
        raise SegdistError(f"no job {job_id!r} at {resolve_address(address)} ({exc})") from None


def info(job_id: str, address: str | None = None) -> dict[str, Any]:
    c = client(address)
    try:
        details = c.get_job_info(job_id)
    except RuntimeError as exc:
        raise SegdistError(f"no job {job_id!r} at {resolve_address(address)} ({exc})") from None
    return {"job_id": job_id, "status": str(details.status.value), "entrypoint": details.entrypoint,
            "message": details.message, "start_time": details.start_time, "end_time": details.end_time}


def logs(job_id: str, address: str | None = None) -> str:
    c = client(address)
    try:
        return c.get_job_logs(job_id)
    except RuntimeError as exc:
        raise SegdistError(f"no job {job_id!r} at {resolve_address(address)} ({exc})") from None


def stop(job_id: str, address: str | None = None) -> bool:
    c = client(address)
    try:
        return bool(c.stop_job(job_id))
    except RuntimeError as exc:
        raise SegdistError(f"cannot stop job {job_id!r} at {resolve_address(address)} ({exc})") from None


def list_jobs(address: str | None = None) -> list[dict[str, Any]]:
    c = client(address)
    return [{"job_id": j.submission_id or j.job_id, "status": str(j.status.value),
             "entrypoint": j.entrypoint, "start_time": j.start_time} for j in c.list_jobs()]

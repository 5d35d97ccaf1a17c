"""Joining a Ray cluster or starting an embedded one: the one place every stage connects.

Joining: ``ray.init(address=...)`` retries a head it cannot reach for more than ten minutes,
printing Ray's C++ warnings all along, and a head that wants a token the driver does not send
fails only after 20 s with "Failed to connect". So the head is asked first, with a deadline, the
question ``ray.init`` asks it (the cluster id, over the GCS's own gRPC service): no answer within
``connect_timeout_s`` is one line naming the address, a refused token is the line ``segdist
submit`` gives.

Embedded, for the stages that ask (``quiet``: the job, the evaluation): Ray's own output stays in
Ray's log folder (``/tmp/ray/session_latest/logs``) unless debug logging is on: worker processes'
output, the raylet's messages about dead workers (the job reports lost workers itself) and Ray's
INFO lines. A joined cluster's output is left as Ray prints it (the user chose that cluster and
reads its logs).

Signals: ``ray.init`` replaces the process's SIGTERM handler (with Ray's ``sys.exit`` and then a
C++ handler that dumps a stack trace); handlers the process had installed for SIGTERM and SIGINT
(the CLI's, which turn both into an interruption like Ctrl-C) are put back.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

from segdist.errors import SegdistError

log = logging.getLogger(__name__)

DEFAULT_CONNECT_TIMEOUT_S = 30.0


class ClusterConnectError(SegdistError):
    """The Ray cluster at an address cannot be reached, or refused this driver."""


def token_refused(address: str, detail: str, mode_needed: bool = False) -> str:
    """The one-line message for a cluster that refused the request's token (or its absence).

    ``mode_needed``: the refused party is a driver joining with RAY_AUTH_MODE unset, which Ray
    needs set to ``token`` before it sends any token.
    """
    what = "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN" if mode_needed else "RAY_AUTH_TOKEN"
    return (f"the Ray cluster at {address} refused the request ({detail}); set {what} (or "
            "RAY_AUTH_TOKEN_PATH) to the cluster's token")


def auth_token() -> str | None:
    """The cluster token this process would send, or None: RAY_AUTH_TOKEN, else the file
    RAY_AUTH_TOKEN_PATH names, else ``~/.ray/auth_token`` (Ray's own order); none with
    RAY_AUTH_MODE=disabled."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.join(os.path.expanduser("~"), ".ray",
                                                                  "auth_token")
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError:
        return None
    return token or None


def _sends_token(address: str) -> bool:
    """Whether ``ray.init(address)`` sends a token: RAY_AUTH_MODE=token, or (mode unset) the local
    cluster found by ``auto`` when a token exists (Ray's rule: an explicit address never turns
    token auth on by itself)."""
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None:
        return mode.lower() == "token"
    return address == "auto" and auth_token() is not None


def _gcs_address(address: str) -> str:
    """``host:port`` of the head's GCS for a ``host:port`` or ``auto`` address."""
    if address != "auto":
        return address
    from ray._private.services import canonicalize_bootstrap_address_or_die

    try:  # what ray.init reads for "auto": the last `ray start` on this machine, or a running GCS
        return canonicalize_bootstrap_address_or_die("auto")
    except ConnectionError as exc:
        raise ClusterConnectError(f"--address auto: {exc}") from None


def check_cluster(address: str, timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S) -> None:
    """Wait up to ``timeout_s`` for the Ray head at ``address`` to answer; raise
    ClusterConnectError (one line naming the address and what to check) when it does not, or
    when it refuses this process's token.

    ``host:port`` / ``auto``: the GCS is asked for the cluster id, as ``ray.init`` does first
    (a head that is still starting refuses connections for a moment: retried until the deadline).
    ``ray://host:port`` (Ray Client): the server's gRPC channel has to become ready.
    """
    import grpc

    deadline = time.monotonic() + timeout_s
    if address.startswith("ray://"):
        channel = grpc.insecure_channel(address[len("ray://"):])
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout_s)
            return
        except grpc.FutureTimeoutError:
            raise ClusterConnectError(_unreachable(address, timeout_s, "no answer")) from None
        finally:
            channel.close()

    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    target = _gcs_address(address)
    sends = _sends_token(address)
    token = auth_token() if sends else None
    metadata = [("authorization", f"Bearer {token}")] if token else None
    reason = "no answer"
    channel = grpc.insecure_channel(target)
    try:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ClusterConnectError(_unreachable(address, timeout_s, reason))
            try:
                stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), metadata=metadata,
                                  timeout=min(5.0, left))
                return
            except grpc.RpcError as exc:
                code = exc.code()
                detail = next(iter((exc.details() or "").splitlines()), "") or str(code)
                if code == grpc.StatusCode.UNAUTHENTICATED:
                    raise ClusterConnectError(token_refused(address, detail, not sends)) from None
                if code == grpc.StatusCode.UNIMPLEMENTED:
                    raise ClusterConnectError(
                        f"{address} is not a Ray head's GCS address (it answered, but not as Ray's "
                        "GCS); use the head's GCS port (6379 by default), or ray://HEAD:10001 for "
                        "Ray Client") from None
                reason = "connection refused" if "refused" in detail.lower() else detail
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    finally:
        channel.close()


def _unreachable(address: str, timeout_s: float, reason: str) -> str:
    return (f"cannot reach the Ray cluster at {address} within {timeout_s:g} s ({reason}); check "
            "--address (the head's GCS address, HEAD:6379 by default, or ray://HEAD:10001) and "
            "that the cluster is up; resources.connect_timeout_s waits longer")


def connect_ray(address: str | None = None, num_cpus: int | None = None,
                num_gpus: int | None = None,
                connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S, quiet: bool = False) -> bool:
    """Join the cluster at ``address`` (or RAY_ADDRESS), or start an embedded local one on loopback.

    Args:
        address: a Ray address (``ray://``, ``host:port``, ``auto``); None reads RAY_ADDRESS.
        num_cpus, num_gpus: resources of an embedded cluster (None: what the machine has).
            CPU-only stages pass ``num_gpus=0``.
        connect_timeout_s: how long a cluster to join may take to answer (:func:`check_cluster`).
        quiet: an embedded cluster keeps Ray's own output (worker processes' output, raylet
            messages, Ray's INFO lines) in its log folder, unless segdist logs at DEBUG level:
            for stages whose workers report through their results (the job, the evaluation),
            not through logging (training).

    Returns whether this call started Ray (and so should shut it down). A Ray already initialised in
    this process (a test session, a notebook) is used as it is. Raises ClusterConnectError when
    the cluster does not answer in time or refuses this process.
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    own_handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    if address:
        log.info("joining the Ray cluster at %s", address)
        check_cluster(address, connect_timeout_s)
        try:
            ray.init(address=address, log_to_driver=True)
        except ConnectionError as exc:  # it answered the probe, then went away
            raise ClusterConnectError(f"cannot join the Ray cluster at {address}: {exc}") from None
    else:
        # "local" (not None): never silently join a stale cluster left in Ray's temp dir. Loopback
        # only: an embedded cluster must not listen on the machine's public addresses.
        log.info("starting an embedded local Ray cluster (pass --address to use a running one)")
        quiet = quiet and not logging.getLogger("segdist").isEnabledFor(logging.DEBUG)
        # Ray turns token auth on for a new local cluster and warns that it did (once per
        # process); the job's embedded cluster listens on loopback only.
        auth_log = logging.getLogger("ray._private.authentication.authentication_token_setup")
        level = auth_log.level
        if quiet:
            auth_log.setLevel(logging.ERROR)
        try:
            ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus,
                     include_dashboard=False, _node_ip_address="127.0.0.1",
                     log_to_driver=not quiet,
                     logging_level=logging.WARNING if quiet else logging.INFO)
        finally:
            auth_log.setLevel(level)
        if quiet:
            _ray_messages(False)
    if threading.current_thread() is threading.main_thread():
        for sig, handler in own_handlers.items():
            if callable(handler) and signal.getsignal(sig) is not handler:
                signal.signal(sig, handler)
    return True


def shutdown_ray() -> None:
    """``ray.shutdown()`` for a Ray that :func:`connect_ray` started (its output switched back on
    for a later ``ray.init`` in this process)."""
    import ray

    ray.shutdown()
    _ray_messages(True)


def _ray_messages(enabled: bool) -> None:
    """Let the driver print the raylet's error messages ("A worker died or was killed ...") and
    worker output, or not.

    Ray prints the raylet's from a listener thread of the driver whatever ``log_to_driver`` says;
    its only switch is the module flag a debugger breakpoint uses to pause worker output.
    """
    import ray._private.worker as ray_worker

    if hasattr(ray_worker, "_worker_logs_enabled"):
        ray_worker._worker_logs_enabled = enabled

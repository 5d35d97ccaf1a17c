"""Joining a Ray cluster or starting an embedded one: the one place every stage connects."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def connect_ray(address: str | None = None, num_cpus: int | None = None,
                num_gpus: int | None = None) -> bool:
    """Join the cluster at ``address`` (or RAY_ADDRESS), or start an embedded local one on loopback.

    Args:
        address: a Ray address (``ray://``, ``host:port``, ``auto``); None reads RAY_ADDRESS.
        num_cpus, num_gpus: resources of an embedded cluster (None: what the machine has).
            CPU-only stages pass ``num_gpus=0``.

    Returns whether this call started Ray (and so should shut it down). A Ray already initialised in
    this process (a test session, a notebook) is used as it is.
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        # "local" (not None): never silently join a stale cluster left in Ray's temp dir. Loopback
        # only: an embedded cluster must not listen on the machine's public addresses.
        log.info("starting an embedded local Ray cluster (pass --address to use a running one)")
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
                 _node_ip_address="127.0.0.1", log_to_driver=True)
    return True

"""Training on Ray Train: one :func:`segdist.training.trainer.fit` per worker, DDP across them.

Each worker is a Ray Train TorchTrainer worker (gloo on CPU, NCCL on GPU); rank 0 evaluates and
writes the checkpoints straight to ``output.uri`` through fsspec (local paths, s3://, gs://), so the
checkpoints are segdist's own format and do not depend on Ray's storage. A worker group that Ray
restarts (``resources.max_failures``) resumes from the last checkpoint there.

Storage endpoints reach the workers in two ways: ``output.storage_options`` / the datasets'
``storage_options`` travel inside the config, and the non-secret endpoint/region variables of the
driver's environment (AWS_ENDPOINT_URL, AWS_ENDPOINT_URL_S3, AWS_DEFAULT_REGION, AWS_REGION) are
set in the workers' runtime environment. Credentials are not forwarded: workers take them from
their own environment (instance roles, a cluster secret) or from the storage options.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from segdist.config import validate
from segdist.errors import SegdistError
from segdist.storage import exists, join, read_bytes
from segdist.training.checkpoints import read_last
from segdist.training.config import TrainConfig

log = logging.getLogger(__name__)

FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION")


def _flat(record: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in record.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[prefix + k] = v
    return out


def _worker_loop(config: dict) -> None:
    """Ray Train's ``train_loop_per_worker``: validate the config again, then run :func:`fit`."""
    import ray.train
    import ray.train.torch

    from segdist.training.trainer import TrainContext, fit

    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = validate(TrainConfig, config["cfg"], "train config (worker)")
    context = ray.train.get_context()

    def wrap(model):
        return ray.train.torch.prepare_model(
            model, move_to_device=False,
            # On a mask batch the score head takes no part (and vice versa): DDP must allow it.
            parallel_strategy_kwargs={"find_unused_parameters": cfg.optim.hfreq > 0})

    ctx = TrainContext(rank=context.get_world_rank(), world_size=context.get_world_size(),
                       device=ray.train.torch.get_device(), wrap=wrap,
                       report=lambda record: ray.train.report(_flat(record)))
    fit(cfg, ctx, stop_at_step=config.get("stop_at_step"), max_seconds=config.get("max_seconds"))


def train_on_ray(cfg: TrainConfig, *, address: str | None = None, name: str = "segdist-train",
                 stop_at_step: int | None = None, max_seconds: float | None = None) -> dict:
    """Run the training of ``cfg`` on Ray Train with ``cfg.resources.workers`` workers.

    Args:
        cfg: validated config; ``resources`` says how many workers, GPUs and CPUs per worker.
        address: Ray cluster address (``auto``, ``ray://host:10001``, ``host:6379``); None: the
            cluster in RAY_ADDRESS, else an embedded local Ray on loopback (a Ray already
            initialised in this process is used as it is).
        stop_at_step, max_seconds: as :func:`segdist.training.trainer.fit`.

    Returns:
        a summary dict read back from the output: ``output`` URI, ``step`` reached, ``last``
        (last.json record), ``best`` (best.json contents or None).

    Raises:
        SegdistError: a worker failed with a user error (its message), or training failed.
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from segdist.ray_connect import connect_ray

    preflight(cfg)
    connect_ray(address)
    r = cfg.resources
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    resources = {"CPU": r.cpus_per_worker}
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "stop_at_step": stop_at_step,
                           "max_seconds": max_seconds},
        scaling_config=ScalingConfig(num_workers=r.workers, use_gpu=r.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=name, storage_path=r.ray_storage or None,
            failure_config=FailureConfig(max_failures=r.max_failures),
            worker_runtime_env={"env_vars": env} if env else None),
    )
    try:
        trainer.fit()
    except Exception as exc:  # Ray wraps worker errors; surface a user error as itself
        cause = _user_error(exc)
        if cause is not None:
            raise cause from None
        raise SegdistError(f"training on Ray failed: {str(exc).strip().splitlines()[-1][:500]} "
                           "(see the worker log above)") from exc
    so = cfg.output.storage_options
    last = read_last(cfg.output.uri, so)
    best_uri = join(cfg.output.uri, "best.json")
    best = json.loads(read_bytes(best_uri, so)) if exists(best_uri, so) else None
    return {"output": cfg.output.uri, "step": last["step"] if last else 0, "last": last,
            "best": best}


def preflight(cfg: TrainConfig) -> None:
    """Fail in the driver, before any worker starts, on inputs that cannot be read or an output
    that cannot be written (the message names the URI)."""
    from segdist.errors import StorageError
    from segdist.storage import check_writable

    for name, ds in (("data.train", cfg.data.train), ("data.val", cfg.data.val)):
        if ds is None:
            continue
        uri = ds.annotations if ds.format == "coco" else ds.root
        if not exists(uri, ds.storage_options):
            raise StorageError(f"{name}: {uri} does not exist; check the URI and its "
                               "storage_options (endpoint, credentials)")
    for name, uri in (("model.deepmask", cfg.model.deepmask),
                      ("model.trunk_weights", cfg.model.trunk_weights)):
        if uri and ("/" in uri or "." in uri) and not exists(uri, cfg.model.storage_options):
            raise StorageError(f"{name}: {uri} does not exist")
    check_writable(cfg.output.uri, cfg.output.storage_options)


def _user_error(exc: BaseException) -> SegdistError | None:
    """The SegdistError that a worker raised, found inside Ray's wrapping exceptions."""
    seen: set[int] = set()
    stack: list[BaseException] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, SegdistError):
            return e
        stack.extend(getattr(e, "worker_failures", {}).values())
        for attr in ("controller_failure", "cause", "__cause__", "__context__"):
            nxt = getattr(e, attr, None)
            if isinstance(nxt, BaseException):
                stack.append(nxt)
        if hasattr(e, "as_instanceof_cause"):
            try:
                stack.append(e.as_instanceof_cause())
            except Exception:
                pass
    return None

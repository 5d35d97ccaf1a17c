"""The training loop of DeepMask and SharpMask (TrainerDeepMask.lua, TrainerSharpMask.lua).

One loop serves a single process and every Ray Train worker: :func:`fit` takes a
:class:`TrainContext` that says which rank it is, how to wrap the model (DDP) and where to report.

What the loop does, as the original:
- each batch is all mask samples or all score samples (score with probability ``hfreq``; the
  choice depends only on (seed, step), so all DDP ranks agree);
- SoftMargin loss on +-1 labels; the mask loss (mean over pixels) is multiplied by the batch size
  before backward, as the original scaled the mask gradients;
- SGD (momentum 0.9, weight decay 5e-4 for DeepMask; plain SGD for SharpMask). Parameters of the
  head that did not take part in a batch get no gradient (``grad is None``) and so neither
  momentum nor weight decay moves them, which is what the original's per-part optim.sgd calls did;
- the LR follows the epoch schedule; SharpMask trains only its refinement modules, with the whole
  DeepMask frozen and kept in eval mode;
- per-patch evaluation every few epochs, the best model kept by the IoU >= 0.7 share;
- checkpoints (weights + optimizer state) to the output URI; a restarted run resumes from the
  last one and then sees exactly the batches the uninterrupted run would have.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from segdist.config import public_dict
from segdist.errors import ConfigError
from segdist.device import resolve_device
from segdist.storage import atomic_write, check_writable, join
from segdist.training import checkpoints as ckpt
from segdist.training.config import TrainConfig, lr_at_epoch
from segdist.training.patch_eval import evaluate_patches, resize_logits
from segdist.training.sampler import BatchStream, PatchSampler, loader_worker_init

log = logging.getLogger(__name__)


@dataclass
class TrainContext:
    """Where this copy of the loop runs.

    Attributes:
        rank, world_size: DDP rank and number of processes (1 without Ray Train).
        device: torch device of this rank.
        wrap: turns the model into what the forward/backward runs through (DDP under Ray Train).
        report: called on every rank with the metrics of each checkpoint (Ray Train's report).
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    wrap: Callable[[nn.Module], nn.Module] = lambda m: m
    report: Callable[[dict], None] = lambda metrics: None


@dataclass
class TrainResult:
    """What a finished (or stopped) call of :func:`fit` leaves behind."""

    step: int
    output: str
    final_model: str | None
    best_model: str | None
    best: dict | None
    history: list[dict]


def initial_model(cfg: TrainConfig) -> nn.Module:
    """The model a run starts from: a fresh DeepMask (trunk from ImageNet weights when configured,
    else random, seeded by the run's seed) or a SharpMask on the frozen DeepMask checkpoint
    ``cfg.model.deepmask``; built with :mod:`segdist.models`' builders."""
    from segdist.models.deepmask import DeepMask, deepmask

    m = cfg.model
    if m.arch == "deepmask":
        torch.manual_seed(cfg.seed)  # the random initialisation is part of the run's seed
        model = deepmask(trunk=m.trunk, layout="torchvision", i_sz=m.i_sz, o_sz=m.o_sz)
        if m.trunk_weights:
            from segdist.models.trunk import load_imagenet_trunk

            sha = load_imagenet_trunk(model.trunk.resnet, m.trunk_weights, m.storage_options)
            log.info("trunk initialised from %s (sha256 %s)", m.trunk_weights, sha or "-")
        return model
    from segdist.models.checkpoint import load_model
    from segdist.models.sharpmask import sharpmask

    frozen, info = load_model(m.deepmask, m.storage_options)
    frozen = getattr(frozen, "deepmask", frozen)  # a SharpMask checkpoint: its DeepMask
    log.info("SharpMask on the frozen DeepMask %s (sha256 %s)", m.deepmask, info.sha256)
    if not isinstance(frozen, DeepMask):
        raise ConfigError(f"model.deepmask {m.deepmask} is not a DeepMask checkpoint")
    if frozen.cfg.i_sz != m.i_sz or frozen.cfg.arch != m.trunk:
        raise ConfigError(f"model.deepmask is a {frozen.cfg.arch} DeepMask with i_sz "
                          f"{frozen.cfg.i_sz}; set model.trunk and model.i_sz to match")
    torch.manual_seed(cfg.seed)
    return sharpmask(deepmask=frozen)


def trainable_parameters(model: nn.Module, arch: str) -> list[nn.Parameter]:
    """DeepMask: every parameter. SharpMask: the refinement modules only (the DeepMask is frozen)."""
    if arch == "sharpmask":
        for p in model.deepmask.parameters():
            p.requires_grad_(False)
        return list(model.refinement_parameters())
    return [p for p in model.parameters() if p.requires_grad]


def set_train_mode(model: nn.Module, arch: str) -> None:
    """Training mode, except a SharpMask's DeepMask, which stays in eval mode (frozen BN, no dropout)."""
    model.train()
    if arch == "sharpmask":
        model.deepmask.eval()


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD as the original (momentum, L2 weight decay), or AdamW. Both skip parameters whose
    gradient is None, i.e. the head that took no part in a batch."""
    o = cfg.optim
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr_schedule[0][1], weight_decay=o.weight_decay)
    return torch.optim.SGD(params, lr=o.lr_schedule[0][1], momentum=o.momentum, dampening=0.0,
                           weight_decay=o.weight_decay)


def step_seed(seed: int, step: int, rank: int) -> int:
    """torch seed of one step (dropout): each step is a function of (weights, seed, step, rank)."""
    return int(np.random.SeedSequence([seed, step, rank, 3]).generate_state(1)[0])


def train_step(model: nn.Module, batch: dict, optimizer: torch.optim.Optimizer, *, g_sz: int,
               device: torch.device) -> float:
    """One SGD step on one batch (all mask or all score samples); returns the batch loss.

    ``batch``: inputs float32[B, 3, w_sz, w_sz], labels +-1 float32[B, g_sz, g_sz] ("mask") or
    [B] ("score"). Only the batch's head takes part in the loss.
    """
    inputs = batch["inputs"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    optimizer.zero_grad(set_to_none=True)
    mask_logits, score_logits = model(inputs)
    if batch["head"] == "mask":
        loss = F.soft_margin_loss(resize_logits(mask_logits, g_sz), labels)
        # The original multiplied the mask gradients by the batch size (criterion averages pixels).
        (loss * inputs.shape[0]).backward()
    else:
        loss = F.soft_margin_loss(score_logits.reshape(-1), labels)
        loss.backward()
    optimizer.step()
    return float(loss.detach())


def _metadata(cfg: TrainConfig, step: int, extra: dict | None = None) -> dict[str, str]:
    meta = {
        "arch": cfg.model.arch, "trunk": cfg.model.trunk, "i_sz": str(cfg.model.i_sz),
        "o_sz": str(cfg.model.o_sz), "step": str(step),
        "epoch": f"{step / cfg.optim.steps_per_epoch:.3f}", "trained_by": "segdist train",
    }
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    return meta


def make_sampler(dataset_cfg, cfg: TrainConfig) -> PatchSampler:
    from segdist.data import load_dataset

    return PatchSampler(load_dataset(dataset_cfg), i_sz=cfg.model.i_sz, g_sz=cfg.data.g_sz,
                        scale_jitter=cfg.data.scale_jitter, shift_jitter=cfg.data.shift_jitter,
                        image_cache=cfg.data.image_cache, max_pixels=dataset_cfg.max_pixels)


def fit(cfg: TrainConfig, ctx: TrainContext | None = None, *, stop_at_step: int | None = None,
        max_seconds: float | None = None) -> TrainResult:
    """Train (or resume training) as ``cfg`` says; returns where the results are.

    Args:
        cfg: the validated run config.
        ctx: rank, device, DDP wrapping and reporting; default a single CPU/GPU process.
        stop_at_step: stop (with a checkpoint) once this many steps are done, before the end of
            the schedule; a later call resumes from there.
        max_seconds: stop (with a checkpoint) after this much training time in this call.

    Only rank 0 evaluates and writes; all ranks run the same number of steps.
    """
    threads = torch.get_num_threads()
    if cfg.resources.torch_threads:
        torch.set_num_threads(cfg.resources.torch_threads)
    try:
        return _fit(cfg, ctx or TrainContext(device=resolve_device(cfg.device, "device")),
                    stop_at_step=stop_at_step, max_seconds=max_seconds)
    finally:
        torch.set_num_threads(threads)


def _fit(cfg: TrainConfig, ctx: TrainContext, *, stop_at_step: int | None,
         max_seconds: float | None) -> TrainResult:
    out, so = cfg.output.uri, cfg.output.storage_options
    lead = ctx.rank == 0
    if lead:
        check_writable(out, so)
        atomic_write(join(out, "config.yaml"),
                     yaml.safe_dump(public_dict(cfg), sort_keys=False).encode(), so)

    sampler = make_sampler(cfg.data.train, cfg)
    val_sampler = make_sampler(cfg.data.val, cfg) if cfg.data.val is not None and lead else None
    model = initial_model(cfg).to(ctx.device)
    optimizer = make_optimizer(trainable_parameters(model, cfg.model.arch), cfg)

    start, best, history = 0, None, []
    last = ckpt.read_last(out, so)
    if last is not None:
        ckpt.load_weights_into(model, last["model"], so)
        state = ckpt.load_state(last["state"], so)
        if state.get("arch") != cfg.model.arch:
            raise ConfigError(f"{out} holds a {state.get('arch')} run; use a new output.uri")
        optimizer.load_state_dict(state["optimizer"])
        start, best = int(state["step"]), state.get("best")
        history = list(state.get("history", []))
        log.info("resuming from %s at step %d", last["model"], start)

    total = cfg.total_steps
    stop = min(total, stop_at_step) if stop_at_step is not None else total
    spe = cfg.optim.steps_per_epoch
    ckpt_every = cfg.output.checkpoint_every or spe
    train_model = ctx.wrap(model)
    set_train_mode(model, cfg.model.arch)

    stream = BatchStream(sampler, batch_size=cfg.optim.batch_size, hfreq=cfg.optim.hfreq,
                         seed=cfg.seed, start_step=start, stop_step=stop, rank=ctx.rank)
    nw = cfg.data.loader_workers
    loader = torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=nw, worker_init_fn=loader_worker_init,
        prefetch_factor=2 if nw else None, pin_memory=ctx.device.type == "cuda")

    losses: dict[str, list[float]] = {"mask": [], "score": []}
    window: dict[str, list[float]] = {"mask": [], "score": []}
    t0 = tick = time.monotonic()
    seen = 0
    step = start
    final_uri = best_uri = None
    for batch in loader:
        step = batch["step"]
        epoch = step // spe + 1
        lr = lr_at_epoch(cfg.optim.lr_schedule, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(step_seed(cfg.seed, step, ctx.rank))
        loss = train_step(train_model, batch, optimizer, g_sz=cfg.data.g_sz, device=ctx.device)
        if not math.isfinite(loss):
            raise FloatingPointError(f"training loss is {loss} at step {step}; lower the LR")
        step += 1
        seen += batch["inputs"].shape[0]
        losses[batch["head"]].append(loss)
        window[batch["head"]].append(loss)
        if lead and step % cfg.log_every == 0:
            now = time.monotonic()
            log.info("step %d/%d epoch %d lr %.2g | mask loss %s | score loss %s | %.1f samples/s",
                     step, total, epoch, lr, _fmt(window["mask"]), _fmt(window["score"]),
                     seen * ctx.world_size / max(now - tick, 1e-9))
            window = {"mask": [], "score": []}
            tick, seen = now, 0
        timed_out = _all_agree(max_seconds is not None and time.monotonic() - t0 >= max_seconds,
                               ctx.world_size, ctx.device)
        at_end = step >= stop or timed_out
        if step % ckpt_every and step % spe and not at_end:
            continue
        record: dict[str, Any] = {
            "step": step, "epoch": epoch, "lr": lr,
            "mask_loss": _mean(losses["mask"]), "score_loss": _mean(losses["score"]),
            "mask_batches": len(losses["mask"]), "score_batches": len(losses["score"]),
            "world_size": ctx.world_size,
        }
        losses = {"mask": [], "score": []}
        epoch_done = step % spe == 0 or step == total
        if lead and val_sampler is not None and (
                (epoch_done and epoch % cfg.eval.every_epochs == 0) or step == total):
            metrics = evaluate_patches(
                model, val_sampler, patches=cfg.eval.patches,
                score_patches=cfg.eval.patches if cfg.optim.hfreq > 0 else 0,
                batch_size=cfg.eval.batch_size, seed=cfg.eval.seed, device=ctx.device,
                loader_workers=nw)
            set_train_mode(model, cfg.model.arch)
            record["patch"] = metrics.as_dict()
            log.info("[test] step %d | IoU mean %.3f median %.3f | >=.5 %.3f >=.7 %.3f | score acc %s",
                     step, metrics.mean_iou, metrics.median_iou, metrics.iou50, metrics.iou70,
                     "-" if metrics.score_accuracy is None else f"{metrics.score_accuracy:.3f}")
            if best is None or metrics.iou70 > best["patch"]["iou70"]:
                best = {"step": step, "patch": metrics.as_dict()}
                ckpt.save_weights(model, join(out, "best.safetensors"),
                                  _metadata(cfg, step, {"iou70": metrics.iou70}), so)
                atomic_write(join(out, "best.json"), json.dumps(best, indent=1).encode(), so)
        history.append(record)
        if lead:
            state = {"step": step, "arch": cfg.model.arch, "optimizer": optimizer.state_dict(),
                     "best": best, "history": history, "seed": cfg.seed}
            ckpt.write_checkpoint(out, model, state, _metadata(cfg, step), keep=cfg.output.keep,
                                  storage_options=so)
            atomic_write(join(out, "metrics.jsonl"),
                         "".join(json.dumps(r) + "\n" for r in history).encode(), so)
            if step == total:
                final_uri = join(out, "final.safetensors")
                ckpt.save_weights(model, final_uri, _metadata(cfg, step), so)
        ctx.report(record)
        if timed_out:
            log.info("stopping at step %d: max_seconds %.0f reached", step, max_seconds)
        if at_end:
            break
    if best is not None:
        best_uri = join(out, "best.safetensors")
    return TrainResult(step=step, output=out, final_model=final_uri, best_model=best_uri,
                       best=best, history=history)


def _all_agree(flag: bool, world_size: int, device: torch.device) -> bool:
    """True on every rank if it is True on any (ranks must stop at the same step under DDP)."""
    if world_size <= 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _fmt(values: list[float]) -> str:
    return f"{np.mean(values):.4f}" if values else "-"

"""``segdist train CONFIG``: train DeepMask or SharpMask with Ray Train (local Ray or a cluster)."""

from __future__ import annotations

import argparse
import json

HELP = "train DeepMask or SharpMask (Ray Train)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="training config YAML (any URI), e.g. configs/train-deepmask.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set output.uri=s3://bucket/dm1 "
                             "(repeatable; the value is parsed as YAML)")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join (e.g. ray://head:10001 or auto); default: "
                             "RAY_ADDRESS if set, else an embedded local cluster")
    parser.add_argument("--workers", type=int, default=None,
                        help="Ray Train workers (DDP processes); overrides resources.workers")
    parser.add_argument("--gpu", action="store_true",
                        help="one GPU per worker (overrides resources.use_gpu)")


def run(args: argparse.Namespace) -> int:
    from segdist.config import load_config
    from segdist.training.config import TrainConfig
    from segdist.training.distributed import train_on_ray

    overrides = list(args.overrides)
    if args.workers is not None:
        overrides.append(f"resources.workers={args.workers}")
    if args.gpu:
        overrides.append("resources.use_gpu=true")
    cfg = load_config(TrainConfig, args.config, overrides)
    summary = train_on_ray(cfg, address=args.address)
    print(f"trained {cfg.model.arch} to step {summary['step']}/{cfg.total_steps}; "
          f"checkpoints under {summary['output']}")
    if summary["best"]:
        print(f"best model (per-patch IoU>=.7 share): {summary['output'].rstrip('/')}/best.safetensors "
              f"{json.dumps(summary['best']['patch'])}")
    return 0

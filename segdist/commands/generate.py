"""``segdist generate CONFIG``: run the proposal job (embedded local Ray, or a running cluster)."""

from __future__ import annotations

import argparse

HELP = "precompute proposals for a dataset (the Ray job)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="run config YAML (any URI), e.g. configs/demo.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set output.uri=s3://bucket/run1 "
                             "(repeatable; the value is parsed as YAML)")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join (e.g. ray://head:10001 or auto); default: "
                             "RAY_ADDRESS if set, else an embedded local cluster")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace proposals that a different config or model wrote to the output")
    parser.add_argument("--no-progress", action="store_true", help="no live progress bar")


def run(args: argparse.Namespace) -> int:
    from segdist.config import JobConfig, load_config
    from segdist.job.driver import run_job

    cfg = load_config(JobConfig, args.config, args.overrides)
    result = run_job(cfg, address=args.address, overwrite=args.overwrite,
                     progress=not args.no_progress)
    print(result.summary())
    # 1 (not 2): the run itself worked, but some chunks failed; re-running retries just those.
    return 0 if result.complete else 1

"""``segdist submit CONFIG --address http://HEAD:8265``: run generate/evaluate/train on a cluster."""

from __future__ import annotations

import argparse
import sys

HELP = "submit a generate/evaluate/train run to a Ray cluster through the Jobs API"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="run config: a path inside the working dir, or a URI")
    parser.add_argument("--address", default=None,
                        help="the cluster's Jobs API (dashboard) URL, e.g. http://127.0.0.1:8265; "
                             "default: RAY_API_SERVER_ADDRESS or RAY_ADDRESS, else http://127.0.0.1:8265")
    parser.add_argument("--entry", choices=("generate", "evaluate", "train"), default="generate",
                        help="which run (the script jobs/<entry>.py); default generate")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override passed to the run (repeatable)")
    parser.add_argument("--no-wait", action="store_true",
                        help="print just the job id (on stdout) and return")
    parser.add_argument("--working-dir", default=".",
                        help="project folder uploaded as the job's working_dir (default: .)")
    parser.add_argument("--no-runtime-env", action="store_true",
                        help="upload nothing: the cluster has segdist installed (runs python -m segdist)")
    parser.add_argument("--pip", default=None,
                        help="requirements file, or comma-separated packages, to install for the job")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment variable for the job (repeatable; not for secrets: use the "
                             "cluster's IAM role or secrets)")
    parser.add_argument("--entrypoint-gpus", type=float, default=None,
                        help="GPUs reserved for the driver process itself (default: none)")
    parser.add_argument("--job-id", default=None, help="submission id (default: generated)")


def run(args: argparse.Namespace) -> int:
    from segdist.errors import ConfigError
    from segdist.job import submission

    env = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--env {item!r}: expected KEY=VALUE")
        env[key] = value
    job_id = submission.submit(
        args.config, address=args.address, entry=args.entry, overrides=args.overrides,
        working_dir=None if args.no_runtime_env else args.working_dir, pip=args.pip, env=env,
        entrypoint_num_gpus=args.entrypoint_gpus, submission_id=args.job_id)
    address = submission.resolve_address(args.address)
    if args.no_wait:
        # Just the id on stdout, for scripts (JOB=$(segdist submit ... --no-wait)); the hint to
        # the terminal.
        print(job_id, flush=True)
        print(f"submitted job {job_id} to {address}; follow it with: segdist jobs logs {job_id} "
              f"--follow --address {address}", file=sys.stderr)
        return 0
    print(f"submitted job {job_id} to {address}", flush=True)
    try:
        status = submission.follow(job_id, args.address)
    except KeyboardInterrupt:
        print(f"\nstopped following; the job keeps running. segdist jobs stop {job_id} "
              f"--address {address} stops it.")
        return 130
    print(f"job {job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1

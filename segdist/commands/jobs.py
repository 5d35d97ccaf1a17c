"""``segdist jobs status|logs|stop|list [ID]``: look after runs submitted with ``segdist submit``."""

from __future__ import annotations

import argparse
import json

HELP = "status, logs or stop of a submitted job (or list them)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("status", "logs", "stop", "list", "wait"))
    parser.add_argument("job_id", nargs="?", help="the id that segdist submit printed")
    parser.add_argument("--address", default=None,
                        help="the cluster's Jobs API URL (default: RAY_API_SERVER_ADDRESS or "
                             "RAY_ADDRESS, else http://127.0.0.1:8265)")
    parser.add_argument("--follow", action="store_true", help="logs: stream until the job ends")
    parser.add_argument("--timeout", type=float, default=3600.0, help="wait: give up after seconds")


def run(args: argparse.Namespace) -> int:
    from segdist.errors import ConfigError
    from segdist.job import submission

    if args.action == "list":
        for job in submission.list_jobs(args.address):
            print(f"{job['job_id']}\t{job['status']}\t{job['entrypoint']}")
        return 0
    if not args.job_id:
        raise ConfigError(f"segdist jobs {args.action} needs a job id")
    if args.action == "status":
        details = submission.info(args.job_id, args.address)
        print(json.dumps(details, indent=1))
        return 0 if details["status"] != "FAILED" else 1
    if args.action == "logs":
        if args.follow:
            status = submission.follow(args.job_id, args.address)
            print(f"job {args.job_id}: {status}")
            return 0 if status == "SUCCEEDED" else 1
        print(submission.logs(args.job_id, args.address), end="")
        return 0
    if args.action == "wait":
        status = submission.wait(args.job_id, args.address, timeout=args.timeout)
        print(f"job {args.job_id}: {status}")
        return 0 if status == "SUCCEEDED" else 1
    stopped = submission.stop(args.job_id, args.address)
    print(f"job {args.job_id}: {'stop requested' if stopped else 'not running'}")
    return 0

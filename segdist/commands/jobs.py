"""``segdist jobs ACTION``: look after runs submitted with ``segdist submit`` (status, logs, stop,
wait, list), one sub-command per action, each with its own help."""

from __future__ import annotations

import argparse
import json

HELP = "look after submitted jobs: status, logs, stop, wait, list"

# action -> its help line (also the order `segdist jobs --help` lists them in)
ACTIONS = {
    "status": "the job's status, entry point, message and times (JSON); exit 1 if it failed",
    "logs": "the job's log so far, or with --follow streamed until the job ends",
    "stop": "ask the cluster to stop the job",
    "wait": "wait (without logs) until the job ends; exit 0 if it succeeded",
    "list": "every job the cluster knows: id, status, entry point",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, text in ACTIONS.items():
        p = actions.add_parser(name, help=text, description=text)
        if name != "list":
            p.add_argument("job_id", help="the id that segdist submit printed")
        p.add_argument("--address", default=None,
                       help="the cluster's Jobs API URL (default: RAY_API_SERVER_ADDRESS or "
                            "RAY_ADDRESS, else http://127.0.0.1:8265)")
        if name == "logs":
            p.add_argument("--follow", action="store_true", help="stream until the job ends")
        if name == "wait":
            p.add_argument("--timeout", type=float, default=3600.0,
                           help="give up after this many seconds (default 3600)")


def run(args: argparse.Namespace) -> int:
    from segdist.job import submission

    if args.action == "list":
        for job in submission.list_jobs(args.address):
            print(f"{job['job_id']}\t{job['status']}\t{job['entrypoint']}")
        return 0
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

"""Benchmark (not a test): the job's images/s against the bare proposer loop, same images, device.

    python benchmarks/job.py --images 48 --chunk-size 8 --threads 2 --model deepmask

The bare loop is what one process does without the job: decode each image, then run the proposer
on batches, in one thread, writing nothing. The job adds Ray, decode-ahead threads, chunk encoding
(COCO-JSON + Parquet) and atomic writes, and records. Its steady-state rate is images divided by the
time from the first worker being ready (model loaded) to the last chunk committed, so that both
sides exclude the model load; the end-to-end rate (with Ray start-up and model load) is reported too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # segdist


def bare_loop(cfg, threads: int) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds incl. the model load, images): decode + proposer, one process."""
    import torch

    from segdist.data import load_dataset
    from segdist.imageio import read_image
    from segdist.proposers import build_proposer

    torch.set_num_threads(threads)
    c0 = time.process_time()
    gen = build_proposer(cfg.model)
    ds = load_dataset(cfg.dataset)
    bs = cfg.model.batch_size
    t0 = time.perf_counter()
    n = 0
    for s in range(0, len(ds.images), bs):
        recs = ds.images[s:s + bs]
        images = [read_image(r.uri) for r in recs]
        out = gen(images, [r.image_id for r in recs])
        n += len(out)
    return time.perf_counter() - t0, time.process_time() - c0, n


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


class WorkerCPU:
    """Samples the CPU time of this Ray node's ChunkWorker processes (children of its raylet) until
    stopped; ``total()`` sums the last sample of each (a worker is killed at the end of the run)."""

    def __init__(self, period: float = 0.1):
        import threading

        import ray

        self.raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
        self.last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period,), daemon=True)
        self._thread.start()

    def _run(self, period: float) -> None:
        while not self._stop.is_set():
            for p in os.listdir("/proc"):
                if not p.isdigit():
                    continue
                try:
                    stat = open(f"/proc/{p}/stat").read()
                    cmd = open(f"/proc/{p}/cmdline", "rb").read()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == self.raylet and b"ChunkWorker" in cmd:
                    try:
                        self.last[int(p)] = _cpu_seconds(int(p))
                    except (OSError, ValueError):
                        pass
            time.sleep(period)

    def total(self) -> float:
        self._stop.set()
        self._thread.join()
        return sum(self.last.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--chunk-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch threads = CPUs of the one worker")
    p.add_argument("--model", default="deepmask")
    p.add_argument("--trunk", default="resnet18")
    p.add_argument("--proposals", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--scales", default="-1,0,0.5", help="min,max,step (log2); empty: the preset's")
    p.add_argument("--min-side", type=int, default=160)
    p.add_argument("--max-side", type=int, default=240)
    args = p.parse_args()

    import ray

    from segdist.config import JobConfig, validate
    from segdist.data.synthetic import make_synthetic
    from segdist.job.driver import run_job
    from segdist.proposers import config_class

    work = tempfile.mkdtemp(prefix="segdist-bench-")
    try:
        make_synthetic(f"{work}/data", args.images, seed=11, min_side=args.min_side,
                       max_side=args.max_side)
        base = {
            "dataset": {"annotations": f"{work}/data/annotations/instances_all.json",
                        "images": f"{work}/data/images"},
            "model": {"name": args.model, "proposals": args.proposals,
                      "batch_size": args.batch_size, "device": "cpu"},
            "output": {"uri": f"{work}/out", "chunk_size": args.chunk_size},
            "resources": {"num_workers": 1, "cpus_per_worker": args.threads, "decode_threads": 2},
        }
        family = config_class(args.model).model_fields  # the options this model has
        if "trunk" in family:
            base["model"]["trunk"] = args.trunk
        if args.scales and "scales" in family:
            lo, hi, step = (float(x) for x in args.scales.split(","))
            base["model"]["scales"] = {"min": lo, "max": hi, "step": step}
        cfg = validate(JobConfig, base)
        ray.init(address="local", num_cpus=args.threads, include_dashboard=False,
                 _node_ip_address="127.0.0.1", log_to_driver=False)
        bares, bare_cpu, steady, total, job_cpu, parts = [], [], [], [], [], []
        # Interleaved, best of N: on a shared machine other load only ever slows a run down.
        # CPU seconds are the steadier measure there (one torch thread: no OpenMP spin-waiting).
        for _ in range(args.repeats):
            wall, cpu, _n = bare_loop(cfg, args.threads)
            bares.append(wall)
            bare_cpu.append(cpu)
            shutil.rmtree(f"{work}/out", ignore_errors=True)
            sampler = WorkerCPU()
            c0 = time.process_time()
            t0 = time.perf_counter()
            result = run_job(cfg, progress=False)
            total.append(time.perf_counter() - t0)
            job_cpu.append(sampler.total() + time.process_time() - c0)
            m = json.loads(open(f"{work}/out/manifest.json").read())["timings"]
            steady.append(m["run_seconds"] - m["first_worker_ready_seconds"])
            parts.append({"first_worker_ready_s": m["first_worker_ready_seconds"],
                          **{f"chunks_{k}_s": v for k, v in m["chunk_seconds"].items()}})
            assert result.complete
        ray.shutdown()
        bare = min(bares)
        n = args.images
        rep = {
            "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "model": f"{args.model}/{args.trunk}, {args.proposals} proposals, batch {args.batch_size}",
            "images": n, "chunk_size": args.chunk_size, "threads": args.threads,
            "scales": args.scales or "preset",
            "bare_seconds": [round(b, 2) for b in bares], "job_steady_seconds": [round(x, 2) for x in steady],
            "bare_images_per_s": round(n / bare, 3),
            "job_steady_images_per_s": round(n / min(steady), 3),
            "job_end_to_end_images_per_s": round(n / min(total), 3),
            "overhead_steady_pct": round(100 * (min(steady) - bare) / bare, 1),
            "bare_cpu_seconds": [round(c, 2) for c in bare_cpu],
            "job_cpu_seconds_worker_plus_driver": [round(c, 2) for c in job_cpu],
            "overhead_cpu_pct": round(100 * (min(job_cpu) - min(bare_cpu)) / min(bare_cpu), 1),
            "job_parts_of_fastest_run": parts[steady.index(min(steady))],
        }
        print(json.dumps(rep, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Benchmark (not a test): the job's driver at dataset scale (COCO train+val is 123K images).

    python benchmarks/scale.py --images 120000 --out /tmp/segdist-scale [--s3]

A synthetic image folder of ``--images`` tiny PNGs (a few distinct 32x32 images, hard-linked
under many names in folders of 500: written in seconds), run through ``segdist generate`` with
the cheapest proposer (``sliding-window``, 5 proposals per image) in chunks of 500, by a driver
process of its own on an embedded Ray. Measured in that driver (its own CPU time and peak RSS,
``resource.getrusage``; the steps timed by wrapping the driver's functions, nothing else
changed):

- plan: preflight (output probe, listing the folder) and the chunk plan;
- resume check: ``state.scan_committed`` on the complete output (the re-run, every chunk
  committed), and the same called directly on the local output and on a copy in the loopback S3
  server (moto), best of ``--repeats``;
- dispatch: the driver's CPU in ``Dispatcher.run`` per chunk (the loop: handing out chunks,
  waiting, taking results in, progress), and over the whole run divided by the chunks;
- the manifest: its size and the time to build and write it;
- peak RSS of the driver process.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # segdist


def make_collection(root: Path, n: int, per_folder: int = 500, distinct: int = 4) -> float:
    """``n`` PNGs under ``root`` (``f0000/img000000.png`` ...): ``distinct`` real 32x32 images,
    hard-linked under every name. Returns the seconds it took."""
    import numpy as np
    from PIL import Image

    t0 = time.perf_counter()
    shutil.rmtree(root, ignore_errors=True)
    sources = []
    rng = np.random.default_rng(0)
    (root / "_src").mkdir(parents=True)
    for k in range(distinct):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
        src = root / "_src" / f".src{k}.png"  # hidden: not part of the collection
        src.write_bytes(buf.getvalue())
        sources.append(src)
    for i in range(n):
        folder = root / f"f{i // per_folder:04d}"
        if i % per_folder == 0:
            folder.mkdir()
        os.link(sources[i % distinct], folder / f"img{i:06d}.png")
    return time.perf_counter() - t0


def job_config(images: Path, out: str, workers: int, storage_options: dict | None = None) -> dict:
    return {
        "dataset": {"format": "images", "images": str(images)},
        "model": {"name": "sliding-window", "proposals": 5, "batch_size": 50},
        "output": {"uri": out, "chunk_size": 500, "storage_options": dict(storage_options or {})},
        "resources": {"num_workers": workers, "cpus_per_worker": 1, "decode_threads": 2},
    }


# -- the driver process ---------------------------------------------------------------------------

def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Clock:
    """Wall and CPU seconds of this process spent in wrapped functions, by name, and the peak RSS
    (MB) reached by the end of each call."""

    def __init__(self):
        self.spans: dict[str, list[tuple[float, float]]] = {}
        self.peaks: dict[str, float] = {}

    def wrap(self, owner, name: str, label: str | None = None) -> None:
        fn = getattr(owner, name)
        spans = self.spans.setdefault(label or name, [])

        def timed(*args, **kwargs):
            w0, c0 = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                spans.append((time.perf_counter() - w0, time.process_time() - c0))
                self.peaks[label or name] = _peak_mb()

        setattr(owner, name, timed)


def driver(config_path: str) -> None:
    """Run the job once in this process, print what was measured as one JSON line."""
    from segdist.config import JobConfig, load_config
    from segdist.job import driver as job_driver
    from segdist.job import state
    from segdist.job.dispatch import Dispatcher

    clock = _Clock()
    clock.peaks["start"] = _peak_mb()
    clock.wrap(job_driver, "_preflight", "preflight")
    clock.wrap(job_driver, "_plan", "plan")
    clock.wrap(state, "scan_committed", "resume_check")
    clock.wrap(job_driver, "_dispatch", "dispatch")
    clock.wrap(Dispatcher, "run", "dispatch_loop")
    clock.wrap(job_driver, "_write_manifest", "manifest")
    w0, c0 = time.perf_counter(), time.process_time()
    result = job_driver.run_job(load_config(JobConfig, config_path), progress=False)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    manifest = Path(result.manifest_uri)
    print(json.dumps({
        "complete": result.complete, "chunks": result.chunks_total,
        "written": result.chunks_written, "skipped": result.chunks_skipped,
        "images": result.images_total, "wall_s": wall, "cpu_s": cpu,
        "peak_rss_mb": _peak_mb(), "peak_rss_mb_after": clock.peaks,
        "manifest_bytes": manifest.stat().st_size if manifest.exists() else None,
        "spans": clock.spans}))


def run_driver(config: dict, workdir: Path) -> dict:
    path = workdir / f"job-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(config))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, __file__, "_driver", str(path)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"driver failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- the resume check, called directly ------------------------------------------------------------

def resume_check(out: str, storage_options: dict | None, repeats: int) -> tuple[list[float], int]:
    """Wall seconds of ``scan_committed`` on the complete output (each repeat), chunks found."""
    from segdist.job import state

    recorded = state.recorded_chunk_ids(out, storage_options)
    n = len(recorded)
    ids = [sorted(recorded[i]) for i in range(n)]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        found = state.scan_committed(out, n, storage_options, ids).committed
        times.append(time.perf_counter() - t0)
        assert len(found) == n, (len(found), n)
    return times, n


def copy_to_s3(out: Path) -> tuple[str, dict, float]:
    """The output copied into a bucket of a moto server on loopback; (uri, options, seconds)."""
    import logging

    import fsspec
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise

    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"})
    with socket.socket() as sock:  # a free port on loopback
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    options = {"client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"}}
    fs = fsspec.filesystem("s3", **options)
    fs.mkdir("scale")
    t0 = time.perf_counter()
    files = [p for p in out.rglob("*") if p.is_file()]
    fs.put([str(p) for p in files], [f"scale/out/{p.relative_to(out).as_posix()}" for p in files])
    return "s3://scale/out", options, time.perf_counter() - t0


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "_driver":
        driver(sys.argv[2])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=120_000)
    ap.add_argument("--out", default="/tmp/segdist-scale", help="work folder (replaced)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--s3", action="store_true", help="also the resume check on moto's S3")
    ap.add_argument("--keep", action="store_true", help="reuse an existing collection and output")
    args = ap.parse_args()

    work = Path(args.out)
    images, out = work / "images", work / "out"
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        made = make_collection(images, args.images)
        print(f"collection: {args.images} images in {made:.1f} s", flush=True)
    config = job_config(images, str(out), args.workers)

    report: dict = {"hardware": f"{os.cpu_count()} CPUs, {platform.machine()}",
                    "load_before": os.getloadavg()}
    if not (args.keep and (out / "manifest.json").exists()):
        report["first"] = run_driver(config, work)
        print("first run:", _summary(report["first"]), flush=True)
    report["rerun"] = run_driver(config, work)
    print("re-run (complete output):", _summary(report["rerun"]), flush=True)
    local, n = resume_check(str(out), None, args.repeats)
    report["resume_local_s"] = local
    print(f"resume check, local, {n} chunks: best {min(local):.2f} s of {local}", flush=True)
    if args.s3:
        uri, options, copied = copy_to_s3(out)
        s3, _ = resume_check(uri, options, args.repeats)
        report["resume_s3_s"] = s3
        print(f"resume check, moto S3 (copied in {copied:.0f} s): best {min(s3):.2f} s of {s3}",
              flush=True)
    report["load_after"] = os.getloadavg()
    (work / "report.json").write_text(json.dumps(report, indent=1))
    print(f"report: {work / 'report.json'}")


def _summary(r: dict) -> str:
    spans = {k: (sum(w for w, _ in v), sum(c for _, c in v)) for k, v in r["spans"].items()}
    chunks = max(r["written"], 1)
    parts = [f"{r['chunks']} chunks ({r['written']} written)", f"wall {r['wall_s']:.1f} s",
             f"driver CPU {r['cpu_s']:.1f} s", f"peak RSS {r['peak_rss_mb']:.0f} MB",
             f"manifest {r['manifest_bytes'] / 1e6:.1f} MB"]
    for k, (w, c) in spans.items():
        parts.append(f"{k} {w:.2f} s wall / {c:.2f} s CPU")
    if r["written"]:
        loop = spans.get("dispatch_loop", (0, 0))[1]
        parts.append(f"dispatch loop CPU per chunk {1000 * loop / chunks:.1f} ms")
        parts.append(f"driver CPU per chunk (whole run) {1000 * r['cpu_s'] / chunks:.1f} ms")
    return "; ".join(parts)


if __name__ == "__main__":
    main()

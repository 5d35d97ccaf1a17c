"""``segdist bench`` (the throughput rows; ``--profile`` is tests/test_profiling.py): one child
process per (preset, workload), its rows printed and written as JSON, bad sizes refused."""

from __future__ import annotations

import json
import subprocess
import sys

from segdist.cli import main


def test_bench_rows_for_the_size_mix_and_the_big_image(tmp_path):
    out = tmp_path / "bench.json"
    res = subprocess.run([sys.executable, "-m", "segdist", "bench", "--presets", "sliding-window",
                          "--size", "mix", "--images", "3", "--big", "96x80", "--proposals", "20",
                          "--device", "cpu", "--threads", "1", "--json", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    rows = json.loads(out.read_text())
    assert [(r["preset"], r["workload"], r["images"]) for r in rows] == [
        ("sliding-window", "size mix", 3), ("sliding-window", "96x80", 1)]
    for r in rows:
        assert r["proposals_per_image"] == 20 and r["device"] == "cpu" and r["torch_threads"] == 1
        assert r["cpu_peak_rss_mb"] >= r["rss_loaded_mb"] > 0 and r["images_per_s"] > 0
    lines = res.stdout.splitlines()
    assert [line.split(" | ")[:4] for line in lines] == [
        ["| sliding-window", "size mix", "3", f"{rows[0]['images_per_s']:.3f}"],
        ["| sliding-window", "96x80", "1", f"{rows[1]['images_per_s']:.3f}"]]


def test_bench_refuses_bad_sizes_and_presets_in_one_line(capsys):
    assert main(["bench", "--presets", "sliding-window", "--size", "8x8"]) == 2
    assert "image size '8x8' is too small (at least 16x16)" in capsys.readouterr().err
    assert main(["bench", "--presets", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown presets ['nope']" in err and err.count("\n") == 1

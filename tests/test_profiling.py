"""The profile behind ``segdist bench --profile``: op and sync counting, the size mix, a run."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import torch

from segdist.commands.bench_profile import size_mix
from segdist.device import assume_gpu_path, gpu_path
from segdist.profiling import OpCounter, host_stage, profiling


def test_op_counter_counts_kernels_and_syncs():
    x = torch.arange(12.0).view(3, 4)
    c = OpCounter()
    with profiling(c, Counter()):
        y = x + 1                        # 1 op
        y.view(4, 3).t()                 # views: none
        x.t().contiguous()               # an aliasing op that had to copy: 1
        x.contiguous()                   # already contiguous: none
        torch.nn.functional.dropout(x, training=False)  # returns its input: none
        (y > 5).nonzero()                # gt 1, nonzero 1 + sync
        float(y[0, 0])                   # select is a view; item: 1 + sync
        torch.repeat_interleave(torch.tensor([1, 2]))   # (a host tensor) repeat_interleave 1 + sync
        y.cpu()                          # a host read on the GPU path: sync
        torch.where(y > 5)               # gt 1, where(cond) (a nonzero) 1 + sync
        torch.where(y > 5, y, x)         # gt 1, where 1: no sync
    assert c.syncs == 5
    assert c.ops == 10, c.by_op


def test_host_reads_are_counted_once_per_copy_even_when_ids_are_reused():
    """``.cpu()`` then ``.numpy()`` is one read; a new tensor is counted even where it reuses the
    memory (and ``id``) of one read before and freed (CI once saw a batch one read short)."""
    c = OpCounter()
    with profiling(c, Counter()):
        for i in range(50):
            t = torch.full((4,), float(i))
            host = t.cpu()
            assert host.numpy().tolist() == [float(i)] * 4  # the copy's own reads: not again
            del t, host
        kept = torch.ones(2)
        kept.cpu()
        kept.cpu()                        # the tensor in use is read again: counted again
    assert c.syncs == 52


def test_host_stage_counts_only_while_profiling():
    stages = Counter()
    with host_stage("x"):
        sum(range(1000))
    with profiling(OpCounter(), stages):
        with host_stage("x"):
            sum(range(100000))
    assert set(stages) == {"x"} and stages["x"] > 0


def test_gpu_path_is_forced_only_inside_the_context():
    assert not gpu_path("cpu")
    with assume_gpu_path():
        assert gpu_path("cpu") and gpu_path(torch.device("cpu"))
    assert not gpu_path("cpu")


def test_size_mix_is_coco_like_and_seeded():
    sizes = size_mix(20, seed=0)
    n = Counter(sizes)
    assert n[(640, 480)] == 10 and n[(480, 640)] == 4 and len(sizes) == 20
    rest = [s for s in sizes if s not in ((640, 480), (480, 640))]
    assert all(max(s) == 640 and 300 <= min(s) <= 640 for s in rest) and len(rest) == 6
    assert size_mix(20, seed=0) == sizes and size_mix(20, seed=1) != sizes


def test_bench_profile_command_reports_per_image_costs(tmp_path):
    out = tmp_path / "profile.json"
    res = subprocess.run([sys.executable, "-m", "segdist", "bench", "--profile", "--presets",
                          "sliding-window", "--images", "4", "--proposals", "50", "--device", "cpu",
                          "--threads", "1", "--json", str(out)], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    (row,) = json.loads(out.read_text())
    assert row["preset"] == "sliding-window" and row["images"] == 4
    assert row["proposals_per_image"] == 50
    # the no-network baseline encodes its boxes with numpy: no aten op, no sync
    assert row["ops_per_image"] == 0 and row["syncs_per_image"] == 0
    host = row["host_ms_per_image"]
    assert {"decode", "coco_json_segm", "coco_json_bbox", "parquet"} <= set(host)
    assert all(v > 0 for k, v in host.items() if k != "rle_host")
    assert "| sliding-window | 4 |" in res.stdout

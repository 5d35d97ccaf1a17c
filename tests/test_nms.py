"""Batched grouped NMS: exactly torchvision's per-group ``nms``, whatever the batch, prefix or
number of rounds, with one host read per check."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from torchvision.ops import nms

from segdist.profiling import OpCounter, profiling
from segdist.proposers.nms import float32_threshold, grouped_nms


def _reference(boxes, scores, groups, valid, thr, keep):
    """torchvision's CPU nms per group, then all kept by score, descending, ties in input order."""
    kept = []
    for g in torch.unique(groups[valid]).tolist():
        idx = torch.nonzero(valid & (groups == g))[:, 0]
        kept.append(idx[nms(boxes[idx].float(), scores[idx].float(), thr)])
    if not kept:
        return []
    kept = torch.sort(torch.cat(kept)).values
    order = torch.sort(scores[kept].float(), descending=True, stable=True).indices
    return kept[order][:keep].tolist()


def _candidates(seed, n, n_groups, *, ties=False, size=60.0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 100
    wh = 5 + torch.rand(n, 2, generator=g) * size
    boxes = torch.cat([xy, xy + wh], 1)
    scores = torch.rand(n, generator=g)
    if ties:  # a few distinct values: many exact ties
        scores = (scores * 4).floor() / 4
    groups = torch.randint(0, n_groups, (n,), generator=g)
    valid = torch.rand(n, generator=g) > 0.1
    return boxes, scores, groups, valid


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("thr", [0.5, 0.7, 0.3])
def test_equals_torchvision_nms_per_group(ties, thr):
    cands = [_candidates(seed, 300, 7, ties=ties) for seed in range(3)]
    boxes, scores, groups, valid = (torch.stack(t) for t in zip(*cands))
    group_size = max(int(Counter(g.tolist()).most_common(1)[0][1]) for g in groups)
    for keep, prefix, rounds in [(1000, None, 16), (40, 45, 1), (40, None, 2), (40, 40, 16)]:
        kept = grouped_nms(boxes, scores, groups, valid, thr, keep, group_size=group_size,
                           prefix=prefix, rounds=rounds)
        grew = False
        for b in range(3):
            ref = _reference(boxes[b], scores[b], groups[b], valid[b], thr, keep)
            assert kept.index[b, :kept.counts[b]].tolist() == ref, (keep, prefix, rounds, b)
            ranked = torch.sort(torch.where(valid[b], scores[b], -1.0), descending=True,
                                stable=True).indices.tolist()
            grew |= prefix is not None and ranked.index(ref[-1]) >= prefix
        if grew:  # an image's answer reached past the first prefix: it had to grow
            assert kept.checks > 1


def test_an_image_gets_the_same_answer_alone_and_in_any_batch():
    cands = [_candidates(seed, 200, 3) for seed in range(4)]
    boxes, scores, groups, valid = (torch.stack(t) for t in zip(*cands))
    together = grouped_nms(boxes, scores, groups, valid, 0.5, 30, group_size=200, prefix=60)
    for b in range(4):
        alone = grouped_nms(boxes[b:b + 1], scores[b:b + 1], groups[b:b + 1], valid[b:b + 1],
                            0.5, 30, group_size=200, prefix=60)
        n = together.counts[b]
        assert n == alone.counts[0] == 30
        assert torch.equal(together.index[b, :n], alone.index[0, :n])


def test_the_answer_does_not_depend_on_the_memory_budget():
    cands = [_candidates(seed, 120, 3) for seed in range(3)]
    boxes, scores, groups, valid = (torch.stack(t) for t in zip(*cands))
    answers = []
    # one row of one image per slab, a few rows, one image, two images, all at once
    for budget in (1, 120 * 40 * 5, 120 * 119 * 40, 2 * 120 * 119 * 40, 2 ** 30):
        kept = grouped_nms(boxes, scores, groups, valid, 0.5, 50, group_size=120,
                           budget_bytes=budget)
        answers.append([kept.index[b, :n].tolist() for b, n in enumerate(kept.counts)])
    assert all(a == answers[0] for a in answers) and min(map(len, answers[0])) > 10


def test_a_long_chain_of_suppressions_takes_more_rounds_and_stays_exact():
    # boxes in a row, each overlapping the next by IoU 8/12 and the one after by 6/14, scores
    # falling along the row: the greedy answer keeps every other box, and each decision waits for
    # the one before it (a chain 40 long: 4 rounds per check need 10 checks)
    n = 40
    x = torch.arange(n, dtype=torch.float32) * 2.0
    boxes = torch.stack([x, torch.zeros(n), x + 10, torch.full((n,), 10.0)], 1)[None]
    scores = torch.linspace(1, 0.1, n)[None]
    groups = torch.zeros(1, n, dtype=torch.int64)
    valid = torch.ones(1, n, dtype=torch.bool)
    kept = grouped_nms(boxes, scores, groups, valid, 0.5, n, group_size=n, rounds=4)
    ref = _reference(boxes[0], scores[0], groups[0], valid[0], 0.5, n)
    assert kept.index[0, :kept.counts[0]].tolist() == ref
    assert ref == list(range(0, n, 2))
    assert kept.checks >= 10


def test_one_host_read_per_check_and_a_summary_in_it():
    boxes, scores, groups, valid = (t[None] for t in _candidates(0, 500, 5))
    c = OpCounter()
    with profiling(c, Counter()):
        kept = grouped_nms(boxes, scores, groups, valid, 0.5, 50, group_size=500, prefix=100,
                           summary=lambda index, mask: mask.sum(1))
    assert c.syncs == kept.checks == 1
    assert kept.summary.tolist() == kept.counts == [50]


def test_float32_threshold_matches_the_double_comparison():
    rng = np.random.default_rng(0)
    for thr in (0.5, 0.7, 0.3, 0.1, 1 / 3):
        t = np.float32(float32_threshold(thr))
        near = np.float32(thr) + np.arange(-3, 4, dtype=np.float32) * np.spacing(np.float32(thr))
        xs = np.concatenate([near.astype(np.float32), rng.random(1000, dtype=np.float32)])
        assert np.array_equal(xs > t, xs.astype(np.float64) > thr)


def test_nothing_to_keep():
    boxes = torch.zeros(2, 0, 4)
    empty = torch.zeros(2, 0)
    kept = grouped_nms(boxes, empty, empty.long(), empty.bool(), 0.5, 10, group_size=1)
    assert kept.counts == [0, 0] and kept.index.shape == (2, 0)
    boxes, scores, groups, _ = (t[None] for t in _candidates(1, 20, 2))
    kept = grouped_nms(boxes, scores, groups, torch.zeros(1, 20, dtype=torch.bool), 0.5, 10,
                       group_size=20)
    assert kept.counts == [0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_same_answer_on_cuda():
    cands = [_candidates(seed, 400, 5, ties=True) for seed in range(3)]
    boxes, scores, groups, valid = (torch.stack(t) for t in zip(*cands))
    args = dict(group_size=400, prefix=50, rounds=2)
    cpu = grouped_nms(boxes, scores, groups, valid, 0.5, 60, **args)
    gpu = grouped_nms(boxes.cuda(), scores.cuda(), groups.cuda(), valid.cuda(), 0.5, 60, **args)
    assert gpu.counts == cpu.counts and gpu.checks == cpu.checks
    for b, n in enumerate(cpu.counts):
        assert torch.equal(gpu.index[b, :n].cpu(), cpu.index[b, :n])

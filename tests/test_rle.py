"""The torch RLE encoder against pycocotools, byte for byte, with boxes and areas.

Run ``python tests/test_rle.py`` for the throughput comparison recorded in docs/benchmarks.md
(not part of the suite).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from segdist.proposals import rle


def reference(masks: np.ndarray) -> tuple[list[bytes], np.ndarray, np.ndarray]:
    """pycocotools' counts, toBbox and area of uint8 masks [N, H, W]."""
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    counts = [r["counts"] for r in rles]
    boxes = mask_utils.toBbox(rles).astype(np.float32).reshape(-1, 4)
    areas = mask_utils.area(rles).astype(np.int64)
    return counts, boxes, areas


def check_equal(masks: np.ndarray, device: str = "cpu") -> None:
    counts, boxes, areas = rle.encode_with_boxes(torch.from_numpy(masks).to(device))
    ref_counts, ref_boxes, ref_areas = reference(masks)
    assert counts == ref_counts
    np.testing.assert_array_equal(boxes, ref_boxes)
    np.testing.assert_array_equal(areas, ref_areas)
    assert boxes.dtype == np.float32 and areas.dtype == np.int64


def random_masks(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """Masks of several kinds: i.i.d. noise of varied density, rectangles, and blobs."""
    out = np.zeros((n, h, w), np.uint8)
    for i in range(n):
        kind = rng.integers(3)
        if kind == 0:
            out[i] = rng.random((h, w)) < rng.choice([0.001, 0.05, 0.3, 0.5, 0.9, 0.999])
        elif kind == 1:
            y0, y1 = np.sort(rng.integers(0, h + 1, 2))
            x0, x1 = np.sort(rng.integers(0, w + 1, 2))
            out[i, y0:y1, x0:x1] = 1
        else:
            yy, xx = np.mgrid[:h, :w]
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            r = rng.uniform(0.5, max(h, w) / 2)
            out[i] = ((yy - cy) ** 2 + (xx - cx) ** 2 * rng.uniform(0.3, 3)) < r * r
    return out


def test_random_masks_byte_identical():
    rng = np.random.default_rng(1234)
    total = 0
    for _ in range(60):
        h, w = (int(v) for v in rng.integers(1, 97, 2))
        n = int(rng.integers(1, 40))
        check_equal(random_masks(rng, n, h, w))
        total += n
    assert total >= 1000


@pytest.mark.parametrize("h,w", [(1, 1), (1, 7), (7, 1), (5, 8), (8, 5), (13, 17), (64, 48)])
def test_edge_cases(h, w):
    a = h * w
    cases = [np.zeros((h, w)), np.ones((h, w))]
    for flat_index in {0, a - 1, a // 2}:  # first pixel, last pixel, one pixel in the middle
        m = np.zeros(a)
        m[flat_index] = 1
        cases.append(m.reshape(w, h).T)  # column-major index as in the format
        cases.append(1 - cases[-1])  # everything but that pixel
    cases.append(np.indices((h, w)).sum(0) % 2)  # checkerboard: a run per pixel
    check_equal(np.stack(cases).astype(np.uint8))


def test_long_runs_and_large_differences():
    # Runs longer than 2^15 and differences of both signs that need several 5-bit groups.
    h, w = 300, 257
    m = np.zeros((4, h, w), np.uint8)
    m[0, :, 120:] = 1  # one run of 300 * 137 = 41100 ones
    m[1, 5:6, 3] = 1  # one pixel, then a run of ~77000 zeros
    m[2, :, :110] = 1
    m[2, 10, 200] = 1  # long run, short run, long run: large negative differences
    m[3] = 1
    m[3, 0, 0] = 0
    check_equal(m)
    big = np.zeros((1, 1000, 1000), np.uint8)
    big[0, 1:, 1:] = 1
    check_equal(big)


def test_empty_and_full_in_one_batch_and_box_conventions():
    masks = np.zeros((3, 6, 9), np.uint8)
    masks[1] = 1
    masks[2, 2:5, 3:4] = 1  # rows 2..4, column 3
    counts, boxes, areas = rle.encode_with_boxes(torch.from_numpy(masks).bool())
    np.testing.assert_array_equal(boxes, [[0, 0, 0, 0], [0, 0, 9, 6], [3, 2, 1, 3]])
    np.testing.assert_array_equal(areas, [0, 54, 3])
    assert counts[0] == reference(masks[:1])[0][0]


def test_inputs_of_other_types_and_layouts():
    rng = np.random.default_rng(7)
    m = random_masks(rng, 5, 23, 31)
    expected = reference(m)[0]
    assert rle.encode(m) == expected  # numpy input
    assert rle.encode(torch.from_numpy(m).bool()) == expected
    assert rle.encode(torch.from_numpy(m * 3).int()) == expected  # nonzero = foreground
    # A non-contiguous view (the transpose of column-major storage) encodes the same.
    t = torch.from_numpy(np.ascontiguousarray(m.transpose(0, 2, 1))).transpose(1, 2)
    assert not t.is_contiguous()
    assert rle.encode(t) == expected


def test_no_masks_and_zero_size():
    counts, boxes, areas = rle.encode_with_boxes(torch.zeros(0, 4, 5, dtype=torch.bool))
    assert counts == [] and boxes.shape == (0, 4) and areas.shape == (0,)
    check_equal(np.zeros((2, 0, 5), np.uint8))


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match=r"\[N, H, W\]"):
        rle.encode(torch.zeros(4, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="binarise"):
        rle.encode(torch.zeros(1, 4, 5))


def test_decode_round_trip():
    rng = np.random.default_rng(3)
    m = random_masks(rng, 6, 19, 11)
    out = rle.decode(rle.encode(m), 19, 11)
    assert out.shape == (6, 19, 11) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, m)
    assert rle.decode([], 4, 3).shape == (0, 4, 3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_equals_pycocotools():
    rng = np.random.default_rng(11)
    for h, w in [(1, 1), (37, 53), (480, 640)]:
        check_equal(random_masks(rng, 16, h, w), device="cuda")


# ---------------------------------------------------------------------------------------------
# Benchmark (not collected by pytest): python tests/test_rle.py


@pytest.mark.parametrize("height,width", [(1, 1), (1, 9), (9, 1), (7, 11), (40, 56), (300, 2)])
def test_encode_boxes_equals_pycocotools(height, width):
    from segdist.proposals.rle import encode_boxes

    rng = np.random.default_rng(height * 1000 + width)
    boxes = []
    for _ in range(200):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        boxes.append((x0, y0, rng.integers(x0 + 1, width + 1), rng.integers(y0 + 1, height + 1)))
    boxes += [(0, 0, width, height), (0, 0, 1, 1), (width - 1, height - 1, width, height),
              (0, 0, width, 1), (0, height - 1, width, height), (0, 0, 1, height),
              (width - 1, 0, width, height)]  # full, corners, full rows and columns
    masks = np.zeros((height, width, len(boxes)), np.uint8, order="F")
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        masks[y0:y1, x0:x1, i] = 1
    assert encode_boxes(np.array(boxes), height, width) == [r["counts"] for r in mask_utils.encode(masks)]
    with pytest.raises(ValueError, match="0 <= x0 < x1"):
        encode_boxes(np.array([[0, 0, 0, 1]]), height, width)


def _compress_via_pycocotools(diff_free_counts: list[np.ndarray], h: int, w: int) -> list[bytes]:
    rles = mask_utils.frPyObjects([{"size": [h, w], "counts": c.tolist()} for c in diff_free_counts], h, w)
    return [r["counts"] for r in rles]


def bench() -> None:
    """Masks/s of: pycocotools.encode, our encoder, and our runs + pycocotools' string code."""
    rng = np.random.default_rng(0)
    h, w, n = 480, 640, 250
    yy, xx = np.mgrid[:h, :w]
    masks = np.zeros((n, h, w), np.uint8)
    for i in range(n):  # blob-like proposals of varied size, as models produce
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(5, 200)
        masks[i] = ((yy - cy) ** 2 + (xx - cx) ** 2) < r * r
    t = torch.from_numpy(masks).bool()
    fortran = np.asfortranarray(masks.transpose(1, 2, 0))

    def timed(fn, reps=3):
        fn()
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return best

    def ours_then_frpy():
        # Same device pass, then undifferenced counts handed to pycocotools' C string code.
        masks_b = rle._as_bool_masks(t)
        flat = masks_b.transpose(1, 2).reshape(n, -1)
        change = torch.ones_like(flat)
        change[:, :1] = flat[:, :1]
        torch.ne(flat[:, 1:], flat[:, :-1], out=change[:, 1:])
        idx, pos = change.nonzero(as_tuple=True)
        k = torch.bincount(idx, minlength=n).tolist()
        pos_np = pos.numpy()
        out, o = [], 0
        for ki in k:
            b = np.concatenate([[0], pos_np[o:o + ki], [h * w]])
            out.append(np.diff(b))
            o += ki
        return _compress_via_pycocotools(out, h, w)

    assert ours_then_frpy() == rle.encode(t) == [r["counts"] for r in mask_utils.encode(fortran)]
    ref = timed(lambda: mask_utils.encode(fortran))
    ours = timed(lambda: rle.encode_with_boxes(t))
    frpy = timed(ours_then_frpy)
    runs = timed(lambda: rle._runs_on_device(t, None, None))
    cpu_path = timed(lambda: rle._encode_with_pycocotools(t))
    print(f"{n} masks {h}x{w}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"pycocotools.encode (from Fortran uint8):       {n / ref:9.0f} masks/s")
    print(f"segdist encode_with_boxes (torch coder):       {n / ours:9.0f} masks/s")
    print(f"  of which the torch pass (runs/boxes/areas):  {n / runs:9.0f} masks/s")
    print(f"torch runs + pycocotools frPyObjects strings:  {n / frpy:9.0f} masks/s")
    print(f"pycocotools after a column-major copy (CPU):   {n / cpu_path:9.0f} masks/s")
    if torch.cuda.is_available():
        tc = t.cuda()
        def gpu():
            rle.encode_with_boxes(tc)
            torch.cuda.synchronize()
        g = timed(gpu, reps=10)
        print(f"segdist encode_with_boxes on {torch.cuda.get_device_name()}: {n / g:9.0f} masks/s")


if __name__ == "__main__":
    bench()


def test_encode_masks_backends_agree():
    # encode_masks sends CPU masks to pycocotools' C encoder and GPU masks to the torch encoder;
    # both must give the same bytes, boxes and areas as the torch encoder on the CPU.
    rng = np.random.default_rng(7)
    masks = rng.random((40, 23, 31)) < rng.random((40, 1, 1))
    masks[0] = False
    masks[1] = True
    t = torch.from_numpy(masks)
    got = rle.encode_masks(t)
    want = rle.encode_with_boxes(t)
    assert got[0] == want[0]
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[2], want[2])
    assert got[1].dtype == np.float32 and got[2].dtype == np.int64
    assert rle.encode_masks(torch.zeros(0, 3, 4, dtype=torch.bool))[0] == []


def test_encode_masks_cpu_path_with_many_masks():
    # A chunk of 1000 proposals per image: pycocotools.mask.area overflows for 256+ masks under
    # numpy 2, so the CPU path must not depend on it (regression).
    rng = np.random.default_rng(11)
    masks = rng.random((300, 9, 7)) < 0.4
    counts, boxes, areas = rle.encode_masks(torch.from_numpy(masks))
    want = rle.encode_with_boxes(torch.from_numpy(masks))
    assert counts == want[0]
    np.testing.assert_array_equal(boxes, want[1])
    np.testing.assert_array_equal(areas, masks.reshape(300, -1).sum(1))



@pytest.mark.parametrize("backend", ["device", "cpu"])
def test_masks_of_several_sizes_in_one_canvas(backend):
    # Masks of different images share one canvas (their own block top-left, zeros elsewhere);
    # each encodes as pycocotools encodes it alone, through the device coder or the CPU path.
    rng = np.random.default_rng(5)
    sizes = [(int(rng.integers(1, 30)), int(rng.integers(1, 30))) for _ in range(40)] + [(29, 31), (1, 1)]
    canvas = np.zeros((len(sizes), 29, 31), np.uint8)
    alone = []
    for i, (h, w) in enumerate(sizes):
        m = random_masks(rng, 1, h, w)[0]
        canvas[i, :h, :w] = m
        alone.append(m)
    t = torch.from_numpy(canvas).bool().transpose(1, 2).contiguous().transpose(1, 2)  # a [N, W, H] canvas
    hs = torch.tensor([h for h, _ in sizes])
    ws = torch.tensor([w for _, w in sizes])
    fn = rle.encode_with_boxes if backend == "device" else rle.encode_masks
    counts, boxes, areas = fn(t, heights=hs, widths=ws)
    for i, m in enumerate(alone):
        rc, rb, ra = reference(m[None])
        assert counts[i] == rc[0], (i, sizes[i])
        np.testing.assert_array_equal(boxes[i], rb[0])
        assert areas[i] == ra[0]

"""Image decoding: a corpus of good and bad files made here, decoded through segdist.imageio."""

from __future__ import annotations

import io
import os
import pickle
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image, ImageOps

from segdist.errors import ImageDecodeError
from segdist.imageio import DEFAULT_MAX_PIXELS, decode_image, read_image

T = Image.Transpose


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _noise_rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _huge_header_png(width: int, height: int) -> bytes:
    """A syntactically valid PNG header declaring width x height RGB pixels, with no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IEND", b"")


# --- good images: (file name, bytes, expected uint8 H x W x 3 or None, tolerance) --------------

def _good_corpus() -> dict[str, tuple[bytes, np.ndarray, int]]:
    files: dict[str, tuple[bytes, np.ndarray, int]] = {}
    rgb = _noise_rgb(5, 9, seed=1)
    files["rgb.png"] = (_encode(Image.fromarray(rgb), "PNG"), rgb, 0)

    gray = np.arange(5 * 9, dtype=np.uint8).reshape(5, 9) * 5
    files["gray.png"] = (_encode(Image.fromarray(gray, "L"), "PNG"), np.dstack([gray] * 3), 0)

    la = np.dstack([gray, np.full_like(gray, 17)])
    files["gray_alpha.png"] = (_encode(Image.fromarray(la, "LA"), "PNG"), np.dstack([gray] * 3), 0)

    # Alpha is dropped, not composited: colour values come back as stored, even where alpha = 0.
    rgba = np.dstack([rgb, np.where(np.arange(9) % 2 == 0, 0, 255).astype(np.uint8)[None].repeat(5, 0)])
    files["rgba.png"] = (_encode(Image.fromarray(rgba, "RGBA"), "PNG"), rgb, 0)

    palette = [255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30] + [0] * (768 - 12)
    idx = (np.arange(4 * 6).reshape(4, 6) % 4).astype(np.uint8)
    pim = Image.fromarray(idx, "P")
    pim.putpalette(palette)
    lut = np.array(palette, dtype=np.uint8).reshape(256, 3)
    files["palette.png"] = (_encode(pim, "PNG"), lut[idx], 0)
    # Palette with per-entry alpha (tRNS): the palette colours, alpha dropped.
    files["palette_alpha.png"] = (_encode(pim, "PNG", transparency=bytes([0, 128, 255, 7])), lut[idx], 0)

    # CMYK JPEG (Pillow writes Adobe-inverted CMYK): pure C, M, Y, K quadrants.
    cmyk = np.zeros((16, 16, 4), np.uint8)
    cmyk[:8, :8] = (255, 0, 0, 0)  # cyan
    cmyk[:8, 8:] = (0, 255, 0, 0)  # magenta
    cmyk[8:, :8] = (0, 0, 255, 0)  # yellow
    cmyk[8:, 8:] = (0, 0, 0, 255)  # black
    want = np.zeros((16, 16, 3), np.uint8)
    want[:8, :8] = (0, 255, 255)
    want[:8, 8:] = (255, 0, 255)
    want[8:, :8] = (255, 255, 0)
    want[8:, 8:] = (0, 0, 0)
    files["cmyk.jpg"] = (_encode(Image.fromarray(cmyk, "CMYK"), "JPEG", quality=95), want, 40)

    # 16-bit grayscale: scaled by 65535, not clipped (1000 -> 4, not 255).
    g16 = np.array([[0, 257, 1000, 32896], [40000, 65279, 65535, 128]], dtype=np.uint16)
    g8 = np.array([[0, 1, 4, 128], [156, 254, 255, 0]], dtype=np.uint8)
    files["gray16.png"] = (_encode(Image.fromarray(g16), "PNG"), np.dstack([g8] * 3), 0)
    g16b = Image.frombytes("I;16B", (4, 2), g16.astype(">u2").tobytes())
    files["gray16b.tif"] = (_encode(g16b, "TIFF"), np.dstack([g8] * 3), 0)
    # 32-bit signed integer ("I", raw I;32S): scaled by 2**31 - 1, negatives to 0.
    g32 = np.array([[0, 2**30, 2**31 - 1, -5]], dtype=np.int32)
    files["gray32.tif"] = (_encode(Image.fromarray(g32, "I"), "TIFF"),
                           np.dstack([np.array([[0, 128, 255, 0]], np.uint8)] * 3), 0)

    bits = (np.indices((3, 5)).sum(0) % 2).astype(bool)
    files["bilevel.png"] = (_encode(Image.fromarray(bits), "PNG"),
                            np.dstack([bits.astype(np.uint8) * 255] * 3), 0)

    one = np.array([[[12, 200, 99]]], np.uint8)
    files["one_pixel.png"] = (_encode(Image.fromarray(one), "PNG"), one, 0)
    tall = _noise_rgb(7, 3, seed=2)
    files["tall.png"] = (_encode(Image.fromarray(tall), "PNG"), tall, 0)
    wide = _noise_rgb(2, 11, seed=3)
    files["wide.bmp"] = (_encode(Image.fromarray(wide), "BMP"), wide, 0)
    smooth = np.zeros((24, 40, 3), np.uint8)  # edge on the block grid, 4:4:4: no ringing
    smooth[:, :16] = (200, 30, 30)
    smooth[:, 16:] = (30, 30, 200)
    files["rgb.jpg"] = (_encode(Image.fromarray(smooth), "JPEG", quality=95, subsampling=0), smooth, 12)
    return files


# EXIF orientation -> the transpose that makes the stored image upright (as Pillow's exif_transpose).
_UPRIGHT = {2: T.FLIP_LEFT_RIGHT, 3: T.ROTATE_180, 4: T.FLIP_TOP_BOTTOM, 5: T.TRANSPOSE,
            6: T.ROTATE_270, 7: T.TRANSVERSE, 8: T.ROTATE_90}
_INVERSE = {T.FLIP_LEFT_RIGHT: T.FLIP_LEFT_RIGHT, T.ROTATE_180: T.ROTATE_180,
            T.FLIP_TOP_BOTTOM: T.FLIP_TOP_BOTTOM, T.TRANSPOSE: T.TRANSPOSE,
            T.ROTATE_270: T.ROTATE_90, T.TRANSVERSE: T.TRANSVERSE, T.ROTATE_90: T.ROTATE_270}


def _quadrants(h: int, w: int) -> np.ndarray:
    up = np.zeros((h, w, 3), np.uint8)
    up[: h // 2, : w // 2] = (255, 0, 0)
    up[: h // 2, w // 2:] = (0, 255, 0)
    up[h // 2:, : w // 2] = (0, 0, 255)
    up[h // 2:, w // 2:] = (255, 255, 255)
    return up


def _exif_jpeg(upright: np.ndarray, orientation: int) -> bytes:
    im = Image.fromarray(upright)
    if orientation != 1:
        im = im.transpose(_INVERSE[_UPRIGHT[orientation]])
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encode(im, "JPEG", quality=95, exif=exif.tobytes())


def _bad_corpus(tmp_path) -> dict[str, tuple[bytes | None, int, str]]:
    """name -> (bytes or None for a missing file, max_pixels, a word the reason must contain)."""
    jpeg = _encode(Image.fromarray(_noise_rgb(64, 64, seed=4)), "JPEG", quality=90)
    png = _encode(Image.fromarray(_noise_rgb(64, 64, seed=5)), "PNG")
    # Flip bytes inside the IDAT payload: the chunk CRC no longer matches.
    corrupt = bytearray(png)
    start = png.index(b"IDAT") + 40
    corrupt[start:start + 16] = bytes(16)
    return {
        "empty.jpg": (b"", DEFAULT_MAX_PIXELS, "empty"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], DEFAULT_MAX_PIXELS, "truncated"),
        "truncated.png": (png[: int(len(png) * 0.6)], DEFAULT_MAX_PIXELS, "truncated"),
        "corrupt.png": (bytes(corrupt), DEFAULT_MAX_PIXELS, "corrupt"),
        "random.jpg": (np.random.default_rng(6).bytes(4096), DEFAULT_MAX_PIXELS, "not a recognised"),
        "notes.png": (b"these are notes, not pixels\n" * 20, DEFAULT_MAX_PIXELS, "not a recognised"),
        "missing.jpg": (None, DEFAULT_MAX_PIXELS, "not found"),
        "bomb.png": (_huge_header_png(100_000, 100_000), DEFAULT_MAX_PIXELS, "pixels"),
        "over_limit.png": (png, 64 * 64 - 1, "over the limit"),
    }


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """One folder with the good and the bad files side by side."""
    d = tmp_path_factory.mktemp("images")
    for name, (data, _, _) in _good_corpus().items():
        (d / name).write_bytes(data)
    for o in range(1, 9):
        (d / f"exif{o}.jpg").write_bytes(_exif_jpeg(_quadrants(24, 40), o))
    for name, (data, _, _) in _bad_corpus(d).items():
        if data is not None:
            (d / name).write_bytes(data)
    return d


@pytest.mark.parametrize("name", sorted(_good_corpus()))
def test_good_images_decode_to_expected_rgb(corpus_dir, name):
    _, want, tol = _good_corpus()[name]
    got = read_image(str(corpus_dir / name))
    assert got.dtype == np.uint8 and got.ndim == 3 and got.shape == want.shape
    assert got.flags["C_CONTIGUOUS"] and got.flags["WRITEABLE"]
    diff = np.abs(got.astype(int) - want.astype(int)).max()
    assert diff <= tol, f"{name}: max abs difference {diff} > {tol}"


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(corpus_dir, orientation):
    path = corpus_dir / f"exif{orientation}.jpg"
    got = read_image(str(path))
    assert got.shape == (24, 40, 3)  # upright size, whatever the stored one
    want = _quadrants(24, 40)
    for y, x in [(6, 10), (6, 30), (18, 10), (18, 30)]:  # quadrant centres
        assert np.abs(got[y, x].astype(int) - want[y, x]).max() < 40, (orientation, y, x, got[y, x])
    # Same pixels as Pillow's own exif_transpose of the same decode.
    with Image.open(path) as im:
        ref = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("name", sorted(_bad_corpus(None)))
def test_bad_images_raise_typed_error_with_file_name(corpus_dir, name):
    _, max_pixels, word = _bad_corpus(corpus_dir)[name]
    uri = str(corpus_dir / name)
    with pytest.raises(ImageDecodeError) as info:
        read_image(uri, max_pixels=max_pixels)
    assert info.value.uri == uri
    assert name in str(info.value)
    reason = info.value.reason
    assert word in reason, reason
    # one clean clause: no library period left before our own punctuation, none at the end
    assert not any(s in reason for s in (".;", ".)", "..")) and not reason.endswith("."), reason
    if name in ("bomb.png", "over_limit.png"):  # the refusal says which setting allows more
        assert "raise dataset.max_pixels" in reason, reason
    # It survives pickling (Ray ships it between processes) with both fields.
    again = pickle.loads(pickle.dumps(info.value))
    assert (again.uri, again.reason) == (info.value.uri, info.value.reason)


def test_mixed_folder_good_and_bad_side_by_side(corpus_dir):
    ok, failed = [], []
    for name in sorted(os.listdir(corpus_dir)):
        try:
            read_image(str(corpus_dir / name), max_pixels=10**6)
            ok.append(name)
        except ImageDecodeError as exc:
            failed.append(os.path.basename(exc.uri))
    bad = set(_bad_corpus(None)) - {"missing.jpg", "over_limit.png"}  # missing: not in the folder
    assert set(failed) == bad
    assert set(ok) == set(_good_corpus()) | {f"exif{o}.jpg" for o in range(1, 9)} | {"over_limit.png"}


def test_directory_is_a_decode_error(tmp_path):
    with pytest.raises(ImageDecodeError, match="directory"):
        read_image(str(tmp_path))


def test_pixel_limit_checked_before_decoding_and_pillow_limit_lifted(monkeypatch):
    data = _encode(Image.fromarray(_noise_rgb(100, 100, seed=7)), "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow would now refuse > 2000 px
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(data))
    # A caller allowing more than Pillow's global gets the image, and the global is restored.
    got = decode_image(data, "big.png", max_pixels=20_000)
    assert got.shape == (100, 100, 3)
    assert Image.MAX_IMAGE_PIXELS == 1000
    # Below Pillow's threshold, Pillow's own bomb error becomes the typed error.
    with pytest.raises(ImageDecodeError, match="big.png.*too many pixels") as info:
        decode_image(data, "big.png", max_pixels=1500)
    assert info.value.reason == (
        "too many pixels (decompression-bomb guard: DecompressionBombError: Image size (10000 "
        "pixels) exceeds limit of 2000 pixels, could be decompression bomb DOS attack); raise "
        "dataset.max_pixels for trusted large images")
    with pytest.raises(ValueError, match="max_pixels"):
        decode_image(data, "big.png", max_pixels=0)


def test_header_within_limit_but_no_pixel_data_fails_cleanly():
    # 2000 x 1500 declared, under the limit: passes the bomb guard, then the missing pixel data is
    # reported (no hang, no bare exception).
    data = _huge_header_png(2_000, 1_500)
    with pytest.raises(ImageDecodeError, match="huge.png"):
        decode_image(data, "huge.png", max_pixels=10**7)


def test_concurrent_decoding_matches_sequential(corpus_dir):
    names = sorted(_good_corpus()) + [f"exif{o}.jpg" for o in range(1, 9)]
    uris = [str(corpus_dir / n) for n in names] * 6
    sequential = [read_image(u) for u in uris]
    with ThreadPoolExecutor(max_workers=8) as pool:
        threaded = list(pool.map(read_image, uris))
    for u, a, b in zip(uris, sequential, threaded):
        np.testing.assert_array_equal(a, b, err_msg=u)


def test_read_image_from_s3(s3_bucket):
    import s3fs

    bucket, opts = s3_bucket
    fs = s3fs.S3FileSystem(**opts)
    rgb = _noise_rgb(6, 10, seed=8)
    fs.pipe(f"{bucket}/img/a.png", _encode(Image.fromarray(rgb), "PNG"))
    got = read_image(f"s3://{bucket}/img/a.png", storage_options=opts)
    np.testing.assert_array_equal(got, rgb)
    with pytest.raises(ImageDecodeError, match="not found"):
        read_image(f"s3://{bucket}/img/missing.png", storage_options=opts)

"""Image decoding: any file a dataset may hold -> ``uint8 H x W x 3`` RGB, upright.

Rules (also in docs/datasets.md):

- Output: ``np.ndarray`` uint8, shape ``(H, W, 3)``, RGB, C-contiguous and writable, with the EXIF
  orientation (tag 0x0112, all 8 values) applied, so ``H, W`` are the size of the upright image.
- Colour modes: grayscale (``L``), 1-bit (``1``: 0/255) and ``LA`` are replicated to 3 channels;
  alpha (``LA``, ``RGBA``, ``PA``) is **dropped, not composited**: colour values are kept as stored;
  palette (``P``/``PA``) is looked up; CMYK JPEGs (Adobe-inverted or not) go through Pillow's
  CMYK -> RGB; 16-bit grayscale (``I;16``/``I;16B``/``I;16L``, 16-bit PNG) and 32-bit ``I`` are
  **scaled** by their bit depth (``round(v * 255 / (2**bits - 1))``), never clipped at 255 (Pillow's
  own ``convert("L")`` clips); the depth comes from the decoder's raw mode (``I;16*`` -> 16, ``I;32*``
  -> 32), negative values become 0. Floating-point (``F``) images are clipped to 0..255 as Pillow
  does. ICC profiles are not applied: pixel values are used as stored.
- Decompression bombs: the pixel count from the header is checked against ``max_pixels`` (default
  :data:`DEFAULT_MAX_PIXELS`, Pillow's own error limit) before any pixel is decoded. Pillow's
  ``DecompressionBombError`` (and its ``DecompressionBombWarning`` where warnings are turned into
  errors) becomes :class:`~segdist.errors.ImageDecodeError` too. Runs set the limit with the
  config field ``dataset.max_pixels``, which the refusal names.
- Every failure of a file (missing, empty, truncated, corrupt, not an image, unsupported mode, too
  many pixels) raises ``ImageDecodeError(uri, reason)``; never a bare PIL or OS error. A reason is
  one clause without a final period (Pillow's own messages are quoted with theirs stripped), so
  that it reads cleanly inside a sentence, a manifest or a run summary. Failures of the
  storage itself (no permission, network) raise :class:`~segdist.errors.StorageError`, because
  retrying them can succeed and skipping the image would be wrong.
- Decoding is forced (``Image.load()``), so a truncated file fails here and not later, and the
  functions are thread-safe: each call works on its own ``Image`` object (Pillow releases the GIL
  while decoding, so threads give real parallelism).
- Truncation detection relies on Pillow's default ``ImageFile.LOAD_TRUNCATED_IMAGES = False``;
  segdist never changes that global.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from segdist.errors import ImageDecodeError
from segdist.storage import url_to_fs
from segdist.storage_errors import translate

# Pillow's own hard limit (it raises above 2 * Image.MAX_IMAGE_PIXELS = 178,956,970 pixels), so the
# default here refuses nothing that Pillow would accept.
DEFAULT_MAX_PIXELS = 178_956_970

_EXIF_ORIENTATION = 0x0112

# Serialises the rare calls that must lift Pillow's global bomb limit (max_pixels above Pillow's
# own error threshold); every other call leaves the global untouched and needs no lock.
_PILLOW_LIMIT_LOCK = threading.Lock()

_GRAY16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")

# What to do about a refused large image, in the words of the run config.
_RAISE_LIMIT = "raise dataset.max_pixels for trusted large images"


def _quoted(exc: BaseException) -> str:
    """``Type: message`` of a library exception, without a trailing period (it is embedded)."""
    return f"{type(exc).__name__}: {str(exc).strip().rstrip('.')}"


def read_image(
    uri: str,
    storage_options: Mapping[str, Any] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Read and decode the image at ``uri`` (any fsspec URI).

    Returns ``uint8[H, W, 3]`` RGB, upright (EXIF orientation applied), C-contiguous.
    Raises ImageDecodeError for a missing, empty, corrupt, truncated, non-image or too-large file,
    StorageError when the storage refuses the read (permission, network).
    """
    fs, path = url_to_fs(uri, storage_options)
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        raise ImageDecodeError(uri, "file not found") from None
    except IsADirectoryError:
        raise ImageDecodeError(uri, "is a directory, not an image file") from None
    except Exception as exc:  # permission, network (botocore's errors are not OSErrors), ...
        raise translate(exc, uri, "read") from exc
    return decode_image(data, uri, max_pixels=max_pixels)


def decode_image(data: bytes, uri: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode encoded image bytes (JPEG, PNG, TIFF, BMP, GIF, WebP, ... whatever Pillow reads).

    Args:
        data: the file's bytes.
        uri: where they came from; used only in error messages.
        max_pixels: refuse images with more than this many pixels (width * height from the header,
            checked before decoding).

    Returns ``uint8[H, W, 3]`` RGB, upright, C-contiguous, writable. See the module docstring for
    the colour-mode rules.
    """
    if not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive int, got {max_pixels!r}")
    if not data:
        raise ImageDecodeError(uri, "empty file (0 bytes)")
    im = _open(data, uri, max_pixels)
    try:
        width, height = im.size
        if width < 1 or height < 1:
            raise ImageDecodeError(uri, f"image has no pixels ({width} x {height})")
        if width * height > max_pixels:
            raise ImageDecodeError(
                uri,
                f"{width} x {height} = {width * height} pixels is over the limit of {max_pixels} "
                f"(decompression-bomb guard); {_RAISE_LIMIT}",
            )
        if im.format == "PNG":
            # PNG carries a CRC per chunk but Pillow's decoder does not check the pixel chunks:
            # a flipped byte can decode to silent garbage. verify() checks them; it consumes the
            # file object, so the image is opened again for decoding.
            _verify(im, uri)
            im.close()
            im = _open(data, uri, max_pixels)
        rawmode = _tile_rawmode(im)
        orientation = _orientation(im)
        try:
            im.load()
        except Exception as exc:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, zlib.error, ...
            raise ImageDecodeError(uri, f"corrupt or truncated image data ({_quoted(exc)})") from None
        try:
            rgb = _to_rgb(im, rawmode)
        except Exception as exc:  # noqa: BLE001 - modes Pillow cannot convert (LAB, ...)
            raise ImageDecodeError(
                uri, f"cannot convert colour mode {im.mode} to RGB ({_quoted(exc)})") from None
    finally:
        im.close()
    return _apply_orientation(rgb, orientation)


def _open(data: bytes, uri: str, max_pixels: int) -> Image.Image:
    """``Image.open`` (header only) with every failure turned into ImageDecodeError."""
    pillow_limit = Image.MAX_IMAGE_PIXELS
    # Pillow refuses images over 2 * MAX_IMAGE_PIXELS inside open(); a caller who allows more must
    # get past that check. Our own limit is checked right after open, before any pixel is decoded.
    lift = pillow_limit is not None and max_pixels > 2 * pillow_limit
    try:
        if lift:
            with _PILLOW_LIMIT_LOCK:
                saved = Image.MAX_IMAGE_PIXELS
                Image.MAX_IMAGE_PIXELS = None
                try:
                    return Image.open(io.BytesIO(data))
                finally:
                    Image.MAX_IMAGE_PIXELS = saved
        return Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(
            uri, f"too many pixels (decompression-bomb guard: {_quoted(exc)}); {_RAISE_LIMIT}"
        ) from None
    except UnidentifiedImageError:
        raise ImageDecodeError(uri, "not a recognised image format (corrupt or not an image)") from None
    except Exception as exc:  # noqa: BLE001 - plugins raise OSError, SyntaxError, struct.error, ...
        raise ImageDecodeError(uri, f"corrupt image header ({_quoted(exc)})") from None


def _verify(im: Image.Image, uri: str) -> None:
    try:
        im.verify()
    except Exception as exc:  # noqa: BLE001 - SyntaxError("broken PNG file"), OSError, ...
        raise ImageDecodeError(uri, f"corrupt or truncated image data ({_quoted(exc)})") from None


def _tile_rawmode(im: Image.Image) -> str | None:
    """The decoder's raw mode (e.g. ``I;16B``, ``I;32S``), read before load() clears the tiles."""
    tiles = getattr(im, "tile", None) or []
    if not tiles:
        return None
    args = tiles[0].args if hasattr(tiles[0], "args") else tiles[0][3]
    if isinstance(args, str):
        return args
    if isinstance(args, tuple) and args and isinstance(args[0], str):
        return args[0]
    return None


def _orientation(im: Image.Image) -> int:
    """EXIF orientation 1..8; 1 when absent or unreadable (a broken EXIF block is not fatal)."""
    try:
        value = im.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - malformed EXIF: keep the pixels, ignore the tag
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _integer_bits(mode: str, rawmode: str | None) -> int:
    if mode in _GRAY16_MODES:
        return 16
    raw = rawmode or ""
    if raw.startswith("I;16"):
        return 16
    if raw.startswith("I;8"):
        return 8
    return 32


def _to_rgb(im: Image.Image, rawmode: str | None) -> np.ndarray:
    """Decoded image -> ``uint8[H, W, 3]`` (before orientation)."""
    mode = im.mode
    if mode == "RGB":
        return np.array(im, dtype=np.uint8)
    if mode in _GRAY16_MODES or mode == "I":
        bits = _integer_bits(mode, rawmode)
        full = (1 << bits) - 1 if bits < 32 else (1 << 31) - 1  # I;32 is signed
        values = np.clip(np.array(im).astype(np.int64), 0, full)
        gray = ((values * 255 + full // 2) // full).astype(np.uint8)
        return _gray_to_rgb(gray)
    if mode in ("L", "1", "F"):
        return _gray_to_rgb(np.array(im.convert("L"), dtype=np.uint8))
    if mode in ("LA", "La"):
        return _gray_to_rgb(np.array(im.getchannel(0), dtype=np.uint8))
    if mode in ("P", "PA"):
        # Palette lookup through RGBA: Pillow warns when a palette image with transparency goes
        # straight to RGB. The alpha channel is then dropped like any other.
        return np.array(im.convert("RGBA"), dtype=np.uint8)[:, :, :3].copy()
    return np.array(im.convert("RGB"), dtype=np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)


def _apply_orientation(rgb: np.ndarray, orientation: int) -> np.ndarray:
    """Make an ``H x W x 3`` array upright for EXIF ``orientation`` (the same transposes as
    Pillow's ``ImageOps.exif_transpose``)."""
    if orientation == 2:  # mirrored left-right
        out = rgb[:, ::-1]
    elif orientation == 3:  # rotated 180
        out = rgb[::-1, ::-1]
    elif orientation == 4:  # mirrored top-bottom
        out = rgb[::-1]
    elif orientation == 5:  # transpose (mirror about the main diagonal)
        out = rgb.transpose(1, 0, 2)
    elif orientation == 6:  # stored rotated 90 CCW: rotate 90 CW
        out = np.rot90(rgb, k=-1)
    elif orientation == 7:  # transverse (mirror about the anti-diagonal)
        out = rgb[::-1, ::-1].transpose(1, 0, 2)
    elif orientation == 8:  # stored rotated 90 CW: rotate 90 CCW
        out = np.rot90(rgb, k=1)
    else:
        out = rgb
    return np.ascontiguousarray(out)

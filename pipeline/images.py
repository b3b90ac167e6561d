"""Safe image decoding: encoded bytes in, 8-bit RGB pixels out, or an ``ImageError``.

This module owns every decision about turning untrusted image bytes into pixels:
which inputs are rejected (and with which stable ``reason`` code, used to
quarantine bad records), how exotic modes become RGB, EXIF orientation, and the
decompression-bomb guard. Nothing else in the pipeline calls ``Image.open``.

Outcomes:

===============================================  ==========================================
Input                                            Result
===============================================  ==========================================
zero bytes                                       ``ImageError`` reason ``"empty"``
bytes PIL cannot identify (text named .jpg)      ``"not_an_image"``
valid header, pixel data cut short               ``"truncated"`` (never a half-grey image)
width*height above ``max_pixels``                ``"too_large"``, checked from the header
                                                 before any pixels are decoded
decoder or mode we cannot handle (e.g. float F)  ``"unsupported"``
any other PIL failure (corrupt data stream)      ``"not_an_image"``, PIL's message in str(e)
RGB                                              unchanged
CMYK (incl. Adobe inverted CMYK JPEG)            converted to RGB (no ICC colour management)
L, 1-bit, I;16/I (16-bit grey)                   grey replicated to 3 equal channels;
                                                 16-bit values scaled by 255/65535, not clipped
RGBA, LA, PA, palette/L/RGB with transparency    alpha composited onto a WHITE background
EXIF orientation 2..8                            applied (``ImageOps.exif_transpose``)
multi-frame GIF/TIFF/APNG                        first frame only
===============================================  ==========================================

:func:`shrink` (``imgpipe pack --max-side N``) decodes the same way, and re-encodes an
image whose long side exceeds N as an upright RGB JPEG of at most N px on the long
side (aspect kept, Lanczos); an image within N keeps its bytes exactly.

Notes:

- Truncation is detected because we force ``load()`` and leave
  ``ImageFile.LOAD_TRUNCATED_IMAGES`` at its default ``False``; a process that sets it
  to ``True`` globally would defeat this check.
- ``max_pixels`` is enforced per call from the header size. PIL's own global guard
  (``Image.MAX_IMAGE_PIXELS``, about 179M pixels for a hard error) still applies
  underneath and is reported as ``"too_large"`` too; we never mutate it, so a
  ``max_pixels`` above PIL's limit cannot admit images PIL refuses.
"""

from __future__ import annotations

import io
import struct

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

REASONS = ("empty", "not_an_image", "truncated", "too_large", "unsupported")

MAX_PIXELS: int = 64_000_000

# JPEG quality of images `pack --max-side` re-encodes (FFCV's default too). Measured on
# benchmarks/make_images.py photos shrunk to 256 px (4:2:0 chroma): quality 90 gives
# 37 dB PSNR at 16 KB, 95 gives 40 dB at 24 KB (1.5x), 100 gives 46 dB at 46 KB (2.8x),
# 80 gives 35 dB at 11 KB. 90 is a third smaller than 95 for 3 dB; going lower trades
# dB for bytes at a similar rate and starts to smear fine texture a model may use.
SHRINK_QUALITY: int = 90
# Image.resize's reducing_gap: first shrink by an integer factor with a box filter
# (Image.reduce, fast), then Lanczos over the last >= 3x. Pillow documents 3.0 as
# "indistinguishable from fair resampling in most cases".
SHRINK_REDUCING_GAP: float = 3.0

_DESCRIPTIONS = {
    "empty": "empty image data (0 bytes)",
    "not_an_image": "not a readable image",
    "truncated": "truncated image data",
    "too_large": "image too large",
    "unsupported": "unsupported image",
}

# White, because most image datasets show objects on light backgrounds and the colour
# of fully transparent pixels is undefined (often black or garbage).
_BACKGROUND = (255, 255, 255)

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_INT16_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N"}


class ImageError(ValueError):
    """An image that cannot be used; .reason is a short stable code, str(e) a one-line human message."""

    reason: str

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown ImageError reason {reason!r}; expected one of {REASONS}")
        self.reason = reason
        self.detail = " ".join(detail.split())  # one line, whatever PIL put in its message
        message = _DESCRIPTIONS[reason] + (f": {self.detail}" if self.detail else "")
        super().__init__(message)

    def __reduce__(self) -> tuple[type[ImageError], tuple[str, str]]:
        # Ray ships exceptions between processes; rebuild from (reason, detail), not the
        # formatted message, so .reason survives pickling.
        return (type(self), (self.reason, self.detail))


def decode_rgb(data: bytes, max_pixels: int = MAX_PIXELS, min_size: int = 0) -> np.ndarray:
    """Decode to HxWx3 uint8 RGB, EXIF orientation applied. Raises ImageError."""
    # np.array (not asarray) so callers get a writable, C-contiguous array they own.
    return np.array(decode_pil(data, max_pixels, min_size), dtype=np.uint8)


def decode_pil(data: bytes, max_pixels: int = MAX_PIXELS, min_size: int = 0) -> Image.Image:
    """Same, but returns an RGB PIL image (mode 'RGB'), EXIF orientation applied.

    ``min_size`` > 0 (opt-in, for a caller that resizes the result anyway): a JPEG may
    be decoded at 1/2, 1/4 or 1/8 scale in libjpeg's DCT (``Image.draft``), the largest
    reduction that keeps BOTH sides >= ``min_size`` px; other formats decode in full.
    The bomb guard still judges the stored size."""
    if not data:
        raise ImageError("empty")
    try:
        with Image.open(io.BytesIO(data)) as im:
            # Image.open only parses the header, so this rejects bombs before any
            # pixel memory is allocated.
            width, height = im.size
            if width * height > max_pixels:
                raise ImageError(
                    "too_large", f"{width}x{height} = {width * height} pixels > {max_pixels}"
                )
            im.seek(0)  # multi-frame formats: always the first frame
            if min_size > 0 and im.format == "JPEG":
                im.draft(None, (min_size, min_size))  # square: right for either EXIF orientation
            im.load()  # force a full decode so truncation raises here, not later
            im = _apply_orientation(im)
            return _to_rgb(im)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # PIL's own global guard (the warning only arrives as an exception when the
        # process turned warnings into errors).
        raise ImageError("too_large", str(e)) from e
    except UnidentifiedImageError as e:
        # PIL's message embeds a BytesIO repr, which is noise in a quarantine log.
        raise ImageError("not_an_image", "cannot identify image format") from e
    except (OSError, EOFError, SyntaxError, ValueError, struct.error, NotImplementedError) as e:
        raise ImageError(_classify(e), f"{type(e).__name__}: {e}") from e


def check(data: bytes, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """Fully decode once to validate; return (width, height) after EXIF orientation. Raises ImageError."""
    # Same code path as decode_pil, so check() passes exactly when decoding would.
    width, height = decode_pil(data, max_pixels).size
    return width, height


def shrunk_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) scaled so the long side is ``max_side`` (aspect kept, each >= 1 px);
    unchanged when already within it or ``max_side`` is 0."""
    long = max(width, height)
    if max_side <= 0 or long <= max_side:
        return width, height
    return max(1, round(width * max_side / long)), max(1, round(height * max_side / long))


def shrink(data: bytes, max_side: int, max_pixels: int = MAX_PIXELS,
           quality: int = SHRINK_QUALITY) -> bytes:
    """``data`` validated like :func:`check`; returned as is when its long side is within
    ``max_side`` (or ``max_side`` is 0), else decoded (EXIF orientation applied, RGB as in
    :func:`decode_pil`), downscaled to ``max_side`` on the long side and re-encoded as a
    baseline JPEG of ``quality`` with no EXIF (the pixels are upright). Raises ImageError."""
    im = decode_pil(data, max_pixels)
    size = shrunk_size(im.width, im.height, max_side)
    if size == im.size:
        return data
    small = im.resize(size, Image.Resampling.LANCZOS, reducing_gap=SHRINK_REDUCING_GAP)
    out = io.BytesIO()
    small.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def _classify(e: BaseException) -> str:
    message = str(e).lower()
    if isinstance(e, EOFError) or "truncated" in message or "premature" in message:
        return "truncated"
    if isinstance(e, NotImplementedError) or any(
        s in message for s in ("not available", "not supported", "unsupported")
    ):
        return "unsupported"
    return "not_an_image"  # corrupt stream inside a recognised container


def _apply_orientation(im: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(im)
    except (SyntaxError, ValueError, TypeError, KeyError, OSError, struct.error):
        # A malformed EXIF block does not make the pixels unusable: keep them as stored
        # (copied, because the caller closes the file-backed original).
        return im.copy()


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in _INT16_MODES:
        # PIL's convert("L") clips I;16 at 255 instead of scaling; rescale 0..65535
        # to 0..255 with rounding (65535 -> 255, 32768 -> 128).
        values = np.clip(np.asarray(im).astype(np.int64), 0, 65535)
        grey = ((values * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode == "F":
        # Float images have no agreed value range; guessing one would silently mis-scale.
        raise ImageError("unsupported", "32-bit float (mode F) images have no defined 0..255 scale")
    if mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        out = Image.new("RGB", rgba.size, _BACKGROUND)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    # CMYK, YCbCr, LAB, HSV, L, 1, P, ...: PIL's converters handle these exactly.
    return im.convert("RGB")

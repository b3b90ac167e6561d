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


def decode_rgb(data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode to HxWx3 uint8 RGB, EXIF orientation applied. Raises ImageError."""
    # np.array (not asarray) so callers get a writable, C-contiguous array they own.
    return np.array(decode_pil(data, max_pixels), dtype=np.uint8)


def decode_pil(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Same, but returns an RGB PIL image (mode 'RGB'), EXIF orientation applied."""
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

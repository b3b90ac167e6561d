"""Tests for pipeline.images: every defined outcome, with inputs generated in-test."""

from __future__ import annotations

import io
import pickle
import struct
import sys
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline.images import MAX_PIXELS, REASONS, ImageError, check, decode_pil, decode_rgb


def encode(im: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def noise(h: int = 48, w: int = 64) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def reason_of(data: bytes, **kwargs: int) -> str:
    with pytest.raises(ImageError) as info:
        decode_rgb(data, **kwargs)
    assert info.value.reason in REASONS
    assert "\n" not in str(info.value)
    return info.value.reason


def png_with_declared_size(width: int, height: int) -> bytes:
    """A real tiny PNG whose IHDR claims width x height (CRC fixed, so only the size lies)."""
    data = bytearray(encode(Image.new("RGB", (8, 8), (1, 2, 3)), "PNG"))
    # Layout: 8-byte signature, then IHDR: length(4) type(4) data(13) crc(4).
    assert data[12:16] == b"IHDR"
    struct.pack_into(">II", data, 16, width, height)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    return bytes(data)


# -- rejections ---------------------------------------------------------------------


def test_empty() -> None:
    assert reason_of(b"") == "empty"


def test_text_named_jpg_is_not_an_image() -> None:
    assert reason_of(b"this is a caption file, not a photo\n" * 10) == "not_an_image"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_is_rejected_not_grey_filled(fmt: str) -> None:
    data = encode(noise(), fmt)
    assert reason_of(data[: len(data) // 2]) == "truncated"


def test_decompression_bomb_header_is_rejected_before_allocation() -> None:
    bomb = png_with_declared_size(100_000, 100_000)  # 10^10 px, ~30 GB as RGB
    before = _peak_rss_mb()
    start = time.perf_counter()
    assert reason_of(bomb) == "too_large"
    assert time.perf_counter() - start < 1.0
    if before is not None:
        assert _peak_rss_mb() - before < 100


def test_header_above_our_limit_but_below_pils() -> None:
    # 81M pixels: under PIL's own guard, over MAX_PIXELS, so our header check must fire.
    data = png_with_declared_size(9_000, 9_000)
    assert 9_000 * 9_000 > MAX_PIXELS
    with pytest.raises(ImageError, match="9000x9000") as info:
        check(data)
    assert info.value.reason == "too_large"


def test_max_pixels_is_per_call_and_global_is_untouched() -> None:
    pil_limit = Image.MAX_IMAGE_PIXELS
    data = encode(Image.new("RGB", (20, 20)), "PNG")
    assert reason_of(data, max_pixels=399) == "too_large"
    assert decode_rgb(data, max_pixels=400).shape == (20, 20, 3)
    assert decode_rgb(data).shape == (20, 20, 3)
    assert Image.MAX_IMAGE_PIXELS == pil_limit


def test_float_image_is_unsupported() -> None:
    im = Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32))
    assert reason_of(encode(im, "TIFF")) == "unsupported"


def test_corrupt_stream_carries_pil_message_on_one_line() -> None:
    data = bytearray(encode(noise(), "PNG"))
    idat = data.index(b"IDAT")
    data[idat + 20 : idat + 40] = b"\xff" * 20  # IDAT CRC no longer matches
    with pytest.raises(ImageError) as info:
        decode_rgb(bytes(data))
    assert info.value.reason == "not_an_image"
    assert "\n" not in str(info.value) and "broken data stream" in str(info.value)


def test_image_error_pickles_with_reason() -> None:
    err = pickle.loads(pickle.dumps(ImageError("truncated", "cut\nshort")))
    assert err.reason == "truncated"
    assert str(err) == "truncated image data: cut short"
    assert isinstance(err, ValueError)
    with pytest.raises(ValueError):
        ImageError("nope")


# -- conversions --------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_rgb_round_trip(fmt: str) -> None:
    src = noise(48, 64)
    out = decode_rgb(encode(src, fmt))
    assert out.shape == (48, 64, 3) and out.dtype == np.uint8
    assert out.flags.writeable and out.flags.c_contiguous
    if fmt == "PNG":
        np.testing.assert_array_equal(out, np.asarray(src))
    assert check(encode(src, fmt)) == (64, 48)
    pil = decode_pil(encode(src, fmt))
    assert pil.mode == "RGB" and pil.size == (64, 48)


def test_cmyk_jpeg_red_stays_red() -> None:
    cmyk = Image.new("RGB", (16, 16), (255, 0, 0)).convert("CMYK")
    out = decode_rgb(encode(cmyk, "JPEG", quality=95)).astype(int)
    assert np.abs(out - [255, 0, 0]).max() < 12


@pytest.mark.parametrize(
    ("mode", "values", "expected"),
    [
        ("L", [[0, 100, 255]], [0, 100, 255]),
        ("1", [[0, 255, 0]], [0, 255, 0]),
    ],
)
def test_grey_modes_have_equal_channels(mode: str, values: list, expected: list) -> None:
    im = Image.fromarray(np.array(values, dtype=np.uint8)).convert(mode)
    out = decode_rgb(encode(im, "PNG"))
    assert out.shape == (1, 3, 3)
    np.testing.assert_array_equal(out[0], np.repeat(np.array(expected)[:, None], 3, axis=1))


def test_la_composited_on_white() -> None:
    la = Image.fromarray(np.array([[[50, 255], [50, 0]]], dtype=np.uint8), "LA")
    out = decode_rgb(encode(la, "PNG"))
    np.testing.assert_array_equal(out[0], [[50, 50, 50], [255, 255, 255]])


def test_rgba_composited_on_white() -> None:
    px = np.array([[[255, 0, 0, 0], [0, 0, 255, 255], [0, 0, 0, 128]]], dtype=np.uint8)
    out = decode_rgb(encode(Image.fromarray(px, "RGBA"), "PNG")).astype(int)
    np.testing.assert_array_equal(out[0, 0], [255, 255, 255])  # transparent -> white
    np.testing.assert_array_equal(out[0, 1], [0, 0, 255])  # opaque kept
    assert np.abs(out[0, 2] - 127).max() <= 1  # half alpha: halfway to white


def test_palette_transparency_composited_on_white() -> None:
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * (254 * 3))
    pal.putpixel((0, 0), 0)
    pal.putpixel((1, 0), 1)
    out = decode_rgb(encode(pal, "PNG", transparency=0))
    np.testing.assert_array_equal(out[0], [[255, 255, 255], [0, 255, 0]])


def test_16bit_png_is_scaled_not_clipped() -> None:
    im = Image.fromarray(np.array([[0, 257, 32768, 65535]], dtype=np.uint16))
    data = encode(im, "PNG")
    assert Image.open(io.BytesIO(data)).mode in ("I;16", "I")
    out = decode_rgb(data)
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 128, 255])
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


@pytest.mark.parametrize(("orientation", "k"), [(6, -1), (8, 1)])  # 6: 90° CW, 8: 90° CCW
def test_exif_orientation_applied(orientation: int, k: int) -> None:
    # Asymmetric smooth gradient (survives JPEG): red grows left->right, green top->bottom,
    # so any wrong rotation or flip moves the gradients and fails the comparison.
    rows, cols = np.mgrid[0:20, 0:40]
    stored = np.stack([cols * 6, rows * 12, np.full_like(rows, 64)], axis=-1).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif.tobytes())

    out = decode_rgb(data)
    assert out.shape == (40, 20, 3)
    viewer = np.rot90(stored, k=k)  # what an EXIF-aware viewer shows
    assert np.abs(out.astype(int) - viewer.astype(int)).max() < 16
    assert check(data) == (20, 40)


@pytest.mark.parametrize("fmt", ["GIF", "TIFF"])
def test_multi_frame_takes_first(fmt: str) -> None:
    red = Image.new("RGB", (8, 8), (255, 0, 0))
    blue = Image.new("RGB", (8, 8), (0, 0, 255))
    data = encode(red, fmt, save_all=True, append_images=[blue])
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2
    out = decode_rgb(data)
    assert out.shape == (8, 8, 3)
    np.testing.assert_array_equal(out[0, 0], [255, 0, 0])


def _peak_rss_mb() -> float | None:
    if sys.platform.startswith("win"):
        return None
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024

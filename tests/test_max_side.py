"""``imgpipe pack --max-side N`` (#13 item 5): images longer than N stored shrunk, upright,
re-encoded as JPEG; smaller ones byte for byte; ids of the source bytes; settings compared."""

import hashlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import images
from pipeline.data import packing, shardset
from tests.conftest import small_config

MAX_SIDE = 64
# flags matching small_config(data=...) below, so that a CLI rerun sees the same settings
SETTINGS_FLAGS = ["--shard-rows", "24", "--val", "0", "--test", "0"]


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _gradient(w: int, h: int) -> np.ndarray:
    """Red grows left->right, green top->bottom: any rotation or flip shows."""
    rows, cols = np.mgrid[0:h, 0:w]
    return np.stack([cols * 255 // (w - 1), rows * 255 // (h - 1), np.full_like(rows, 64)], -1).astype(np.uint8)


def _source(root) -> dict[str, bytes]:
    """An ImageFolder of two classes; returns {file name: bytes}."""
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 300x150, shown rotated 90° clockwise: 150 wide, 300 tall
    files = {
        "a/landscape.jpg": _encode(Image.fromarray(_gradient(300, 200)), "JPEG", quality=95),
        "a/portrait.jpg": _encode(Image.fromarray(_gradient(97, 301)), "JPEG", quality=95),
        "a/rotated.jpg": _encode(Image.fromarray(_gradient(300, 150)), "JPEG", quality=95, exif=exif.tobytes()),
        "b/small.jpg": _encode(Image.fromarray(_gradient(40, 30)), "JPEG", quality=95),
        "b/exact.png": _encode(Image.fromarray(_gradient(MAX_SIDE, 20)), "PNG"),
        "b/alpha.png": _encode(Image.new("RGBA", (200, 100), (255, 0, 0, 0)), "PNG"),  # fully transparent
    }
    for name, data in files.items():
        os.makedirs(root / os.path.dirname(name), exist_ok=True)
        (root / name).write_bytes(data)
    return files


@pytest.fixture(scope="module")
def packed_small(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("max_side")
    files = _source(root / "src")
    dst = str(root / "dst")
    cfg = small_config(data={"val_fraction": 0.0, "test_fraction": 0.0, "max_side": MAX_SIDE})
    packing.pack(str(root / "src"), dst, cfg, quiet=True)
    m = shardset.read_manifest(dst)
    rows = {os.path.relpath(r["source"], root / "src"): r
            for t in shardset.iter_split(m, "train") for r in t.to_pylist()}
    return root, files, m, rows


def _pack_cli(src: str, dst: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", "--quiet", "pack", src, dst, *extra],
                          capture_output=True, text=True, timeout=300)


def test_pack_max_side_round_trip(packed_small):
    _, files, m, rows = packed_small
    assert set(rows) == set(files)
    assert m.raw["max_side"] == MAX_SIDE == m.max_side and m.raw["jpeg_quality"] == images.SHRINK_QUALITY
    for name, data in files.items():
        row = rows[name]
        assert row["image_id"] == hashlib.sha256(data).hexdigest()  # the SOURCE's bytes: copies still found
        w, h = images.check(data)  # as shown (EXIF applied)
        stored = Image.open(io.BytesIO(row["image"]))
        if max(w, h) <= MAX_SIDE:
            assert row["image"] == data, name  # byte for byte
            continue
        assert stored.format == "JPEG" and max(stored.size) == MAX_SIDE, (name, stored.size)
        scale = MAX_SIDE / max(w, h)
        assert abs(stored.width - w * scale) <= 1 and abs(stored.height - h * scale) <= 1, (name, stored.size)
        assert stored.getexif().get(0x0112, 1) == 1, name  # pixels upright, no orientation left to apply


def test_exif_rotated_image_is_stored_upright(packed_small):
    _, _, _, rows = packed_small
    stored = Image.open(io.BytesIO(rows["a/rotated.jpg"]["image"]))
    assert stored.size == (32, 64)  # 300x150 shown as 150x300, shrunk to 64 on the long side
    upright = np.rot90(_gradient(300, 150), k=-1)  # what a viewer shows for orientation 6
    want = np.asarray(Image.fromarray(np.ascontiguousarray(upright)).resize((32, 64), Image.Resampling.LANCZOS))
    got = np.asarray(stored.convert("RGB"))  # raw pixels, no EXIF step: already upright
    assert np.abs(got.astype(int) - want.astype(int)).mean() < 4


def test_transparent_png_is_shrunk_onto_white(packed_small):
    _, _, _, rows = packed_small
    out = images.decode_rgb(rows["b/alpha.png"]["image"])
    assert out.shape == (32, 64, 3) and out.min() >= 250  # composited on white, as decode_rgb does


def test_repack_same_max_side_is_a_no_op_other_exits_2(packed_small):
    root, _, _, _ = packed_small
    src, dst = str(root / "src"), str(root / "dst")
    same = _pack_cli(src, dst, *SETTINGS_FLAGS, "--max-side", str(MAX_SIDE))
    assert same.returncode == 0, same.stderr[-2000:]
    assert json.loads(same.stdout.strip().splitlines()[-1])["already_committed"] is True
    for other in (["--max-side", "32"], []):  # another size, and none (0: full size)
        r = _pack_cli(src, dst, *SETTINGS_FLAGS, *other)
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
        assert "max_side" in lines[0] and "other settings" in lines[0], lines[0]


def test_negative_max_side_exits_2_naming_the_flag(tmp_path):
    (tmp_path / "src" / "a").mkdir(parents=True)
    r = _pack_cli(str(tmp_path / "src"), str(tmp_path / "dst"), "--max-side", "-1")
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "--max-side" in lines[0], r.stderr[-2000:]
    assert not (tmp_path / "dst").exists()


def test_manifest_without_max_side_counts_as_full_size(tmp_path):
    """A dataset packed before --max-side existed holds full-size images: packing into it
    with --max-side is another setting, not a no-op."""
    dst = tmp_path / "old"
    dst.mkdir()
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    manifest = {"format": 1, "classes": ["a", "b"], "splits": {"train": [], "val": [], "test": []},
                "source": str(src), "seed": 0, "fractions": {"val": 0.0, "test": 0.0}, "shard_rows": 24}
    (dst / "manifest.json").write_text(json.dumps(manifest))
    r = _pack_cli(str(src), str(dst), *SETTINGS_FLAGS, "--max-side", "32")
    assert r.returncode == 2 and "max_side 0 (committed) vs 32" in r.stderr, r.stderr[-2000:]


# ------------------------------------- decode lever: reduced-size JPEG decoding (opt-in)


def test_draft_decode_keeps_min_size_and_matches_full_decode_after_resize():
    """``decode_pil(min_size=S)`` decodes a JPEG at 1/2..1/8 scale with both sides >= S;
    resized to S x S it matches the full decode resized alike (pixels equivalent up to
    resampling). EXIF orientation still applies; other formats decode in full."""
    from torchvision.transforms import v2

    rng = np.random.default_rng(0)
    photo = np.clip(_gradient(400, 300).astype(int) + rng.integers(-12, 13, (300, 400, 3)), 0, 255).astype(np.uint8)
    data = _encode(Image.fromarray(photo), "JPEG", quality=90)
    size = 48
    small = images.decode_pil(data, min_size=size)
    assert small.size == (100, 75)  # 1/4 scale: 300 // 48 = 6 -> the largest of 8, 4, 2, 1 that fits
    resize = v2.Resize((size, size), antialias=True)
    to_chw = lambda im: resize(torch.from_numpy(np.asarray(im)).permute(2, 0, 1)).int()  # noqa: E731
    diff = (to_chw(small) - to_chw(images.decode_pil(data))).abs()
    assert float(diff.float().mean()) < 2.0 and int(diff.max()) < 32
    assert images.decode_pil(data, min_size=301).size == (400, 300)  # no reduction keeps both sides >= 301
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = _encode(Image.fromarray(photo), "JPEG", quality=90, exif=exif.tobytes())
    assert images.decode_pil(rotated, min_size=size).size == (75, 100)
    assert images.decode_pil(_encode(Image.fromarray(photo), "PNG"), min_size=size).size == (400, 300)

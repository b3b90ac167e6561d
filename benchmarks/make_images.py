"""Synthetic JPEGs with natural-image statistics, as an ImageFolder (``<class>/<id>.jpg``).

Each image is smooth content (a low-resolution random colour field upsampled, plus a
few soft-edged ellipses whose hue and position depend on the class, so a model can
learn the classes) plus texture (1/f "pink" noise, the amplitude spectrum of natural
photos). ``--size large``: 500x375 at JPEG quality 90, about 60 KB, like an ImageNet
photo; ``--size small``: 32x32 (rendered at 64x64 and downsampled), about 1 KB.

    python benchmarks/make_images.py DST --n 1000 [--size small|large] [--classes 10]
    python benchmarks/make_images.py s3://bucket/images --n 1000 --s3   # moto on 127.0.0.1

Images are deterministic in (seed, index). Local folders are cached: generating again
into a folder that already holds the same set (``.complete`` marker) is free.
"""

from __future__ import annotations

import io
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from multiprocessing import get_context

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

SIZES = {"large": (500, 375), "small": (32, 32)}
QUALITY = 90
TEXTURE_BANK = 6  # pink-noise tiles per process, cropped at random offsets


def _pink(rng: np.random.Generator, h: int, w: int, alpha: float = 1.0) -> np.ndarray:
    """3-channel 1/f^alpha noise (amplitude), zero mean, unit std per channel."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    f = np.sqrt(fx * fx + fy * fy)
    f[0, 0] = 1.0
    amp = 1.0 / f**alpha
    amp[0, 0] = 0.0
    spec = (rng.standard_normal((3, h, fx.shape[1])) + 1j * rng.standard_normal((3, h, fx.shape[1]))) * amp
    img = np.fft.irfft2(spec, s=(h, w)).astype(np.float32)
    img -= img.mean(axis=(1, 2), keepdims=True)
    img /= img.std(axis=(1, 2), keepdims=True) + 1e-6
    return img.transpose(1, 2, 0)


_BANK: dict[tuple[int, int], list[np.ndarray]] = {}


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    key = (h, w)
    if key not in _BANK:
        brng = np.random.default_rng(12345)
        _BANK[key] = [_pink(brng, 2 * h, 2 * w) for _ in range(TEXTURE_BANK)]
    tile = _BANK[key][int(rng.integers(TEXTURE_BANK))]
    y, x = int(rng.integers(h)), int(rng.integers(w))
    t = tile[y:y + h, x:x + w]
    if rng.random() < 0.5:
        t = t[:, ::-1]
    # photos' texture is mostly luminance: channels strongly correlated, a little chroma
    return 0.9 * t[:, :, :1] + 0.35 * t


def render(index: int, label: int, classes: int, size: str, seed: int = 0) -> bytes:
    """The JPEG bytes of image ``index`` of class ``label``."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng([seed, index])
    w, h = SIZES[size]
    rw, rh = (64, 64) if size == "small" else (w, h)
    # smooth content: a coarse colour field, upsampled
    coarse = rng.integers(40, 216, size=(3, 4, 3), dtype=np.uint8)
    base = Image.fromarray(coarse, "RGB").resize((rw, rh), Image.BICUBIC)
    draw = ImageDraw.Draw(base)
    hue = label / classes
    for k in range(int(rng.integers(2, 5))):
        cx, cy = rng.uniform(0.2, 0.8) * rw, rng.uniform(0.2, 0.8) * rh
        if k == 0:  # the class's object: hue and place depend on the label
            cx = rw * (0.25 + 0.5 * ((label * 0.37) % 1.0))
        r = rng.uniform(0.12, 0.35) * min(rw, rh)
        col = _hsv(hue if k == 0 else rng.random(), rng.uniform(0.5, 1.0), rng.uniform(0.5, 1.0))
        draw.ellipse([cx - r, cy - r * rng.uniform(0.6, 1.4), cx + r, cy + r * rng.uniform(0.6, 1.4)], fill=col)
    base = base.filter(ImageFilter.GaussianBlur(radius=max(1.0, min(rw, rh) / 120)))
    img = np.asarray(base, dtype=np.float32)
    img += _texture(rng, rh, rw) * rng.uniform(10, 17)  # texture: 1/f noise
    out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    if (rw, rh) != (w, h):
        out = out.resize((w, h), Image.LANCZOS)
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=QUALITY)
    return buf.getvalue()


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    import colorsys

    r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
    return int(r * 255), int(g * 255), int(b * 255)


def rel_path(index: int, classes: int) -> str:
    return f"c{index % classes:02d}/{index:07d}.jpg"


def _render_chunk(args: tuple[int, int, int, str, int]) -> list[bytes]:
    start, stop, classes, size, seed = args
    return [render(i, i % classes, classes, size, seed) for i in range(start, stop)]


def generate(n: int, size: str = "small", classes: int = 10, seed: int = 0, workers: int | None = None):
    """Yield (relative path, jpeg bytes) for images 0..n-1, rendered in a process pool."""
    workers = workers or os.cpu_count() or 1
    chunk = 256 if size == "small" else 16
    jobs = [(s, min(n, s + chunk), classes, size, seed) for s in range(0, n, chunk)]
    if workers == 1 or n <= chunk:
        for j in jobs:
            for i, data in zip(range(j[0], j[1]), _render_chunk(j)):
                yield rel_path(i, classes), data
        return
    # spawn, not fork: a fork while another thread holds a lock (the PeakRSS sampler,
    # s3fs's event loop) can deadlock the children
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        for j, blobs in zip(jobs, pool.map(_render_chunk, jobs)):
            for i, data in zip(range(j[0], j[1]), blobs):
                yield rel_path(i, classes), data


def write_local(dst: str, n: int, size: str = "small", classes: int = 10, seed: int = 0) -> dict:
    """Write (or reuse) an ImageFolder of ``n`` images under local folder ``dst``."""
    marker = os.path.join(dst, ".complete")
    want = {"n": n, "size": size, "classes": classes, "seed": seed}
    if os.path.exists(marker):
        with open(marker) as f:
            have = json.load(f)
        if {k: have.get(k) for k in want} == want:
            return have
    total = 0
    for c in range(min(n, classes)):
        os.makedirs(os.path.join(dst, f"c{c:02d}"), exist_ok=True)
    for rel, data in generate(n, size, classes, seed):
        with open(os.path.join(dst, rel), "wb") as f:
            f.write(data)
        total += len(data)
    info = {**want, "bytes": total, "mean_kb": round(total / max(n, 1) / 1e3, 2)}
    with open(marker, "w") as f:
        json.dump(info, f)
    return info


def upload(src_dir: str, dst: str, n: int, classes: int = 10, threads: int = 32) -> None:
    """Copy a local ImageFolder made by :func:`write_local` to ``dst`` (s3://...)."""
    from pipeline import storage

    def put(i: int) -> None:
        rel = rel_path(i, classes)
        with open(os.path.join(src_dir, rel), "rb") as f:
            storage.write_bytes(storage.join(dst, rel), f.read())

    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(put, range(n)):
            pass


def cache_dir(n: int, size: str, classes: int = 10, seed: int = 0) -> str:
    """A persistent local cache of a generated set (``$IMGPIPE_BENCH_CACHE`` or /tmp)."""
    root = os.environ.get("IMGPIPE_BENCH_CACHE", os.path.join("/tmp", "imgpipe-bench-images"))
    return os.path.join(root, f"{size}-n{n}-c{classes}-s{seed}")


def images(n: int, size: str, classes: int = 10, seed: int = 0) -> str:
    """A local ImageFolder of this set, generated once and cached."""
    d = cache_dir(n, size, classes, seed)
    write_local(d, n, size, classes, seed)
    return d


def main(argv: list[str] | None = None) -> None:
    p = common.parser(__doc__.splitlines()[0], default_n=1000, smoke_n=200)
    p.add_argument("dst", nargs="?", default=None, help="local folder or s3://bucket/prefix")
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    args = common.parse(p, argv)
    dst = args.dst or os.path.join(args.workdir, "images")
    extra: dict = {}
    with common.PeakRSS() as mem, common.Timer() as t:
        if dst.startswith("s3://"):
            local = images(args.n, args.size, args.classes, args.seed)
            with common.MotoS3() as s3:
                s3.bucket(dst[5:].split("/", 1)[0])
                with common.Timer() as tu:
                    upload(local, dst, args.n, args.classes)
            with open(os.path.join(local, ".complete")) as f:
                info = json.load(f)
            extra = {"upload_images_per_second": common.rate(args.n, tu.seconds),
                     "note": "the moto server lives only as long as this command"}
        else:
            info = write_local(dst, args.n, args.size, args.classes, args.seed)
    # Not a comparison: the generator's own rate (a cached set is reused: rate is then huge).
    common.emit({"name": f"make_images_{args.size}", "ours_images_per_second": common.rate(args.n, t.seconds),
                 "baseline_images_per_second": None, "ratio": None, **mem.result(), "n": args.n,
                 "dst": dst, "seconds": round(t.seconds, 2), **info, **extra}, args)

if __name__ == "__main__":
    main()

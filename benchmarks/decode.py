"""Decode levers: CPU seconds per image to turn JPEG bytes into the model's input pixels.

Not an ours-vs-baseline comparison: each lever against plain PIL decoding, on one core
(``torch.set_num_threads(1)``, as one augment actor runs), measured as this process's
CPU time (user + sys, ``time.process_time``: what a loaded machine disturbs least).

Levers, each timed twice: decode only, and decode + the eval resize to ``S`` x ``S``
(``v2.Resize((S, S), antialias=True)``, what the non-imagenet presets do first):

- ``pil``: :func:`pipeline.images.decode_rgb` (what training and scoring use today);
- ``pil_draft``: the same with ``min_size=S`` (JPEG decoded at 1/2..1/8 scale in
  libjpeg's DCT when both sides stay >= S); its ``max_abs_diff`` / ``mean_abs_diff``
  are against ``pil`` after the resize, in 0..255 levels;
- ``tv_batch``: ``torchvision.io.decode_jpeg`` on a list of ``--batch`` CPU tensors.

Image sets: ``large`` (500x375, make_images.py ``--size large``), and the same images
as ``imgpipe pack --max-side M`` stores them (:func:`pipeline.images.shrink`).

    python benchmarks/decode.py [--n 200] [--resize-to 32,64,128,224] [--max-side 256]
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import make_images  # noqa: E402

sys.path.insert(0, str(common.ROOT))
from pipeline import images  # noqa: E402


def cpu_seconds(repeat: int, fn: Callable[..., object], *args: object) -> float:
    """Least process CPU time of ``repeat`` calls of ``fn(*args)`` (the least is the least disturbed)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.process_time()
        fn(*args)
        best = min(best, time.process_time() - t0)
    return best


def pil(blobs: list[bytes], size: int = 0, resize: v2.Resize | None = None) -> list[torch.Tensor]:
    out = []
    for b in blobs:
        t = torch.from_numpy(images.decode_rgb(b, min_size=size)).permute(2, 0, 1)
        out.append(resize(t) if resize else t)
    return out


def tv_batch(blobs: list[bytes], batch: int, resize: v2.Resize | None = None) -> list[torch.Tensor]:
    out = []
    for start in range(0, len(blobs), batch):
        data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs[start:start + batch]]
        decoded = decode_jpeg(data, mode=ImageReadMode.RGB)
        out += [resize(t) for t in decoded] if resize else decoded
    return out


def measure(name: str, blobs: list[bytes], sizes: list[int], batch: int, repeat: int) -> list[dict]:
    n = len(blobs)
    per = lambda s: round(s / n * 1e3, 3)  # noqa: E731 - ms of CPU per image
    first = images.decode_pil(blobs[0])
    rows = [{"set": name, "image": f"{first.width}x{first.height}",
             "kb": round(sum(map(len, blobs)) / n / 1e3, 1), "size": "-", "resize": False,
             "pil_ms": per(cpu_seconds(repeat, pil, blobs)),
             "pil_draft_ms": None,
             "tv_batch_ms": per(cpu_seconds(repeat, tv_batch, blobs, batch))}]
    for s in sizes:
        resize = v2.Resize((s, s), antialias=True)
        plain, drafted = pil(blobs, 0, resize), pil(blobs, s, resize)
        diff = [(a.int() - b.int()).abs() for a, b in zip(plain, drafted)]
        drafted_size = images.decode_pil(blobs[0], min_size=s).size
        rows.append({"set": name, "image": f"{first.width}x{first.height}", "kb": rows[0]["kb"],
                     "size": s, "resize": True, "draft_decodes": f"{drafted_size[0]}x{drafted_size[1]}",
                     "pil_ms": per(cpu_seconds(repeat, pil, blobs, 0, resize)),
                     "pil_draft_ms": per(cpu_seconds(repeat, pil, blobs, s, resize)),
                     "tv_batch_ms": per(cpu_seconds(repeat, tv_batch, blobs, batch, resize)),
                     "max_abs_diff": int(max(int(d.max()) for d in diff)),
                     "mean_abs_diff": round(float(np.mean([d.float().mean() for d in diff])), 3)})
    return rows


def table(rows: list[dict]) -> str:
    head = ("| set | stored | KB | resize to | draft decodes | PIL ms | PIL+draft ms | decode_jpeg batch ms "
            "| draft vs PIL (max / mean abs) |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    lines = [head]
    for r in rows:
        diff = f"{r['max_abs_diff']} / {r['mean_abs_diff']}" if r.get("resize") else "-"
        lines.append(f"| {r['set']} | {r['image']} | {r['kb']} | {r['size']} | {r.get('draft_decodes', '-')} "
                     f"| {r['pil_ms']} | {r['pil_draft_ms'] if r['pil_draft_ms'] is not None else '-'} "
                     f"| {r['tv_batch_ms']} | {diff} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = common.parser(__doc__.splitlines()[0], default_n=200, smoke_n=16)
    p.add_argument("--resize-to", default="32,64,128,224", help="resize targets S (comma separated)")
    p.add_argument("--max-side", type=int, default=256, help="the packed set's --max-side")
    p.add_argument("--batch", type=int, default=64, help="images per decode_jpeg call")
    p.add_argument("--timing-repeat", type=int, default=3, help="timed passes per lever; the least counts")
    args = common.parse(p, argv)
    torch.set_num_threads(1)  # one core, as one augment actor
    sizes = [int(s) for s in args.resize_to.split(",") if s.strip()]
    src = make_images.images(args.n, "large")
    large = []
    for i in range(args.n):
        with open(os.path.join(src, make_images.rel_path(i, 10)), "rb") as f:
            large.append(f.read())
    packed = [images.shrink(b, args.max_side) for b in large]
    rows = (measure("large", large, sizes, args.batch, args.timing_repeat)
            + measure(f"--max-side {args.max_side}", packed, sizes, args.batch, args.timing_repeat))
    common.log("\n" + table(rows))
    common.emit({"name": "decode_levers", "ours_images_per_second": None, "baseline_images_per_second": None,
                 "ratio": None, "n": args.n, "batch": args.batch, "unit": "CPU ms per image, one thread",
                 "rows": rows}, args)


if __name__ == "__main__":
    main()

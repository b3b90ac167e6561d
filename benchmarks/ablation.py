"""Augmentation and transfer ablation on few labels: a 2x2 of init x augmentation.

On the real handwritten digits of scikit-learn (8x8, 10 classes), at each ``--per-class``
(labelled training images per class) and each seed, EfficientNet-Lite0
(:class:`pipeline.models.pretrained.EfficientNetLite0`) is trained four times:

- init ``imagenet`` (the packaged ``efficientnet_lite0:imagenet`` weights, head replaced)
  or ``scratch`` (random init), crossed with
- augment ``on`` (the project's digits training transform,
  :class:`pipeline.transforms.TrainPreset` with ``augment.preset: digits``: resize to
  ``--size``, random crop after zero padding, random rotation) or ``off`` (the eval
  transform, :class:`pipeline.transforms.EvalPreset`: resize only).

Everything else is fixed per seed: the images (the same uint8 pixels
:func:`pipeline.data.digits.write_digits` packs: ``rint(v * 255 / 16)``, grey to RGB), the
test set and training draw (:func:`transfer.split`: ``--test-per-class`` fixed test digits
per class, the training subset drawn by seed), the model's random init (``torch.manual_seed``
of the seed), the batch order, and the schedule of ``transfer.py`` (AdamW with weight decay
0.01 on weights, 1 epoch linear warmup + cosine, label smoothing 0.1, BatchNorm momentum
0.1). Inputs are normalized with ImageNet's mean/std in all four cells
(:func:`pipeline.transforms.to_input`). Test images go through the eval transform.

Augmentation is seeded as in the pipeline: each image's draws come from
``(seed, epoch, image_id)`` (:func:`pipeline.transforms.augment_one`), so a cell is
reproducible; the global RNG state is saved and restored around it, so the model's own
draws (dropout) are the same stream with augmentation on and off. The recipe's padding
is 2 px at its 16 px (a shift of up to 1/8 of the side); ``--pad`` defaults to the same
fraction of ``--size`` (8 px at 64 px). Rotation is the recipe's 10 degrees.

Plain PyTorch in-process, one thread by default (this is about accuracy, not Ray or speed).
One JSON line per cell (per-class x init x augment) on stdout, appended to
``benchmarks/results.jsonl`` (``--results``); the markdown table on stderr at the end::

    python benchmarks/ablation.py --per-class 10 50 --epochs 15 --size 64 --seeds 0 1 2

``--smoke``: 2 images per class, 1 epoch, 32 px, seed 0, 5 test images per class; it
appends only where ``--results`` points.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits

from pipeline import transforms
from pipeline.config import AugmentConfig
from pipeline.models import pretrained
from pipeline.models import zoo as models

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import transfer  # noqa: E402  (the sibling script: same split and machine line)

RESULTS = Path(__file__).resolve().parent / "results.jsonl"
NAME = "ablation_efficientnet_lite0_digits"
RECIPE_SIZE = 16  # px: the digits recipe's image size, which its pad is relative to
INITS, AUGMENTS = ("imagenet", "scratch"), ("on", "off")

# a batch's training images as normalized model input: (indices into the dataset, epoch) -> float
Inputs = Callable[[torch.Tensor, int], torch.Tensor]


def digits_uint8() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as uint8 (N, 3, 8, 8) RGB, the pixels the digits dataset packs, and labels."""
    d = load_digits()
    pixels = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    x = torch.from_numpy(pixels)[:, None].repeat(1, 3, 1, 1).contiguous()
    return x, torch.from_numpy(d.target.astype(np.int64))


def normalize(u8: torch.Tensor) -> torch.Tensor:
    return transforms.to_input(u8, list(pretrained.IMAGENET_MEAN), list(pretrained.IMAGENET_STD),
                               torch.device("cpu"))


def make_inputs(raw: torch.Tensor, evaluated: torch.Tensor, augment: str, cfg: AugmentConfig,
                size: int, seed: int) -> Inputs:
    """Training inputs: the eval-transformed images (``off``) or the project's train
    transform applied per image, seeded from ``(seed, epoch, image_id)`` (``on``)."""
    if augment == "off":
        return lambda idx, epoch: evaluated[idx]
    preset = transforms.TrainPreset(cfg, size)

    def augmented(idx: torch.Tensor, epoch: int) -> torch.Tensor:
        state = torch.random.get_rng_state()  # augment_one reseeds the global CPU generator
        out = torch.stack([transforms.augment_one(preset, raw[i], seed, epoch, f"digits/{int(i):04d}")
                           for i in idx])
        torch.random.set_rng_state(state)
        return normalize(out)

    return augmented


def new_model(init: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = pretrained.EfficientNetLite0(10, bn_momentum=0.1)
    if init == "imagenet":
        models.load_pretrained(model, pretrained.load_for(pretrained.LITE0_SPEC, "efficientnet_lite0"),
                               pretrained.LITE0_SPEC)
    return model


def optimizer(model: torch.nn.Module, lr: float, epochs: int, steps_per_epoch: int):
    """AdamW (decay on weights only) with one epoch of linear warmup, then cosine to 0."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    total, warmup = epochs * steps_per_epoch, steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup
        else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))))
    return opt, sched


def train_eval(inputs: Inputs, evaluated: torch.Tensor, y: torch.Tensor, tr: np.ndarray, te: np.ndarray,
               *, init: str, epochs: int, batch: int, lr: float, seed: int) -> tuple[float, float]:
    """Train on ``tr`` (inputs from ``inputs``), return (test accuracy on ``te``, seconds)."""
    start = time.perf_counter()
    model = new_model(init, seed)
    opt, sched = optimizer(model, lr, epochs, math.ceil(len(tr) / batch))
    gen = torch.Generator().manual_seed(seed)  # batch order: the same in all four cells
    tr_t = torch.from_numpy(tr)
    for epoch in range(epochs):
        model.train()
        order = tr_t[torch.randperm(len(tr), generator=gen)]
        for i in range(0, len(tr), batch):
            b = order[i:i + batch]
            if len(b) < 2:  # BatchNorm needs more than one sample
                continue
            transfer.train_step(model, opt, sched, inputs(b, epoch), y[b])
    return transfer.held_out_accuracy(model, evaluated, y, te), time.perf_counter() - start


def cell_row(args: argparse.Namespace, per_class: int, init: str, augment: str, accs: list[float],
             seconds: float, test_images: int, cfg: AugmentConfig) -> dict:
    a = np.asarray(accs)
    return {"name": NAME, "images_per_class": per_class, "init": init, "augment": augment,
            "accuracy_mean": round(float(a.mean()), 4),
            "accuracy_std": round(float(a.std(ddof=1)), 4) if len(a) > 1 else 0.0,  # sample std
            "accuracy_min": round(float(a.min()), 4), "accuracy_max": round(float(a.max()), 4),
            "per_seed": accs, "seeds": args.seeds, "seconds": round(seconds, 1),
            "epochs": args.epochs, "test_images": test_images, "image_size": args.size,
            "batch": args.batch, "lr": args.lr,
            "augment_recipe": {"preset": cfg.preset, "pad": cfg.pad, "rotation": cfg.rotation},
            "weights": pretrained.LITE0_SPEC if init == "imagenet" else None,
            "machine": transfer.machine(), "command": "python benchmarks/ablation.py " + " ".join(sys.argv[1:]),
            "mode": "smoke" if args.smoke else "full", "date": time.strftime("%Y-%m-%dT%H:%M:%S")}


def markdown(rows: list[dict]) -> str:
    lines = ["| labels per class | init | augment | mean test acc | spread (min–max) | std | seeds | seconds |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['images_per_class']} | {r['init']} | {r['augment']} | {r['accuracy_mean']:.3f} "
                     f"| {r['accuracy_min']:.3f}–{r['accuracy_max']:.3f} | {r['accuracy_std']:.3f} "
                     f"| {len(r['seeds'])} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--per-class", type=int, nargs="+", default=[10, 50])
    ap.add_argument("--test-per-class", type=int, default=30)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--pad", type=int, default=None,
                    help="px of padding before the random crop (default: the recipe's 2 px at 16 px, scaled)")
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--smoke", action="store_true", help="a tiny run: the script works, numbers mean nothing")
    ap.add_argument("--results", type=Path, default=None,
                    help=f"JSON lines file appended to (default {RESULTS.name} here; --smoke: none)")
    ap.add_argument("--no-append", action="store_true", help="print only; do not append to --results")
    args = ap.parse_args(argv)
    if args.smoke:
        args.per_class, args.epochs, args.size, args.seeds, args.test_per_class = [2], 1, 32, [0], 5
    if args.results is None:
        args.results = None if args.smoke else RESULTS
    args.no_append = args.no_append or args.results is None
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    defaults = AugmentConfig()  # the digits recipe (preset digits, pad 2 at 16 px, rotation 10)
    pad = args.pad if args.pad is not None else round(defaults.pad * args.size / RECIPE_SIZE)
    cfg = AugmentConfig(preset="digits", pad=pad, rotation=defaults.rotation, hflip=False)
    raw, y = digits_uint8()
    evaluated = normalize(torch.stack([transforms.EvalPreset(cfg, args.size)(img) for img in raw]))
    rows = []
    for per_class in args.per_class:
        accs = {(i, a): [] for i in INITS for a in AUGMENTS}
        secs = dict.fromkeys(accs, 0.0)
        for seed in args.seeds:
            tr, te = transfer.split(y, args.test_per_class, per_class, seed)
            for init, augment in accs:
                inputs = make_inputs(raw, evaluated, augment, cfg, args.size, seed)
                acc, s = train_eval(inputs, evaluated, y, tr, te, init=init, epochs=args.epochs,
                                    batch=args.batch, lr=args.lr, seed=seed)
                accs[init, augment].append(acc)
                secs[init, augment] += s
                print(f"per_class={per_class} seed={seed} init={init} augment={augment}: "
                      f"acc {acc:.4f} in {s:.0f} s", file=sys.stderr, flush=True)
        for init, augment in accs:
            row = cell_row(args, per_class, init, augment, accs[init, augment], secs[init, augment],
                           len(te), cfg)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if not args.no_append:
                with open(args.results, "a") as f:
                    f.write(json.dumps(row) + "\n")
    print(markdown(rows), file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()

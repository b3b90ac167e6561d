"""Transfer learning on few labels: ImageNet EfficientNet-Lite0 fine-tuned vs trained from scratch.

The real handwritten digits of scikit-learn (8x8, 10 classes) are upsampled to ``--size``
px RGB; a fixed stratified test set (``--test-per-class`` per class) is held out, and
``--per-class`` labelled images per class are drawn from the rest for training. Both
runs use the same architecture (:class:`pipeline.models.pretrained.EfficientNetLite0`), the same
schedule (AdamW, warmup + cosine, random shifts, same seed) and differ only in the
initial weights: the packaged ImageNet weights (``efficientnet_lite0:imagenet``, head
replaced) or random init. BatchNorm momentum is 0.1 in both (the reference's 0.01 leaves
the running statistics stale after a few dozen steps).

Plain PyTorch in-process (this is about the weights, not Ray). One JSON line per
(images per class) on stdout, appended to ``benchmarks/results.jsonl``::

    python benchmarks/transfer.py --per-class 10 20 --epochs 15 --size 64 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from pipeline.models import pretrained
from pipeline.models import zoo as models

RESULTS = Path(__file__).resolve().parent / "results.jsonl"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cpus, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def digits_tensors(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as ImageNet-normalized (N, 3, size, size) float32, and labels."""
    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    mean = torch.tensor(pretrained.IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(pretrained.IMAGENET_STD)[:, None, None]
    return (x - mean) / std, torch.from_numpy(d.target.astype(np.int64))


def split(labels: torch.Tensor, test_per_class: int, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed test indices (seed 0) and ``per_class`` training indices per class (``seed``)."""
    y = labels.numpy()
    fixed, rng = np.random.default_rng(0), np.random.default_rng(1000 + seed)
    test, train = [], []
    for c in range(10):
        idx = fixed.permutation(np.flatnonzero(y == c))
        test.append(idx[:test_per_class])
        train.append(rng.permutation(idx[test_per_class:])[:per_class])
    return np.concatenate(train), np.concatenate(test)


def shift(x: torch.Tensor, max_px: int, gen: torch.Generator) -> torch.Tensor:
    """Random per-image translation by up to ``max_px`` (padding with the background)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_px,) * 4, mode="replicate")
    dx = torch.randint(0, 2 * max_px + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * max_px + 1, (n,), generator=gen)
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def train_eval(x: torch.Tensor, y: torch.Tensor, tr: np.ndarray, te: np.ndarray, *, init: str,
               epochs: int, batch: int, lr: float, seed: int) -> tuple[float, float]:
    """Train on ``tr`` and return (test accuracy, seconds)."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    model = pretrained.EfficientNetLite0(10, bn_momentum=0.1)
    if init == "imagenet":
        models.load_pretrained(model, pretrained.load_for(pretrained.LITE0_SPEC, "efficientnet_lite0"),
                               pretrained.LITE0_SPEC)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    steps_per_epoch = math.ceil(len(tr) / batch)
    total = epochs * steps_per_epoch
    warmup = min(steps_per_epoch, total // 2)  # one epoch, or half a 1-epoch run (cosine needs steps after it)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))))
    gen = torch.Generator().manual_seed(seed)
    xtr, ytr = x[tr], y[tr]
    max_px = max(1, x.shape[-1] // 16)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(tr), generator=gen)
        for i in range(0, len(tr), batch):
            b = order[i:i + batch]
            if len(b) < 2:  # BatchNorm needs more than one sample
                continue
            train_step(model, opt, sched, shift(xtr[b], max_px, gen), ytr[b])
    return held_out_accuracy(model, x, y, te), time.perf_counter() - start


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any, x: torch.Tensor,
               y: torch.Tensor) -> None:
    """One optimizer step on a batch (label smoothing 0.1) and one schedule step."""
    loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()


def held_out_accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, te: np.ndarray) -> float:
    """Accuracy of ``model`` (put in eval mode) on rows ``te`` of ``x``, in batches of 256."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(te), 256):
            b = torch.as_tensor(te[i:i + 256])
            correct += int((model(x[b]).argmax(1) == y[b]).sum())
    return correct / len(te)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--per-class", type=int, nargs="+", default=[10, 20])
    ap.add_argument("--test-per-class", type=int, default=30)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=1)  # 1 beats 2 on a busy 2-core box
    ap.add_argument("--no-append", action="store_true", help="print only; do not append to results.jsonl")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x, y = digits_tensors(args.size)
    for per_class in args.per_class:
        fine, scratch, secs = [], [], {"imagenet": 0.0, "scratch": 0.0}
        for seed in args.seeds:
            tr, te = split(y, args.test_per_class, per_class, seed)
            for init, accs in (("imagenet", fine), ("scratch", scratch)):
                acc, s = train_eval(x, y, tr, te, init=init, epochs=args.epochs, batch=args.batch,
                                    lr=args.lr, seed=seed)
                accs.append(acc)
                secs[init] += s
        row = {"name": "transfer_efficientnet_lite0_digits",
               "accuracy_finetune": round(float(np.mean(fine)), 4),
               "accuracy_scratch": round(float(np.mean(scratch)), 4),
               "images_per_class": per_class, "epochs": args.epochs,
               "seconds": round(secs["imagenet"] + secs["scratch"], 1),
               "seconds_finetune": round(secs["imagenet"], 1), "seconds_scratch": round(secs["scratch"], 1),
               "per_seed_finetune": fine, "per_seed_scratch": scratch, "seeds": args.seeds,
               "test_images": len(te), "image_size": args.size, "batch": args.batch, "lr": args.lr,
               "weights": pretrained.LITE0_SPEC, "machine": machine(),
               "date": time.strftime("%Y-%m-%dT%H:%M:%S")}
        line = json.dumps(row)
        print(line, flush=True)
        if not args.no_append:
            with open(RESULTS, "a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()

"""train: end-to-end training. imgpipe's Ray Train run vs a plain PyTorch script.

Ours: :func:`pipeline.training.driver.run` on packed shards: Ray Data (shard read -> augment actor
pool) -> Ray Train ``TorchTrainer`` workers, per-epoch validation and checkpoint, then
the test evaluation and the run report, on a local Ray instance of ``--cpus`` CPUs.
``--workers`` Ray Train workers (default 1: one training process, like the baseline;
``--workers 2`` is imgpipe's default DDP shape); ``--set k=v`` overrides ours.
Baseline: one plain PyTorch process: ``DataLoader(num_workers=cpus)`` over the same
train/val/test files (the split of the packed dataset), the same decode and
``TrainPreset``/``EvalPreset``, the same model, optimizer (SGD nesterov, same lr rule,
no decay on norms/biases), warmup + cosine schedule, label smoothing and global batch
(ours: ``--batch`` / ``--workers`` per worker);
validation and a checkpoint each epoch, test accuracy at the end.

Two figures per run: end to end (``epochs x train images / wall-clock``, Ray's start
excluded and reported apart) and steady state (training-loop images/s only: ours from
the run's own epoch timings, the baseline from its loop).

CPU mode (default): 5,000 32x32 JPEGs, the small CNN, 3 epochs. GPU mode (``--gpu``):
ResNet-50 on 500x375 JPEGs (ImageNet recipe, 224 px), bf16, channels_last, batch 256,
``train.use_gpu=true``, ``cpus - 2`` augment actors; plus the ceiling: the same model
stepping on GPU-resident synthetic tensors.

    python benchmarks/train.py                      # CPU, 5k small JPEGs, 1 worker
    python benchmarks/train.py --workers 2          # imgpipe's default DDP shape
    python benchmarks/train.py --gpu --n 20000 --epochs 2
    python benchmarks/train.py --smoke
"""

from __future__ import annotations

import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import make_images  # noqa: E402


class SplitDataset:
    def __init__(self, items: list[tuple[str, int]], transform) -> None:
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        from pipeline.transforms import decode_tensor

        path, label = self.items[i]
        with open(path, "rb") as f:
            return self.transform(decode_tensor(f.read())), label


def baseline_train(splits: dict, cfg, cpus: int, gpu: bool, stats: dict) -> int:
    """Plain PyTorch, one process. Returns the number of training images stepped on."""
    import torch
    from torch import nn
    from torch.utils.data import DataLoader

    from pipeline.models import zoo as models
    from pipeline.transforms import EvalPreset, TrainPreset, to_input

    torch.manual_seed(0)
    device = torch.device("cuda" if gpu else "cpu")
    size, b = cfg.data.image_size, cfg.train.batch_size
    model = models.build_model(cfg.model.arch, 10, cfg.model.dropout).to(device)
    if gpu:
        model = model.to(memory_format=torch.channels_last)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    lr = cfg.train.lr * b / 256
    opt = torch.optim.SGD([{"params": decay, "weight_decay": cfg.train.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}], lr=lr, momentum=0.9, nesterov=True)
    train_dl = DataLoader(SplitDataset(splits["train"], TrainPreset(cfg.augment, size)), batch_size=b,
                          shuffle=True, num_workers=cpus, pin_memory=gpu, persistent_workers=True,
                          prefetch_factor=4, drop_last=False)
    ev = EvalPreset(cfg.augment, size)
    val_dl = DataLoader(SplitDataset(splits["val"], ev), batch_size=256, num_workers=cpus)
    test_dl = DataLoader(SplitDataset(splits["test"], ev), batch_size=256, num_workers=cpus)
    steps = len(train_dl) * cfg.train.epochs
    warm = int(cfg.train.warmup_epochs * len(train_dl))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warm) / max(1, steps - warm)))))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
    mean, std = cfg.augment.mean, cfg.augment.std

    def accuracy(dl) -> float:
        model.eval()
        correct = n = 0
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
            for x, y in dl:
                pred = model(to_input(x, mean, std, device, channels_last=gpu)).argmax(1).cpu()
                correct += int((pred == y).sum())
                n += len(y)
        return correct / max(n, 1)

    seen, loop_s = 0, 0.0
    ckpt = os.path.join(stats["workdir"], f"baseline-{time.time_ns()}.pt")
    for _ in range(cfg.train.epochs):
        model.train()
        t0 = time.perf_counter()
        for x, y in train_dl:
            x = to_input(x, mean, std, device, channels_last=gpu)
            y = y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
                loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen += len(y)
        loss.item()
        loop_s += time.perf_counter() - t0
        stats["val_accuracy"] = accuracy(val_dl)
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, ckpt)
    stats["test_accuracy"] = accuracy(test_dl)
    stats["steady"] = seen / max(loop_s, 1e-9)
    return seen


def gpu_ceiling(arch: str, size: int, batch: int, steps: int = 30) -> float:
    """Training steps on GPU-resident synthetic tensors: the model's own ceiling."""
    import torch
    from torch import nn

    from pipeline.models import zoo as models

    model = models.build_model(arch, 10).cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device="cuda")
    loss_fn = nn.CrossEntropyLoss()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0)


def _configs(args, dst: str = "") -> tuple[list[str], list[str]]:
    """(settings both sides share, ours' full config)."""
    epochs = args.epochs or (1 if args.smoke else 3)
    batch = args.batch or (256 if args.gpu else 128)
    shared = [f"ray.num_cpus={args.cpus}", f"train.epochs={epochs}", f"train.batch_size={batch}",
              "train.warmup_epochs=0.5", f"data.shard_rows={100 if args.gpu else 500}"]
    if not args.gpu:
        shared += ["data.image_size=32"]  # the size the JPEGs are made at (the figures in README)
    if args.gpu:
        shared += ["model.arch=resnet50", "data.image_size=224", "augment.preset=imagenet",
                   "augment.hflip=true", "augment.rotation=0", "augment.mean=[0.485,0.456,0.406]",
                   "augment.std=[0.229,0.224,0.225]", "train.amp=bf16", "train.channels_last=true",
                   "train.lr=0.1"]
    if batch % args.workers:
        raise SystemExit(f"--batch {batch} must be a multiple of --workers {args.workers}")
    # the same global batch as the baseline (train.batch_size is per worker), so both
    # take the same optimizer steps at the same lr: equal accuracy is then expected
    ours = [*shared, f"data.manifest={dst}", f"train.storage={os.path.join(args.workdir, 'runs')}",
            f"train.num_workers={args.workers}", f"train.batch_size={batch // args.workers}"]
    if args.gpu:
        ours += ["train.use_gpu=true", f"augment.actors={max(1, args.cpus - 2)}"]
    return shared, ours + args.overrides


def work(side: str, args, state: dict):
    """One side, in a child process (see common.compare)."""
    from pipeline import config

    shared, ours = _configs(args, state["dst"])
    if side == "baseline":
        if args.baseline_threads:
            import torch

            torch.set_num_threads(args.baseline_threads)
        stats = {"workdir": args.workdir}
        n = baseline_train(state["splits"], config.load(None, shared), args.cpus, args.gpu, stats)
        return n, {"steady": stats["steady"], "test_accuracy": stats["test_accuracy"]}
    from pipeline.training import driver, progress

    s = driver.run(config.load(None, [*ours, f"train.run_name=bench-{time.time_ns()}"]), quiet=True)
    history = progress.read_history(s["run_uri"])
    return sum(h["train_images"] for h in history), {"steady": s["train_images_per_second"],
                                                     "test_accuracy": s["test_accuracy"]}


def main(argv=None) -> None:
    p = common.parser(__doc__.splitlines()[0], default_n=5000, smoke_n=400)
    p.add_argument("--epochs", type=int, default=None, help="default 3 (--smoke: 1)")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers for ours (default 1)")
    p.add_argument("--batch", type=int, default=None,
                   help="global batch per step (default 128; --gpu 256); ours: divided over --workers")
    p.add_argument("--baseline-threads", type=int, default=None,
                   help="torch.set_num_threads in the baseline's main process (default: torch's default)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="config override for ours")
    args = common.parse(p, argv)
    if args.side:
        common.child(args, work)
        return
    from pipeline import config
    from pipeline.data import packing, shardset

    size_kind = "large" if args.gpu else "small"
    dst = os.path.join(args.workdir, "shards")
    shared, ours = _configs(args, dst)
    base_cfg = config.load(None, shared)
    config.load(None, ours)  # fail fast on a bad --set
    root = make_images.images(args.n, size_kind)
    common.start_ray(args.cpus)
    packing.pack(root, dst, base_cfg, quiet=True)
    common.stop_ray()
    manifest = shardset.read_manifest(dst)
    splits = {}
    for split in ("train", "val", "test"):
        items = []
        for t in shardset.iter_split(manifest, split, columns=["source", "label"]):
            items += list(zip(t.column("source").to_pylist(), t.column("label").to_pylist()))
        splits[split] = items
    epochs = base_cfg.train.epochs
    res = common.compare(args, {"dst": dst, "splits": splits},
                         label=f"train {base_cfg.model.arch} {len(splits['train'])}x{epochs}")
    so, sb = res["ours_extra"], res.get("baseline_extra") or {}
    rec = {"name": f"train_{base_cfg.model.arch}_{size_kind}_jpeg_{args.workers}w", "n": args.n,
           "train_images": len(splits["train"]), "epochs": epochs, **res,
           "ours_steady_images_per_second": round(so["steady"], 1),
           "baseline_steady_images_per_second": round(sb["steady"], 1) if sb else None,
           "steady_ratio": round(so["steady"] / sb["steady"], 3) if sb else None,
           "ours_test_accuracy": so["test_accuracy"], "baseline_test_accuracy": sb.get("test_accuracy"),
           "batch_size": base_cfg.train.batch_size, "cpus": args.cpus, "ours_workers": args.workers,
           "ours_config": ours,
           "baseline": f"one process, DataLoader(num_workers={args.cpus}), "
                       + (f"torch.set_num_threads({args.baseline_threads}), " if args.baseline_threads
                          else "torch default threads, ")
                       + "same model/optimizer/schedule"}
    if args.gpu:
        rec["gpu_resident_ceiling_images_per_second"] = round(
            gpu_ceiling(base_cfg.model.arch, 224, base_cfg.train.batch_size), 1)
    common.emit(rec, args)


if __name__ == "__main__":
    main()

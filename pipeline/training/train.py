"""Distributed training: Ray Train ``TorchTrainer`` (DDP) fed by Ray Data.

Shape after torchvision's ``references/classification/train.py``:
:func:`train_one_epoch`, :func:`evaluate`, and :func:`train_loop` (runs on every
worker), plus :func:`run` on the driver (``imgpipe train``).

Data: shards -> Ray Data (per-epoch shard order and in-shard row order from
``(seed, epoch)``) -> decode + augment in an actor pool (or, with ``augment.device``
cuda/worker, in the training worker) -> ``streaming_split`` across ranks (equal row
counts, so every rank runs the same number of steps; the remainder, < world size, is
reported as ``dropped_train_images``) -> a bounded local shuffle window.

Each epoch, and every ``train.checkpoint_every_steps`` steps, rank 0 writes a
checkpoint folder that is also a model artifact (``weights.pt`` + ``meta.json``, see
:mod:`pipeline.models.artifact`) plus ``train_state.pt`` (model, optimizer, step -> schedule,
best accuracy; mid-epoch also the epoch's consumed rows as a bitmap, gathered from all
ranks, and its running loss/accuracy sums). Ray Train keeps the best by val accuracy
and the latest; restarting workers after a failure, or rerunning with the same
``train.run_name``, resumes from the latest: mid-epoch, the shard readers skip the
rows already trained on (see :mod:`pipeline.data.shardset`), so no sample is repeated or
lost.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
import sys
import tempfile
import threading
import time
from typing import Any

import torch
from torch import nn

from pipeline import config, storage
from pipeline import transforms as augment
from pipeline.config import Config
from pipeline.data import shardset, stream
from pipeline.errors import JobFailed, UserError
from pipeline.models import artifact, pretrained
from pipeline.models import zoo as models
from pipeline.ops import preflight
from pipeline.ops.watchdog import Watchdog

log = logging.getLogger("imgpipe")

TRAIN_STATE = "train_state.pt"
VAL_IN_MEMORY_BYTES = 256 * 2**20  # val sets up to this (as uint8) are transformed once and shared
METRICS = "metrics.jsonl"
HEARTBEAT = "_heartbeat.json"
SUMS = ("seen", "loss_sum", "correct", "seconds")  # per-epoch training sums, reduced over ranks


# ------------------------------------------------------------------ worker side


def _param_groups(model: nn.Module, cfg: Config, peak_lr: float) -> list[dict[str, Any]]:
    """No weight decay on norms and biases; the head gets ``head_lr_mult``."""
    head = models.head_parameters(model)
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        decay = p.ndim > 1
        groups.setdefault((name in head, decay), []).append(p)
    out = []
    for (is_head, decay), params in groups.items():
        mult = cfg.train.head_lr_mult if is_head else 1.0
        out.append({"params": params, "weight_decay": cfg.train.weight_decay if decay else 0.0,
                    "lr": peak_lr * mult, "base_lr": peak_lr * mult, "is_head": is_head})
    return out


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup to 1, then cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _set_lr(opt: torch.optim.Optimizer, factor: float, freeze_backbone: bool) -> float:
    lr = 0.0
    for g in opt.param_groups:
        g["lr"] = 0.0 if (freeze_backbone and not g["is_head"]) else g["base_lr"] * factor
        lr = max(lr, g["lr"])
    return lr


def train_one_epoch(model, loader, opt, loss_fn, step: int, total_steps: int, warmup_steps: int,
                    cfg: Config, device, mixer=None, ema=None, freeze_backbone: bool = False,
                    prepare=None, after_step=None) -> dict[str, float]:
    """One pass over ``loader``. ``prepare(batch)`` turns a batch into the model's input
    (default: uint8 images -> normalized floats); ``after_step(step, batch, stats)``
    runs after every optimizer step (heartbeat, data position, mid-epoch checkpoints)."""
    model.train()
    stats = {"seen": 0, "loss_sum": 0.0, "correct": 0, "seconds": 0.0, "lr": 0.0}
    t0 = time.time()
    for batch in loader:
        if prepare is not None:
            x = prepare(batch)
        else:
            x = augment.to_input(batch["image"], cfg.augment.mean, cfg.augment.std, device,
                                 channels_last=device.type == "cuda" and cfg.train.channels_last)
        y = batch["label"].to(device)
        target = y
        if mixer is not None:
            x, target = mixer(x, y)
        stats["lr"] = _set_lr(opt, _lr_factor(step, total_steps, warmup_steps), freeze_backbone)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and cfg.train.amp != "off"):
            logits = model(x)
            loss = loss_fn(logits, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.train.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        if ema is not None:
            ema.update_parameters(model)
        step += 1
        stats["seen"] += len(y)
        stats["loss_sum"] += loss.item() * len(y)
        stats["correct"] += (logits.argmax(1) == y).sum().item()
        stats["seconds"] = time.time() - t0
        if after_step is not None:
            after_step(step, batch, stats)
    stats["seconds"] = time.time() - t0
    return {"step": step, **stats}


@torch.no_grad()
def evaluate(model, loader, cfg: Config, device, num_classes: int) -> dict[str, Any]:
    """Loss, correct count and confusion matrix (rows: true, cols: predicted)."""
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    loss_sum, n = 0.0, 0
    for batch in loader:
        x = augment.to_input(batch["image"], cfg.augment.mean, cfg.augment.std, device)
        y = batch["label"].to(device)
        logits = model(x).float()
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        pred = logits.argmax(1)
        confusion += torch.bincount((y * num_classes + pred).cpu(), minlength=num_classes**2).view(num_classes, num_classes)
        n += len(y)
    return {"loss_sum": loss_sum, "n": n, "confusion": confusion}


def _all_reduce(values: list[float]) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def train_loop(loop_cfg: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch

    cfg = config.from_dict(loop_cfg["config"])
    storage.configure(config.storage_options(cfg))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, cfg.train.torch_threads))
    torch.manual_seed(cfg.train.seed)  # same init everywhere; DDP broadcasts rank 0's anyway
    device = ray.train.torch.get_device()
    classes = loop_cfg["classes"]
    num_classes = len(classes)

    model = models.build_model(cfg.model.arch, num_classes, cfg.model.dropout)
    if loop_cfg.get("pretrained_uri"):
        uri = loop_cfg["pretrained_uri"]
        state = pretrained.load_for(uri, cfg.model.arch)  # a weights name (package/torchvision), else None
        if state is None and loop_cfg.get("pretrained_is_artifact"):
            state = artifact.load(uri).state_dict
        elif state is None:  # a plain state dict at a URI (local or s3://), never unpickling code
            state = torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)
        models.load_pretrained(model, state, uri)
    if device.type == "cuda" and cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    global_batch = cfg.train.batch_size * world
    peak_lr = cfg.train.lr * global_batch / 256
    groups = _param_groups(model, cfg, peak_lr)
    if cfg.train.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=peak_lr, momentum=cfg.train.momentum, nesterov=True)
    else:
        opt = torch.optim.AdamW(groups, lr=peak_lr)
    model = ray.train.torch.prepare_model(model)
    if device.type == "cuda" and cfg.train.compile:
        model = torch.compile(model)
    ema = None
    if cfg.train.ema_decay > 0:
        ema = torch.optim.swa_utils.AveragedModel(
            _unwrap(model), multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.train.ema_decay))

    n_train = loop_cfg["train_rows"]
    steps_per_epoch = max(1, math.ceil(n_train // world / cfg.train.batch_size))  # streaming_split(equal=True)
    total_steps = steps_per_epoch * cfg.train.epochs
    warmup_steps = int(cfg.train.warmup_epochs * steps_per_epoch)

    start_epoch, step, best_acc, since_best, history = 0, 0, -1.0, 0, []
    partial: dict[str, Any] | None = None  # a mid-epoch checkpoint's data position and stats
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            st = torch.load(os.path.join(d, TRAIN_STATE), map_location="cpu", weights_only=True)
            _unwrap(model).load_state_dict(st["model"])
            opt.load_state_dict(st["optimizer"])
            if ema is not None and "ema" in st:
                ema.load_state_dict(st["ema"])
            start_epoch, step, best_acc, since_best = st["epoch"] + 1, st["step"], st["best_acc"], st["since_best"]
            history = json.loads(st["history"])
            partial = st.get("partial")
        if partial is not None:
            start_epoch = int(partial["epoch"])
        if rank == 0:
            where = f", {int(partial['seen'])} of its images done" if partial is not None else ""
            print(f"resumed from checkpoint at epoch {start_epoch + 1} (step {step}{where})", flush=True)

    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
    mixer = None
    if cfg.augment.mixup_alpha > 0 or cfg.augment.cutmix_alpha > 0:
        from torchvision.transforms import v2

        choices = []
        if cfg.augment.mixup_alpha > 0:
            choices.append(v2.MixUp(alpha=cfg.augment.mixup_alpha, num_classes=num_classes))
        if cfg.augment.cutmix_alpha > 0:
            choices.append(v2.CutMix(alpha=cfg.augment.cutmix_alpha, num_classes=num_classes))
        mixer = v2.RandomChoice(choices)

    worker_aug = None
    if cfg.augment.device != "cpu":  # decode + augment here, on this worker's device
        worker_aug = augment.WorkerAugment(config.AugmentConfig(**loop_cfg["config"]["augment"]),
                                           cfg.data.image_size, cfg.train.seed, device)
    channels_last = device.type == "cuda" and cfg.train.channels_last
    clock = stream.epoch_clock(loop_cfg["clock_name"])
    beat = _Heartbeat(loop_cfg["run_uri"])
    trace = _Trace(loop_cfg.get("trace_ids_dir"), rank)
    train_shard = ray.train.get_dataset_shard("train")
    val_data = ray.get(loop_cfg["val_ref"]) if loop_cfg.get("val_ref") is not None else None
    val_shard = ray.train.get_dataset_shard("val") if val_data is None else None
    every = cfg.train.checkpoint_every_steps

    def save(epoch: int, completed: int, metrics: dict[str, Any], state: dict[str, Any], name: str) -> None:
        """Rank 0 writes the checkpoint folder (a model artifact + train state) taken
        during epoch index ``epoch`` after ``completed`` whole epochs; every rank
        reports, as Ray Train requires."""
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                weights = ema.module.state_dict() if ema is not None else _unwrap(model).state_dict()
                weights = {k.removeprefix("_orig_mod."): v for k, v in weights.items()}
                artifact.save(d, weights, {**loop_cfg["meta"], "metrics": metrics, "epoch": completed})
                state = {"model": _unwrap(model).state_dict(), "optimizer": opt.state_dict(),
                         "best_acc": best_acc, "since_best": since_best, "history": json.dumps(history), **state}
                if ema is not None:
                    state["ema"] = ema.state_dict()
                torch.save(state, os.path.join(d, TRAIN_STATE))
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)
        trace.commit(epoch)

    for epoch in range(start_epoch, cfg.train.epochs):
        consumed = None  # bits of the rows this epoch has trained on, as of the last checkpoint
        carry = dict.fromkeys(SUMS, 0.0)  # sums of the steps before a mid-epoch restart
        if partial is not None and int(partial["epoch"]) == epoch:
            consumed = partial["consumed"].numpy()
            carry = {k: float(partial[k]) for k in SUMS}
        partial = None
        ray.get(clock.set.remote(epoch, consumed))  # every rank sets it before the epoch's data flows
        torch.manual_seed(hash((cfg.train.seed, epoch, step, rank)) % 2**63)  # mixup draws
        rows: list = []  # row numbers this rank trained on since the epoch (re)started

        def prepare(batch, epoch=epoch):
            imgs = worker_aug(batch["image"], batch["image_id"], epoch)
            return augment.to_input(imgs, cfg.augment.mean, cfg.augment.std, device, channels_last)

        def after_step(step_now: int, batch: dict[str, Any], stats: dict[str, float], epoch=epoch,
                       carry=carry, rows=rows) -> None:
            nonlocal consumed
            rows.append(batch["row"])
            trace.step(batch["image_id"])
            if rank == 0:
                beat(step_now)
            if every and step_now % every == 0:
                consumed = _consumed_bits(n_train, consumed, rows)
                rows.clear()
                done = {k: carry[k] + v for k, v in zip(SUMS, _all_reduce([stats[k] for k in SUMS]))}
                # scored -1: never the run's best, kept only while it is the latest
                save(epoch, epoch, {"epoch": epoch, "step": step_now, "val_accuracy": -1.0, "mid_epoch": True},
                     {"epoch": epoch - 1, "step": step_now,
                      "partial": {"epoch": epoch, "consumed": torch.from_numpy(consumed), **done}},
                     f"checkpoint_epoch_{epoch + 1:04d}_step_{step_now:07d}")

        loader = _crash_hook(loop_cfg.get("crash_once"), rank, epoch, _batches(train_shard.iter_batches(
            batch_size=cfg.train.batch_size, batch_format="numpy", local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
            local_shuffle_seed=cfg.train.seed * 100_003 + epoch * 101 + rank), decoded=worker_aug is None))
        freeze = epoch < cfg.train.freeze_backbone_epochs
        tr = train_one_epoch(model, loader, opt, loss_fn, step, total_steps, warmup_steps, cfg, device,
                             mixer, ema, freeze, prepare=prepare if worker_aug is not None else None,
                             after_step=after_step)
        step = tr["step"]
        eval_model = ema.module if ema is not None else model
        val_batches = (_memory_batches(val_data, 256) if val_data is not None
                       else _batches(val_shard.iter_batches(batch_size=256, batch_format="numpy")))
        ev = evaluate(eval_model, val_batches, cfg, device, num_classes)
        seen, loss_sum, correct, secs = (carry[k] + v for k, v in zip(SUMS, _all_reduce([tr[k] for k in SUMS])))
        # val is not split: every rank scores the whole (small) val set, so no reduce
        vloss, vn, confusion = ev["loss_sum"], ev["n"], ev["confusion"]
        val_correct = float(confusion.diag().sum())
        val_acc = val_correct / max(vn, 1)
        improved = val_acc > best_acc
        best_acc, since_best = (val_acc, 0) if improved else (best_acc, since_best + 1)
        metrics = {"epoch": epoch + 1, "step": step, "train_loss": loss_sum / max(seen, 1),
                   "train_accuracy": correct / max(seen, 1), "val_loss": vloss / max(vn, 1),
                   "val_accuracy": val_acc, "best_val_accuracy": best_acc, "lr": tr["lr"],
                   "train_images": int(seen), "val_images": int(vn),
                   "dropped_train_images": int(n_train - seen),  # equal split's remainder
                   "images_per_second": seen / max(secs / world, 1e-9), "epoch_seconds": secs / world}
        history.append(metrics)
        stop = cfg.train.early_stopping_patience > 0 and since_best >= cfg.train.early_stopping_patience
        if rank == 0:
            _write_metrics(loop_cfg["run_uri"], history)
            print(f"epoch {epoch + 1}/{cfg.train.epochs}  loss {metrics['train_loss']:.4f}  "
                  f"train_acc {metrics['train_accuracy']:.4f}  val_acc {val_acc:.4f}  "
                  f"lr {tr['lr']:.4f}  {metrics['images_per_second']:.0f} img/s  "
                  f"{metrics['epoch_seconds']:.1f}s", flush=True)
        save(epoch, epoch + 1, metrics, {"epoch": epoch, "step": step}, f"checkpoint_epoch_{epoch + 1:04d}")
        if stop:
            if rank == 0:
                print(f"early stopping: no val improvement for {since_best} epochs", flush=True)
            break


def _consumed_bits(n: int, consumed, rows: list) -> Any:
    """Merge this rank's and the other ranks' trained-on row numbers into the epoch's
    consumed-row bitmap (``np.packbits`` of ``n`` bits)."""
    import numpy as np
    import torch.distributed as dist

    mine = np.concatenate(rows) if rows else np.empty(0, dtype=np.int64)
    everyone = [mine]
    if dist.is_available() and dist.is_initialized():
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
    bits = np.zeros(n, dtype=bool) if consumed is None else np.unpackbits(consumed, count=n).astype(bool)
    for r in everyone:
        bits[r] = True
    return np.packbits(bits)


class _Trace:
    """Test hook: with a folder, each rank appends the image ids it trained on to
    ``<dir>/rank<R>-epoch<E>.txt`` when a checkpoint commits them (ids trained on after
    the last checkpoint of a crashed attempt are trained on again, and traced then)."""

    def __init__(self, folder: str | None, rank: int) -> None:
        self.folder, self.rank, self.pending = folder, rank, []

    def step(self, ids) -> None:
        if self.folder:
            self.pending.extend(str(i) for i in ids)

    def commit(self, epoch: int) -> None:
        if self.folder and self.pending:
            with open(os.path.join(self.folder, f"rank{self.rank}-epoch{epoch}.txt"), "a") as f:
                f.write("".join(f"{i}\n" for i in self.pending))
            self.pending = []


class _Heartbeat:
    """Rank 0 writes ``RUN_URI/_heartbeat.json`` (step, time) at most every 20 s, so the
    driver's stall detection sees progress inside long epochs."""

    def __init__(self, run_uri: str, every_s: float = 20.0) -> None:
        self.uri, self.every_s, self.last = storage.join(run_uri, HEARTBEAT), every_s, 0.0

    def __call__(self, step: int) -> None:
        now = time.time()
        if now - self.last >= self.every_s:
            self.last = now
            storage.write_json(self.uri, {"step": step, "time": now})


def _crash_hook(spec: dict[str, Any] | None, rank: int, epoch: int, batches):
    """Test-only fault injection: the worker of ``spec["rank"]`` dies (``os._exit``) at
    batch ``spec["batch"]`` of epoch index ``spec["epoch"]``, once (a marker file), after
    ``spec["wait_s"]`` seconds (time for Ray Train's controller, which polls workers every
    2 s, to have registered the last checkpoint)."""
    for i, b in enumerate(batches):
        if (spec and spec["rank"] == rank and spec["epoch"] == epoch and i == spec.get("batch", 1)
                and not os.path.exists(spec["marker"])):
            open(spec["marker"], "w").close()
            time.sleep(spec.get("wait_s", 0.0))
            os._exit(1)
        yield b


def _memory_batches(data: dict[str, Any], batch_size: int):
    for i in range(0, len(data["label"]), batch_size):
        yield {"image": torch.from_numpy(data["image"][i:i + batch_size]),
               "label": torch.from_numpy(data["label"][i:i + batch_size])}


def _batches(it, decoded: bool = True):
    """numpy batches -> torch tensors (label int64; image uint8 when ``decoded``, else the
    encoded bytes for :class:`pipeline.transforms.WorkerAugment`); ids and rows kept as numpy."""
    for b in it:
        out = {"image": torch.from_numpy(b["image"]) if decoded else b["image"],
               "label": torch.from_numpy(b["label"].astype("int64")), "image_id": b["image_id"]}
        if "row" in b:
            out["row"] = b["row"]
        yield out


def _write_metrics(run_uri: str, history: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(h, sort_keys=True) + "\n" for h in history)
    storage.write_bytes(storage.join(run_uri, METRICS), text.encode())


# ------------------------------------------------------------------ driver side


def _pretrained(cfg: Config) -> tuple[str | None, bool]:
    """Resolve ``model.pretrained`` to (URI, is_artifact)."""
    spec = cfg.model.pretrained
    if not spec:
        return None, False
    from pipeline import registry

    if pretrained.is_weights_name(spec):
        pretrained.load_for(spec, cfg.model.arch)  # fail fast: unknown name, wrong arch, no package/internet
        return spec, False
    if "@" in spec and "/" not in spec:
        return registry.resolve(cfg.registry.uri, spec), True
    if storage.exists(storage.join(spec, artifact.META)):
        return spec, True
    if storage.exists(spec):
        return spec, False
    raise UserError(f"model.pretrained not found: {spec} (a state-dict URI, a checkpoint folder, or NAME@vN)")


def run_name(cfg: Config) -> str:
    return cfg.train.run_name or f"{cfg.registry.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def run(cfg: Config, quiet: bool = False, trace_ids_dir: str | None = None,
        crash_once: dict[str, Any] | None = None) -> dict[str, Any]:
    """``imgpipe train``: train on ``data.manifest``; returns the summary dict.

    ``trace_ids_dir`` and ``crash_once`` are test hooks (see :class:`_Trace`, :func:`_crash_hook`)."""
    import ray
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline.ops.runtime import AUGMENT_ACTOR_CPUS, EVAL_TASK_CPUS, ensure_ray, train_resources

    if not cfg.data.manifest:
        raise UserError("data.manifest is not set: pack a dataset (`imgpipe pack SRC DST`) and "
                        "pass --set data.manifest=DST")
    manifest = shardset.read_manifest(cfg.data.manifest)
    for split in ("train", "val"):
        if manifest.rows(split) == 0:
            raise UserError(f"dataset {manifest.root} has no '{split}' images")
    models.build_model(cfg.model.arch, len(manifest.classes))  # fail fast on a bad arch
    pretrained_uri, pretrained_is_artifact = _pretrained(cfg)
    ensure_ray(cfg, quiet=quiet)
    cluster_cpus = ray.cluster_resources().get("CPU", 1.0)
    preflight.check(preflight.train_request(cfg, cluster_cpus), "train", cfg)
    res = train_resources(cfg, cluster_cpus)
    name = run_name(cfg)
    storage_root = storage.normalize(cfg.train.storage)
    run_uri = storage.join(storage_root, name)
    storage.write_bytes(storage.join(run_uri, "config.yaml"), config.dump(cfg).encode())
    clock_name = f"epoch-clock-{name}"
    acfg = dataclasses.asdict(cfg.augment)
    size = cfg.data.image_size

    epoch_clock = stream.epoch_clock(clock_name, on_this_node=True)  # here, so readers always find it
    train_ds = stream.read_split(manifest, "train", columns=["image_id", "image", "label"],
                                 shuffle_seed=cfg.train.seed, clock_name=clock_name)
    if cfg.augment.device == "cpu":
        train_ds = train_ds.map_batches(
            augment.AugmentBatch, fn_constructor_kwargs={"cfg": acfg, "size": size, "train": True,
                                                         "seed": cfg.train.seed, "clock_name": clock_name},
            compute=ray.data.ActorPoolStrategy(size=cfg.augment.actors), num_cpus=AUGMENT_ACTOR_CPUS,
            batch_size=cfg.augment.batch_size)
    val_ds = stream.read_split(manifest, "val", columns=["image_id", "image", "label"]).map_batches(
        _eval_transform, fn_kwargs={"cfg": acfg, "size": size}, num_cpus=EVAL_TASK_CPUS, batch_size=256)
    datasets = {"train": train_ds}
    val_ref = None
    if manifest.rows("val") * 3 * size * size <= VAL_IN_MEMORY_BYTES:
        # Eval transforms are deterministic: run them once, and hand every rank the same
        # uint8 arrays through the object store instead of a pipeline per rank per epoch.
        import numpy as np

        parts = list(val_ds.iter_batches(batch_size=1024, batch_format="numpy"))
        val_ref = ray.put({"image": np.concatenate([b["image"] for b in parts]),
                           "label": np.concatenate([b["label"] for b in parts])})
    else:
        datasets["val"] = val_ds

    meta = {"arch": cfg.model.arch, "classes": manifest.classes, "image_size": size,
            "mean": cfg.augment.mean, "std": cfg.augment.std, "eval_preset": cfg.augment.preset,
            "config": config.to_dict(cfg), "data_manifest_sha256": manifest.sha256,
            "data_manifest": manifest.root, "run": run_uri,
            "pretrained": cfg.model.pretrained}
    loop_cfg = {"config": config.to_dict(cfg), "classes": manifest.classes, "train_rows": manifest.rows("train"),
                "meta": meta, "run_uri": run_uri, "clock_name": clock_name,
                "pretrained_uri": pretrained_uri, "pretrained_is_artifact": pretrained_is_artifact,
                "trace_ids_dir": trace_ids_dir, "val_ref": val_ref, "crash_once": crash_once}
    fs, fs_path = storage.pyarrow_filesystem(storage_root)
    resources = {"CPU": res.cpus_per_worker}
    if res.gpus_per_worker:
        resources["GPU"] = res.gpus_per_worker
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_cfg,
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=name, storage_path=fs_path, storage_filesystem=fs if storage.is_remote(storage_root) else None,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=max(1, cfg.train.num_to_keep), checkpoint_score_attribute="val_accuracy",
                checkpoint_score_order="max"),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    log.info("train: run %s, %d workers x %.2f CPU (%.2f CPU left for Ray Data), %d train / %d val images",
             name, cfg.train.num_workers, res.cpus_per_worker, res.data_cpus, manifest.rows("train"),
             manifest.rows("val"))
    t0 = time.time()
    with Watchdog(f"training run {name}", run_uri, cfg.ray.stall_timeout_s) as dog:
        follower = _MetricsFollower(run_uri, cfg.train.epochs, quiet, beat=dog.beat)
        follower.start()
        try:
            result = trainer.fit()
        except Exception as e:  # noqa: BLE001 - Ray wraps worker errors; surface the cause
            raise JobFailed(f"training run {name} failed: {_root_cause(e)}") from e
        finally:
            follower.stop()
            ray.kill(epoch_clock)
    if result.error:
        raise JobFailed(f"training run {name} failed: {_root_cause(result.error)}")
    best = max(result.best_checkpoints, key=lambda cm: cm[1].get("val_accuracy", -1.0))
    best_ckpt, best_metrics = best
    best_uri = _checkpoint_uri(storage_root, fs_path, best_ckpt.path)
    history = _read_history(run_uri)
    seconds = time.time() - t0
    train_seen = sum(h["train_images"] for h in history)
    epoch_secs = sum(h["epoch_seconds"] for h in history)
    test, report_uri = _test_and_report(cfg, run_uri, best_uri, manifest, history, quiet)
    return {
        "test_accuracy": test["accuracy"] if test else None, "test": test, "report": report_uri,
        "run": name, "run_uri": run_uri, "best_checkpoint_uri": best_uri,
        "best_val_accuracy": best_metrics.get("val_accuracy"), "best_epoch": best_metrics.get("epoch"),
        "epochs": len(history), "final": result.metrics, "seconds": round(seconds, 2),
        "train_images_per_second": round(train_seen / max(epoch_secs, 1e-9), 1),
        "data_manifest_sha256": manifest.sha256, "classes": manifest.classes,
    }


def _test_and_report(cfg: Config, run_uri: str, best_uri: str, manifest: shardset.Manifest,
                     history: list[dict[str, Any]], quiet: bool) -> tuple[dict[str, Any] | None, str]:
    """Score the best checkpoint on the test split; write report.html and TensorBoard files."""
    from pipeline.inference import evaluate
    from pipeline.report import report

    test = None
    if manifest.rows("test") > 0:
        test = evaluate.run(best_uri, manifest.root, "test", cfg, quiet=quiet)
    if not storage.is_remote(run_uri):
        report.write_tensorboard(run_uri, history)
    uri = report.write_train_report(run_uri, evaluation=test, model_uri=best_uri if test else None,
                                    data_uri=manifest.root if test else None)
    if not quiet:
        acc = f"test accuracy {test['accuracy']:.4f}; " if test else ""
        print(f"train: {acc}report {uri}", file=sys.stderr, flush=True)
    return test, uri


class _MetricsFollower(threading.Thread):
    """Prints each epoch's line on the driver as rank 0 appends it to metrics.jsonl.

    Workers' own output reaches the console only with ``--verbose``; this keeps the
    progress a person wants (loss, accuracy, images/s, ETA) without Ray's chatter."""

    def __init__(self, run_uri: str, epochs: int, quiet: bool, beat=None) -> None:
        super().__init__(daemon=True)
        self.run_uri, self.epochs, self.quiet, self.beat = run_uri, epochs, quiet, beat
        self.last_step = None
        self.seen = len(_read_history(run_uri))  # a resumed run: print only new epochs
        self._stop_event = threading.Event()
        self.t0 = time.time()

    def run(self) -> None:
        while not self._stop_event.wait(2.0):
            self.poll()

    def poll(self) -> None:
        try:
            history = _read_history(self.run_uri)
            hb = storage.join(self.run_uri, HEARTBEAT)
            step = storage.read_json(hb).get("step") if storage.exists(hb) else None
        except Exception:  # noqa: BLE001 - a half-written file: next poll
            return
        if self.beat is not None and step != self.last_step:
            self.last_step = step
            self.beat()
        for h in history[self.seen:]:
            self.seen += 1
            if self.beat is not None:
                self.beat()
            if self.quiet:
                continue
            done = h["epoch"]
            elapsed = time.time() - self.t0
            eta = elapsed / max(1, self.seen) * max(0, self.epochs - done)
            print(f"epoch {done}/{self.epochs}  loss {h['train_loss']:.4f}  train_acc {h['train_accuracy']:.4f}  "
                  f"val_acc {h['val_accuracy']:.4f}  lr {h['lr']:.4f}  {h['images_per_second']:.0f} img/s  "
                  f"ETA {eta:.0f}s", file=sys.stderr, flush=True)

    def stop(self) -> None:
        self._stop_event.set()
        self.poll()


def _eval_transform(batch, cfg: dict[str, Any], size: int):
    """Ray Data task UDF: decode + eval preset (stateless, so a task, not an actor)."""
    import numpy as np

    preset = augment.EvalPreset(config.AugmentConfig(**cfg), size)
    out = np.empty((len(batch["image"]), 3, size, size), dtype=np.uint8)
    for i, data in enumerate(batch["image"]):
        out[i] = preset(augment.decode_tensor(bytes(data))).numpy()
    return {"image": out, "label": batch["label"].astype(np.int64), "image_id": batch["image_id"]}


def _checkpoint_uri(storage_root: str, fs_path: str, ckpt_path: str) -> str:
    if storage.is_remote(storage_root):
        scheme = storage_root.split("://", 1)[0]
        return f"{scheme}://{ckpt_path}"
    return ckpt_path


def _read_history(run_uri: str) -> list[dict[str, Any]]:
    try:
        text = storage.read_text(storage.join(run_uri, METRICS))
    except storage.NotFound:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _root_cause(e: BaseException) -> str:
    while e.__cause__ is not None:
        e = e.__cause__
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1] if text else ''}"

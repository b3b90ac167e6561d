"""The training worker: :func:`train_loop` runs on every Ray Train worker (a DDP rank).

Shape after torchvision's ``references/classification/train.py``: build the model and
optimizer, restore the train state from the latest checkpoint, then per epoch
:func:`train_one_epoch`, :func:`evaluate`, one metrics line and one checkpoint.

Data: the driver's train stream (see :mod:`pipeline.data.stream`) arrives through
``streaming_split`` (equal row counts, so every rank runs the same number of steps; the
remainder, < world size, is reported as ``dropped_train_images``) and a bounded local
shuffle window. With ``augment.device`` cuda/worker the batches hold encoded bytes,
decoded and augmented here (:class:`BatchInput`). Every rank scores the whole (small)
val set.

Exact resume: :class:`StepTracker` remembers the rows each step trained on; a mid-epoch
checkpoint folds every rank's rows into the epoch's consumed-row bitmap. After a
restart the loop hands that bitmap to the epoch clock and the readers skip those rows.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn
from torchvision.transforms import v2

from pipeline import config, storage, transforms
from pipeline.config import AugmentConfig, Config
from pipeline.data import stream
from pipeline.models import zoo as models
from pipeline.training import callbacks
from pipeline.training.progress import Heartbeat, epoch_line, write_metrics
from pipeline.training.state import SUMS, CheckpointSaver, Partial, RunSpec, TrainState, unwrap

VAL_BATCH = 256  # images per val batch


@dataclass(frozen=True)
class Schedule:
    """Learning-rate factor per optimizer step: linear warmup to 1, then cosine to 0."""

    total: int  # steps in the run
    warmup: int

    def factor(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class BatchInput:
    """A training batch -> the model's normalized float input on the device. With
    ``augment.device`` cuda/worker the batch holds encoded bytes, decoded and augmented
    here first (:class:`pipeline.transforms.WorkerAugment`)."""

    def __init__(self, cfg: Config, device: torch.device) -> None:
        self.mean, self.std, self.device = cfg.augment.mean, cfg.augment.std, device
        self.channels_last = device.type == "cuda" and cfg.train.channels_last
        self.augment = None
        if cfg.augment.device != "cpu":
            self.augment = transforms.WorkerAugment(cfg.augment, cfg.data.image_size, cfg.train.seed, device)

    @property
    def decoded(self) -> bool:
        """Whether batches arrive decoded (uint8) rather than as encoded bytes."""
        return self.augment is None

    def __call__(self, batch: dict[str, Any], epoch: int) -> torch.Tensor:
        images = batch["image"] if self.augment is None else self.augment(batch["image"], batch["image_id"], epoch)
        return transforms.to_input(images, self.mean, self.std, self.device, self.channels_last)


@dataclass
class Learner:
    """The model and everything that updates it, on this rank's device."""

    model: nn.Module  # DDP-wrapped (and compiled with train.compile)
    opt: torch.optim.Optimizer
    ema: nn.Module | None  # AveragedModel with train.ema_decay
    loss_fn: nn.Module
    mixer: Any  # None, or torchvision's MixUp/CutMix choice
    schedule: Schedule
    inputs: BatchInput
    device: torch.device
    amp: bool  # bf16 autocast
    grad_clip: float  # max grad norm; 0: off
    freeze_backbone_epochs: int

    def scorer(self) -> nn.Module:
        """The model val accuracy is measured on (the EMA copy when there is one)."""
        return self.ema.module if self.ema is not None else self.model


# ------------------------------------------------------------------ one epoch


def _set_lr(opt: torch.optim.Optimizer, factor: float, freeze_backbone: bool) -> float:
    lr = 0.0
    for g in opt.param_groups:
        g["lr"] = 0.0 if (freeze_backbone and not g["is_head"]) else g["base_lr"] * factor
        lr = max(lr, g["lr"])
    return lr


def train_one_epoch(learner: Learner, batches: Iterable[dict[str, Any]], epoch: int, step: int,
                    tracker: StepTracker | None = None) -> dict[str, float]:
    """One pass over ``batches`` of epoch index ``epoch``, from optimizer step ``step``;
    ``tracker.after_step`` runs after every step. Returns this rank's sums, the last lr
    and the step reached."""
    m = learner
    m.model.train()
    freeze = epoch < m.freeze_backbone_epochs
    stats = {"seen": 0, "loss_sum": 0.0, "correct": 0, "seconds": 0.0, "lr": 0.0}
    t0 = time.time()
    for batch in batches:
        x = m.inputs(batch, epoch)
        y = batch["label"].to(m.device)
        target = y
        if m.mixer is not None:
            x, target = m.mixer(x, y)
        stats["lr"] = _set_lr(m.opt, m.schedule.factor(step), freeze)
        with torch.autocast(m.device.type, dtype=torch.bfloat16, enabled=m.amp):
            logits = m.model(x)
            loss = m.loss_fn(logits, target)
        m.opt.zero_grad(set_to_none=True)
        loss.backward()
        if m.grad_clip > 0:
            nn.utils.clip_grad_norm_(m.model.parameters(), m.grad_clip)
        m.opt.step()
        if m.ema is not None:
            m.ema.update_parameters(m.model)
        step += 1
        stats["seen"] += len(y)
        stats["loss_sum"] += loss.item() * len(y)
        stats["correct"] += (logits.argmax(1) == y).sum().item()
        stats["seconds"] = time.time() - t0
        if tracker is not None:
            tracker.after_step(step, batch, stats)
    stats["seconds"] = time.time() - t0
    return {"step": step, **stats}


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[dict[str, Any]], cfg: AugmentConfig, device: torch.device,
             num_classes: int) -> dict[str, Any]:
    """Loss, correct count and confusion matrix (rows: true, cols: predicted)."""
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    loss_sum, n = 0.0, 0
    for batch in batches:
        x = transforms.to_input(batch["image"], cfg.mean, cfg.std, device)
        y = batch["label"].to(device)
        logits = model(x).float()
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        pred = logits.argmax(1)
        confusion += torch.bincount((y * num_classes + pred).cpu(), minlength=num_classes**2).view(num_classes, num_classes)
        n += len(y)
    return {"loss_sum": loss_sum, "n": n, "confusion": confusion}


# ------------------------------------------------------------------ across ranks


def _all_reduce(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def _all_gather(mine: np.ndarray) -> list[np.ndarray]:
    everyone = [mine]
    if dist.is_available() and dist.is_initialized():
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
    return everyone


@dataclass
class Worker:
    """This rank, and what its loop reports to."""

    spec: RunSpec
    rank: int
    world: int
    saver: CheckpointSaver
    beat: Heartbeat
    callbacks: callbacks.Callbacks


class StepTracker:
    """After each optimizer step of one epoch: remembers the rows trained on, calls the
    callbacks, beats (rank 0), and every ``train.checkpoint_every_steps`` steps writes a
    mid-epoch checkpoint with the epoch's consumed rows (from all ranks) and sums."""

    def __init__(self, worker: Worker, state: TrainState, epoch: int) -> None:
        self.worker, self.state, self.epoch = worker, state, epoch
        self.consumed: np.ndarray | None = None  # rows trained on, as of the last checkpoint
        self.carry = dict.fromkeys(SUMS, 0.0)  # sums of the steps before a mid-epoch restart
        if state.partial is not None and state.partial.epoch == epoch:
            self.consumed, self.carry = state.partial.consumed, dict(state.partial.sums)
        self.rows: list[np.ndarray] = []  # row numbers trained on since the last checkpoint

    def after_step(self, step: int, batch: dict[str, Any], stats: dict[str, float]) -> None:
        w = self.worker
        self.rows.append(batch["row"])
        w.callbacks.on_step(w.rank, self.epoch, batch)
        if w.rank == 0:
            w.beat(step)
        every = w.spec.config.train.checkpoint_every_steps
        if every and step % every == 0:
            self.checkpoint(step, stats)

    def checkpoint(self, step: int, stats: dict[str, float]) -> None:
        """A mid-epoch checkpoint (collective: every rank calls it at the same step)."""
        w = self.worker
        mine = np.concatenate(self.rows) if self.rows else np.empty(0, dtype=np.int64)
        self.consumed = stream.mark_consumed(w.spec.train_rows, self.consumed, _all_gather(mine))
        self.rows.clear()
        w.saver.save_mid_epoch(self.state, step, Partial(self.epoch, self.consumed, self.totals(stats)))
        w.callbacks.on_checkpoint(w.rank, self.epoch)

    def totals(self, stats: dict[str, float]) -> dict[str, float]:
        """The epoch's SUMS over all ranks, with those before a restart (collective)."""
        return {k: self.carry[k] + v for k, v in zip(SUMS, _all_reduce([stats[k] for k in SUMS]))}


# ------------------------------------------------------------------ batches


def _batches(it: Iterable[dict[str, np.ndarray]], decoded: bool = True) -> Iterator[dict[str, Any]]:
    """numpy batches -> torch tensors (label int64; image uint8 when ``decoded``, else the
    encoded bytes for :class:`BatchInput`); ids and rows kept as numpy."""
    for b in it:
        out = {"image": torch.from_numpy(b["image"]) if decoded else b["image"],
               "label": torch.from_numpy(b["label"].astype("int64")), "image_id": b["image_id"]}
        if "row" in b:
            out["row"] = b["row"]
        yield out


def _memory_batches(data: dict[str, np.ndarray], batch_size: int) -> Iterator[dict[str, Any]]:
    for i in range(0, len(data["label"]), batch_size):
        yield {"image": torch.from_numpy(data["image"][i:i + batch_size]),
               "label": torch.from_numpy(data["label"][i:i + batch_size])}


class WorkerData:
    """This rank's batches: its split of the train stream each epoch, and the val set
    (from the object store when the driver transformed it once, else a dataset shard)."""

    def __init__(self, spec: RunSpec, rank: int, decoded: bool) -> None:
        self.cfg, self.rank, self.decoded = spec.config, rank, decoded
        self.train_shard = ray.train.get_dataset_shard("train")
        self.val_data = ray.get(spec.val_ref) if spec.val_ref is not None else None
        self.val_shard = ray.train.get_dataset_shard("val") if self.val_data is None else None

    def train(self, epoch: int) -> Iterator[dict[str, Any]]:
        t, d = self.cfg.train, self.cfg.data
        return _batches(self.train_shard.iter_batches(
            batch_size=t.batch_size, batch_format="numpy", local_shuffle_buffer_size=d.shuffle_buffer or None,
            local_shuffle_seed=t.seed * 100_003 + epoch * 101 + self.rank), decoded=self.decoded)

    def val(self) -> Iterator[dict[str, Any]]:
        if self.val_data is not None:
            return _memory_batches(self.val_data, VAL_BATCH)
        return _batches(self.val_shard.iter_batches(batch_size=VAL_BATCH, batch_format="numpy"))


# ------------------------------------------------------------------ building


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


def _model(spec: RunSpec) -> nn.Module:
    """The architecture, with the ``model.pretrained`` weights the driver loaded and
    verified (see :func:`pipeline.training.driver.pretrained_state`)."""
    cfg = spec.config
    model = models.build_model(cfg.model.arch, len(spec.classes), cfg.model.dropout)
    if spec.pretrained_ref is not None:
        models.load_pretrained(model, ray.get(spec.pretrained_ref), cfg.model.pretrained)
    return model


def _mixer(cfg: AugmentConfig, num_classes: int) -> Any:
    choices = []
    if cfg.mixup_alpha > 0:
        choices.append(v2.MixUp(alpha=cfg.mixup_alpha, num_classes=num_classes))
    if cfg.cutmix_alpha > 0:
        choices.append(v2.CutMix(alpha=cfg.cutmix_alpha, num_classes=num_classes))
    return v2.RandomChoice(choices) if choices else None


def build_learner(spec: RunSpec, device: torch.device, world: int) -> Learner:
    """Model (DDP), optimizer with the lr scaled to the global batch, EMA, loss, schedule."""
    cfg, t = spec.config, spec.config.train
    model = _model(spec)
    if device.type == "cuda" and t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    peak_lr = t.lr * t.batch_size * world / 256
    groups = _param_groups(model, cfg, peak_lr)
    if t.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=peak_lr, momentum=t.momentum, nesterov=True)
    else:
        opt = torch.optim.AdamW(groups, lr=peak_lr)
    model = ray.train.torch.prepare_model(model)
    if device.type == "cuda" and t.compile:
        model = torch.compile(model)
    ema = None
    if t.ema_decay > 0:
        ema = torch.optim.swa_utils.AveragedModel(
            unwrap(model), multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(t.ema_decay))
    steps_per_epoch = max(1, math.ceil(spec.train_rows // world / t.batch_size))  # streaming_split(equal=True)
    schedule = Schedule(steps_per_epoch * t.epochs, int(t.warmup_epochs * steps_per_epoch))
    return Learner(model, opt, ema, nn.CrossEntropyLoss(label_smoothing=t.label_smoothing),
                   _mixer(cfg.augment, len(spec.classes)), schedule, BatchInput(cfg, device), device,
                   amp=device.type == "cuda" and t.amp != "off", grad_clip=t.grad_clip,
                   freeze_backbone_epochs=t.freeze_backbone_epochs)


# ------------------------------------------------------------------ the loop


def _finish_epoch(worker: Worker, state: TrainState, epoch: int, sums: dict[str, float],
                  ev: dict[str, Any], lr: float) -> bool:
    """Book the epoch: metrics (rank 0: metrics.jsonl and the epoch line), then its
    checkpoint. True when early stopping ends the run here."""
    cfg, world, n_train = worker.spec.config, worker.world, worker.spec.train_rows
    seen, vn = sums["seen"], ev["n"]
    val_acc = float(ev["confusion"].diag().sum()) / max(vn, 1)
    state.record(val_acc)
    metrics = {"epoch": epoch + 1, "step": state.step, "train_loss": sums["loss_sum"] / max(seen, 1),
               "train_accuracy": sums["correct"] / max(seen, 1), "val_loss": ev["loss_sum"] / max(vn, 1),
               "val_accuracy": val_acc, "best_val_accuracy": state.best_acc, "lr": lr,
               "train_images": int(seen), "val_images": int(vn),
               "dropped_train_images": int(n_train - seen),  # equal split's remainder
               "images_per_second": seen / max(sums["seconds"] / world, 1e-9),
               "epoch_seconds": sums["seconds"] / world}
    state.history.append(metrics)
    patience = cfg.train.early_stopping_patience
    stop = patience > 0 and state.since_best >= patience
    if worker.rank == 0:
        write_metrics(worker.spec.run_uri, state.history)
        print(epoch_line(metrics, cfg.train.epochs, f"{metrics['epoch_seconds']:.1f}s"), flush=True)
    worker.saver.save_epoch(state, epoch, metrics)
    worker.callbacks.on_checkpoint(worker.rank, epoch)
    if stop and worker.rank == 0:
        print(f"early stopping: no val improvement for {state.since_best} epochs", flush=True)
    return stop


def _resume(worker: Worker) -> TrainState:
    state = worker.saver.restore()
    if state is None:
        return TrainState()
    if worker.rank == 0:
        where = f", {int(state.partial.sums['seen'])} of its images done" if state.partial is not None else ""
        print(f"resumed from checkpoint at epoch {state.epoch + 1} (step {state.step}{where})", flush=True)
    return state


def train_loop(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker; ``loop_config["spec"]`` is the driver's :class:`RunSpec`."""
    spec: RunSpec = loop_config["spec"]
    cfg = spec.config
    storage.configure(config.storage_options(cfg))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, cfg.train.torch_threads))
    torch.manual_seed(cfg.train.seed)  # same init everywhere; DDP broadcasts rank 0's anyway
    device = ray.train.torch.get_device()
    learner = build_learner(spec, device, world)
    saver = CheckpointSaver(rank, spec.meta, learner.model, learner.opt, learner.ema)
    worker = Worker(spec, rank, world, saver, Heartbeat(spec.run_uri), callbacks.load(cfg.train.callbacks))
    state = _resume(worker)
    clock = stream.epoch_clock(spec.clock_name)
    data = WorkerData(spec, rank, learner.inputs.decoded)
    for epoch in range(state.epoch, cfg.train.epochs):
        tracker = StepTracker(worker, state, epoch)
        state.partial = None
        ray.get(clock.set.remote(epoch, tracker.consumed))  # every rank sets it before the epoch's data flows
        torch.manual_seed(hash((cfg.train.seed, epoch, state.step, rank)) % 2**63)  # mixup draws
        tr = train_one_epoch(learner, data.train(epoch), epoch, state.step, tracker)
        state.step = int(tr["step"])
        ev = evaluate(learner.scorer(), data.val(), cfg.augment, device, len(spec.classes))
        if _finish_epoch(worker, state, epoch, tracker.totals(tr), ev, tr["lr"]):
            break

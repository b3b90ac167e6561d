"""The training worker: :func:`train_loop` runs on every Ray Train worker (a DDP rank).

Shape after torchvision's ``references/classification/train.py``: build the model and
optimizer, restore the train state from the latest checkpoint, then per epoch
:func:`train_one_epoch`, :func:`evaluate`, one metrics line and one checkpoint.

Data: :class:`pipeline.training.inputs.TrainBatches`, this rank's share of every
epoch in an order fixed by the config (see :mod:`pipeline.data.stream`); every rank
scores the whole (small) val set.

Reproducible: the same config, seed and world size give the same batches on every
rank and, on CPU, bitwise the same weights: augmentation is seeded per image and
epoch, and the rest of the randomness (mixup/cutmix, dropout) per optimizer step
(:func:`step_seed`). Exact resume: a mid-epoch checkpoint records how many rows of
the epoch every rank has trained on; the restarted stream starts there.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn
from torchvision.transforms import v2

from pipeline import config, storage, transforms
from pipeline.config import AugmentConfig, Config
from pipeline.models import zoo as models
from pipeline.ops.runtime import training_threads
from pipeline.training import callbacks
from pipeline.training.inputs import BatchInput, TrainBatches, val_batches
from pipeline.training.progress import Heartbeat, epoch_line, write_metrics
from pipeline.training.state import SUMS, CheckpointSaver, Partial, RunSpec, TrainState, unwrap


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
        """The bare model val accuracy is measured on (the EMA copy when there is one),
        with rank 0's buffers (BN statistics), which its checkpoint holds: not through DDP,
        whose forward is a collective, and ranks score unequal shares of the val set."""
        model = self.ema.module if self.ema is not None else unwrap(self.model)
        if dist.is_available() and dist.is_initialized():
            for buf in model.buffers():
                dist.broadcast(buf, 0)
        return model


# ------------------------------------------------------------------ one epoch


def _set_lr(opt: torch.optim.Optimizer, factor: float, freeze_backbone: bool) -> float:
    lr = 0.0
    for g in opt.param_groups:
        g["lr"] = 0.0 if (freeze_backbone and not g["is_head"]) else g["base_lr"] * factor
        lr = max(lr, g["lr"])
    return lr


def step_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of optimizer step ``step`` on ``rank`` (mixup/cutmix, dropout): a
    function of the position in the run, so a resumed run draws what it would have."""
    return (seed * 1_000_003 + step) * 1_009 + rank


def train_one_epoch(learner: Learner, batches: Iterable[dict[str, Any]], epoch: int, step: int,
                    seed: int, rank: int, tracker: StepTracker | None = None) -> dict[str, float]:
    """One pass over ``batches`` of epoch index ``epoch``, from optimizer step ``step``;
    ``tracker.after_step`` runs after every step. Returns this rank's sums, the last lr,
    the step reached, ``step_seconds`` (inside steps; the rest of ``seconds`` is
    waiting for data) and ``first_batch_seconds``."""
    m = learner
    m.model.train()
    freeze = epoch < m.freeze_backbone_epochs
    stats = {"seen": 0, "loss_sum": 0.0, "correct": 0, "seconds": 0.0, "lr": 0.0, "step_seconds": 0.0,
             "first_batch_seconds": 0.0}
    t0 = time.perf_counter()
    for batch in batches:
        t_step = time.perf_counter()
        if not stats["seen"]:
            stats["first_batch_seconds"] = t_step - t0
        x = m.inputs(batch, epoch)
        y = batch["label"].to(m.device)
        torch.manual_seed(step_seed(seed, step, rank))
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
        stats["step_seconds"] += time.perf_counter() - t_step
        stats["seconds"] = time.perf_counter() - t0
        if tracker is not None:
            tracker.after_step(step, batch, stats)
    stats["seconds"] = time.perf_counter() - t0
    return {"step": step, **stats}


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[dict[str, Any]], cfg: AugmentConfig, device: torch.device,
             num_classes: int) -> dict[str, Any]:
    """Loss, count and confusion matrix (rows: true, cols: predicted) over all ranks:
    each rank scores its share of the val set (:func:`val_batches`), the sums are
    all-reduced."""
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    loss_sum, n = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            x = transforms.to_input(batch["image"], cfg.mean, cfg.std, device)
            y = batch["label"].to(device)
            logits = model(x).float()
            loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
            pred = logits.argmax(1)
            confusion += torch.bincount((y * num_classes + pred).cpu(),
                                        minlength=num_classes**2).view(num_classes, num_classes)
            n += len(y)
    loss_sum, n = _all_reduce([loss_sum, float(n)])
    if dist.is_available() and dist.is_initialized():
        confusion = confusion.to(device)
        dist.all_reduce(confusion)
        confusion = confusion.cpu()
    return {"loss_sum": loss_sum, "n": int(n), "confusion": confusion}


# ------------------------------------------------------------------ across ranks


def _all_reduce(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


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
    """After each optimizer step of one epoch: counts the rows trained on, calls the
    callbacks, beats (rank 0), and every ``train.checkpoint_every_steps`` steps writes a
    mid-epoch checkpoint with the epoch's position and sums."""

    def __init__(self, worker: Worker, state: TrainState, epoch: int) -> None:
        self.worker, self.state, self.epoch = worker, state, epoch
        self.position = 0  # rows of this epoch this rank has trained on
        self.carry = dict.fromkeys(SUMS, 0.0)  # sums of the steps before a mid-epoch restart
        if state.partial is not None and state.partial.epoch == epoch:
            self.position, self.carry = state.partial.position, dict(state.partial.sums)

    def after_step(self, step: int, batch: dict[str, Any], stats: dict[str, float]) -> None:
        w = self.worker
        self.position += len(batch["label"])
        w.callbacks.on_step(w.rank, self.epoch, batch)
        if w.rank == 0:
            w.beat(step)
        every = w.spec.config.train.checkpoint_every_steps
        if every and step % every == 0:
            self.checkpoint(step, stats)

    def checkpoint(self, step: int, stats: dict[str, float]) -> None:
        """A mid-epoch checkpoint (collective: every rank calls it at the same step)."""
        w = self.worker
        w.saver.save_mid_epoch(self.state, step, Partial(self.epoch, self.position, self.totals(stats)))
        w.callbacks.on_checkpoint(w.rank, self.epoch)

    def totals(self, stats: dict[str, float]) -> dict[str, float]:
        """The epoch's SUMS over all ranks, with those before a restart (collective)."""
        return {k: self.carry[k] + v for k, v in zip(SUMS, _all_reduce([stats[k] for k in SUMS]))}


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
                  ev: dict[str, Any], tr: dict[str, float], wall: float) -> bool:
    """Book the epoch: metrics (rank 0: metrics.jsonl and the epoch line), then its
    checkpoint. ``tr``: this rank's :func:`train_one_epoch` result; ``wall``: seconds
    since the previous epoch was booked (or the worker started). True when early
    stopping ends the run here."""
    cfg, world, n_train = worker.spec.config, worker.world, worker.spec.train_rows
    seen, vn = sums["seen"], ev["n"]
    val_acc = float(ev["confusion"].diag().sum()) / max(vn, 1)
    state.record(val_acc)
    metrics = {"epoch": epoch + 1, "step": state.step, "train_loss": sums["loss_sum"] / max(seen, 1),
               "train_accuracy": sums["correct"] / max(seen, 1), "val_loss": ev["loss_sum"] / max(vn, 1),
               "val_accuracy": val_acc, "best_val_accuracy": state.best_acc, "lr": tr["lr"],
               "train_images": int(seen), "val_images": int(vn),
               "dropped_train_images": int(n_train - seen),  # equal split's remainder
               "images_per_second": seen / max(sums["seconds"] / world, 1e-9),
               "epoch_seconds": sums["seconds"] / world,
               # this rank's wall time since the last epoch was booked, and the part of it
               # outside optimizer steps: waiting for data, val, the last checkpoint, start-up
               "wall_seconds": wall, "step_seconds": tr["step_seconds"],
               "overhead_seconds": wall - tr["step_seconds"],
               # where the overhead goes (this rank): the wait for the epoch's first batch,
               # the other waits for data, val, and booking the previous epoch (metrics +
               # checkpoint; in epoch 1: the worker's start instead)
               "first_batch_seconds": tr["first_batch_seconds"],
               "data_wait_seconds": tr["seconds"] - tr["step_seconds"] - tr["first_batch_seconds"],
               "val_seconds": tr["val_seconds"],
               "booking_seconds": wall - tr["seconds"] - tr["val_seconds"],
               "torch_threads": torch.get_num_threads()}  # CPU results are bitwise equal only at equal threads
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
    t_mark = time.perf_counter()
    spec: RunSpec = loop_config["spec"]
    cfg = spec.config
    storage.configure(config.storage_options(cfg))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(training_threads(cfg.train.torch_threads, ctx.get_local_world_size()))
    torch.manual_seed(cfg.train.seed)  # same init everywhere; DDP broadcasts rank 0's anyway
    device = ray.train.torch.get_device()
    learner = build_learner(spec, device, world)
    saver = CheckpointSaver(rank, spec.meta, learner.model, learner.opt, learner.ema)
    worker = Worker(spec, rank, world, saver, Heartbeat(spec.run_uri), callbacks.load(cfg.train.callbacks))
    state = _resume(worker)
    skip = state.partial.position if state.partial is not None and state.partial.epoch == state.epoch else 0
    data = TrainBatches(spec, rank, world, state.epoch, skip)
    try:
        for epoch in range(state.epoch, cfg.train.epochs):
            tracker = StepTracker(worker, state, epoch)
            state.partial = None
            tr = train_one_epoch(learner, data.epoch(epoch), epoch, state.step, cfg.train.seed, rank, tracker)
            state.step = int(tr["step"])
            t_val = time.perf_counter()
            ev = evaluate(learner.scorer(), val_batches(spec, rank, world), cfg.augment, device, len(spec.classes))
            now = time.perf_counter()
            tr["val_seconds"] = now - t_val
            stop = _finish_epoch(worker, state, epoch, tracker.totals(tr), ev, tr, now - t_mark)
            t_mark = now
            if stop:
                break
    finally:
        data.close()

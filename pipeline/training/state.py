"""What the driver hands the training workers (:class:`RunSpec`), the state a training
run resumes from (:class:`TrainState`, :class:`Partial`), and the one owner of
checkpoint policy (:class:`CheckpointSaver`).

A checkpoint folder is also a model artifact (``weights.pt`` + ``meta.json``, see
:mod:`pipeline.models.artifact`) plus ``train_state.pt``: model, optimizer (and EMA),
step (hence the schedule), best accuracy, the history; a mid-epoch one also the epoch's
data position (rows each rank has trained on, see :mod:`pipeline.data.stream`) and
running sums. Random draws need no saved state: augmentation is seeded per image and
epoch, everything else per optimizer step.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import ray.train
import torch
from torch import nn

from pipeline import names
from pipeline.config import Config
from pipeline.data.shardset import Manifest
from pipeline.models import artifact

SUMS = ("seen", "loss_sum", "correct", "seconds")  # per-epoch training sums, reduced over ranks
SCORE = "val_accuracy"  # Ray Train keeps the checkpoints scoring highest on this
MID_EPOCH_SCORE = -1.0  # a mid-epoch checkpoint is never the run's best
CHECKPOINT_PREFIX = "checkpoint_epoch_"  # every checkpoint folder of a run: RUN/checkpoint_epoch_*


@dataclass(frozen=True)
class RunSpec:
    """Everything a worker gets from the driver (Ray Train's ``train_loop_config``)."""

    config: Config
    manifest: Manifest  # the dataset (the train split's shards and their row counts)
    meta: dict[str, Any]  # meta.json of every checkpoint artifact, less its metrics and epoch
    run_uri: str
    pretrained_ref: Any = None  # ObjectRef of the verified ``model.pretrained`` state dict; None: none
    val_ref: Any = None  # ObjectRef of the transformed val set; None: read the "val" dataset shard

    @property
    def classes(self) -> list[str]:
        return self.manifest.classes

    @property
    def train_rows(self) -> int:
        return self.manifest.rows("train")


@dataclass
class Partial:
    """A mid-epoch checkpoint's data position: epoch index ``epoch``, of which every rank
    has trained on its first ``position`` rows, and the epoch's training sums so far."""

    epoch: int
    position: int  # rows per rank (equal on every rank)
    sums: dict[str, float]  # the SUMS over all ranks

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, **self.sums}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Partial:
        if "position" not in d:  # a checkpoint from before positions (a consumed-row bitmap)
            return cls(int(d["epoch"]), 0, dict.fromkeys(SUMS, 0.0))  # that epoch restarts
        return cls(int(d["epoch"]), int(d["position"]), {k: float(d[k]) for k in SUMS})


@dataclass
class TrainState:
    """Where training stands: the next epoch index to train and the optimizer step."""

    epoch: int = 0
    step: int = 0
    best_acc: float = -1.0
    since_best: int = 0  # epochs without a val improvement (early stopping)
    history: list[dict[str, Any]] = field(default_factory=list)  # metrics of finished epochs
    partial: Partial | None = None  # set after a mid-epoch restart, until that epoch starts

    def record(self, val_acc: float) -> None:
        """Book one finished epoch's val accuracy."""
        if val_acc > self.best_acc:
            self.best_acc, self.since_best = val_acc, 0
        else:
            self.since_best += 1


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DDP (and ``torch.compile``)."""
    return model.module if hasattr(model, "module") else model


class CheckpointSaver:
    """Checkpoint policy, in one place (after timm's ``CheckpointSaver``).

    - Epoch end: ``checkpoint_epoch_NNNN``, scored by its val accuracy.
    - Every ``train.checkpoint_every_steps`` steps: ``checkpoint_epoch_NNNN_step_SSSSSSS``
      holding the data position, scored ``MID_EPOCH_SCORE`` so it is never the best and
      is kept only while it is the latest.
    - Keep: Ray Train keeps the ``train.num_to_keep`` best (at least 1) and the latest
      (:meth:`ray_config`); a restart resumes from the latest (:meth:`restore`).
    - Atomic: rank 0 writes the folder in a local temp dir; Ray Train copies it to the
      run's storage and registers it only once complete. Every rank reports, as Ray
      Train requires.
    """

    def __init__(self, rank: int, meta: dict[str, Any], model: nn.Module, opt: torch.optim.Optimizer,
                 ema: nn.Module | None) -> None:
        self.rank, self.meta, self.model, self.opt, self.ema = rank, meta, model, opt, ema

    @staticmethod
    def ray_config(num_to_keep: int) -> ray.train.CheckpointConfig:
        return ray.train.CheckpointConfig(num_to_keep=max(1, num_to_keep), checkpoint_score_attribute=SCORE,
                                          checkpoint_score_order="max")

    def restore(self) -> TrainState | None:
        """Load the latest checkpoint into the model/optimizer; its train state, or None
        when the run starts fresh."""
        ckpt = ray.train.get_checkpoint()
        if not ckpt:
            return None
        with ckpt.as_directory() as d:
            st = torch.load(os.path.join(d, names.TRAIN_STATE), map_location="cpu", weights_only=True)
        unwrap(self.model).load_state_dict(st["model"])
        self.opt.load_state_dict(st["optimizer"])
        if self.ema is not None and "ema" in st:
            self.ema.load_state_dict(st["ema"])
        partial = Partial.from_dict(st["partial"]) if st.get("partial") is not None else None
        return TrainState(epoch=partial.epoch if partial else st["epoch"] + 1, step=st["step"],
                          best_acc=st["best_acc"], since_best=st["since_best"],
                          history=json.loads(st["history"]), partial=partial)

    def save_epoch(self, state: TrainState, epoch: int, metrics: dict[str, Any]) -> None:
        """The checkpoint at the end of epoch index ``epoch``."""
        self._report(metrics, epoch + 1, state, {"epoch": epoch, "step": state.step},
                     f"{CHECKPOINT_PREFIX}{epoch + 1:04d}")

    def save_mid_epoch(self, state: TrainState, step: int, partial: Partial) -> None:
        """A checkpoint inside epoch index ``partial.epoch`` after optimizer step ``step``."""
        e = partial.epoch
        metrics = {"epoch": e, "step": step, SCORE: MID_EPOCH_SCORE, "mid_epoch": True}
        self._report(metrics, e, state, {"epoch": e - 1, "step": step, "partial": partial.to_dict()},
                     f"{CHECKPOINT_PREFIX}{e + 1:04d}_step_{step:07d}")

    def _report(self, metrics: dict[str, Any], completed: int, state: TrainState,
                position: dict[str, Any], name: str) -> None:
        """``completed``: whole epochs in the weights; ``position``: where to resume."""
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if self.rank == 0:
                self._write(d, metrics, completed, state, position)
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)

    def _write(self, d: str, metrics: dict[str, Any], completed: int, state: TrainState,
               position: dict[str, Any]) -> None:
        weights = self.ema.module.state_dict() if self.ema is not None else unwrap(self.model).state_dict()
        weights = {k.removeprefix("_orig_mod."): v for k, v in weights.items()}
        artifact.save(d, weights, {**self.meta, "metrics": metrics, "epoch": completed})
        train_state = {"model": unwrap(self.model).state_dict(), "optimizer": self.opt.state_dict(),
                       "best_acc": state.best_acc, "since_best": state.since_best,
                       "history": json.dumps(state.history), **position}
        if self.ema is not None:
            train_state["ema"] = self.ema.state_dict()
        torch.save(train_state, os.path.join(d, names.TRAIN_STATE))

"""Training progress: the run's ``metrics.jsonl`` and ``_heartbeat.json`` (written by
rank 0), the driver thread that follows them, and the one epoch line both print.

Workers' own output reaches the console only with ``--verbose``; the driver prints the
same line as rank 0 appends each epoch, so a person sees loss, accuracy, images/s and
an ETA without Ray's chatter. Inside an epoch the driver draws a progress bar
(:mod:`pipeline.ops.console`) from the heartbeat's step: images done = steps this epoch x
``train.batch_size`` x ``train.num_workers`` (read from ``RUN/config.yaml``). The
heartbeat also lets the driver's stall detection see progress inside long epochs.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import yaml

from pipeline import names, storage
from pipeline.data import shardset
from pipeline.ops import console

HEARTBEAT_EVERY_S = 2.0  # rank 0 writes the heartbeat at most this often (the driver's bar moves with it)
POLL_S = 2.0  # the driver reads metrics and heartbeat this often


def lr_note(lr_per_256: float, global_batch: int) -> str:
    """What ``train.lr`` became: ``"(0.1 per 256 images x global batch 32)"``."""
    return f"({lr_per_256:g} per 256 images x global batch {global_batch})"


def epoch_line(metrics: dict[str, Any], epochs: int, tail: str, lr_explained: str = "") -> str:
    """The line printed for one finished epoch; ``tail`` ends it (duration or ETA);
    ``lr_explained`` (:func:`lr_note`) follows the learning rate."""
    m = metrics
    lr = f"lr {m['lr']:.4g}" + (f" {lr_explained}" if lr_explained else "")
    return (f"epoch {m['epoch']}/{epochs}  loss {m['train_loss']:.4f}  train_acc {m['train_accuracy']:.4f}  "
            f"val_acc {m['val_accuracy']:.4f}  {lr}  {m['images_per_second']:.0f} img/s  {tail}")


def write_metrics(run_uri: str, history: list[dict[str, Any]]) -> None:
    """Rewrite ``RUN/metrics.jsonl``: one JSON object per finished epoch."""
    text = "".join(json.dumps(h, sort_keys=True) + "\n" for h in history)
    storage.write_bytes(storage.join(run_uri, names.METRICS), text.encode())


def read_history(run_uri: str) -> list[dict[str, Any]]:
    """The epochs in ``RUN/metrics.jsonl`` so far ([] before the first)."""
    try:
        text = storage.read_text(storage.join(run_uri, names.METRICS))
    except storage.NotFound:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


class Heartbeat:
    """Rank 0 writes ``RUN/_heartbeat.json`` (step, time) at most every ``every_s``."""

    def __init__(self, run_uri: str, every_s: float = HEARTBEAT_EVERY_S) -> None:
        self.uri, self.every_s, self.last = storage.join(run_uri, names.HEARTBEAT), every_s, 0.0

    def __call__(self, step: int) -> None:
        now = time.time()
        if now - self.last >= self.every_s:
            self.last = now
            storage.write_json(self.uri, {"step": step, "time": now})


@dataclasses.dataclass(frozen=True)
class RunShape:
    """What the driver needs to turn steps into images, from ``RUN/config.yaml``."""

    lr: float  # train.lr: per 256 images of global batch
    global_batch: int  # train.batch_size x train.num_workers
    epoch_images: int | None  # images an epoch trains on (equal split over the ranks); None: unknown

    @classmethod
    def read(cls, run_uri: str) -> RunShape | None:
        try:
            cfg = yaml.safe_load(storage.read_text(storage.join(run_uri, names.RUN_CONFIG)))
            train = cfg["train"]
            world, batch = int(train["num_workers"]), int(train["batch_size"])
        except (storage.NotFound, KeyError, TypeError, ValueError, yaml.YAMLError):
            return None
        try:
            rows = shardset.read_manifest(cfg["data"]["manifest"]).rows("train")
            epoch_images: int | None = rows // world * world
        except Exception:  # noqa: BLE001 - only the bar's total is lost
            epoch_images = None
        return cls(float(train["lr"]), batch * world, epoch_images)


class MetricsFollower(threading.Thread):
    """On the driver: prints each epoch's line as rank 0 appends it to metrics.jsonl,
    draws the bar of the epoch in progress from the heartbeat, and calls ``beat``
    whenever the heartbeat's step or the history moves."""

    def __init__(self, run_uri: str, epochs: int, quiet: bool, beat: Callable[[], None] | None = None) -> None:
        super().__init__(daemon=True)
        self.run_uri, self.epochs, self.quiet, self.beat = run_uri, epochs, quiet, beat
        self.last_step = None
        history = read_history(run_uri)
        self.seen = len(history)  # a resumed run: print only new epochs
        self.epoch_start_step = int(history[-1].get("step", 0)) if history else 0
        self.shape: RunShape | None = None
        self.bar: Any = None
        self._stop_event = threading.Event()
        self.t0 = time.time()

    def run(self) -> None:
        while not self._stop_event.wait(POLL_S):
            self.poll()

    def poll(self) -> None:
        try:
            history = read_history(self.run_uri)
            hb = storage.join(self.run_uri, names.HEARTBEAT)
            step = storage.read_json(hb).get("step") if storage.exists(hb) else None
        except Exception:  # noqa: BLE001 - a half-written file: next poll
            return
        if self.beat is not None and step != self.last_step:
            self.last_step = step
            self.beat()
        for h in history[self.seen:]:
            self.seen += 1
            self.epoch_start_step = int(h.get("step", self.epoch_start_step))
            if self.beat is not None:
                self.beat()
            self._close_bar(h.get("train_images"))
            if not self.quiet:
                eta = (time.time() - self.t0) / max(1, self.seen) * max(0, self.epochs - h["epoch"])
                note = lr_note(self.shape.lr, self.shape.global_batch) if self._shape() else ""
                print(epoch_line(h, self.epochs, f"ETA {eta:.0f}s", note), file=sys.stderr, flush=True)
        if step is not None and self.seen < self.epochs:
            self._draw(int(step))

    def _shape(self) -> RunShape | None:
        if self.shape is None:
            self.shape = RunShape.read(self.run_uri)
        return self.shape

    def _draw(self, step: int) -> None:
        """Move the bar of the epoch in progress to ``step`` (rank 0's heartbeat)."""
        shape = self._shape()
        if self.quiet or shape is None or step <= self.epoch_start_step:
            return
        if self.bar is None:
            self.bar = console.bar(shape.epoch_images, f"epoch {self.seen + 1}/{self.epochs}")
        done = (step - self.epoch_start_step) * shape.global_batch
        if shape.epoch_images is not None:
            done = min(done, shape.epoch_images)
        self.bar.update(done - self.bar.n)

    def _close_bar(self, images: int | None) -> None:
        if self.bar is not None:
            if images is not None and images > self.bar.n:
                self.bar.update(images - self.bar.n)
            self.bar.close()
            self.bar = None

    def stop(self) -> None:
        self._stop_event.set()
        self.poll()
        self._close_bar(None)

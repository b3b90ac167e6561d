"""Training callbacks for tests (see :mod:`pipeline.training.callbacks`): id tracing and
fault injection, built inside every Ray Train worker from ``train.callbacks`` entries.

    from tests.train_callbacks import crash_once, trace_ids
    cfg.train.callbacks = [trace_ids(folder), crash_once(rank=1, epoch=1, batch=3, marker=path)]
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any
from urllib.parse import urlencode

from pipeline.training.callbacks import Callback


def _entry(cls: type, **params: Any) -> str:
    return f"{__name__}:{cls.__name__}?{urlencode(params)}"


class TraceIds(Callback):
    """Each rank appends the image ids it trained on to ``<folder>/rank<R>-epoch<E>.txt``
    when a checkpoint commits them (ids trained on after the last checkpoint of a crashed
    attempt are trained on again, and traced then)."""

    def __init__(self, folder: str) -> None:
        self.folder, self.pending = folder, []

    def on_step(self, rank: int, epoch: int, batch: dict[str, Any]) -> None:
        self.pending.extend(str(i) for i in batch["image_id"])

    def on_checkpoint(self, rank: int, epoch: int) -> None:
        if self.pending:
            with open(os.path.join(self.folder, f"rank{rank}-epoch{epoch}.txt"), "a") as f:
                f.write("".join(f"{i}\n" for i in self.pending))
            self.pending = []


class CrashOnce(Callback):
    """The worker of ``rank`` dies (``os._exit``) at batch index ``batch`` of epoch index
    ``epoch`` (after that step, before any checkpoint it would trigger), once (a marker
    file), after ``wait_s`` seconds (time for Ray Train's controller, which polls workers
    every 2 s, to have registered the last checkpoint)."""

    def __init__(self, rank: int, epoch: int, batch: int, marker: str, wait_s: float = 0.0) -> None:
        self.rank, self.epoch, self.batch, self.marker, self.wait_s = rank, epoch, batch, marker, wait_s
        self.seen: dict[int, int] = {}  # batches per epoch in this attempt

    def on_step(self, rank: int, epoch: int, batch: dict[str, Any]) -> None:
        index = self.seen.get(epoch, 0)
        self.seen[epoch] = index + 1
        if (rank, epoch, index) == (self.rank, self.epoch, self.batch) and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            time.sleep(self.wait_s)
            os._exit(1)


class RunAgain(Callback):
    """Rank 0, at its first step: runs ``python -m pipeline --quiet train <config>`` in
    ``cwd`` (a second run while this one holds the run's lease) and writes its exit code
    and stderr to ``<out>.rc`` and ``<out>.err``."""

    def __init__(self, config: str, cwd: str, out: str) -> None:
        self.config, self.cwd, self.out, self.done = config, cwd, out, False

    def on_step(self, rank: int, epoch: int, batch: dict[str, Any]) -> None:
        if rank != 0 or self.done:
            return
        self.done = True
        proc = subprocess.run([sys.executable, "-m", "pipeline", "--quiet", "train", self.config], cwd=self.cwd,
                              capture_output=True, text=True, timeout=300)
        with open(self.out + ".err", "w") as f:
            f.write(proc.stderr)
        with open(self.out + ".rc", "w") as f:  # last: the test waits for it
            f.write(str(proc.returncode))


def trace_ids(folder: str) -> str:
    """The ``train.callbacks`` entry of :class:`TraceIds`."""
    return _entry(TraceIds, folder=folder)


def crash_once(**params: Any) -> str:
    """The ``train.callbacks`` entry of :class:`CrashOnce`."""
    return _entry(CrashOnce, **params)


def run_again(**params: Any) -> str:
    """The ``train.callbacks`` entry of :class:`RunAgain`."""
    return _entry(RunAgain, **params)

"""Training progress: the run's ``metrics.jsonl`` and ``_heartbeat.json`` (written by
rank 0), the driver thread that follows them, and the one epoch line both print.

Workers' own output reaches the console only with ``--verbose``; the driver prints the
same line as rank 0 appends each epoch, so a person sees loss, accuracy, images/s and
an ETA without Ray's chatter. The heartbeat lets the driver's stall detection see
progress inside long epochs.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from pipeline import names, storage

HEARTBEAT_EVERY_S = 20.0  # rank 0 writes the heartbeat at most this often
POLL_S = 2.0  # the driver reads metrics and heartbeat this often


def epoch_line(metrics: dict[str, Any], epochs: int, tail: str) -> str:
    """The line printed for one finished epoch; ``tail`` ends it (duration or ETA)."""
    m = metrics
    return (f"epoch {m['epoch']}/{epochs}  loss {m['train_loss']:.4f}  train_acc {m['train_accuracy']:.4f}  "
            f"val_acc {m['val_accuracy']:.4f}  lr {m['lr']:.4f}  {m['images_per_second']:.0f} img/s  {tail}")


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


class MetricsFollower(threading.Thread):
    """On the driver: prints each epoch's line as rank 0 appends it to metrics.jsonl,
    and calls ``beat`` whenever the heartbeat's step or the history moves."""

    def __init__(self, run_uri: str, epochs: int, quiet: bool, beat: Callable[[], None] | None = None) -> None:
        super().__init__(daemon=True)
        self.run_uri, self.epochs, self.quiet, self.beat = run_uri, epochs, quiet, beat
        self.last_step = None
        self.seen = len(read_history(run_uri))  # a resumed run: print only new epochs
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
            if self.beat is not None:
                self.beat()
            if not self.quiet:
                eta = (time.time() - self.t0) / max(1, self.seen) * max(0, self.epochs - h["epoch"])
                print(epoch_line(h, self.epochs, f"ETA {eta:.0f}s"), file=sys.stderr, flush=True)

    def stop(self) -> None:
        self._stop_event.set()
        self.poll()

"""TensorBoard event files for a run: every numeric per-epoch metric as a scalar.

Written under ``RUN/tensorboard/`` with tensorboardX, for local run folders only.
"""

from __future__ import annotations

import os

from pipeline import names, storage

TAGS = {"train_loss": "loss/train", "val_loss": "loss/val", "train_accuracy": "accuracy/train",
        "val_accuracy": "accuracy/val", "best_val_accuracy": "accuracy/best_val", "lr": "lr",
        "images_per_second": "throughput/images_per_second", "epoch_seconds": "time/epoch_seconds"}
NOT_SCALARS = ("epoch", "step")  # counters, not metrics: the epoch is the step of every point
EVENTS_PREFIX = "events.out.tfevents."  # tensorboardX's event file names


def write_tensorboard(run_dir: str, history: list[dict]) -> None:
    """Write every numeric per-epoch metric as TensorBoard scalars to ``<run_dir>/tensorboard/``.

    The step is the epoch number. Event files written here before are replaced, so
    calling this again with the full history does not duplicate points. Remote run
    folders (``s3://``) are skipped silently: TensorBoard files there would need a
    local copy first.
    """
    if storage.is_remote(run_dir):
        return None
    # deferred: tensorboardX imports torch (seconds) and only training runs write events
    from tensorboardX import SummaryWriter

    logdir = os.path.join(storage.normalize(run_dir), names.TENSORBOARD_DIR)
    os.makedirs(logdir, exist_ok=True)
    for name in os.listdir(logdir):
        if name.startswith(EVENTS_PREFIX):
            os.unlink(os.path.join(logdir, name))
    writer = SummaryWriter(logdir=logdir)
    try:
        for i, h in enumerate(history):
            step = int(h.get("epoch", i + 1))
            for key, value in h.items():
                if key in NOT_SCALARS or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                writer.add_scalar(TAGS.get(key, f"other/{key}"), float(value), global_step=step)
    finally:
        writer.close()
    return None

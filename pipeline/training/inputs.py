"""What one training rank feeds its model: the whole-run training stream, cut into
epochs and batches, and the val set.

The stream (:func:`pipeline.data.stream.train_stream`) is built once per run (per
restart after a failure): its reader and decode + augment actors live until the run
ends, instead of an actor pool and a split coordinator per epoch. It is delivered in
order, so a rank's batches are a function of the config alone. With ``augment.device``
cuda/worker the batches hold encoded bytes, decoded and augmented here (:class:`BatchInput`).

Ray Data's executor runs in a :class:`pipeline.training.feed.StreamFeeder` actor next
to the rank, not in the rank (see that module for why).
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Iterator
from typing import Any

import numpy as np
import ray
import ray.train
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipeline import transforms
from pipeline.config import Config
from pipeline.training.feed import StreamFeeder
from pipeline.training.state import RunSpec

VAL_BATCH = 256  # images per val batch
FEEDER_CALLS_AHEAD = 4  # batch requests in flight to the feeder: hides a call's ~1 ms round trip


def as_tensor(a: np.ndarray) -> torch.Tensor:
    """A tensor over ``a`` without a copy. Arrays from the object store are read-only;
    these tensors are only read (the model input is a new float tensor), so torch's
    warning about non-writable arrays does not apply."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(a)


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

    def __call__(self, batch: dict[str, Any], epoch: int) -> torch.Tensor:
        images = batch["image"] if self.augment is None else self.augment(batch["image"], batch["image_id"], epoch)
        return transforms.to_input(images, self.mean, self.std, self.device, self.channels_last)


class TrainBatches:
    """This rank's training batches for the rest of the run, one epoch at a time."""

    def __init__(self, spec: RunSpec, rank: int, world: int, first_epoch: int, skip: int) -> None:
        cfg = spec.config
        self.decoded = cfg.augment.device == "cpu"
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        idle = not cfg.train.use_gpu  # CPU ranks compete with it for the cores; GPU ranks hardly do
        self.feeder = StreamFeeder.options(scheduling_strategy=here).remote(cfg, spec.manifest, rank, world,
                                                                              first_epoch, skip, idle)
        self.calls = deque(self.feeder.next.remote() for _ in range(FEEDER_CALLS_AHEAD))
        self.ahead: tuple[int, dict[str, Any]] | None = None

    def _next(self) -> tuple[int, dict[str, Any]] | None:
        """The stream's next item, None at its end (calls run in order: an actor's
        calls from one caller execute as submitted)."""
        while self.calls:
            item = ray.get(self.calls.popleft())
            if item is not None:
                self.calls.append(self.feeder.next.remote())
                return item
        return None

    def epoch(self, epoch: int) -> Iterator[dict[str, Any]]:
        """The batches of epoch index ``epoch`` (the stream must have reached it)."""
        while True:
            item = self.ahead if self.ahead is not None else self._next()
            self.ahead = None
            if item is None:
                return
            e, batch = item
            if e != epoch:
                if e < epoch:
                    raise RuntimeError(f"training stream at epoch {e}, expected {epoch}")
                self.ahead = item  # the next epoch's first batch
                return
            yield self._tensors(batch)

    def _tensors(self, b: dict[str, np.ndarray]) -> dict[str, Any]:
        """numpy -> torch (label int64; image uint8 when decoded, else the encoded bytes
        for :class:`BatchInput`); ids and rows stay numpy."""
        return {"image": as_tensor(b["image"]) if self.decoded else b["image"],
                "label": torch.from_numpy(b["label"].astype("int64")), "image_id": b["image_id"], "row": b["row"]}

    def close(self) -> None:
        """Stop the stream (its tasks and actors) before the run ends, e.g. early stopping."""
        self.calls.clear()
        ray.kill(self.feeder)


def _memory_batches(data: dict[str, np.ndarray], batch_size: int) -> Iterator[dict[str, Any]]:
    for i in range(0, len(data["label"]), batch_size):
        yield {"image": as_tensor(data["image"][i:i + batch_size]),
               "label": as_tensor(data["label"][i:i + batch_size])}


def val_batches(spec: RunSpec, rank: int, world: int) -> Iterator[dict[str, Any]]:
    """This rank's share of the val set (every image scored by exactly one rank; the
    loop all-reduces the sums): a contiguous slice of the arrays the driver transformed
    once into the object store (small sets), else every ``world``-th batch of Ray
    Train's unsplit "val" dataset (each rank reads it all, scores its share)."""
    if spec.val_ref is not None:
        data = ray.get(spec.val_ref)
        n = len(data["label"])
        lo, hi = n * rank // world, n * (rank + 1) // world
        return _memory_batches({k: v[lo:hi] for k, v in data.items()}, VAL_BATCH)
    shard = ray.train.get_dataset_shard("val")
    return ({"image": as_tensor(b["image"]), "label": torch.from_numpy(b["label"].astype("int64"))}
            for i, b in enumerate(shard.iter_batches(batch_size=VAL_BATCH, batch_format="numpy"))
            if i % world == rank)

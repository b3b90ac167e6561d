"""What one training rank feeds its model: the whole-run training stream, cut into
epochs and batches, and the val set.

The stream (:func:`pipeline.data.stream.train_stream`) is built here, inside the worker,
once per run (per restart after a failure): its read tasks and decode + augment actors
live until the run ends, instead of an actor pool and a split coordinator per epoch.
It is delivered in order, so a rank's batches are a function of the config alone.
With ``augment.device`` cuda/worker the batches hold encoded bytes, decoded and
augmented here (:class:`BatchInput`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import ray
import ray.data
import ray.train
import torch

from pipeline import config, transforms
from pipeline.config import Config
from pipeline.data import stream
from pipeline.ops.runtime import augment_pool
from pipeline.training.state import RunSpec

VAL_BATCH = 256  # images per val batch


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


def _stream(spec: RunSpec, rank: int, world: int, first_epoch: int, skip: int) -> ray.data.Dataset:
    """This rank's training rows from ``first_epoch`` (position ``skip``) to the end,
    decoded and augmented by its actor pool unless the worker augments."""
    cfg = spec.config
    ds = stream.train_stream(spec.manifest, cfg.train.seed, rank, world, first_epoch, cfg.train.epochs, skip)
    pool = augment_pool(cfg, world, ray.cluster_resources().get("CPU", 1.0))
    if pool.actors:
        ds = ds.map_batches(
            transforms.AugmentBatch, fn_constructor_kwargs={"cfg": config.to_dict(cfg)["augment"],
                                                             "size": cfg.data.image_size, "seed": cfg.train.seed},
            compute=ray.data.ActorPoolStrategy(size=pool.actors), num_cpus=pool.cpus_per_actor,
            batch_size=cfg.augment.batch_size)
    return stream.ordered(ds, cpu_limit=pool.cpu_limit)


class TrainBatches:
    """This rank's training batches for the rest of the run, one epoch at a time."""

    def __init__(self, spec: RunSpec, rank: int, world: int, first_epoch: int, skip: int) -> None:
        cfg = spec.config
        self.decoded = cfg.augment.device == "cpu"
        blocks = _stream(spec, rank, world, first_epoch, skip).iter_batches(batch_size=None, batch_format="numpy")
        self.batches = stream.epoch_batches(blocks, cfg.train.batch_size)
        self.ahead: tuple[int, dict[str, Any]] | None = None

    def epoch(self, epoch: int) -> Iterator[dict[str, Any]]:
        """The batches of epoch index ``epoch`` (the stream must have reached it)."""
        while True:
            item = self.ahead if self.ahead is not None else next(self.batches, None)
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
        return {"image": torch.from_numpy(b["image"]) if self.decoded else b["image"],
                "label": torch.from_numpy(b["label"].astype("int64")), "image_id": b["image_id"], "row": b["row"]}

    def close(self) -> None:
        """Stop the stream (its tasks and actors) before the run ends, e.g. early stopping."""
        self.batches.close()


def _memory_batches(data: dict[str, np.ndarray], batch_size: int) -> Iterator[dict[str, Any]]:
    for i in range(0, len(data["label"]), batch_size):
        yield {"image": torch.from_numpy(data["image"][i:i + batch_size]),
               "label": torch.from_numpy(data["label"][i:i + batch_size])}


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
    return ({"image": torch.from_numpy(b["image"]), "label": torch.from_numpy(b["label"].astype("int64"))}
            for i, b in enumerate(shard.iter_batches(batch_size=VAL_BATCH, batch_format="numpy"))
            if i % world == rank)

"""The process that runs one training rank's stream: :class:`StreamFeeder`.

Ray Data's executor runs in this actor next to the rank, not in the rank: while the
stream is ahead of training (the usual case) the executor's scheduling loop polls without
sleeping (Ray 2.60 waits in ``ray.wait`` only while one of its tasks runs). In the rank's
process that thread held the GIL against the training thread and took a core: on 2 CPUs
with 2 ranks, 7.1 of every 15 CPU-s of each rank went to it and 6.4 to training
(per-thread CPU time from ``/proc``, 20k benchmark, epoch 1). When training on CPU the
feeder runs at the idle scheduling class (Linux ``SCHED_IDLE``; nice 19 elsewhere): its
polling gets the CPU only when nothing else wants it. Ray runs its workers at nice 15,
so nice 19 alone still left the two feeders ~25% of a core each.

This module imports no torch: the feeder starts before the rank's first batch can
arrive, and importing torch and torchvision took 3.3 of the 4.3 s its imports took
(``python -c "import pipeline.training.inputs"`` on the 2-core machine). The augment
actors import them (:class:`Augment`).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import ray
import ray.data

from pipeline import config, storage
from pipeline.config import Config
from pipeline.data import stream
from pipeline.data.shardset import Manifest
from pipeline.ops.runtime import augment_pool


class Augment:
    """Ray Data actor: :class:`pipeline.transforms.AugmentBatch`, imported in the actor.
    The feeder only names this class when it builds the stream; importing
    ``pipeline.transforms`` there would cost it torch's import (see the module doc)."""

    def __init__(self, **kwargs: Any) -> None:
        from pipeline import transforms  # deferred: torch + torchvision, only in the actor

        self.augment = transforms.AugmentBatch(**kwargs)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.augment(batch)


def rank_stream(cfg: Config, manifest: Manifest, rank: int, world: int, first_epoch: int,
                skip: int) -> ray.data.Dataset:
    """This rank's training rows from ``first_epoch`` (position ``skip``) to the end,
    decoded and augmented by its actor pool unless the worker augments."""
    ds = stream.train_stream(manifest, cfg.train.seed, rank, world, first_epoch, cfg.train.epochs, skip)
    pool = augment_pool(cfg, world, ray.cluster_resources().get("CPU", 1.0))
    if pool.actors:
        ds = ds.map_batches(
            Augment, fn_constructor_kwargs={"cfg": config.to_dict(cfg)["augment"],
                                            "size": cfg.data.image_size, "seed": cfg.train.seed},
            compute=ray.data.ActorPoolStrategy(size=pool.actors), num_cpus=pool.cpus_per_actor,
            batch_size=cfg.augment.batch_size)
    return stream.ordered(ds, cpu_limit=pool.cpu_limit)


@ray.remote(num_cpus=0)
class StreamFeeder:
    """Runs one rank's training stream (Ray Data's executor) in its own process and hands
    the rank its ``(epoch, batch)`` items in stream order, one per call (see the module
    doc for why not in the rank). Lives as long as the rank's handle: an actor dies with
    the worker that created it, so a killed rank takes its feeder along."""

    def __init__(self, cfg: Config, manifest: Manifest, rank: int, world: int, first_epoch: int, skip: int,
                 idle: bool) -> None:
        storage.configure(config.storage_options(cfg))  # the stream's readers get these options
        if idle:  # for this thread and the threads it starts (the executor's)
            if hasattr(os, "sched_setscheduler"):
                os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            else:
                os.nice(19)
        blocks = rank_stream(cfg, manifest, rank, world, first_epoch, skip).iter_batches(
            batch_size=None, batch_format="numpy")
        self.items = stream.epoch_batches(blocks, cfg.train.batch_size)

    def next(self) -> tuple[int, dict[str, np.ndarray]] | None:
        """The next item; None at the end of the stream."""
        return next(self.items, None)

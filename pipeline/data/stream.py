"""The training stream, and everything exact mid-epoch resume needs on the data side.

- Order: each epoch visits the shards in :func:`epoch_order` of ``(seed, epoch)`` and
  permutes each shard's rows by ``(seed, epoch, shard)``; every row carries ``row``, its
  index in the split.
- The epoch clock: a tiny named actor (:class:`EpochClock`) that the training workers set
  before each epoch; the shard readers and the augment actors read the epoch from it.
- Consumed rows: a bitmap of the rows an epoch has trained on (``np.packbits``, one bit
  per row of the split). The training loop gathers each rank's row numbers at a
  checkpoint and folds them in with :func:`mark_consumed`; after a restart the clock
  holds that bitmap and the readers drop those rows (:func:`unconsumed`) before
  anything is decoded, so no sample is repeated or lost.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.data
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipeline import storage
from pipeline.data.shardset import Manifest, read_shard
from pipeline.errors import UserError
from pipeline.ops.runtime import READ_TASK_CPUS

log = logging.getLogger("imgpipe")

CLOCK_NAMESPACE = "imgpipe"


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """Shard visiting order for one epoch: a permutation depending only on (seed, epoch)."""
    order = list(range(n))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return order


# ------------------------------------------------------------------ consumed rows


def mark_consumed(n: int, consumed: np.ndarray | None, rows: Iterable[np.ndarray]) -> np.ndarray:
    """The consumed-row bitmap of a split of ``n`` rows (``np.packbits``): ``consumed``
    (None: nothing yet) with every row number in ``rows`` (one array per rank) set."""
    bits = np.zeros(n, dtype=bool) if consumed is None else np.unpackbits(consumed, count=n).astype(bool)
    for r in rows:
        bits[r] = True
    return np.packbits(bits)


def unconsumed(consumed: np.ndarray, n: int, rows: np.ndarray) -> np.ndarray:
    """A boolean mask over ``rows`` (row numbers in a split of ``n``): True where the
    bitmap ``consumed`` does not mark the row, i.e. still to train on this epoch."""
    return ~np.unpackbits(consumed, count=n).astype(bool)[rows]


# ------------------------------------------------------------------ reading


def _read_shard_batch(batch: pa.Table, uris: list[str], shas: list[str], offsets: list[int],
                      columns: list[str] | None, seed: int | None, clock_name: str | None,
                      opts: storage.StorageOptions) -> pa.Table:
    """Ray Data UDF: slot ``i`` -> the verified rows of one shard.

    When shuffling (``seed`` set) the slot maps to a shard by :func:`epoch_order`, the
    shard's rows are permuted by ``(seed, epoch, shard)``, each row carries ``row`` (its
    index in the split, for exact resume), and rows the epoch clock marks as consumed
    are dropped before anything is decoded."""
    storage.configure(opts)
    slot = batch.column("slot")[0].as_py()
    index, epoch, consumed = slot, 0, None
    if seed is not None:
        if clock_name:
            clock = ray.get_actor(clock_name, namespace=CLOCK_NAMESPACE)  # the driver made it
            epoch, consumed = ray.get(clock.state.remote())
        index = epoch_order(len(uris), seed, epoch)[slot]
    table = read_shard(uris[index], shas[index], columns)
    if seed is None:
        return table
    rows = np.arange(offsets[index], offsets[index] + table.num_rows, dtype=np.int64)
    perm = np.random.default_rng([seed, epoch, index]).permutation(table.num_rows)
    table, rows = table.take(perm), rows[perm]
    table = table.append_column("row", pa.array(rows))
    if consumed is not None:
        table = table.filter(pa.array(unconsumed(consumed, offsets[-1], rows)))
    return table


def read_split(manifest: Manifest, split: str, columns: list[str] | None = None,
               shuffle_seed: int | None = None, clock_name: str | None = None) -> ray.data.Dataset:
    """A Ray Dataset over one split's shards; each shard's sha256 is checked as it is read.

    With ``shuffle_seed`` (training): shards are visited in :func:`epoch_order` of
    ``(seed, epoch)`` and each shard's rows are permuted by ``(seed, epoch, shard)``,
    the epoch read from the run's :class:`EpochClock`; rows get a ``row`` column, and
    rows the clock marks consumed are skipped. Reads are small-CPU tasks: on a 2-CPU
    machine a 1-CPU file-listing task next to training workers deadlocks Ray Data (seen
    with ``read_parquet`` on Ray 2.60). The dataset's context (shared by the datasets
    built on it) raises a reader's own exception, e.g. :class:`~pipeline.data.shardset.ShardIntegrityError`.
    """
    uris = manifest.shard_uris(split)
    if not uris:
        raise UserError(f"split '{split}' of {manifest.root} is empty")
    shas = [s["sha256"] for s in manifest.splits[split]]
    offsets = [0]
    for s in manifest.splits[split]:
        offsets.append(offsets[-1] + s["rows"])
    slots = pa.table({"slot": list(range(len(uris)))})
    ds = ray.data.from_arrow([slots.slice(i, 1) for i in range(len(uris))])
    # A reader's error reaches the consumer as itself (ShardIntegrityError: bad input,
    # exit 2), not as Ray Data's UserCodeException, whose cause is lost on the way.
    # Neither Ray Data (DataContext.retried_map_errors, off by default) nor Ray Core
    # (application errors are not in the tasks' retry_exceptions) retries it: a shard
    # that fails its sha256 fails at once; storage.read_bytes retries transient I/O.
    ds.context.raise_original_map_exception = True
    return ds.map_batches(
        _read_shard_batch, batch_size=1, batch_format="pyarrow", num_cpus=READ_TASK_CPUS,
        fn_kwargs={"uris": uris, "shas": shas, "offsets": offsets, "columns": columns, "seed": shuffle_seed,
                   "clock_name": clock_name, "opts": storage.default_options()})


# ------------------------------------------------------------------ the epoch clock


class EpochClock:
    """A named actor holding the current epoch of a training run and, after a mid-epoch
    resume, the rows that epoch already consumed (a bitmap, see :func:`mark_consumed`):
    shard readers drop them."""

    def __init__(self) -> None:
        self.epoch = 0
        self.consumed: np.ndarray | None = None

    def set(self, epoch: int, consumed: np.ndarray | None = None) -> None:
        self.epoch, self.consumed = epoch, consumed

    def get(self) -> int:
        return self.epoch

    def state(self) -> tuple[int, np.ndarray | None]:
        return self.epoch, self.consumed


def epoch_clock(name: str, on_this_node: bool = False) -> Any:
    """Get or create the run's :class:`EpochClock` actor (0 CPU: bookkeeping only).

    The driver creates it with ``on_this_node``: pinned to the driver's node, like Ray
    Train's own controller, so losing a worker node cannot take the clock with it."""
    opts: dict[str, Any] = {"name": name, "namespace": CLOCK_NAMESPACE, "get_if_exists": True}
    if on_this_node:
        opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(
            ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0)(EpochClock).options(**opts).remote()

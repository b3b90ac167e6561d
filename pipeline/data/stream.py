"""Reading a split as a Ray Dataset, and the training stream: which rows each rank
trains on, in which order, for the whole run.

The training order is a pure function of ``(seed, epoch, rank, world size)``, decided
before anything is read (no ``streaming_split``, whose assignment of blocks to ranks
depends on timing):

- an epoch's global order: the shards in :func:`epoch_order` of ``(seed, epoch)``, each
  shard's rows permuted by ``(seed, epoch, shard)`` (pack writes shards as random
  samples of their split, so this mixes classes and sources);
- rank ``r`` of ``w`` takes positions ``[r*M, (r+1)*M)`` of that order, ``M = N // w``
  (every rank the same number of rows, hence of steps; the remainder, < w rows, is
  dropped that epoch): :func:`rank_slots`, as contiguous slices of shards;
- :func:`train_stream` is one Ray Dataset over all of a rank's remaining epochs, so the
  reader actor and the augment actors behind it start once per run, not per epoch. Each
  row carries ``epoch``, ``row`` (its index in the split) and ``pos`` (its position in
  the rank's epoch); :func:`epoch_batches` cuts the stream into training batches that
  never straddle an epoch.

Exact resume: a checkpoint records how many rows of the current epoch each rank has
trained on (the same for every rank); the resumed stream starts at that position, so
the remaining batches are the ones the uninterrupted run would have trained on.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.data

from pipeline import storage
from pipeline.data.shardset import Manifest, read_shard
from pipeline.errors import UserError
from pipeline.ops.runtime import READ_TASK_CPUS

TRAIN_COLUMNS = ["image_id", "image", "label"]


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """Shard visiting order for one epoch: a permutation depending only on (seed, epoch)."""
    order = list(range(n))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return order


def row_order(rows: int, seed: int, epoch: int, shard: int) -> np.ndarray:
    """The permutation of one shard's rows in one epoch."""
    return np.random.default_rng([seed, epoch, shard]).permutation(rows)


def rows_per_rank(n: int, world: int) -> int:
    """Rows each rank trains on per epoch (equal for all ranks)."""
    return n // world


@dataclass(frozen=True)
class Slot:
    """A contiguous slice ``[start, stop)`` of one shard's permuted rows, read as one
    task, at position ``pos`` of its rank's sequence for ``epoch``."""

    epoch: int
    shard: int
    start: int
    stop: int
    pos: int


def rank_slots(shard_rows: list[int], seed: int, epoch: int, rank: int, world: int) -> list[Slot]:
    """What rank ``rank`` of ``world`` reads in ``epoch``, in order (see the module doc)."""
    per = rows_per_rank(sum(shard_rows), world)
    lo, hi = rank * per, (rank + 1) * per
    slots, g = [], 0  # g: global position of the current shard's first row
    for shard in epoch_order(len(shard_rows), seed, epoch):
        n = shard_rows[shard]
        a, b = max(lo, g), min(hi, g + n)
        if a < b:
            slots.append(Slot(epoch, shard, a - g, b - g, a - lo))
        g += n
    return slots


# ------------------------------------------------------------------ reading


def _read_shard_batch(batch: pa.Table, uris: list[str], shas: list[str], columns: list[str] | None,
                      opts: storage.StorageOptions) -> pa.Table:
    """Ray Data UDF: slot ``i`` -> the verified rows of shard ``i``."""
    storage.configure(opts)
    index = batch.column("slot")[0].as_py()
    return read_shard(uris[index], shas[index], columns)


class SlotReader:
    """Ray Data actor: one :class:`Slot` -> its rows, in training order, with ``epoch``,
    ``row`` and ``pos``; rows before position ``skip`` of the slot's epoch are dropped
    before anything is decoded (``skip`` applies to the stream's first epoch only).

    An actor, not a task: the stream is backpressured most of the time (it runs ahead of
    training), and Ray reaps a task's worker process after about a second idle when a
    node has more idle workers than CPUs, so every read started a new process importing
    pyarrow and the pipeline (8 new read processes in 30 s of the 20k benchmark, ~2 CPU-s
    each on 2 cores). The actor lives for the run, like the augment actors."""

    def __init__(self, uris: list[str], shas: list[str], offsets: list[int], seed: int, skip: int,
                 opts: storage.StorageOptions) -> None:
        storage.configure(opts)
        self.uris, self.shas, self.offsets, self.seed, self.skip = uris, shas, offsets, seed, skip

    def __call__(self, batch: pa.Table) -> pa.Table:
        s = Slot(**{k: batch.column(k)[0].as_py() for k in Slot.__dataclass_fields__})
        table = read_shard(self.uris[s.shard], self.shas[s.shard], TRAIN_COLUMNS)
        take = row_order(table.num_rows, self.seed, s.epoch, s.shard)[s.start:s.stop]
        pos = np.arange(s.pos, s.pos + len(take), dtype=np.int64)
        if s.epoch == batch.column("first_epoch")[0].as_py() and self.skip > s.pos:
            keep = pos >= self.skip
            take, pos = take[keep], pos[keep]
        out = table.take(pa.array(take))
        return (out.append_column("row", pa.array(take + self.offsets[s.shard], pa.int64()))
                .append_column("pos", pa.array(pos))
                .append_column("epoch", pa.array(np.full(len(take), s.epoch, dtype=np.int64))))


def _one_row_blocks(rows: list[dict[str, Any]]) -> ray.data.Dataset:
    """A dataset with one block per row (one read task each), built in this process:
    ``ray.data.from_arrow`` computes each block's metadata in a 1-CPU task, which never
    runs inside a training worker when the trainers hold all but a fraction of a CPU
    (``augment.device: worker`` on 2 CPUs hung there)."""
    return ray.data.from_items(rows, override_num_blocks=len(rows))


def _raise_readers_errors(ds: ray.data.Dataset) -> None:
    # A reader's error reaches the consumer as itself (ShardIntegrityError: bad input,
    # exit 2), not as Ray Data's UserCodeException, whose cause is lost on the way.
    # Neither Ray Data (DataContext.retried_map_errors, off by default) nor Ray Core
    # (application errors are not in the tasks' retry_exceptions) retries it: a shard
    # that fails its sha256 fails at once; storage.read_bytes retries transient I/O.
    ds.context.raise_original_map_exception = True


def read_split(manifest: Manifest, split: str, columns: list[str] | None = None) -> ray.data.Dataset:
    """A Ray Dataset over one split's shards, in manifest order; each shard's sha256 is
    checked as it is read. Reads are small-CPU tasks: on a 2-CPU machine a 1-CPU read
    task next to training workers deadlocks Ray Data (seen with ``read_parquet`` on Ray
    2.60). The dataset's context (shared by the datasets built on it) raises a reader's
    own exception, e.g. :class:`~pipeline.data.shardset.ShardIntegrityError`."""
    uris = manifest.shard_uris(split)
    if not uris:
        raise UserError(f"split '{split}' of {manifest.root} is empty")
    shas = [s["sha256"] for s in manifest.splits[split]]
    ds = _one_row_blocks([{"slot": i} for i in range(len(uris))])
    _raise_readers_errors(ds)
    return ds.map_batches(_read_shard_batch, batch_size=1, batch_format="pyarrow", num_cpus=READ_TASK_CPUS,
                          fn_kwargs={"uris": uris, "shas": shas, "columns": columns,
                                     "opts": storage.default_options()})


def train_stream(manifest: Manifest, seed: int, rank: int, world: int, first_epoch: int, epochs: int,
                 skip: int = 0) -> ray.data.Dataset:
    """Rank ``rank``'s training rows for epochs ``first_epoch`` .. ``epochs - 1``, in
    order, as one dataset (columns ``image_id``, ``image``, ``label``, ``row``, ``pos``,
    ``epoch``), starting at position ``skip`` of ``first_epoch`` (a mid-epoch resume).
    Consume it with ``preserve_order`` set (see :func:`ordered`)."""
    split = manifest.splits["train"]
    if not split:
        raise UserError(f"split 'train' of {manifest.root} is empty")
    shard_rows = [s["rows"] for s in split]
    offsets = list(np.cumsum([0, *shard_rows]).tolist())
    slots = [dict(asdict(s), first_epoch=first_epoch) for e in range(first_epoch, epochs)
             for s in rank_slots(shard_rows, seed, e, rank, world)]
    slots = [s for s in slots if not (s["epoch"] == first_epoch and s["pos"] + s["stop"] - s["start"] <= skip)]
    if not slots:
        return ray.data.from_items([])
    ds = _one_row_blocks(slots)
    _raise_readers_errors(ds)
    return ds.map_batches(SlotReader, batch_size=1, batch_format="pyarrow", num_cpus=READ_TASK_CPUS,
                          compute=ray.data.ActorPoolStrategy(size=1),
                          fn_constructor_kwargs={"uris": manifest.shard_uris("train"),
                                                 "shas": [s["sha256"] for s in split], "offsets": offsets,
                                                 "seed": seed, "skip": skip, "opts": storage.default_options()})


def ordered(ds: ray.data.Dataset, cpu_limit: float | None = None) -> ray.data.Dataset:
    """``ds`` set to deliver its blocks in input order (parallel tasks and actors
    otherwise finish in any order), within ``cpu_limit`` logical CPUs when given (a
    dataset built inside a training worker shares the cluster with the other ranks'
    datasets: Ray Train excludes only its own workers' resources, and only for datasets
    it is handed)."""
    options = ds.context.execution_options
    options.preserve_order = True
    if cpu_limit is not None:
        options.resource_limits = options.resource_limits.copy(cpu=cpu_limit)
    return ds


def epoch_batches(blocks: Iterable[dict[str, np.ndarray]], batch_size: int) -> Iterator[tuple[int, dict[str, Any]]]:
    """(epoch, batch) from a stream of numpy blocks holding an ``epoch`` column: batches
    of ``batch_size`` rows in stream order, cut at epoch boundaries (an epoch's last
    batch may be smaller). The cut points depend only on the rows' order, never on how
    the stream happened to be blocked."""
    pending: list[dict[str, np.ndarray]] = []
    have, epoch = 0, None
    for block in blocks:
        epochs = block["epoch"]
        start = 0
        while start < len(epochs):
            e = int(epochs[start])
            if epoch is not None and e != epoch and pending:
                yield epoch, _concat(pending)
                pending, have = [], 0
            epoch = e
            stop = start + int(np.searchsorted(epochs[start:], e, side="right"))  # epochs never decrease
            stop = min(stop, start + batch_size - have)
            pending.append({k: v[start:stop] for k, v in block.items()})
            have += stop - start
            start = stop
            if have == batch_size:
                yield epoch, _concat(pending)
                pending, have = [], 0
    if pending:
        yield epoch, _concat(pending)


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(parts) == 1:
        return parts[0]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

"""The light Ray Data tasks of the inference path (no torch, so their workers start fast):
reading input rows, and writing the predictions files.

Input rows, from :func:`read_snapshot` (stored images) or :func:`read_split` (a packed
split): ``source``, ``bytes``, ``image_id`` (sha256 of the bytes), ``error`` (``""``
or ``"reason: message"``), ``truth`` (class index, -1 when unknown). They go on to
:mod:`pipeline.inference.actors`; :func:`write_part` writes what the model actors return.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import ray.data

from pipeline import storage
from pipeline.data import listings, shardset, stream
from pipeline.data.shardset import Manifest
from pipeline.names import ERRORS_DIR, PREDICT_SIDE_TABLE
from pipeline.ops.runtime import READ_TASK_CPUS

READ_BATCH = 64  # images per read / decode call; threads inside a read overlap S3 latency
PRED_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("source", pa.string()), ("label", pa.int32()),
    ("label_name", pa.string()), ("score", pa.float32()), ("topk_labels", pa.list_(pa.int32())),
    ("topk_scores", pa.list_(pa.float32())), ("model", pa.string()), ("run_id", pa.string()),
    ("topk_label_names", pa.list_(pa.string())),  # the names of topk_labels (added after run_id)
])
ERROR_SCHEMA = shardset.ERROR_SCHEMA


def read_objects(batch: dict[str, np.ndarray], opts: storage.StorageOptions) -> dict[str, np.ndarray]:
    """Ray Data task: fetch the batch's ``uri`` objects concurrently
    (:func:`pipeline.storage.read_many`) and hash them. An object gone since the listing
    or empty is an error row; 403 or a fault that outlasts the retries fails the task."""
    storage.configure(opts)
    uris = [str(u) for u in batch["uri"]]
    data: list[bytes] = []
    errors: list[str] = []
    for got in storage.read_many(uris, opts):
        if isinstance(got, storage.NotFound):
            data.append(b"")
            errors.append("missing: object disappeared after listing")
        elif isinstance(got, Exception):
            raise got
        else:
            data.append(got)
            errors.append("" if got else "empty: zero-byte file")
    return {"source": np.array(uris, dtype=object), "bytes": np.array(data, dtype=object),
            "image_id": np.array([hashlib.sha256(b).hexdigest() if b else "" for b in data], dtype=object),
            "error": np.array(errors, dtype=object), "truth": batch["truth"]}


def read_group(batch: dict[str, np.ndarray], uri: str, opts: storage.StorageOptions) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data task: the listing snapshot's row group ``batch["id"]`` (one ranged read),
    read :data:`READ_BATCH` objects at a time (:func:`read_objects`). One task per group,
    yielding as it reads, so rows reach the model while the group is read and no task
    takes more than one group."""
    storage.configure(opts)
    for g in batch["id"]:
        uris = listings.read_snapshot_group(uri, int(g), ["uri"]).column("uri").to_numpy()
        for i in range(0, len(uris), READ_BATCH):
            chunk = uris[i:i + READ_BATCH]
            yield read_objects({"uri": chunk, "truth": np.full(len(chunk), -1, dtype=np.int32)}, opts)


def read_snapshot(uri: str, opts: storage.StorageOptions) -> ray.data.Dataset:
    """Stored images named by the listing snapshot at ``uri``
    (:func:`pipeline.data.listings.write_input_listing`, or
    :func:`~pipeline.data.listings.write_remaining` for what is left to score).
    The driver holds neither the listing nor its rows: each task reads one row group
    (:data:`pipeline.data.listings.LISTING_GROUP` rows) itself. A task's error (e.g.
    :class:`pipeline.storage.Forbidden`) reaches the consumer as itself, not as Ray
    Data's UserCodeException (see :func:`pipeline.data.stream.read_split`)."""
    _, groups = listings.snapshot_shape(uri)
    # the group numbers as in-memory blocks (a few bytes each): no read task, which would
    # ask for a whole CPU that predict's actors may hold
    ds = ray.data.from_items([{"id": g} for g in range(groups)], override_num_blocks=max(groups, 1))
    ds.context.raise_original_map_exception = True
    # one op, batch_size=1: a second map_batches(batch_size=READ_BATCH) fused after this one
    # bundled READ_BATCH *groups* into one task, so all of a run's rows left the read stage
    # as one block and the predictions files were written only at the very end
    return ds.map_batches(read_group, fn_kwargs={"uri": uri, "opts": opts}, batch_size=1,
                          num_cpus=READ_TASK_CPUS)


def shard_rows(batch: dict[str, np.ndarray], skip: frozenset[str] = frozenset()) -> dict[str, np.ndarray]:
    """Ray Data task: shard rows (bytes and ids already there) as input rows, without
    the sources in ``skip``."""
    keep = np.array([s not in skip for s in batch["source"]], dtype=bool)
    return {"source": batch["source"][keep], "bytes": batch["image"][keep], "image_id": batch["image_id"][keep],
            "error": np.array([""] * int(keep.sum()), dtype=object), "truth": batch["label"][keep].astype(np.int32)}


def read_split(manifest: Manifest, split: str, skip: frozenset[str] = frozenset()) -> ray.data.Dataset:
    """The verified shards of one split of a packed dataset, without the sources in ``skip``."""
    ds = stream.read_split(manifest, split, columns=["image_id", "image", "label", "source"])
    # batch_size=None: fused into the one-shard read tasks, as in read_snapshot (a batch
    # size would bundle that many shards into one task)
    return ds.map_batches(shard_rows, fn_kwargs={"skip": skip}, num_cpus=READ_TASK_CPUS, batch_size=None)


# ------------------------------------------------------------------------ output


def part_digest(sources: list[str], model_name: str, run_id: str) -> str:
    """The ``<h>`` of a part file: its sources, the model and the run, so a retried task
    (or the resumed run) rewrites the same file while another run never writes over a
    committed one."""
    return hashlib.sha1(("\n".join(sorted(sources)) + "|" + model_name + "|" + run_id).encode()).hexdigest()[:20]


def write_part(batch: dict[str, Any], dst: str, model_name: str, run_id: str,
               opts: storage.StorageOptions) -> dict[str, Any]:
    """Ray Data task: write one predictions file ``part-<h>.parquet`` (+ its errors file
    ``_errors/part-<h>.pq``); ``<h>`` from :func:`part_digest`."""
    storage.configure(opts)
    sources = [str(s) for s in batch["source"]]
    digest = part_digest(sources, model_name, run_id)
    name, error_name = f"part-{digest}.parquet", f"part-{digest}{PREDICT_SIDE_TABLE}"
    bad = np.array([bool(e) for e in batch["error"]], dtype=bool)
    good = ~bad
    truth, label = np.asarray(batch["truth"]), np.asarray(batch["label"])
    if bad.any():
        errors = pa.table({"source": [s for s, e in zip(sources, bad) if e],
                           "image_id": [str(i) for i in np.asarray(batch["image_id"])[bad]],
                           "error": [str(x) for x in np.asarray(batch["error"])[bad]]}, schema=ERROR_SCHEMA)
        storage.write_table(storage.join(dst, ERRORS_DIR, error_name), errors)
    if good.any():
        table = pa.table({
            "image_id": [str(x) for x in np.asarray(batch["image_id"])[good]],
            "source": [s for s, g in zip(sources, good) if g],
            "label": label.astype(np.int32)[good],
            "label_name": [str(x) for x in np.asarray(batch["label_name"])[good]],
            "score": np.asarray(batch["score"], dtype=np.float32)[good],
            "topk_labels": [list(map(int, x)) for x, g in zip(batch["topk_labels"], good) if g],
            "topk_scores": [list(map(float, x)) for x, g in zip(batch["topk_scores"], good) if g],
            "model": [str(x) for x in np.asarray(batch["model"])[good]],
            "run_id": [str(x) for x in np.asarray(batch["run_id"])[good]],
            "topk_label_names": [list(map(str, x)) for x, g in zip(batch["topk_label_names"], good) if g],
        }, schema=PRED_SCHEMA)
        storage.write_table(storage.join(dst, name), table)
    return {"file": [name if good.any() else ""], "error_file": [error_name if bad.any() else ""],
            "rows": [int(good.sum())], "errors": [int(bad.sum())],
            "correct": [int(np.sum((label == truth)[good]))], "labelled": [int(np.sum(truth[good] >= 0))]}

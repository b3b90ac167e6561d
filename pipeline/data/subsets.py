"""Stratified subsets of a dataset's training split, each a dataset of its own.

:func:`stratified_subset` writes ``DST/manifest.json`` whose train split holds, per
class, the ``round(fraction * n_class)`` rows (at least one) that come first in the
order ``sha256(f"{seed}:{image_id}")``, copied into new shards under ``DST/train/``;
its val and test entries point at the source dataset's shards by absolute URI (the
same images, the same bytes, not copied). Subsets with one seed are nested: the 25%
subset holds the 10% one, so a learning curve's points differ only by the images
added. The manifest records what it was cut from (``subset_of``); a second call with
the same arguments reuses the committed subset.

The driver reads the train split's ``image_id`` and ``label`` columns (about 80 bytes a
row in memory: fine for the millions a learning curve on one machine trains on).
"""

from __future__ import annotations

import hashlib
import time
from collections import defaultdict
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import storage
from pipeline.data import shardset
from pipeline.data.packing import shard_path
from pipeline.data.shardset import Manifest
from pipeline.errors import UserError
from pipeline.names import MANIFEST


def check_fraction(fraction: float) -> None:
    if not 0.0 < fraction <= 1.0:
        raise UserError(f"subset fraction {fraction} must be in (0, 1]")


def chosen_ids(manifest: Manifest, fraction: float, seed: int) -> set[str]:
    """The train split's image ids in the subset (see the module doc)."""
    check_fraction(fraction)
    by_class: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for t in shardset.iter_split(manifest, "train", columns=["image_id", "label"]):
        for image_id, label in zip(t.column("image_id").to_pylist(), t.column("label").to_pylist()):
            by_class[label].append((hashlib.sha256(f"{seed}:{image_id}".encode()).hexdigest(), image_id))
    keep: set[str] = set()
    for rows in by_class.values():
        rows.sort()
        keep.update(image_id for _, image_id in rows[:max(1, round(fraction * len(rows)))])
    return keep


def _subset_record(manifest: Manifest, fraction: float, seed: int) -> dict[str, Any]:
    return {"root": manifest.root, "manifest_sha256": manifest.sha256, "fraction": fraction, "seed": seed}


def stratified_subset(manifest: Manifest, fraction: float, seed: int, dst: str) -> Manifest:
    """Write (or reuse) the subset of ``manifest``'s train split at ``dst``; its manifest."""
    dst = storage.normalize(dst)
    record = _subset_record(manifest, fraction, seed)
    if shardset.is_dataset(dst):
        done = shardset.read_manifest(dst)
        if done.raw.get("subset_of") == record:
            return done
        raise UserError(f"{dst} holds another dataset (not the {fraction} subset, seed {seed}, of "
                        f"{manifest.root}); choose another folder")
    keep = pa.array(sorted(chosen_ids(manifest, fraction, seed)))
    train = []
    for s in manifest.splits["train"]:
        table = shardset.read_shard(shardset.shard_uri(manifest.root, s["path"]), s["sha256"])
        table = table.filter(pc.is_in(table.column("image_id"), value_set=keep))
        if table.num_rows:
            path = shard_path("train", len(train))
            data = storage.write_table(storage.join(dst, path), table, compression="none")
            train.append({"path": path, "rows": table.num_rows, "sha256": hashlib.sha256(data).hexdigest()})
    splits = {split: [{**s, "path": shardset.shard_uri(manifest.root, s["path"])} for s in entries]
              for split, entries in manifest.splits.items() if split != "train"}
    raw = {k: v for k, v in manifest.raw.items() if k not in ("splits", "audit", "created")}
    storage.write_json(storage.join(dst, MANIFEST), {  # last: commits the subset
        **raw, "splits": {"train": train, **splits}, "subset_of": record,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return shardset.read_manifest(dst)

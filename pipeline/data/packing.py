"""``imgpipe pack``: a Ray Data job: the driver lists the source (streaming, paginated) and
assigns each image to a split and a shard; tasks read the images in parallel,
validate them by decoding, and write one shard each. Shard contents depend only on
the listing and the seed, and a shard file already present is reused, so rerunning
``pack`` after a crash neither duplicates nor loses an image.

    pack -> check_args, committed (no-op / refuse), lease.hold(DST) ->
    plan (list_source, assign_splits, shard_tasks) -> run_tasks (write_shard per task:
    fetch, check_image, write) -> tally -> separate_duplicates -> manifest.json (commits)

One image in one split: the split is decided per *listed* object (before any byte is
read), so two objects with identical bytes (one ``image_id``) could land in two splits.
:func:`separate_duplicates` fixes that after the shards are written, from 64-bit id
prefixes the tasks return; see its docstring.

An error inside a task (an integrity error, a refused object) reaches the caller as
itself, at once and never retried (:func:`write_shard`, :func:`raise_failure`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import images, storage
from pipeline.config import Config
from pipeline.data import audit
from pipeline.data.listings import check_source, list_source
from pipeline.data.shardset import (
    ERROR_SCHEMA,
    SHARD_SCHEMA,
    SPLITS,
    Manifest,
    is_dataset,
    read_manifest,
    read_shard,
)
from pipeline.errors import JobFailed, UserError
from pipeline.names import ERRORS_DIR, MANIFEST
from pipeline.ops import console, lease, preflight
from pipeline.ops.failures import (
    describe as describe_failure,  # a task's exception, returned as data
)
from pipeline.ops.failures import reraise as raise_failure  # ... and raised on the driver as itself
from pipeline.ops.runtime import READ_TASK_CPUS, ensure_ray
from pipeline.ops.watchdog import Watchdog

log = logging.getLogger("imgpipe")

READ_THREADS = 16  # threads validating images in one pack task (Pillow and hashlib release the GIL)
READ_BATCH = 256  # images one pack task fetches by one storage.read_many call (concurrent GETs)
# Cap on rows per shard when sizing by bytes: 128 MB of 1 KB thumbnails is ~120k rows,
# one task holding them all; 10k rows keeps task memory and parallelism bounded.
MAX_SHARD_ROWS_BY_BYTES = 10_000
TYPICAL_IMAGE_BYTES = 50_000.0  # a typical JPEG: the shard size guess when sizes are unknown
MAX_NAMED = 20  # missing URIs named in a task's result, the summary and the manifest
# Of several copies of one image in different splits, the first split here keeps them:
# the holdout keeps its images, training loses a copy it would otherwise memorise.
KEEP_ORDER = ("test", "val", "train")


# -------------------------------------------------------------------------- split


def _rank(seed: int, name: str) -> str:
    return hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()


def _common_folder(sources: list[str]) -> int:
    """Length of the folder prefix (through its last "/") that every source shares."""
    prefix = os.path.commonprefix(sources) if sources else ""
    return prefix.rfind("/") + 1


def assign_splits(listing: pa.Table, val: float, test: float, seed: int) -> dict[str, list[int]]:
    """Stratified, seeded split: per class, rows ranked by hash(seed, name), where a
    source's name is its URI without the folder all sources share (``<class>/<file>``
    for an ImageFolder), so the same images give the same split wherever they are
    stored; the first round(n*test) go to test, the next round(n*val) to val, the rest
    to train. Returns row indices per split, each ordered by rank (so shards mix classes)."""
    sources = listing.column("source").to_pylist()
    labels = listing.column("label_name").to_pylist()
    cut = _common_folder(sources)
    by_class: dict[str, list[tuple[str, int]]] = {}
    for i, (s, c) in enumerate(zip(sources, labels)):
        by_class.setdefault(c, []).append((_rank(seed, s[cut:]), i))
    out: dict[str, list[tuple[str, int]]] = {k: [] for k in SPLITS}
    for members in by_class.values():
        members.sort()
        n = len(members)
        n_test = round(n * test)
        n_val = round(n * val)
        if n - n_test - n_val < 1 and n > 0:  # every class keeps at least one training image
            n_val = max(0, n - n_test - 1)
        out["test"] += members[:n_test]
        out["val"] += members[n_test:n_test + n_val]
        out["train"] += members[n_test + n_val:]
    return {k: [i for _, i in sorted(v)] for k, v in out.items()}


# --------------------------------------------------------------- one shard (a task)


def shard_path(split: str, index: int) -> str:
    return f"{split}/part-{index:05d}.parquet"


def error_path(split: str, index: int) -> str:
    return f"{ERRORS_DIR}/{split}-part-{index:05d}.parquet"


class OriginCache:
    """Rows of packed shards (re-packing a shard set), one shard held at a time: bounds memory."""

    def __init__(self) -> None:
        self.uri = ""
        self.table: pa.Table | None = None

    def read(self, origin: str, sha256: str) -> bytes:
        """The image bytes at ``origin`` (``<shard uri>#<row>``)."""
        uri, _, row = origin.rpartition("#")
        if self.table is None or uri != self.uri:
            self.table, self.uri = read_shard(uri, sha256, columns=["image"]), uri
        return self.table.column("image")[int(row)].as_py()


@dataclass
class ShardRows:
    """What one task keeps, in listing order: good rows for the shard, bad ones for _errors/."""

    good: dict[str, list] = field(default_factory=lambda: {k: [] for k in SHARD_SCHEMA.names})
    bad: dict[str, list] = field(default_factory=lambda: {k: [] for k in ERROR_SCHEMA.names})

    def add(self, source: str, label: int, checked: tuple[bytes | None, str, str]) -> None:
        blob, image_id, error = checked
        if error:
            for k, v in zip(ERROR_SCHEMA.names, (source, image_id, error)):
                self.bad[k].append(v)
        else:
            for k, v in zip(SHARD_SCHEMA.names, (image_id, blob, label, source)):
                self.good[k].append(v)


def fetch(task: dict[str, Any], rows: range, cache: OriginCache) -> list[bytes | Exception]:
    """The bytes (or the read error) of ``rows`` of ``task``: objects by one batched
    :func:`storage.read_many` (concurrent GETs on s3fs' event loop), rows of origin
    shards (re-packing a shard set) from ``cache``, in this thread."""
    sources, origins, shas = task["sources"], task["origins"], task["origin_sha256"]
    blobs: list[bytes | Exception] = [b""] * len(rows)
    direct = [k for k, i in enumerate(rows) if not origins[i]]
    if direct:
        for k, blob in zip(direct, storage.read_many([sources[rows[k]] for k in direct])):
            blobs[k] = blob
    for k, i in enumerate(rows):
        if origins[i]:
            try:
                blobs[k] = cache.read(origins[i], shas[i])
            except storage.NotFound as e:
                blobs[k] = e
    return blobs


MISSING = "missing"  # the reason code of a listed object that does not exist


def check_image(blob: bytes | Exception, max_pixels: int, max_side: int = 0) -> tuple[bytes | None, str, str]:
    """(bytes to store, image_id, error) of one image. Runs in a thread pool: Pillow's
    decoder and hashlib release the GIL, so one task validates on several cores.
    ``max_side`` > 0: an image longer than that is stored shrunk (:func:`images.shrink`);
    its ``image_id`` stays the sha256 of the source's bytes, so copies are still found."""
    if isinstance(blob, storage.NotFound):
        return None, "", f"{MISSING}: {blob}"
    if isinstance(blob, Exception):  # Forbidden, retries exhausted, ...: fail the task
        raise blob
    image_id = hashlib.sha256(blob).hexdigest()
    try:
        stored = images.shrink(blob, max_side, max_pixels=max_pixels)  # validates, as images.check
    except images.ImageError as e:
        return None, image_id, f"{e.reason}: {e}"
    return stored, image_id, ""


def validate(task: dict[str, Any], max_pixels: int, max_side: int = 0) -> ShardRows:
    """Fetch and check every image of ``task``. Reads of batch k+1 overlap the
    validation of batch k (at most two batches held)."""
    out, cache = ShardRows(), OriginCache()
    sources, labels = task["sources"], task["labels"]
    with ThreadPoolExecutor(READ_THREADS) as pool:
        pending: list[tuple[int, Future]] = []
        for start in range(0, len(sources), READ_BATCH):
            rows = range(start, min(start + READ_BATCH, len(sources)))
            checks = [(i, pool.submit(check_image, blob, max_pixels, max_side))
                      for i, blob in zip(rows, fetch(task, rows, cache))]
            for i, fut in pending:
                out.add(sources[i], labels[i], fut.result())
            pending = checks
        for i, fut in pending:
            out.add(sources[i], labels[i], fut.result())
    return out


def write_shard(task: dict[str, Any], opts: storage.StorageOptions, max_pixels: int,
                max_side: int = 0) -> dict[str, Any]:
    """Read, validate and write one shard (a Ray Data task). Reuses a shard already there.

    An exception is returned, not raised (``failed``: :func:`describe_failure`): Ray Data
    would wrap it in a ``UserCodeException`` that crosses to the driver without its cause
    (only a remote traceback and Ray's retry hint as text), log it at ERROR, and could
    retry it. Returned, it fails the job at once, as itself (:func:`raise_failure`)."""
    try:
        return _write_shard(task, opts, max_pixels, max_side)
    except Exception as e:  # noqa: BLE001 - handed to the driver, which raises it
        return {"split": task["split"], "index": task["index"], "path": shard_path(task["split"], task["index"]),
                "rows": 0, "sha256": "", "bad": 0, "reasons": {}, "bytes": 0, "reused": False, "ids": b"",
                "facts": b"", "missing": "", "failed": describe_failure(e)}


def _write_shard(task: dict[str, Any], opts: storage.StorageOptions, max_pixels: int,
                 max_side: int) -> dict[str, Any]:
    storage.configure(opts)
    dst, split, index = task["dst"], task["split"], task["index"]
    reused = _reuse(dst, split, index)
    if reused is not None:
        return reused
    rows = validate(task, max_pixels, max_side)
    if rows.bad["source"]:  # errors first: a shard present implies its errors file is too
        storage.write_table(storage.join(dst, error_path(split, index)), pa.table(rows.bad, schema=ERROR_SCHEMA))
    table = pa.table(rows.good, schema=SHARD_SCHEMA)
    data = _write(dst, split, index, table)
    return _result(split, index, data, rows.good["image_id"], rows.bad["source"], rows.bad["error"],
                   reused=False, facts=audit.shard_facts(table))


def _write(dst: str, split: str, index: int, table: pa.Table) -> bytes:
    return storage.write_table(storage.join(dst, shard_path(split, index)), table,
                               compression="none")  # images are compressed already


def _reuse(dst: str, split: str, index: int) -> dict[str, Any] | None:
    """The result of a shard an earlier, interrupted run wrote, or None if absent."""
    shard_uri = storage.join(dst, shard_path(split, index))
    if not storage.exists(shard_uri):
        return None
    data = storage.read_bytes(shard_uri)
    table = pq.read_table(pa.BufferReader(data), columns=["image_id", "image", "label"])
    ids = table.column("image_id").to_pylist()
    error_uri = storage.join(dst, error_path(split, index))
    errors = (storage.read_table(error_uri, columns=["source", "error"]) if storage.exists(error_uri)
              else pa.table({"source": pa.array([], pa.string()), "error": pa.array([], pa.string())}))
    return _result(split, index, data, ids, errors.column("source").to_pylist(),
                   errors.column("error").to_pylist(), reused=True, facts=audit.shard_facts(table))


def _result(split: str, index: int, data: bytes, ids: list[str], bad_sources: list[str], errors: list[str],
            reused: bool, facts: bytes) -> dict[str, Any]:
    """One task's row in the job's output (Ray Data rows are dicts). ``ids``: the 64-bit
    prefixes of the shard's image ids, in row order (for :func:`separate_duplicates`);
    ``facts``: the audit's per-row facts (:func:`pipeline.data.audit.shard_facts`);
    ``missing``: up to :data:`MAX_NAMED` sources that do not exist."""
    missing = [s for s, e in zip(bad_sources, errors) if e.startswith(MISSING + ":")][:MAX_NAMED]
    return {"split": split, "index": index, "path": shard_path(split, index), "rows": len(ids),
            "sha256": hashlib.sha256(data).hexdigest(), "bad": len(errors), "reasons": _reasons(errors),
            "bytes": len(data), "reused": reused, "ids": id_keys(ids), "facts": facts,
            "missing": "\n".join(missing), "failed": ""}


def id_keys(ids: list[str]) -> bytes:
    """The first 8 bytes of each hex sha256 in ``ids``, concatenated (uint64 keys)."""
    return b"".join(bytes.fromhex(i[:16]) for i in ids)


def _reasons(errors: list[str]) -> dict[str, int]:
    """Counts per reason; an error reads ``<reason>: <detail>``."""
    return dict(Counter(e.split(":", 1)[0] for e in errors))


# ---------------------------------------------------------------- the job (driver)


@dataclass
class PackPlan:
    """What the driver decided before any image is read."""

    classes: list[str]  # label i is classes[i]
    tasks: list[dict[str, Any]]  # one per shard, the rows of :func:`write_shard`
    images: int  # listed
    rows_per_shard: int


def check_args(cfg: Config) -> None:
    """UserError (exit 2) naming the flag, for split and shard settings pack can not honour."""
    d = cfg.data
    for flag, key, value in (("--val", "data.val_fraction", d.val_fraction),
                             ("--test", "data.test_fraction", d.test_fraction)):
        if not 0 <= value < 1:  # also refuses NaN
            raise UserError(f"{flag} ({key}) must be in [0, 1); got {value}")
    if not d.val_fraction + d.test_fraction < 1:
        raise UserError(f"--val + --test (data.val_fraction + data.test_fraction) must be < 1 so that "
                        f"training keeps images; got {d.val_fraction} + {d.test_fraction}")
    if d.shard_rows < 0:
        raise UserError(f"--shard-rows (data.shard_rows) must be >= 0 (0: size shards by data.shard_mb); "
                        f"got {d.shard_rows}")
    if d.shard_rows == 0 and not d.shard_mb > 0:
        raise UserError(f"data.shard_mb must be > 0 when --shard-rows is 0; got {d.shard_mb}")
    if d.max_side < 0:
        raise UserError(f"--max-side (data.max_side) must be >= 0 (0: store images as they are); got {d.max_side}")
    if not 0 <= d.near_dup_distance <= 32:
        raise UserError(f"data.near_dup_distance must be in [0, 32] bits; got {d.near_dup_distance}")
    if d.dedupe == "near" and not audit.near_enabled():
        raise UserError(f"data.dedupe: near needs the perceptual hash: {audit.NEAR_SKIPPED.split(': ', 1)[1]}")


def settings(src: str, seed: int, cfg: Config) -> dict[str, Any]:
    """What decides a dataset's contents, as recorded in its manifest and compared on rerun."""
    out = {"source": storage.normalize(src), "seed": seed,
           "fractions": {"val": cfg.data.val_fraction, "test": cfg.data.test_fraction},
           "shard_rows": cfg.data.shard_rows}
    if cfg.data.shard_rows == 0:  # shards sized by bytes
        out["shard_mb"] = cfg.data.shard_mb
    out["max_side"] = cfg.data.max_side
    if cfg.data.dedupe != "exact":  # recorded only when it changes the splits from the default's
        out["dedupe"] = cfg.data.dedupe
        out["near_dup_distance"] = cfg.data.near_dup_distance
    if cfg.data.max_side > 0:  # shrunk images are re-encoded at this quality
        out["jpeg_quality"] = images.SHRINK_QUALITY
    return out


def committed(src: str, dst: str, seed: int, cfg: Config, classes: list[str] | None) -> Manifest | None:
    """The manifest at ``dst`` if it is committed from the same source and settings; None if
    nothing is committed there; UserError naming both if it was packed differently.
    (Keys an older manifest lacks are not compared, but for ``max_side``: 0, as it packed.)"""
    if not is_dataset(dst):
        return None
    m = read_manifest(dst)
    recorded = {"max_side": 0, **m.raw}
    differs = [f"{k} {recorded[k]!r} (committed) vs {v!r} (this run)"
               for k, v in settings(src, seed, cfg).items() if k in recorded and recorded[k] != v]
    if classes is not None and list(classes) != m.classes:
        differs.append(f"classes {m.classes} (committed) vs {list(classes)} (this run)")
    if differs:
        raise UserError(f"{dst} is already committed from {m.raw.get('source', '?')} with other settings: "
                        f"{'; '.join(differs)}; pack into a new DST (or delete {dst} first)")
    return m


def refuse_file(uri: str, role: str) -> None:
    """UserError (exit 2) if ``uri`` is an existing regular file (a folder is expected)."""
    if storage.exists(uri) and not storage.isdir(uri):
        raise UserError(f"{role} {uri} is a file; pack writes a dataset folder there: name a folder "
                        f"(new, or one packed from the same source)")


def plan(src: str, dst: str, cfg: Config, seed: int, classes: list[str] | None) -> PackPlan:
    """List ``src``, split it and cut it into shard tasks (the listing is freed on return)."""
    listing = list_source(src)
    classes = _class_names(listing, src, classes)
    parts = assign_splits(listing, cfg.data.val_fraction, cfg.data.test_fraction, seed)
    per_shard = _rows_per_shard(cfg, listing)
    return PackPlan(classes, shard_tasks(listing, parts, classes, per_shard, dst), listing.num_rows, per_shard)


def _class_names(listing: pa.Table, src: str, classes: list[str] | None) -> list[str]:
    found = sorted(set(listing.column("label_name").to_pylist()))  # contract: sorted names
    if classes is None:
        if len(found) < 2:
            raise UserError(f"{src} has {len(found)} class ({', '.join(found)}); a classifier needs at least "
                            f"two classes (<class>/<image> folders, or a listing's label column)")
        return found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise UserError(f"{src} has classes not in the dataset: {', '.join(unknown)}; valid: {', '.join(classes)}")
    if len(classes) < 2:
        raise UserError(f"classes {list(classes)}: a classifier needs at least two classes")
    return list(classes)


def _rows_per_shard(cfg: Config, listing: pa.Table) -> int:
    if cfg.data.shard_rows > 0:
        return cfg.data.shard_rows
    sizes = [s for s in listing.column("size").to_pylist() if s >= 0]
    mean = (sum(sizes) / len(sizes)) if sizes else TYPICAL_IMAGE_BYTES  # bytes
    return max(1, min(MAX_SHARD_ROWS_BY_BYTES, int(cfg.data.shard_mb * 1e6 / max(mean, 1.0))))


def shard_tasks(listing: pa.Table, parts: dict[str, list[int]], classes: list[str], per_shard: int,
                dst: str) -> list[dict[str, Any]]:
    """One :func:`write_shard` task per ``per_shard`` rows of each split, in split order."""
    class_index = {c: i for i, c in enumerate(classes)}
    cols = {k: listing.column(k).to_pylist() for k in ("source", "label_name", "origin", "origin_sha256")}
    tasks = []
    for split in SPLITS:
        idx = parts[split]
        for n, start in enumerate(range(0, len(idx), per_shard)):
            rows = idx[start:start + per_shard]
            tasks.append({"dst": dst, "split": split, "index": n,
                          "sources": [cols["source"][i] for i in rows],
                          "labels": [class_index[cols["label_name"][i]] for i in rows],
                          "origins": [cols["origin"][i] for i in rows],
                          "origin_sha256": [cols["origin_sha256"][i] for i in rows]})
    return tasks


def run_tasks(p: PackPlan, dst: str, cfg: Config, quiet: bool, t0: float) -> list[dict[str, Any]]:
    """Run the shard tasks on Ray Data under the stall watchdog; their results, as they
    finish. A task's exception is raised here as itself, once (:func:`raise_failure`): it
    was returned as data, so Ray Data neither retries it nor logs Ray's retry hint."""
    import ray.data  # deferred: ~1.7 s to import, and listing/splitting/write_shard need none of it

    ensure_ray(cfg, quiet=quiet)
    preflight.check(preflight.pack_request(cfg), "pack", cfg)
    ds = ray.data.from_items(p.tasks, override_num_blocks=max(1, len(p.tasks))).map(
        write_shard, fn_kwargs={"opts": storage.default_options(), "max_pixels": images.MAX_PIXELS,
                                "max_side": cfg.data.max_side},
        num_cpus=max(READ_TASK_CPUS, 0.5))
    results = []
    with Watchdog(f"pack into {dst}", dst, cfg.ray.stall_timeout_s) as dog, \
            console.bar(p.images, "pack", quiet) as progress:
        for r in ds.iter_rows():
            dog.beat()
            if r["failed"]:
                raise_failure(r["failed"])  # stops the job: the other tasks are cancelled
            results.append(r)
            progress.update(r["rows"] + r["bad"])
    return results


def tally(results: list[dict[str, Any]], total: int, src: str, dst: str, cfg: Config) -> tuple[int, dict[str, int]]:
    """(bad images, counts per reason); refuses a job with no good image or too many bad ones."""
    bad = sum(r["bad"] for r in results)
    conflicts = sum(_reasons_of(r).get(audit.LABEL_CONFLICT, 0) for r in results)  # data, not read errors
    missing = _missing(results)
    named = f"; missing: {', '.join(missing)}{' ...' if len(missing) >= MAX_NAMED else ''}" if missing else ""
    if missing:
        log.warning("pack: listed images that do not exist: %s%s", ", ".join(missing),
                    " ..." if len(missing) >= MAX_NAMED else "")
    if sum(r["rows"] for r in results) == 0:
        raise UserError(f"no readable images in {src}: all {bad} were bad (see {dst}/{ERRORS_DIR}/){named}")
    if (bad - conflicts) / max(total, 1) > cfg.data.max_bad_fraction:
        raise JobFailed(f"{bad} of {total} images are bad ({bad / total:.2%} > data.max_bad_fraction "
                        f"{cfg.data.max_bad_fraction:.2%}); see {dst}/{ERRORS_DIR}/ ; manifest not written{named}")
    reasons: Counter[str] = Counter()
    for r in results:
        reasons.update(_reasons_of(r))
    return bad, dict(reasons)


def _reasons_of(r: dict[str, Any]) -> dict[str, int]:
    """A result's counts per reason (Ray Data may hand a dict back with None for absent keys)."""
    return {k: v for k, v in (r["reasons"] or {}).items() if v}


def _missing(results: list[dict[str, Any]]) -> list[str]:
    """Up to :data:`MAX_NAMED` listed sources that do not exist, sorted."""
    return sorted(u for r in results for u in r["missing"].split("\n") if u)[:MAX_NAMED]


# ------------------------------------------------------- one image in one split


def separate_duplicates(results: list[dict[str, Any]], dst: str) -> int:
    """Keep every copy of an image (one ``image_id``) in one split; returns rows dropped.

    Splits are assigned per listed object before its bytes are read, so identical files
    under two names (or two class folders) can land in two splits. Hashing every image
    first would read the source twice; instead each task returns 64-bit prefixes of its
    ids, the driver finds prefixes present in more than one split (a few numpy set
    operations, 8 bytes per image), confirms them against the full ids in those shards
    only, and rewrites the shards of the losing splits without those rows: the split
    first in :data:`KEEP_ORDER` keeps the image. ``results`` is updated in place (rows,
    sha256, bytes of rewritten shards). Idempotent: a rerun after a crash reuses the
    rewritten shards, finds nothing left to separate, and commits the same dataset."""
    keys = [np.frombuffer(r["ids"], dtype=np.uint64) for r in results]
    per_split = [np.unique(np.concatenate([k for k, r in zip(keys, results) if r["split"] == s] or
                                          [np.empty(0, np.uint64)])) for s in SPLITS]
    values, counts = np.unique(np.concatenate(per_split), return_counts=True)
    candidates = values[counts > 1]
    if candidates.size == 0:
        return 0
    found: dict[int, list[str]] = {}  # result index -> full ids of its candidate rows
    for n, (k, r) in enumerate(zip(keys, results)):
        hit = np.isin(k, candidates)
        if hit.any():
            col = storage.read_table(storage.join(dst, r["path"]), columns=["image_id"]).column("image_id")
            found[n] = [i for i, h in zip(col.to_pylist(), hit) if h]
    splits_of: dict[str, set[str]] = {}
    for n, ids in found.items():
        for i in ids:
            splits_of.setdefault(i, set()).add(results[n]["split"])
    keep = {i: next(s for s in KEEP_ORDER if s in ss) for i, ss in splits_of.items() if len(ss) > 1}
    dropped = 0
    for n, ids in found.items():
        drop = {i for i in ids if i in keep and keep[i] != results[n]["split"]}
        if drop:
            results[n], gone = _drop_rows(dst, results[n], drop)
            dropped += gone
    if dropped:
        log.warning("pack: %d images had identical copies in other splits (%d ids); each kept in one split",
                    dropped, len(keep))
    return dropped


def _drop_rows(dst: str, r: dict[str, Any], ids: set[str]) -> tuple[dict[str, Any], int]:
    """Rewrite the shard of result ``r`` without rows whose image_id is in ``ids``."""
    table = read_shard(storage.join(dst, r["path"]), r["sha256"])
    kept = table.filter(pc.invert(pc.is_in(table.column("image_id"), value_set=pa.array(sorted(ids)))))
    data = storage.write_table(storage.join(dst, r["path"]), kept, compression="none")
    new = {**r, "rows": kept.num_rows, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
           "ids": id_keys(kept.column("image_id").to_pylist())}
    new["facts"] = audit.realign(audit.facts_of(r["facts"]), new["ids"]).tobytes()
    return new, table.num_rows - kept.num_rows


# ------------------------------------------------- label conflicts, near duplicates


def quarantine_conflicts(results: list[dict[str, Any]], dst: str, classes: list[str]) -> int:
    """Quarantine images whose bytes (one ``image_id``) are listed under two labels; returns rows.

    Candidates come from the tasks' audit facts (64-bit id key + label); they are confirmed
    against full ids in their shards only. Every copy leaves its shard (trained on under no
    label) for ``_errors/`` with reason :data:`pipeline.data.audit.LABEL_CONFLICT`: the error
    rows are written first, so a crash in between loses nothing, and a rerun (which reuses the
    rewritten shards) finds nothing left and counts them from ``_errors/``."""
    candidates = audit.conflicting_keys(audit.facts_of(r["facts"]) for r in results)
    if candidates.size == 0:
        return 0
    found: dict[int, list[tuple[str, int, str]]] = {}  # result index -> (image_id, label, source)
    keys = set(candidates.tolist())
    for n, r in enumerate(results):
        if np.isin(audit.facts_of(r["facts"])["key"], candidates).any():
            t = storage.read_table(storage.join(dst, r["path"]), columns=["image_id", "label", "source"])
            found[n] = [row for row in zip(*(t.column(c).to_pylist() for c in t.column_names))
                        if audit.id_key(row[0]) in keys]
    labels_of: dict[str, set[int]] = {}
    for rows in found.values():
        for image_id, label, _ in rows:
            labels_of.setdefault(image_id, set()).add(label)
    quarantined = 0
    for n, rows in found.items():
        drop = [(src, i, labels_of[i]) for i, _, src in rows if len(labels_of[i]) > 1]
        if drop:
            new = _append_errors(dst, results[n], [(src, i, f"{audit.LABEL_CONFLICT}: the same bytes are listed "
                                                    f"as {', '.join(sorted(classes[k] for k in labs))}")
                                                   for src, i, labs in drop])
            results[n], gone = _drop_rows(dst, results[n], {i for _, i, _ in drop})
            reasons = _reasons_of(results[n])  # a rerun's reused result counts earlier error rows already
            results[n] = {**results[n], "bad": results[n]["bad"] + new,
                          "reasons": {**reasons, audit.LABEL_CONFLICT: reasons.get(audit.LABEL_CONFLICT, 0) + new}}
            quarantined += gone
    if quarantined:
        log.warning("pack: %d images are listed under two labels; quarantined in %s/%s/ (%s)", quarantined,
                    dst, ERRORS_DIR, audit.LABEL_CONFLICT)
    return quarantined


def _append_errors(dst: str, r: dict[str, Any], rows: list[tuple[str, str, str]]) -> int:
    """Add ``rows`` (source, image_id, error) to the errors file of result ``r``'s shard,
    but those already there; returns how many were added."""
    uri = storage.join(dst, error_path(r["split"], r["index"]))
    old = storage.read_table(uri) if storage.exists(uri) else ERROR_SCHEMA.empty_table()
    seen = set(zip(old.column("source").to_pylist(), old.column("image_id").to_pylist()))
    new = [row for row in rows if (row[0], row[1]) not in seen]
    cols = list(zip(*new)) if new else [[], [], []]
    storage.write_table(uri, pa.concat_tables([old, pa.table([list(c) for c in cols], schema=ERROR_SCHEMA)]))
    return len(new)


def moved_path(split: str) -> str:
    """The shard holding images ``data.dedupe: near`` moved into ``split``."""
    return f"{split}/part-near.parquet"


def reuse_moved(results: list[dict[str, Any]], dst: str, reused: bool = True) -> None:
    """Add the moved-image shards (:func:`gather_near`) on storage to ``results``: on a
    rerun, those an interrupted run wrote (``reused``); after moving, this run's."""
    for split in SPLITS:
        uri = storage.join(dst, moved_path(split))
        if storage.exists(uri) and not any(r["path"] == moved_path(split) for r in results):
            data = storage.read_bytes(uri)
            table = pq.read_table(pa.BufferReader(data), columns=["image_id", "image", "label"])
            results.append({**_result(split, -1, data, table.column("image_id").to_pylist(), [], [], reused=reused,
                                      facts=audit.shard_facts(table)), "path": moved_path(split)})


def gather_near(results: list[dict[str, Any]], dst: str, max_distance: int) -> int:
    """``data.dedupe: near``: move every near-duplicate group (pHash within ``max_distance``
    bits, linked transitively) into one split, the first of :data:`KEEP_ORDER` it touches;
    returns images moved. The moved rows are written to the keeping split's
    :func:`moved_path` shard first, then dropped from their shards (a rerun reuses both)."""
    shards = [audit.Shard(r["split"], storage.join(dst, r["path"]), audit.facts_of(r["facts"])) for r in results]
    moves = audit.near_moves(shards, max_distance, KEEP_ORDER)  # shard index -> {image_id key: to split}
    for n, r in enumerate(results):
        if r["path"] == moved_path(r["split"]):  # moved once already: stays with its group
            moves.pop(n, None)
    moved = 0
    for split in SPLITS:
        tables = []
        for n, keys in moves.items():
            ids = _ids_with_keys(dst, results[n], [k for k, to in keys.items() if to == split])
            if ids:
                t = read_shard(storage.join(dst, results[n]["path"]), results[n]["sha256"])
                tables.append(t.filter(pc.is_in(t.column("image_id"), value_set=pa.array(sorted(ids)))))
        if not tables:
            continue
        uri = storage.join(dst, moved_path(split))
        old = [storage.read_table(uri)] if storage.exists(uri) else []
        storage.write_table(uri, pa.concat_tables(old + tables), compression="none")
    for n, keys in moves.items():
        results[n], gone = _drop_rows(dst, results[n], _ids_with_keys(dst, results[n], list(keys)))
        moved += gone
    results[:] = [r for r in results if r["path"] not in {moved_path(s) for s in SPLITS}]
    reuse_moved(results, dst, reused=False)
    if moved:
        log.warning("pack: %d near-duplicate images moved next to their copies' split (data.dedupe: near)", moved)
    return moved


def _ids_with_keys(dst: str, r: dict[str, Any], keys: list[int]) -> set[str]:
    if not keys:
        return set()
    col = storage.read_table(storage.join(dst, r["path"]), columns=["image_id"]).column("image_id").to_pylist()
    wanted = set(keys)
    return {i for i in col if audit.id_key(i) in wanted}


# ------------------------------------------------------------------ the command


def pack(src: str, dst: str, cfg: Config, seed: int = 0, quiet: bool = False,
         classes: list[str] | None = None) -> dict[str, Any]:
    """``imgpipe pack``: list ``src``, write shards and ``manifest.json`` under ``dst``.

    ``classes`` fixes the label mapping (new data for an existing dataset must use the
    dataset's classes); by default it is the sorted class names found in ``src``. A
    ``dst`` committed from the same source and settings is a no-op; from another, a
    UserError. The run holds ``dst``'s lease (:func:`pipeline.ops.lease.hold`), so a
    second pack into the same ``dst`` while this one lives exits 2."""
    t0 = time.time()
    check_args(cfg)
    dst = storage.normalize(dst)
    refuse_file(dst, "DST")
    done = committed(src, dst, seed, cfg, classes)  # a no-op reads nothing of SRC
    if done is None:
        check_source(src)  # SRC's errors before DST is touched (the lease writes there)
        with lease.hold(dst, what="pack", ttl_s=cfg.ray.lease_ttl_s) as held:
            done = committed(src, dst, seed, cfg, classes)  # a run that committed while we started
            if done is None:
                return _pack(src, dst, cfg, seed, quiet, classes, t0, held)
    log.info("pack: %s is already committed (%s) from the same source and settings; nothing to do", dst, MANIFEST)
    return _summary(done, dst, time.time() - t0, already=True)


def _pack(src: str, dst: str, cfg: Config, seed: int, quiet: bool, classes: list[str] | None, t0: float,
          held: lease.Held) -> dict[str, Any]:
    """The pack run proper, under the lease ``held``."""
    p = plan(src, dst, cfg, seed, classes)
    per_split = {sp: sum(len(t["sources"]) for t in p.tasks if t["split"] == sp) for sp in SPLITS}
    log.info("pack: %d images, %d classes -> %d shards of at most %d rows (%s) under %s",
             p.images, len(p.classes), len(p.tasks), p.rows_per_shard,
             ", ".join(f"{sp} {n}" for sp, n in per_split.items()), dst)
    results = run_tasks(p, dst, cfg, quiet, t0)
    reuse_moved(results, dst)
    results.sort(key=lambda r: (SPLITS.index(r["split"]), r["index"] if r["index"] >= 0 else len(results)))
    quarantine_conflicts(results, dst, p.classes)
    bad, reasons = tally(results, p.images, src, dst, cfg)
    duplicates = separate_duplicates(results, dst) if cfg.data.dedupe != "off" else 0
    moved = gather_near(results, dst, cfg.data.near_dup_distance) if cfg.data.dedupe == "near" else 0
    manifest = {
        "format": 1,
        "classes": p.classes,
        "splits": {s: [{"path": r["path"], "rows": r["rows"], "sha256": r["sha256"]}
                       for r in results if r["split"] == s] for s in SPLITS},
        **settings(src, seed, cfg),  # source, seed, fractions, shard_rows, max_side, ...: compared on rerun
        "rows_per_shard": p.rows_per_shard,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "bad_images": bad,
        "bad_reasons": reasons,
        "missing_sources": _missing(results),
        "cross_split_duplicates": duplicates,
        "audit": audit.summarize(p.classes, [audit.Shard(r["split"], storage.join(dst, r["path"]),
                                                         audit.facts_of(r["facts"])) for r in results],
                                 reasons, duplicates, cfg.data.near_dup_distance, moved),
    }
    held.check()  # never commit over a run that took the lease over
    storage.write_json(storage.join(dst, MANIFEST), manifest)  # last: commits the dataset
    return _summary(read_manifest(dst), dst, time.time() - t0, reused=sum(1 for r in results if r["reused"]))


def _summary(m: Manifest, dst: str, seconds: float, already: bool = False, reused: int = 0) -> dict[str, Any]:
    """The JSON line ``imgpipe pack`` prints."""
    images_total = sum(m.rows(s) for s in m.splits)
    out = {"dataset_uri": dst, "manifest_sha256": m.sha256, "classes": len(m.classes),
           "images": images_total, **{f"{s}_images": m.rows(s) for s in m.splits},
           "shards": sum(len(v) for v in m.splits.values()),
           "bad_images": m.raw.get("bad_images", 0), "bad_reasons": m.raw.get("bad_reasons", {}),
           "missing_sources": m.raw.get("missing_sources", []),
           "cross_split_duplicates": m.raw.get("cross_split_duplicates", 0),
           "seconds": round(seconds, 3), "already_committed": already, "reused_shards": reused}
    if not already and seconds > 0:
        out["images_per_second"] = round((images_total + out["bad_images"]) / seconds, 1)
    return out

"""``imgpipe pack``: a Ray Data job: the driver lists the source (streaming, paginated) and
assigns each image to a split and a shard; tasks read the images in parallel,
validate them by decoding, and write one shard each. Shard contents depend only on
the listing and the seed, and a shard file already present is reused, so rerunning
``pack`` after a crash neither duplicates nor loses an image.

    pack -> plan (list_source, assign_splits, shard_tasks) -> run_tasks (write_shard
    per task: fetch, check_image, write) -> tally -> manifest.json (commits)
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import images, storage
from pipeline.config import Config
from pipeline.data.listings import list_source
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
from pipeline.ops import preflight
from pipeline.ops.runtime import READ_TASK_CPUS, ensure_ray
from pipeline.ops.watchdog import Watchdog

log = logging.getLogger("imgpipe")

READ_THREADS = 16  # threads validating images in one pack task (Pillow and hashlib release the GIL)
READ_BATCH = 256  # images one pack task fetches by one storage.read_many call (concurrent GETs)
# Cap on rows per shard when sizing by bytes: 128 MB of 1 KB thumbnails is ~120k rows,
# one task holding them all; 10k rows keeps task memory and parallelism bounded.
MAX_SHARD_ROWS_BY_BYTES = 10_000
TYPICAL_IMAGE_BYTES = 50_000.0  # a typical JPEG: the shard size guess when sizes are unknown


# -------------------------------------------------------------------------- split


def _rank(seed: int, source: str) -> str:
    return hashlib.sha256(f"{seed}:{source}".encode()).hexdigest()


def assign_splits(listing: pa.Table, val: float, test: float, seed: int) -> dict[str, list[int]]:
    """Stratified, seeded split: per class, rows ranked by hash(seed, source); the
    first round(n*test) go to test, the next round(n*val) to val, the rest to train.
    Returns row indices per split, each ordered by rank (so shards mix classes)."""
    sources = listing.column("source").to_pylist()
    labels = listing.column("label_name").to_pylist()
    by_class: dict[str, list[tuple[str, int]]] = {}
    for i, (s, c) in enumerate(zip(sources, labels)):
        by_class.setdefault(c, []).append((_rank(seed, s), i))
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


def check_image(blob: bytes | Exception, max_pixels: int) -> tuple[bytes | None, str, str]:
    """(bytes, image_id, error) of one image. Runs in a thread pool: Pillow's decoder
    and hashlib release the GIL, so one task validates on several cores."""
    if isinstance(blob, storage.NotFound):
        return None, "", f"missing: {blob}"
    if isinstance(blob, Exception):  # Forbidden, retries exhausted, ...: fail the task
        raise blob
    image_id = hashlib.sha256(blob).hexdigest()
    try:
        images.check(blob, max_pixels=max_pixels)
    except images.ImageError as e:
        return None, image_id, f"{e.reason}: {e}"
    return blob, image_id, ""


def validate(task: dict[str, Any], max_pixels: int) -> ShardRows:
    """Fetch and check every image of ``task``. Reads of batch k+1 overlap the
    validation of batch k (at most two batches held)."""
    out, cache = ShardRows(), OriginCache()
    sources, labels = task["sources"], task["labels"]
    with ThreadPoolExecutor(READ_THREADS) as pool:
        pending: list[tuple[int, Future]] = []
        for start in range(0, len(sources), READ_BATCH):
            rows = range(start, min(start + READ_BATCH, len(sources)))
            checks = [(i, pool.submit(check_image, blob, max_pixels))
                      for i, blob in zip(rows, fetch(task, rows, cache))]
            for i, fut in pending:
                out.add(sources[i], labels[i], fut.result())
            pending = checks
        for i, fut in pending:
            out.add(sources[i], labels[i], fut.result())
    return out


def write_shard(task: dict[str, Any], opts: storage.StorageOptions, max_pixels: int) -> dict[str, Any]:
    """Read, validate and write one shard (a Ray Data task). Reuses a shard already there."""
    storage.configure(opts)
    dst, split, index = task["dst"], task["split"], task["index"]
    reused = _reuse(dst, split, index)
    if reused is not None:
        return reused
    rows = validate(task, max_pixels)
    if rows.bad["source"]:  # errors first: a shard present implies its errors file is too
        storage.write_table(storage.join(dst, error_path(split, index)), pa.table(rows.bad, schema=ERROR_SCHEMA))
    data = storage.write_table(storage.join(dst, shard_path(split, index)),
                               pa.table(rows.good, schema=SHARD_SCHEMA),
                               compression="none")  # images are compressed already
    return _result(split, index, data, len(rows.good["source"]), rows.bad["error"], reused=False)


def _reuse(dst: str, split: str, index: int) -> dict[str, Any] | None:
    """The result of a shard an earlier, interrupted run wrote, or None if absent."""
    shard_uri = storage.join(dst, shard_path(split, index))
    if not storage.exists(shard_uri):
        return None
    data = storage.read_bytes(shard_uri)
    rows = pq.read_metadata(pa.BufferReader(data)).num_rows
    error_uri = storage.join(dst, error_path(split, index))
    errors = (storage.read_table(error_uri, columns=["error"]).column("error").to_pylist()
              if storage.exists(error_uri) else [])
    return _result(split, index, data, rows, errors, reused=True)


def _result(split: str, index: int, data: bytes, rows: int, errors: list[str], reused: bool) -> dict[str, Any]:
    """One task's row in the job's output (Ray Data rows are dicts)."""
    return {"split": split, "index": index, "path": shard_path(split, index), "rows": rows,
            "sha256": hashlib.sha256(data).hexdigest(), "bad": len(errors), "reasons": _reasons(errors),
            "bytes": len(data), "reused": reused}


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
        return found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise UserError(f"{src} has classes not in the dataset: {', '.join(unknown)}; valid: {', '.join(classes)}")
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
    """Run the shard tasks on Ray Data under the stall watchdog; their results, as they finish."""
    import ray.data  # deferred: ~1.7 s to import, and listing/splitting/write_shard need none of it

    ensure_ray(cfg, quiet=quiet)
    preflight.check(preflight.pack_request(cfg), "pack", cfg)
    ds = ray.data.from_items(p.tasks, override_num_blocks=max(1, len(p.tasks))).map(
        write_shard, fn_kwargs={"opts": storage.default_options(), "max_pixels": images.MAX_PIXELS},
        num_cpus=max(READ_TASK_CPUS, 0.5))
    results, done = [], 0
    with Watchdog(f"pack into {dst}", dst, cfg.ray.stall_timeout_s) as dog:
        for r in ds.iter_rows():
            dog.beat()
            results.append(r)
            done += r["rows"] + r["bad"]
            if not quiet:
                rate = done / max(time.time() - t0, 1e-6)
                log.info("pack: %d/%d shards, %d/%d images, %.0f img/s, ETA %.0fs", len(results),
                         len(p.tasks), done, p.images, rate, (p.images - done) / max(rate, 1e-6))
    return results


def tally(results: list[dict[str, Any]], total: int, src: str, dst: str, cfg: Config) -> tuple[int, dict[str, int]]:
    """(bad images, counts per reason); refuses a job with no good image or too many bad ones."""
    bad = sum(r["bad"] for r in results)
    if sum(r["rows"] for r in results) == 0:
        raise UserError(f"no readable images in {src}: all {bad} were bad (see {dst}/{ERRORS_DIR}/)")
    if bad / max(total, 1) > cfg.data.max_bad_fraction:
        raise JobFailed(f"{bad} of {total} images are bad ({bad / total:.2%} > data.max_bad_fraction "
                        f"{cfg.data.max_bad_fraction:.2%}); see {dst}/{ERRORS_DIR}/ ; manifest not written")
    reasons: Counter[str] = Counter()
    for r in results:
        reasons.update(r["reasons"])
    return bad, dict(reasons)


def pack(src: str, dst: str, cfg: Config, seed: int = 0, quiet: bool = False,
         classes: list[str] | None = None) -> dict[str, Any]:
    """``imgpipe pack``: list ``src``, write shards and ``manifest.json`` under ``dst``.

    ``classes`` fixes the label mapping (new data for an existing dataset must use the
    dataset's classes); by default it is the sorted class names found in ``src``."""
    t0 = time.time()
    dst = storage.normalize(dst)
    if is_dataset(dst):
        log.info("pack: %s is already committed (%s); nothing to do", dst, MANIFEST)
        return _summary(read_manifest(dst), dst, time.time() - t0, already=True)
    p = plan(src, dst, cfg, seed, classes)
    log.info("pack: %d images, %d classes -> %d shards (%d rows each) under %s",
             p.images, len(p.classes), len(p.tasks), p.rows_per_shard, dst)
    results = run_tasks(p, dst, cfg, quiet, t0)
    bad, reasons = tally(results, p.images, src, dst, cfg)
    results.sort(key=lambda r: (SPLITS.index(r["split"]), r["index"]))
    manifest = {
        "format": 1,
        "classes": p.classes,
        "splits": {s: [{"path": r["path"], "rows": r["rows"], "sha256": r["sha256"]}
                       for r in results if r["split"] == s] for s in SPLITS},
        "source": storage.normalize(src),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seed": seed,
        "fractions": {"val": cfg.data.val_fraction, "test": cfg.data.test_fraction},
        "bad_images": bad,
        "bad_reasons": reasons,
    }
    storage.write_json(storage.join(dst, MANIFEST), manifest)  # last: commits the dataset
    return _summary(read_manifest(dst), dst, time.time() - t0, bad=bad, reasons=reasons,
                    reused=sum(1 for r in results if r["reused"]))


def _summary(m: Manifest, dst: str, seconds: float, already: bool = False, bad: int | None = None,
             reasons: dict | None = None, reused: int = 0) -> dict[str, Any]:
    """The JSON line ``imgpipe pack`` prints."""
    images_total = sum(m.rows(s) for s in m.splits)
    out = {"dataset_uri": dst, "manifest_sha256": m.sha256, "classes": len(m.classes),
           "images": images_total, **{f"{s}_images": m.rows(s) for s in m.splits},
           "shards": sum(len(v) for v in m.splits.values()),
           "bad_images": m.raw.get("bad_images", 0) if bad is None else bad,
           "bad_reasons": m.raw.get("bad_reasons", {}) if reasons is None else reasons,
           "seconds": round(seconds, 3), "already_committed": already, "reused_shards": reused}
    if not already and seconds > 0:
        out["images_per_second"] = round((images_total + out["bad_images"]) / seconds, 1)
    return out

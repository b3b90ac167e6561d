"""``imgpipe pack``: a Ray Data job: the driver lists the source (streaming, paginated) and
assigns each image to a split and a shard; tasks read the images in parallel,
validate them by decoding, and write one shard each. Shard contents depend only on
the listing and the seed, and a shard file already present is reused, so rerunning
``pack`` after a crash neither duplicates nor loses an image.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import images, storage
from pipeline.config import Config
from pipeline.data.listings import list_source
from pipeline.data.shardset import (
    ERROR_SCHEMA,
    MANIFEST,
    SHARD_SCHEMA,
    SPLITS,
    Manifest,
    read_manifest,
    read_shard,
)
from pipeline.errors import JobFailed, UserError

log = logging.getLogger("imgpipe")

READ_THREADS = 16  # threads validating images in one pack task (Pillow and hashlib release the GIL)
READ_BATCH = 256  # images one pack task fetches by one storage.read_many call (concurrent GETs)
# Cap on rows per shard when sizing by bytes: 128 MB of 1 KB thumbnails is ~120k rows,
# one task holding them all; 10k rows keeps task memory and parallelism bounded.
MAX_SHARD_ROWS_BY_BYTES = 10_000



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


# --------------------------------------------------------------------------- pack


def _shard_path(split: str, index: int) -> str:
    return f"{split}/part-{index:05d}.parquet"


def _error_path(split: str, index: int) -> str:
    return f"_errors/{split}-part-{index:05d}.parquet"


def _read_origin(origin: str, sha: str, cache: dict[str, pa.Table]) -> bytes:
    uri, _, row = origin.rpartition("#")
    if uri not in cache:
        cache.clear()  # one origin shard at a time bounds memory
        cache[uri] = read_shard(uri, sha, columns=["image"])
    return cache[uri].column("image")[int(row)].as_py()


def write_shard(task: dict[str, Any], opts: storage.StorageOptions, max_pixels: int) -> dict[str, Any]:
    """Read, validate and write one shard (a Ray Data task). Reuses a shard already there."""
    storage.configure(opts)
    dst, split, index = task["dst"], task["split"], task["index"]
    shard_uri = storage.join(dst, _shard_path(split, index))
    error_uri = storage.join(dst, _error_path(split, index))
    if storage.exists(shard_uri):  # written by an earlier, interrupted run: reuse it
        data = storage.read_bytes(shard_uri)
        rows = pq.read_metadata(io.BytesIO(data)).num_rows
        bad = pq.read_table(io.BytesIO(storage.read_bytes(error_uri)), columns=["error"]) if storage.exists(error_uri) else None
        return {"split": split, "index": index, "path": _shard_path(split, index), "rows": rows,
                "sha256": hashlib.sha256(data).hexdigest(), "bad": 0 if bad is None else bad.num_rows,
                "reasons": _reasons(bad.column("error").to_pylist() if bad is not None else []),
                "bytes": len(data), "reused": True}

    sources, labels, origins, shas = task["sources"], task["labels"], task["origins"], task["origin_sha256"]
    cache: dict[str, pa.Table] = {}

    def fetch(rows: range) -> list[bytes | Exception]:
        """The bytes (or the read error) of rows ``rows``: objects by one batched
        :func:`storage.read_many` (concurrent GETs on s3fs' event loop), rows of origin
        shards (re-packing a shard set) from the one-shard cache, in this thread."""
        blobs: list[bytes | Exception] = [b""] * len(rows)
        direct = [k for k, i in enumerate(rows) if not origins[i]]
        for k, blob in zip(direct, storage.read_many([sources[rows[k]] for k in direct]) if direct else []):
            blobs[k] = blob
        for k, i in enumerate(rows):
            if origins[i]:
                try:
                    blobs[k] = _read_origin(origins[i], shas[i], cache)
                except storage.NotFound as e:
                    blobs[k] = e
        return blobs

    def check(blob: bytes | Exception) -> tuple[bytes | None, str, str]:
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

    good: dict[str, list] = {"image_id": [], "image": [], "label": [], "source": []}
    bad: dict[str, list] = {"source": [], "image_id": [], "error": []}

    def collect(rows: range, checks: list) -> None:
        for i, fut in zip(rows, checks):
            blob, image_id, error = fut.result()
            if error:
                bad["source"].append(sources[i])
                bad["image_id"].append(image_id)
                bad["error"].append(error)
                continue
            good["image_id"].append(image_id)
            good["image"].append(blob)
            good["label"].append(labels[i])
            good["source"].append(sources[i])

    # Reads of batch k+1 overlap the validation of batch k (at most two batches held).
    with ThreadPoolExecutor(READ_THREADS) as pool:
        previous = None
        for start in range(0, len(sources), READ_BATCH):
            rows = range(start, min(start + READ_BATCH, len(sources)))
            checks = [pool.submit(check, blob) for blob in fetch(rows)]
            if previous is not None:
                collect(*previous)
            previous = (rows, checks)
        if previous is not None:
            collect(*previous)
    if bad["source"]:  # errors first: a shard present implies its errors file is too
        buf = io.BytesIO()
        pq.write_table(pa.table(bad, schema=ERROR_SCHEMA), buf)
        storage.write_bytes(error_uri, buf.getvalue())
    buf = io.BytesIO()
    pq.write_table(pa.table(good, schema=SHARD_SCHEMA), buf, compression="none")  # images are compressed already
    data = buf.getvalue()
    storage.write_bytes(shard_uri, data)
    return {"split": split, "index": index, "path": _shard_path(split, index), "rows": len(good["source"]),
            "sha256": hashlib.sha256(data).hexdigest(), "bad": len(bad["source"]),
            "reasons": _reasons(bad["error"]), "bytes": len(data), "reused": False}


def _reasons(errors: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in errors:
        k = e.split(":", 1)[0]
        out[k] = out.get(k, 0) + 1
    return out


def _rows_per_shard(cfg: Config, listing: pa.Table) -> int:
    if cfg.data.shard_rows > 0:
        return cfg.data.shard_rows
    sizes = [s for s in listing.column("size").to_pylist() if s >= 0]
    mean = (sum(sizes) / len(sizes)) if sizes else 50_000.0  # bytes; unknown sizes: a typical JPEG
    return max(1, min(MAX_SHARD_ROWS_BY_BYTES, int(cfg.data.shard_mb * 1e6 / max(mean, 1.0))))


def pack(src: str, dst: str, cfg: Config, seed: int = 0, quiet: bool = False,
         classes: list[str] | None = None) -> dict[str, Any]:
    """``imgpipe pack``: list ``src``, write shards and ``manifest.json`` under ``dst``.

    ``classes`` fixes the label mapping (new data for an existing dataset must use the
    dataset's classes); by default it is the sorted class names found in ``src``."""
    import ray.data

    from pipeline.ops.runtime import READ_TASK_CPUS, ensure_ray

    t0 = time.time()
    dst = storage.normalize(dst)
    if storage.exists(storage.join(dst, MANIFEST)):
        m = read_manifest(dst)
        log.info("pack: %s is already committed (%s); nothing to do", dst, MANIFEST)
        return _summary(m, dst, time.time() - t0, already=True)
    listing = list_source(src)
    found = sorted(set(listing.column("label_name").to_pylist()))  # contract: sorted names
    if classes is not None:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise UserError(f"{src} has classes not in the dataset: {', '.join(unknown)}; valid: {', '.join(classes)}")
    classes = list(classes) if classes is not None else found
    class_index = {c: i for i, c in enumerate(classes)}
    parts = assign_splits(listing, cfg.data.val_fraction, cfg.data.test_fraction, seed)
    per_shard = _rows_per_shard(cfg, listing)
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
    total = listing.num_rows
    del listing, cols
    log.info("pack: %d images, %d classes -> %d shards (%d rows each) under %s",
             total, len(classes), len(tasks), per_shard, dst)
    ensure_ray(cfg, quiet=quiet)
    from pipeline.ops import preflight
    from pipeline.ops.watchdog import Watchdog

    preflight.check(preflight.pack_request(cfg), "pack", cfg)
    opts = storage.default_options()
    max_pixels = images.MAX_PIXELS
    ds = ray.data.from_items(tasks, override_num_blocks=max(1, len(tasks))).map(
        lambda t: write_shard(t, opts, max_pixels), num_cpus=max(READ_TASK_CPUS, 0.5))
    results, done_images = [], 0
    with Watchdog(f"pack into {dst}", dst, cfg.ray.stall_timeout_s) as dog:
        for r in ds.iter_rows():
            dog.beat()
            results.append(r)
            done_images += r["rows"] + r["bad"]
            if not quiet:
                rate = done_images / max(time.time() - t0, 1e-6)
                eta = (total - done_images) / max(rate, 1e-6)
                log.info("pack: %d/%d shards, %d/%d images, %.0f img/s, ETA %.0fs",
                         len(results), len(tasks), done_images, total, rate, eta)
    bad = sum(r["bad"] for r in results)
    good = sum(r["rows"] for r in results)
    if good == 0:
        raise UserError(f"no readable images in {src}: all {bad} were bad (see {dst}/_errors/)")
    if bad / max(total, 1) > cfg.data.max_bad_fraction:
        raise JobFailed(f"{bad} of {total} images are bad ({bad / total:.2%} > data.max_bad_fraction "
                        f"{cfg.data.max_bad_fraction:.2%}); see {dst}/_errors/ ; manifest not written")
    reasons: dict[str, int] = {}
    for r in results:
        for k, v in r["reasons"].items():
            reasons[k] = reasons.get(k, 0) + v
    results.sort(key=lambda r: (SPLITS.index(r["split"]), r["index"]))
    manifest = {
        "format": 1,
        "classes": classes,
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

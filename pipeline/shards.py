"""Datasets as Parquet shards + ``manifest.json``: packing them, reading them back.

Layout (DESIGN.md contract)::

    DST/<split>/part-NNNNN.parquet   image_id (sha256 of bytes), image (encoded bytes),
                                     label int32, source (original URI)
    DST/_errors/<split>-part-NNNNN.parquet   source, image_id, error  (quarantined images)
    DST/manifest.json                written last: its presence commits the dataset

Packing is a Ray Data job: the driver lists the source (streaming, paginated) and
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
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline import images, storage
from pipeline.config import Config
from pipeline.errors import JobFailed, UserError

log = logging.getLogger("imgpipe")

MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SHARD_SCHEMA = pa.schema([("image_id", pa.string()), ("image", pa.binary()),
                          ("label", pa.int32()), ("source", pa.string())])
ERROR_SCHEMA = pa.schema([("source", pa.string()), ("image_id", pa.string()), ("error", pa.string())])
READ_THREADS = 16  # threads validating images in one pack task (Pillow and hashlib release the GIL)
READ_BATCH = 256  # images one pack task fetches by one storage.read_many call (concurrent GETs)
# Cap on rows per shard when sizing by bytes: 128 MB of 1 KB thumbnails is ~120k rows,
# one task holding them all; 10k rows keeps task memory and parallelism bounded.
MAX_SHARD_ROWS_BY_BYTES = 10_000


class ShardIntegrityError(UserError):
    """A shard whose bytes disagree with the manifest's sha256."""


# ----------------------------------------------------------------------- manifest


@dataclass
class Manifest:
    root: str  # URI of the dataset folder
    classes: list[str]
    splits: dict[str, list[dict[str, Any]]]  # split -> [{"path", "rows", "sha256"}]
    raw: dict[str, Any] = field(default_factory=dict)
    sha256: str = ""  # of manifest.json's bytes: identifies this dataset version

    def rows(self, split: str) -> int:
        return sum(s["rows"] for s in self.splits.get(split, []))

    def shard_uris(self, split: str) -> list[str]:
        self._check_split(split)
        return [shard_uri(self.root, s["path"]) for s in self.splits[split]]

    def _check_split(self, split: str) -> None:
        if split not in self.splits:
            raise UserError(f"split '{split}' not in {self.root}; valid: {', '.join(self.splits)}")


def shard_uri(root: str, path: str) -> str:
    """A manifest entry's shard URI: relative paths live under the dataset root; a
    versioned dataset (nightly retraining) may reference other versions' shards by
    absolute URI."""
    return path if (path.startswith("/") or "://" in path) else storage.join(root, path)


def manifest_root(uri: str) -> str:
    uri = storage.normalize(uri)
    return uri[: -len(MANIFEST) - 1] if uri.endswith("/" + MANIFEST) else uri


def read_manifest(uri: str) -> Manifest:
    """Read ``uri`` (a dataset folder or its manifest.json). UserError if absent."""
    root = manifest_root(uri)
    try:
        data = storage.read_bytes(storage.join(root, MANIFEST))
    except storage.NotFound:
        raise UserError(f"no dataset at {uri} (missing {MANIFEST}; run `imgpipe pack` first)") from None
    import json

    raw = json.loads(data)
    if raw.get("format") != 1:
        raise UserError(f"{root}/{MANIFEST}: unsupported format {raw.get('format')!r}; valid: 1")
    return Manifest(root=root, classes=list(raw["classes"]), splits=raw["splits"], raw=raw,
                    sha256=hashlib.sha256(data).hexdigest())


def read_shard(uri: str, sha256: str | None = None, columns: list[str] | None = None) -> pa.Table:
    """Read one shard, refusing it if its sha256 disagrees with ``sha256``."""
    data = storage.read_bytes(uri)
    if sha256 is not None:
        digest = hashlib.sha256(data).hexdigest()
        if digest != sha256:
            raise ShardIntegrityError(
                f"shard {uri} is corrupt or was changed: sha256 {digest[:12]}... != manifest {sha256[:12]}...")
    return pq.read_table(io.BytesIO(data), columns=columns)


def iter_split(manifest: Manifest, split: str, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """Verified shard tables of one split, in manifest order (driver-side; small data, tests)."""
    manifest._check_split(split)
    for s in manifest.splits[split]:
        yield read_shard(shard_uri(manifest.root, s["path"]), s["sha256"], columns)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """Shard visiting order for one epoch: a permutation depending only on (seed, epoch)."""
    import random

    order = list(range(n))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return order


def _read_shard_batch(batch: pa.Table, uris: list[str], shas: list[str], offsets: list[int],
                      columns: list[str] | None, seed: int | None, clock_name: str | None,
                      opts: storage.StorageOptions) -> pa.Table:
    """Ray Data UDF: slot ``i`` -> the verified rows of one shard.

    When shuffling (``seed`` set) the slot maps to a shard by :func:`epoch_order`, the
    shard's rows are permuted by ``(seed, epoch, shard)``, each row carries ``row`` (its
    index in the split, for exact resume), and rows the epoch clock marks as consumed
    are dropped before anything is decoded."""
    import numpy as np

    storage.configure(opts)
    slot = batch.column("slot")[0].as_py()
    index, epoch, consumed = slot, 0, None
    if seed is not None:
        if clock_name:
            import ray

            clock = ray.get_actor(clock_name, namespace="imgpipe")
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
        done = np.unpackbits(consumed, count=offsets[-1]).astype(bool)[rows]
        table = table.filter(pa.array(~done))
    return table


def read_split(manifest: Manifest, split: str, columns: list[str] | None = None,
               shuffle_seed: int | None = None, clock_name: str | None = None):
    """A Ray Dataset over one split's shards; each shard's sha256 is checked as it is read.

    With ``shuffle_seed`` (training): shards are visited in :func:`epoch_order` of
    ``(seed, epoch)`` and each shard's rows are permuted by ``(seed, epoch, shard)``,
    the epoch read from the run's epoch clock actor (see :mod:`pipeline.augment`); rows
    get a ``row`` column, and rows the clock marks consumed are skipped. Reads are
    small-CPU tasks: on a 2-CPU machine a 1-CPU file-listing task next to training
    workers deadlocks Ray Data (seen with ``read_parquet`` on Ray 2.60).
    """
    import ray.data

    from pipeline.runtime import READ_TASK_CPUS

    uris = manifest.shard_uris(split)
    if not uris:
        raise UserError(f"split '{split}' of {manifest.root} is empty")
    shas = [s["sha256"] for s in manifest.splits[split]]
    offsets = [0]
    for s in manifest.splits[split]:
        offsets.append(offsets[-1] + s["rows"])
    slots = pa.table({"slot": list(range(len(uris)))})
    return ray.data.from_arrow([slots.slice(i, 1) for i in range(len(uris))]).map_batches(
        _read_shard_batch, batch_size=1, batch_format="pyarrow", num_cpus=READ_TASK_CPUS,
        fn_kwargs={"uris": uris, "shas": shas, "offsets": offsets, "columns": columns, "seed": shuffle_seed,
                   "clock_name": clock_name, "opts": storage.default_options()})


# ------------------------------------------------------------------------ listing


def _label_names_from_ints(labels: list) -> list[str]:
    return [str(int(v)) for v in labels]


def list_source(src: str) -> pa.Table:
    """List ``src`` into a table (source, label_name, size, origin, origin_sha256).

    ``src`` is an ImageFolder prefix (``<class>/<file>``), a CSV/Parquet listing with
    columns ``uri,label`` (labels as names or ints), or a packed shard set (origin then
    points into its shards, so re-splitting never goes back to the original objects).
    """
    norm = storage.normalize(src)
    low = norm.lower()
    if low.endswith((".csv", ".parquet")):
        return _list_listing(norm)
    if storage.exists(storage.join(norm, MANIFEST)):
        return _list_shard_set(norm)
    if not storage.exists(norm):
        raise UserError(f"source not found: {src}")
    sources, labels, sizes = [], [], []
    prefix_len = len(norm.rstrip("/")) + 1
    for info in storage.iter_files(norm, IMAGE_SUFFIXES):
        rel = info.uri[prefix_len:]
        if "/" not in rel:
            continue  # a file at the top level has no class folder
        sources.append(info.uri)
        labels.append(rel.split("/", 1)[0])
        sizes.append(info.size)
    if not sources:
        raise UserError(f"no images found under {src} (expected <class>/<image> with suffix "
                        f"{', '.join(IMAGE_SUFFIXES)})")
    n = len(sources)
    return pa.table({"source": sources, "label_name": labels, "size": pa.array(sizes, pa.int64()),
                     "origin": [""] * n, "origin_sha256": [""] * n})


def _list_listing(uri: str) -> pa.Table:
    try:
        data = storage.read_bytes(uri)
    except storage.NotFound:
        raise UserError(f"listing file not found: {uri}") from None
    table = pq.read_table(io.BytesIO(data)) if uri.lower().endswith(".parquet") else pacsv.read_csv(io.BytesIO(data))
    missing = {"uri", "label"} - set(table.column_names)
    if missing:
        raise UserError(f"listing {uri} needs columns uri,label; missing {', '.join(sorted(missing))} "
                        f"(has {', '.join(table.column_names)})")
    if table.num_rows == 0:
        raise UserError(f"listing {uri} is empty")
    labels = table.column("label").to_pylist()
    names = _label_names_from_ints(labels) if pa.types.is_integer(table.column("label").type) else [str(v) for v in labels]
    n = table.num_rows
    return pa.table({"source": [str(u) for u in table.column("uri").to_pylist()], "label_name": names,
                     "size": pa.array([-1] * n, pa.int64()), "origin": [""] * n, "origin_sha256": [""] * n})


def _list_shard_set(root: str) -> pa.Table:
    m = read_manifest(root)
    cols: dict[str, list] = {"source": [], "label_name": [], "size": [], "origin": [], "origin_sha256": []}
    for shards_ in m.splits.values():
        for s in shards_:
            uri = shard_uri(m.root, s["path"])
            t = read_shard(uri, s["sha256"], columns=["source", "label"])
            for i, (src, lab) in enumerate(zip(t.column("source").to_pylist(), t.column("label").to_pylist())):
                cols["source"].append(src)
                cols["label_name"].append(m.classes[lab])
                cols["size"].append(-1)
                cols["origin"].append(f"{uri}#{i}")
                cols["origin_sha256"].append(s["sha256"])
    return pa.table(cols)


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

    from pipeline.runtime import READ_TASK_CPUS, ensure_ray

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
    from pipeline import preflight
    from pipeline.watchdog import Watchdog

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

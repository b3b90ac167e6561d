"""Listing a source: ImageFolder prefix, CSV/Parquet listing, or a packed shard set.
"""

from __future__ import annotations

import io
import logging

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.data.shardset import MANIFEST, Manifest, read_manifest, read_shard, shard_uri
from pipeline.errors import UserError

log = logging.getLogger("imgpipe")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")




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


LISTING_SCHEMA = pa.schema([("uri", pa.string()), ("size", pa.int64()), ("version", pa.string())])


def read_input(src: str) -> tuple[pa.Table, Manifest | None, str | None]:
    """Input -> (listing uri,size,version,truth), manifest and split for ``MANIFEST:split``."""
    base, _, split = src.rpartition(":")
    if base and split and "/" not in split and base not in ("s3", "file"):
        m = read_manifest(base)
        m.check_split(split)
        return pa.table({"uri": pa.array([], pa.string())}), m, split
    low = src.lower()
    if low.endswith((".csv", ".parquet")) and not storage.isdir(src):
        try:
            data = storage.read_bytes(src)
        except storage.NotFound:
            raise UserError(f"input listing not found: {src}") from None
        t = pq.read_table(io.BytesIO(data)) if low.endswith(".parquet") else pacsv.read_csv(io.BytesIO(data))
        if "uri" not in t.column_names:
            raise UserError(f"input listing {src} needs a 'uri' column (has {', '.join(t.column_names)})")
        n = t.num_rows
        size = t.column("size") if "size" in t.column_names else pa.array([-1] * n, pa.int64())
        version = t.column("version") if "version" in t.column_names else pa.array([""] * n, pa.string())
        listing = pa.table({"uri": t.column("uri").cast(pa.string()), "size": size.cast(pa.int64()),
                            "version": version.cast(pa.string())})
    else:
        if not storage.exists(src):
            raise UserError(f"input not found: {src}")
        uris, sizes, versions = [], [], []
        for f in storage.iter_files(src, IMAGE_SUFFIXES):
            uris.append(f.uri)
            sizes.append(f.size)
            versions.append(f.version)
        listing = pa.table({"uri": uris, "size": pa.array(sizes, pa.int64()), "version": versions},
                           schema=LISTING_SCHEMA)
    if listing.num_rows == 0:
        raise UserError(f"no images found in {src} (suffixes: {', '.join(IMAGE_SUFFIXES)})")
    return listing, None, None

"""Naming input images: the one parser of source strings, and the listings made from them.

A source string is one of (:func:`parse` tells which)::

    DATASET:split        one split of a packed dataset (predict)
    FILE.csv|.parquet    a listing file: columns uri[,label][,size,version]
    FILE.json            a Label Studio JSON export: data.image is the uri, the last
                         annotation's choice the label (:func:`label_studio_listing`)
    DATASET              a packed shard set, a folder holding manifest.json (pack re-splits it)
    PREFIX               a folder or S3 prefix of images: pack reads it as an ImageFolder
                         (<class>/<file>), predict lists it recursively

Colons elsewhere belong to names (``s3://``, keys like ``dt=2026-01-01T00:00``, local
folders named ``a:b``): only a trailing ``:<split>`` after a dataset is a split.
:func:`list_source` (pack) and :func:`read_input` (predict) build their tables from it.
"""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.data.shardset import (
    SPLITS,
    Manifest,
    is_dataset,
    read_manifest,
    read_shard,
    shard_uri,
)
from pipeline.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
LISTING_SUFFIXES = (".csv", ".parquet", ".json")
SPLIT_NAME = re.compile(r"[A-Za-z0-9_-]+")  # a split name: no '/', so never part of 's3://'

# predict's input listing (also its run-state snapshot); version: ETag on S3, mtime locally
LISTING_SCHEMA = pa.schema([("uri", pa.string()), ("size", pa.int64()), ("version", pa.string())])
# rows per chunk of a streamed listing and per row group of its snapshot: what the driver
# holds at once while listing (~200 B a row in Python lists: ~3 MB), and the rows one read
# task of predict takes (pipeline.inference.tasks.read_snapshot)
LISTING_GROUP = 4_096
# pack's source listing; origin "<shard uri>#<row>" when the bytes come from a packed shard
SOURCE_SCHEMA = pa.schema([("source", pa.string()), ("label_name", pa.string()), ("size", pa.int64()),
                           ("origin", pa.string()), ("origin_sha256", pa.string())])

Kind = Literal["split", "listing", "shards", "prefix"]


@dataclass(frozen=True)
class Source:
    """A parsed source string."""

    kind: Kind
    uri: str  # as given, less a trailing ":<split>"
    split: str | None = None  # kind "split" only


def parse(src: str) -> Source:
    """Classify ``src`` (see the module docstring); looks at storage to decide."""
    dataset_split = split_dataset(src)
    if dataset_split is not None:
        return Source("split", *dataset_split)
    if storage.normalize(src).lower().endswith(LISTING_SUFFIXES) and not storage.isdir(src):
        return Source("listing", src)
    if is_dataset(src):
        return Source("shards", src)
    return Source("prefix", src)


def split_dataset(src: str) -> tuple[str, str] | None:
    """``(dataset, split)`` if ``src`` is ``DATASET:split``, else None.

    Only the text after the last ':' can be a split, and only if it is a bare name and
    the text before it is a dataset (holds manifest.json); anything else is a path (a
    local folder ``imgs:test``, a key ``dt=2026-01-01T00:00``). One exception: a
    standard split name after a missing dataset, when ``src`` does not exist as
    written either, is taken as ``DATASET:split`` so that reading it says what is missing.
    """
    dataset, sep, split = src.rpartition(":")
    if not (sep and dataset and SPLIT_NAME.fullmatch(split)):
        return None
    if is_dataset(dataset) or (split in SPLITS and not storage.exists(src)):
        return dataset, split
    return None


def read_listing(uri: str, required: tuple[str, ...]) -> pa.Table:
    """A CSV or Parquet listing file as stored, checked to have the ``required`` columns."""
    try:
        if uri.lower().endswith(".parquet"):
            table = storage.read_table(uri)
        elif uri.lower().endswith(".json"):
            table = label_studio_listing(storage.read_bytes(uri), uri)
        else:
            table = pacsv.read_csv(io.BytesIO(storage.read_bytes(uri)))
    except storage.NotFound:
        raise UserError(f"listing file not found: {uri}") from None
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise UserError(f"listing {uri} needs columns {','.join(required)}; missing {', '.join(missing)} "
                        f"(has {', '.join(table.column_names)})")
    return table


def label_studio_listing(data: bytes, uri: str) -> pa.Table:
    """A Label Studio JSON export (a list of tasks) as a listing ``uri,label``: ``data.image``
    and the first choice of the task's last annotation that was not cancelled. Tasks with no
    such annotation (not labelled yet) are left out."""
    try:
        tasks = json.loads(data)
    except ValueError as e:
        raise UserError(f"listing {uri} is not JSON: {e}") from None
    if not isinstance(tasks, list):
        raise UserError(f"listing {uri}: expected a Label Studio export (a JSON list of tasks)")
    uris, labels = [], []
    for t in tasks:
        image = (t.get("data") or {}).get("image") if isinstance(t, dict) else None
        if not image:
            raise UserError(f"listing {uri}: a task without data.image: {str(t)[:200]}")
        choices = [c for a in t.get("annotations") or [] if not a.get("was_cancelled")
                   for r in a.get("result") or [] for c in (r.get("value") or {}).get("choices") or []][-1:]
        if choices:
            uris.append(str(image))
            labels.append(str(choices[0]))
    return pa.table({"uri": pa.array(uris, pa.string()), "label": pa.array(labels, pa.string())})


# ------------------------------------------------------------------ pack's source


def list_source(src: str) -> pa.Table:
    """List ``src`` into a table of :data:`SOURCE_SCHEMA` for ``imgpipe pack``.

    ``src`` is an ImageFolder prefix (``<class>/<file>``), a CSV/Parquet listing with
    columns ``uri,label`` (labels as names or ints), or a packed shard set (origin then
    points into its shards, so re-splitting never goes back to the original objects).
    """
    source = check_source(src)
    norm = storage.normalize(source.uri)
    if source.kind == "listing":
        return _labelled_listing(norm)
    if source.kind == "shards":
        return _list_shard_set(norm)
    return _list_image_folder(norm, src)


def check_source(src: str) -> Source:
    """``src`` parsed, if pack can read it; UserError (exit 2) naming it otherwise: a
    ``DATASET:split``, a folder that does not exist, or a regular file that is not a
    listing (an image, a text file). Cheap: a few metadata calls, nothing is listed."""
    source = parse(src)
    if source.kind == "split":
        raise UserError(f"source not found: {src} (pack reads a whole dataset, not one split; "
                        f"`DATASET:split` is for predict)")
    if source.kind == "prefix":
        norm = storage.normalize(source.uri)
        if not storage.exists(norm):
            raise UserError(f"source not found: {src}")
        if not storage.isdir(norm):
            raise UserError(f"SRC {src} is a file; pack reads a folder of <class>/<image> files, a "
                            f"{' or '.join(LISTING_SUFFIXES)} listing (uri,label), or a packed dataset")
    return source


def _source_table(sources: list[str], labels: list[str], sizes: list[int] | None = None,
                  origins: list[str] | None = None, shas: list[str] | None = None) -> pa.Table:
    n = len(sources)
    return pa.table({"source": sources, "label_name": labels,
                     "size": sizes if sizes is not None else [-1] * n,  # bytes; -1: unknown
                     "origin": origins or [""] * n, "origin_sha256": shas or [""] * n},
                    schema=SOURCE_SCHEMA)


def _list_image_folder(norm: str, src: str) -> pa.Table:
    sources, labels, sizes = [], [], []
    prefix_len = len(norm.rstrip("/")) + 1
    top_level = 0  # images with no class folder
    for info in storage.iter_files(norm, IMAGE_SUFFIXES):
        rel = info.uri[prefix_len:]
        if "/" not in rel:
            top_level += 1
            continue
        sources.append(info.uri)
        labels.append(rel.split("/", 1)[0])
        sizes.append(info.size)
    if not sources and top_level:
        raise UserError(f"{src} holds {top_level} images but none in a class folder: images must be "
                        f"in {src.rstrip('/')}/<class>/<image> (the folder name is the label), or "
                        "listed in a CSV/Parquet file with uri,label columns")
    if not sources:
        raise UserError(f"no images found under {src} (expected <class>/<image> with suffix "
                        f"{', '.join(IMAGE_SUFFIXES)})")
    return _source_table(sources, labels, sizes)


def _labelled_listing(uri: str) -> pa.Table:
    table = read_listing(uri, required=("uri", "label"))
    if table.num_rows == 0:
        raise UserError(f"listing {uri} is empty")
    label = table.column("label")
    if pa.types.is_integer(label.type):
        names = [str(int(v)) for v in label.to_pylist()]
    else:
        names = [str(v) for v in label.to_pylist()]
    return _source_table([str(u) for u in table.column("uri").to_pylist()], names)


def _list_shard_set(root: str) -> pa.Table:
    m = read_manifest(root)
    sources: list[str] = []
    labels: list[str] = []
    origins: list[str] = []
    shas: list[str] = []
    for shards in m.splits.values():
        for s in shards:
            uri = shard_uri(m.root, s["path"])
            t = read_shard(uri, s["sha256"], columns=["source", "label"])
            sources += t.column("source").to_pylist()
            labels += [m.classes[lab] for lab in t.column("label").to_pylist()]
            origins += [f"{uri}#{i}" for i in range(t.num_rows)]
            shas += [s["sha256"]] * t.num_rows
    return _source_table(sources, labels, origins=origins, shas=shas)


# ----------------------------------------------------------------- predict's input


def read_input(src: str) -> tuple[pa.Table, Manifest | None, str | None]:
    """``imgpipe predict``'s input: ``(listing, None, None)`` with a :data:`LISTING_SCHEMA`
    listing, or ``(empty table, manifest, split)`` for ``DATASET:split``. The whole
    listing in memory: predict streams it instead (:func:`write_input_listing`)."""
    source = parse(src)
    if source.kind == "split":
        m = read_manifest(source.uri)
        m.check_split(source.split)
        return pa.table({"uri": pa.array([], pa.string())}), m, source.split
    return pa.Table.from_batches(list(iter_input(src)), LISTING_SCHEMA), None, None


def iter_input(src: str) -> Iterator[pa.RecordBatch]:
    """predict's listing of ``src`` (a prefix or a listing file, not ``DATASET:split``) as
    :data:`LISTING_SCHEMA` batches of at most :data:`LISTING_GROUP` rows, streamed: a
    prefix is listed page by page (:func:`pipeline.storage.iter_files`), so memory holds
    one batch, whatever the number of images. UserError (exit 2) when ``src`` is missing,
    is a packed dataset, or holds no images."""
    source = parse(src)
    if source.kind == "listing":
        batches = _input_listing(read_listing(src, required=("uri",))).to_batches(LISTING_GROUP)
    elif source.kind == "shards":
        raise UserError(f"no images found in {src}: it is a packed dataset; name one split, "
                        f"e.g. {src}:test (valid: {', '.join(read_manifest(src).splits)})")
    elif source.kind == "split" or not storage.exists(src):
        raise UserError(f"input not found: {src}")
    else:
        batches = _list_files(src)
    rows = 0
    for b in batches:
        rows += b.num_rows
        if b.num_rows:
            yield b
    if rows == 0:
        raise UserError(f"no images found in {src} (suffixes: {', '.join(IMAGE_SUFFIXES)})")


def write_input_listing(src: str, uri: str) -> int:
    """Stream predict's listing of ``src`` (:func:`iter_input`) into one Parquet file at
    ``uri`` (row groups of :data:`LISTING_GROUP` rows, written atomically); returns its
    rows. The driver holds one chunk at a time, plus the file's footer."""
    rows = 0
    with tempfile.TemporaryDirectory(prefix="imgpipe-listing-") as tmp:
        path = os.path.join(tmp, "listing.pq")
        # no column statistics: min/max URIs per row group would only grow the footer
        with pq.ParquetWriter(path, LISTING_SCHEMA, write_statistics=False) as w:
            for b in iter_input(src):
                w.write_batch(b, row_group_size=LISTING_GROUP)
                rows += b.num_rows
        storage.upload_file(path, uri)
    return rows


def write_remaining(snapshot: str, skip: pa.Array, uri: str) -> int:
    """The rows of the listing snapshot ``snapshot`` whose ``uri`` is not in ``skip``, as a
    snapshot at ``uri`` (row groups of :data:`LISTING_GROUP` rows again); returns its rows.
    One hash anti-join over the ``uri`` column here (the column is held while it runs:
    ~70 B an image), instead of shipping ``skip`` to every read task and hashing it there
    once per row group (at 10^6 images with 1% new: 247 tasks of ~0.4 s each)."""
    fs, path = storage.pyarrow_filesystem(snapshot)
    rows, pending = 0, []
    with fs.open_input_file(path) as f, tempfile.TemporaryDirectory(prefix="imgpipe-listing-") as tmp:
        src = pq.ParquetFile(f)
        dropped = pc.is_in(src.read(columns=["uri"]).column("uri"), value_set=skip)
        out = os.path.join(tmp, "remaining.pq")
        with pq.ParquetWriter(out, LISTING_SCHEMA, write_statistics=False) as w:
            start = 0
            for g in range(src.num_row_groups):
                t = src.read_row_group(g)
                kept = t.filter(pc.invert(dropped.slice(start, t.num_rows)))
                start += t.num_rows
                pending.append(kept)
                buf = pa.concat_tables(pending)
                whole = buf.num_rows if g == src.num_row_groups - 1 else buf.num_rows // LISTING_GROUP * LISTING_GROUP
                if whole:  # full groups only, but for the last
                    w.write_table(buf.slice(0, whole).combine_chunks(), row_group_size=LISTING_GROUP)
                    rows += whole
                pending = [buf.slice(whole)]
        storage.upload_file(out, uri)
    return rows


def snapshot_shape(uri: str) -> tuple[int, int]:
    """(rows, row groups) of a listing snapshot, from its footer alone."""
    fs, path = storage.pyarrow_filesystem(uri)
    with fs.open_input_file(path) as f:
        meta = pq.read_metadata(f)
    return meta.num_rows, meta.num_row_groups


def read_snapshot_group(uri: str, group: int, columns: list[str] | None = None) -> pa.Table:
    """Row group ``group`` of a listing snapshot: one ranged read, not the whole file."""
    fs, path = storage.pyarrow_filesystem(uri)
    with fs.open_input_file(path) as f:
        return pq.ParquetFile(f).read_row_group(group, columns=columns)


def _input_listing(t: pa.Table) -> pa.Table:
    n = t.num_rows
    size = t.column("size") if "size" in t.column_names else pa.array([-1] * n, pa.int64())
    version = t.column("version") if "version" in t.column_names else pa.array([""] * n, pa.string())
    return pa.table({"uri": t.column("uri").cast(pa.string()), "size": size.cast(pa.int64()),
                     "version": version.cast(pa.string())})


def _list_files(prefix: str) -> Iterator[pa.RecordBatch]:
    uris, sizes, versions = [], [], []  # three flat lists of one chunk: FileInfo objects cost more
    for f in storage.iter_files(prefix, IMAGE_SUFFIXES):
        uris.append(f.uri)
        sizes.append(f.size)
        versions.append(f.version)
        if len(uris) == LISTING_GROUP:
            yield pa.record_batch([uris, sizes, versions], schema=LISTING_SCHEMA)
            uris, sizes, versions = [], [], []
    yield pa.record_batch([uris, sizes, versions], schema=LISTING_SCHEMA)

"""The dataset format: ``manifest.json`` + Parquet shards, and verified reads of them.

Layout (written by :mod:`pipeline.data.packing`, described in ``docs/formats.md``)::

    DST/<split>/part-NNNNN.parquet   image_id (sha256 of the source's bytes), image (encoded
                                     bytes: the source's, or shrunk by ``pack --max-side``),
                                     label int32, source (original URI)
    DST/_errors/<split>-part-NNNNN.parquet   source, image_id, error  (quarantined images)
    DST/manifest.json                written last: its presence commits the dataset
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.errors import UserError
from pipeline.names import MANIFEST

SPLITS = ("train", "val", "test")
SHARD_SCHEMA = pa.schema([("image_id", pa.string()), ("image", pa.binary()),
                          ("label", pa.int32()), ("source", pa.string())])
ERROR_SCHEMA = pa.schema([("source", pa.string()), ("image_id", pa.string()), ("error", pa.string())])


class ShardIntegrityError(UserError):
    """A shard whose bytes disagree with the manifest's sha256."""


@dataclass
class Manifest:
    """A committed dataset: its classes and, per split, its shards in order."""

    root: str  # URI of the dataset folder
    classes: list[str]
    splits: dict[str, list[dict[str, Any]]]  # split -> [{"path", "rows", "sha256"}]
    raw: dict[str, Any] = field(default_factory=dict)
    sha256: str = ""  # of manifest.json's bytes: identifies this dataset version

    @property
    def max_side(self) -> int:
        """``pack --max-side``: px on the long side images were shrunk to (0: stored as listed)."""
        return int(self.raw.get("max_side", 0))

    def rows(self, split: str) -> int:
        return sum(s["rows"] for s in self.splits.get(split, []))

    def shard_uris(self, split: str) -> list[str]:
        self.check_split(split)
        return [shard_uri(self.root, s["path"]) for s in self.splits[split]]

    def check_split(self, split: str) -> None:
        if split not in self.splits:
            raise UserError(f"split '{split}' not in {self.root}; valid: {', '.join(self.splits)}")


def shard_uri(root: str, path: str) -> str:
    """A manifest entry's shard URI: relative paths live under the dataset root; a
    versioned dataset (nightly retraining) may reference other versions' shards by
    absolute URI."""
    return path if (path.startswith("/") or "://" in path) else storage.join(root, path)


def manifest_root(uri: str) -> str:
    """The dataset folder of ``uri`` (the folder itself or its manifest.json)."""
    uri = storage.normalize(uri)
    return uri[: -len(MANIFEST) - 1] if uri.endswith("/" + MANIFEST) else uri


def is_dataset(uri: str) -> bool:
    """Whether ``uri`` (a folder or its manifest.json) holds a committed dataset."""
    return storage.exists(storage.join(manifest_root(uri), MANIFEST))


def read_manifest(uri: str) -> Manifest:
    """Read ``uri`` (a dataset folder or its manifest.json). UserError if absent."""
    root = manifest_root(uri)
    try:
        data = storage.read_bytes(storage.join(root, MANIFEST))
    except storage.NotFound:
        raise UserError(f"no dataset at {uri} (missing {MANIFEST}; run `imgpipe pack` first)") from None
    raw = json.loads(data)
    if raw.get("format") != 1:
        raise UserError(f"{root}/{MANIFEST}: unsupported format {raw.get('format')!r}; valid: 1")
    return Manifest(root=root, classes=list(raw["classes"]), splits=raw["splits"], raw=raw,
                    sha256=hashlib.sha256(data).hexdigest())


def read_shard(uri: str, sha256: str | None = None, columns: list[str] | None = None) -> pa.Table:
    """Read one shard, refusing it if its sha256 disagrees with ``sha256``."""
    data = storage.read_bytes(uri)  # one GET: the bytes are both hashed and parsed
    if sha256 is not None:
        digest = hashlib.sha256(data).hexdigest()
        if digest != sha256:
            raise ShardIntegrityError(
                f"shard {uri} is corrupt or was changed: sha256 {digest[:12]}... != manifest {sha256[:12]}...")
    return pq.read_table(pa.BufferReader(data), columns=columns)


def iter_split(manifest: Manifest, split: str, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """Verified shard tables of one split, in manifest order (driver-side; small data, tests)."""
    manifest.check_split(split)
    for s in manifest.splits[split]:
        yield read_shard(shard_uri(manifest.root, s["path"]), s["sha256"], columns)

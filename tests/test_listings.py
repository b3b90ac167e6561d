"""The one source parser (pipeline.data.listings): every kind of source, for pack and
predict, and colons in names (local folders, S3 keys, ``DATASET:split``). No Ray."""

from __future__ import annotations

import hashlib
import io
import pathlib

import pyarrow as pa
import pytest
from PIL import Image

from pipeline import storage
from pipeline.data import listings, shardset
from pipeline.errors import UserError
from pipeline.names import MANIFEST

STAMP = "dt=2026-01-01T00:00"  # a partition key with colons, as nightly jobs write them


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (value, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def _image_folder(root: str, per_class: int = 2) -> list[str]:
    """``root/<a|b>/<i>.png``; returns the image URIs, sorted."""
    uris = [storage.join(root, cls, f"{i}.png") for cls in ("a", "b") for i in range(per_class)]
    for k, uri in enumerate(uris):
        storage.write_bytes(uri, _png(k))
    return sorted(uris)


def _dataset(root: str) -> str:
    """A tiny committed dataset (one test shard of two rows), written without pack."""
    shard = pa.table({"image_id": ["i0", "i1"], "image": [_png(1), _png(2)], "label": [0, 1],
                      "source": ["s3://src/a/0.png", "s3://src/b/1.png"]}, schema=shardset.SHARD_SCHEMA)
    data = storage.write_table(storage.join(root, "test", "part-00000.parquet"), shard)
    storage.write_json(storage.join(root, MANIFEST), {
        "format": 1, "classes": ["a", "b"],
        "splits": {"test": [{"path": "test/part-00000.parquet", "rows": 2,
                             "sha256": hashlib.sha256(data).hexdigest()}]}})
    return root


def test_parse_tells_each_kind(tmp_path: pathlib.Path) -> None:
    ds = _dataset(str(tmp_path / "ds"))
    imgs = str(tmp_path / "imgs")
    _image_folder(imgs)
    (tmp_path / "l.csv").write_text("uri\n")
    assert listings.parse(f"{ds}:test") == listings.Source("split", ds, "test")
    assert listings.parse(f"{ds}/{MANIFEST}:test") == listings.Source("split", f"{ds}/{MANIFEST}", "test")
    assert listings.parse(ds) == listings.Source("shards", ds)
    assert listings.parse(str(tmp_path / "l.csv")) == listings.Source("listing", str(tmp_path / "l.csv"))
    assert listings.parse(str(tmp_path / "L.PARQUET")).kind == "listing"  # missing: reading says so
    assert listings.parse(imgs) == listings.Source("prefix", imgs)
    (tmp_path / "folder.csv").mkdir()
    assert listings.parse(str(tmp_path / "folder.csv")).kind == "prefix"  # a folder, whatever its name


def test_local_folders_with_colons(tmp_path: pathlib.Path) -> None:
    # an image folder named like DATASET:split, and one under a timestamped key
    for name in ("imgs:test", STAMP, f"{STAMP}/imgs"):
        root = str(tmp_path / name)
        uris = _image_folder(root)
        assert listings.parse(root).kind == "prefix"
        listing, manifest, split = listings.read_input(root)
        assert (manifest, split) == (None, None)
        assert listing.column("uri").to_pylist() == uris
        packed = listings.list_source(root)
        assert packed.column("label_name").to_pylist() == ["a", "a", "b", "b"]
    # a dataset whose path holds colons, read as DATASET:split
    ds = _dataset(str(tmp_path / "ds" / STAMP))
    listing, manifest, split = listings.read_input(f"{ds}:test")
    assert listing.num_rows == 0 and split == "test" and manifest.root == ds and manifest.rows("test") == 2


def test_s3_keys_with_colons(s3_bucket: str) -> None:
    prefix = f"{s3_bucket}/{STAMP}"  # s3://b/dt=2026-01-01T00:00: ends in ':00'
    uris = _image_folder(prefix)
    for src in (prefix, f"{prefix}/"):
        assert listings.parse(src).kind == "prefix"
        listing, manifest, _ = listings.read_input(src)
        assert manifest is None and listing.column("uri").to_pylist() == uris
        assert listings.list_source(src).column("label_name").to_pylist() == ["a", "a", "b", "b"]
    ds = _dataset(f"{s3_bucket}/ds/{STAMP}")
    assert listings.parse(f"{ds}:test") == listings.Source("split", ds, "test")
    _, manifest, split = listings.read_input(f"{ds}:test")
    assert manifest.root == ds and split == "test"
    assert listings.list_source(ds).column("origin").to_pylist() == [
        f"{ds}/test/part-00000.parquet#0", f"{ds}/test/part-00000.parquet#1"]


def test_dataset_split_errors(tmp_path: pathlib.Path) -> None:
    ds = _dataset(str(tmp_path / "ds"))
    with pytest.raises(UserError, match="split 'bogus' not in"):
        listings.read_input(f"{ds}:bogus")
    with pytest.raises(UserError, match="no dataset at"):
        listings.read_input(f"{tmp_path}/nope:test")  # a standard split after a missing dataset
    with pytest.raises(UserError, match="input not found"):
        listings.read_input(f"{tmp_path}/nope:other")
    with pytest.raises(UserError, match=f"no images found in {ds}: it is a packed dataset"):
        listings.read_input(ds)
    with pytest.raises(UserError, match="source not found.*not one split"):
        listings.list_source(f"{ds}:test")


def test_listing_files(tmp_path: pathlib.Path) -> None:
    uris = _image_folder(str(tmp_path / "imgs"))
    # predict: uri alone, or with size and version
    plain = tmp_path / "plain.csv"
    plain.write_text("uri\n" + "".join(f"{u}\n" for u in uris))
    listing, _, _ = listings.read_input(str(plain))
    assert listing.schema == listings.LISTING_SCHEMA
    assert listing.column("uri").to_pylist() == uris and set(listing.column("size").to_pylist()) == {-1}
    full = str(tmp_path / "full.parquet")
    storage.write_table(full, pa.table({"uri": uris, "size": [1, 2, 3, 4], "version": ["v"] * 4}))
    listing, _, _ = listings.read_input(full)
    assert listing.column("size").to_pylist() == [1, 2, 3, 4]
    # pack: uri,label with integer labels become names
    labelled = str(tmp_path / "labelled.parquet")
    storage.write_table(labelled, pa.table({"uri": uris, "label": [0, 0, 1, 1]}))
    source = listings.list_source(labelled)
    assert source.schema == listings.SOURCE_SCHEMA
    assert source.column("label_name").to_pylist() == ["0", "0", "1", "1"]
    with pytest.raises(UserError, match="needs columns uri,label; missing label"):
        listings.list_source(str(plain))
    with pytest.raises(UserError, match="listing file not found"):
        listings.read_input(str(tmp_path / "gone.csv"))
    (tmp_path / "empty.csv").write_text("uri,label\n")
    with pytest.raises(UserError, match="is empty"):
        listings.list_source(str(tmp_path / "empty.csv"))


def test_check_source_names_a_source_pack_can_not_read(tmp_path: pathlib.Path, s3_bucket: str) -> None:
    ds = _dataset(str(tmp_path / "ds"))
    imgs = str(tmp_path / "imgs")
    uris = _image_folder(imgs)
    (tmp_path / "notes.txt").write_text("hello")
    assert listings.check_source(imgs) == listings.Source("prefix", imgs)
    assert listings.check_source(ds).kind == "shards"
    for path in (uris[0], str(tmp_path / "notes.txt")):  # an image, a text file: not a listing
        with pytest.raises(UserError, match=f"SRC {path} is a file; pack reads a folder of <class>/<image>"):
            listings.check_source(path)
        with pytest.raises(UserError, match="is a file"):
            listings.list_source(path)
    with pytest.raises(UserError, match="source not found"):
        listings.check_source(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="not one split"):
        listings.check_source(f"{ds}:test")
    s3_imgs = f"{s3_bucket}/imgs"
    s3_uris = _image_folder(s3_imgs)
    assert listings.check_source(s3_imgs).kind == "prefix"
    with pytest.raises(UserError, match=f"SRC {s3_uris[0]} is a file"):
        listings.check_source(s3_uris[0])

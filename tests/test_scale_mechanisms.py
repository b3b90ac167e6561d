"""Issue #18's mechanisms at small scale: predict's listing streamed from paginated S3
into a snapshot of row groups, with the driver's memory bounded per key, and the
snapshot read back by row group."""

from __future__ import annotations

import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from pipeline import storage
from pipeline.data import listings

PAGE = 50  # keys per list_objects_v2 page in these tests
GROUP = 128  # rows per chunk / row group in these tests
BYTES_PER_KEY = 64  # the stated bound: Python memory the listing may grow by per extra key


def _put(s3_bucket: str, prefix: str, lo: int, hi: int) -> None:
    fs, path = storage.filesystem(s3_bucket)
    fs.pipe({f"{path}/{prefix}/c{i % 3}/{i:06d}.jpg": b"\xff\xd8jpeg" for i in range(lo, hi)},
            batch_size=16)  # 16 PUTs in flight


_CHILD = """
import sys, tracemalloc
from pipeline import storage
from pipeline.data import listings
storage.LIST_PAGE_KEYS, listings.LISTING_GROUP = int(sys.argv[3]), int(sys.argv[4])
storage.configure(storage.StorageOptions(endpoint_url=sys.argv[5]))
listings.write_input_listing(sys.argv[1], sys.argv[2] + ".warm")  # imports, clients, caches
tracemalloc.start()
base = tracemalloc.get_traced_memory()[0]
listings.write_input_listing(sys.argv[1], sys.argv[2])
print(tracemalloc.get_traced_memory()[1] - base)
"""


def _peak_listing_bytes(src: str, dst: str, endpoint: str) -> int:
    """Peak Python memory (tracemalloc) of a fresh process streaming ``src``'s listing into
    ``dst`` (a child: the moto server's own allocations stay in this process)."""
    out = subprocess.run([sys.executable, "-c", _CHILD, src, dst, str(PAGE), str(GROUP), endpoint],
                         capture_output=True, text=True, timeout=300, check=True)
    return int(out.stdout.split()[-1])


def test_s3_listing_streams_pages_into_row_groups(s3_bucket, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(storage, "LIST_PAGE_KEYS", PAGE)
    monkeypatch.setattr(listings, "LISTING_GROUP", GROUP)
    calls: list[int] = []
    real = storage.iter_files

    def counting(*a, **k):  # how far the listing ran ahead of what was yielded
        for n, info in enumerate(real(*a, **k), 1):
            calls.append(n)
            yield info

    _put(s3_bucket, "small", 0, 300)
    monkeypatch.setattr(storage, "iter_files", counting)
    seen = 0
    for batch in listings.iter_input(f"{s3_bucket}/small"):
        seen += batch.num_rows
        assert batch.num_rows <= GROUP
        assert calls[-1] <= seen + 1  # at most the key after the chunk was read before it was yielded
    assert seen == 300
    monkeypatch.setattr(storage, "iter_files", real)

    snap = str(tmp_path / "listing.pq")
    assert listings.write_input_listing(f"{s3_bucket}/small", snap) == 300
    rows, groups = listings.snapshot_shape(snap)
    assert (rows, groups) == (300, 3)  # 128 + 128 + 44
    meta = pq.read_metadata(snap)
    assert all(meta.row_group(i).num_rows <= GROUP for i in range(groups))
    uris = [u for g in range(groups) for u in listings.read_snapshot_group(snap, g, ["uri"]).column("uri").to_pylist()]
    assert uris == sorted(uris) and len(set(uris)) == 300 and uris[0].startswith(f"{s3_bucket}/small/c0/")


@pytest.mark.parametrize("extra", [1000])
def test_s3_listing_memory_is_bounded_per_key(s3_server, s3_bucket, tmp_path, extra: int) -> None:
    """Listing 500 and 500 + ``extra`` keys: the peak grows by less than
    :data:`BYTES_PER_KEY` per extra key (holding every URI costs ~150-250 B a key)."""
    _put(s3_bucket, "grow", 0, 500)
    small = _peak_listing_bytes(f"{s3_bucket}/grow", str(tmp_path / "a.pq"), s3_server)
    _put(s3_bucket, "grow", 500, 500 + extra)
    large = _peak_listing_bytes(f"{s3_bucket}/grow", str(tmp_path / "b.pq"), s3_server)
    assert pq.read_metadata(str(tmp_path / "b.pq")).num_rows == 500 + extra
    print(f"peak {small} -> {large} B: {(large - small) / extra:.1f} B per extra key")
    assert (large - small) / extra < BYTES_PER_KEY, (small, large)


def test_predict_reads_a_snapshot_of_many_row_groups(trained, digits_dir, tmp_path, monkeypatch) -> None:
    """A listing of 7-row groups (the driver never holds it): one row per image, and
    ``--skip-existing`` skips sources spread over every group."""
    import shutil

    from pipeline.inference import predict
    from tests.conftest import small_config

    monkeypatch.setattr(listings, "LISTING_GROUP", 7)
    src = tmp_path / "in"
    files = sorted(f.uri for f in storage.iter_files(digits_dir))[:30]
    for i, f in enumerate(files):
        os.makedirs(src / str(i % 3), exist_ok=True)
        shutil.copy(f, src / str(i % 3) / f"{i:03d}.png")
    dst = str(tmp_path / "out")
    cfg = small_config(predict={"skip_existing": True, "rows_per_file": 8})
    first = predict.run(trained["best_checkpoint_uri"], str(src), dst, cfg, quiet=True)
    assert listings.snapshot_shape(os.path.join(dst, "_state", "listing.pq")) == (30, 5)  # 7+7+7+7+2
    assert first["scored"] == first["rows"] == 30 and set(first["phase_seconds"]) >= {"listing", "scoring", "commit"}
    for i in (31, 32):  # two new images, in two folders
        shutil.copy(files[i % 30], src / str(i % 3) / f"{i:03d}.png")
    second = predict.run(trained["best_checkpoint_uri"], str(src), dst, cfg, quiet=True)
    assert second["scored"] == 2 and second["skipped"] == 30
    t = predict.read_predictions(dst)
    sources = t.column("source").to_pylist()
    assert len(sources) == len(set(sources)) == 32


def test_snapshot_is_read_one_row_group_per_task(ray_local, digits_dir, tmp_path, monkeypatch) -> None:
    """Each read task takes one row group and its rows leave the read stage by group, so
    predictions files are written while later groups are still read (a fused
    ``batch_size=READ_BATCH`` stage once read every group in one task: one block, the
    files written only at the end). What is left after skipping is a snapshot of full
    row groups again."""
    import pyarrow as pa

    from pipeline.inference import tasks

    monkeypatch.setattr(listings, "LISTING_GROUP", 7)
    files = sorted(f.uri for f in storage.iter_files(digits_dir))[:30]
    listing = tmp_path / "in.csv"
    listing.write_text("uri\n" + "\n".join(files) + "\n")
    snap, rest = str(tmp_path / "listing.pq"), str(tmp_path / "remaining.pq")
    assert listings.write_input_listing(str(listing), snap) == 30
    every = tasks.read_snapshot(snap, storage.default_options()).materialize()
    assert every.num_blocks() == 5 and sorted(r["source"] for r in every.take_all()) == files  # 7+7+7+7+2
    skip = [files[0], files[8], files[9], files[29], "/not/listed.png"]
    assert listings.write_remaining(snap, pa.array(skip), rest) == 26
    assert listings.snapshot_shape(rest) == (26, 4)  # 7+7+7+5: regrouped, not 5 ragged groups
    ds = tasks.read_snapshot(rest, storage.default_options()).materialize()
    rows = ds.take_all()
    assert sorted(r["source"] for r in rows) == [f for f in files if f not in skip]
    assert all(r["error"] == "" and r["bytes"] for r in rows)
    assert ds.num_blocks() == 4


def test_split_is_read_one_shard_per_task(packed) -> None:
    """``DATASET:split`` input: one read task, and one block, per shard, with the
    skipped sources left out."""
    from pipeline.inference import tasks

    _, manifest, split = listings.read_input(f"{packed}:train")
    shards = len(manifest.shard_uris(split))
    assert shards > 1
    every = tasks.read_split(manifest, split).materialize()
    assert every.num_blocks() == shards and every.count() == manifest.rows(split)
    skip = frozenset(r["source"] for r in every.take(3))
    rest = tasks.read_split(manifest, split, skip).materialize()
    assert rest.count() == manifest.rows(split) - 3 and not skip & {r["source"] for r in rest.take_all()}

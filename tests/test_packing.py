"""Packing and reading shards: layout, manifest, splits, integrity, resume, bad images."""

import collections
import io
import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import storage
from pipeline.data import listings, packing, shardset
from pipeline.errors import JobFailed, UserError
from tests.conftest import PER_CLASS, small_config


def _all_rows(uri):
    m = shardset.read_manifest(uri)
    out = {}
    for split in m.splits:
        rows = []
        for t in shardset.iter_split(m, split, columns=["image_id", "source", "label"]):
            rows += t.to_pylist()
        out[split] = rows
    return m, out


def test_pack_layout_and_manifest(packed, digits_dir):
    m, rows = _all_rows(packed)
    assert m.classes == [str(i) for i in range(10)]
    assert m.raw["format"] == 1 and set(m.splits) == {"train", "val", "test"}
    # stratified 70/15/15: per class 20 -> 3 test, 3 val, 14 train
    counts = {s: collections.Counter(r["label"] for r in rs) for s, rs in rows.items()}
    assert all(counts["test"][c] == 3 and counts["val"][c] == 3 and counts["train"][c] == 14 for c in range(10))
    # every image exactly once across splits, ids are sha256 of the bytes
    sources = [r["source"] for rs in rows.values() for r in rs]
    assert len(sources) == len(set(sources)) == 10 * PER_CLASS
    one = rows["train"][0]
    with open(one["source"], "rb") as f:
        import hashlib
        assert one["image_id"] == hashlib.sha256(f.read()).hexdigest()
    assert one["source"].split("/")[-2] == m.classes[one["label"]]
    # shard files: DST/<split>/part-NNNNN.parquet with the contract schema
    first = storage.join(packed, m.splits["train"][0]["path"])
    assert m.splits["train"][0]["path"] == "train/part-00000.parquet"
    schema = pq.read_schema(first)
    assert [(f.name, str(f.type)) for f in schema] == [("image_id", "string"), ("image", "binary"),
                                                         ("label", "int32"), ("source", "string")]
    assert len(m.splits["train"]) == 6  # 140 rows / 24 per shard


def test_split_is_seeded_and_stable(digits_dir):
    listing = listings.list_source(digits_dir)
    a = packing.assign_splits(listing, 0.15, 0.15, seed=0)
    b = packing.assign_splits(listing, 0.15, 0.15, seed=0)
    c = packing.assign_splits(listing, 0.15, 0.15, seed=1)
    assert a == b and a != c


def test_tampered_shard_is_refused(packed, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(packed, copy)
    m = shardset.read_manifest(str(copy))
    path = copy / m.splits["val"][0]["path"]
    t = pq.read_table(path)
    pq.write_table(t.slice(1), path)  # drop a row: valid Parquet, wrong bytes
    with pytest.raises(shardset.ShardIntegrityError, match="corrupt or was changed"):
        list(shardset.iter_split(m, "val"))


def test_repack_is_a_noop_when_committed(packed):
    out = packing.pack("/nonexistent-src-not-read", packed, small_config(), quiet=True)
    assert out["already_committed"] is True


def test_listing_file_source_and_reshard(tmp_path, digits_dir, ray_local, packed):
    # CSV listing with label names
    files = list(storage.iter_files(digits_dir))[::5]  # 4 of each class
    csv = tmp_path / "list.csv"
    csv.write_text("uri,label\n" + "".join(f"{f.uri},{f.uri.split('/')[-2]}\n" for f in files))
    out = packing.pack(str(csv), str(tmp_path / "from_csv"), small_config(), quiet=True)
    assert out["images"] == 40 and out["classes"] == 10
    # re-shard an existing shard set: same images, new shard size, no object re-read
    out2 = packing.pack(packed, str(tmp_path / "reshard"), small_config(data={"shard_rows": 100}), quiet=True)
    assert out2["images"] == 10 * PER_CLASS and out2["shards"] == 4
    _, rows = _all_rows(str(tmp_path / "reshard"))
    assert len({r["image_id"] for rs in rows.values() for r in rs}) <= 200


def _png(color, mode="RGB", size=(12, 12)):
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def _bad_folder(root, n_good=30):
    for i in range(n_good):
        cls = "a" if i % 2 else "b"
        (root / cls).mkdir(parents=True, exist_ok=True)
        (root / cls / f"{i}.png").write_bytes(_png((i * 8, 0, 0)))
    (root / "a" / "zero.png").write_bytes(b"")
    (root / "a" / "text.jpg").write_bytes(b"hello, not an image")
    import numpy as np

    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="PNG")  # big enough that half the file is pixel data
    (root / "b" / "trunc.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "b" / "gray.png").write_bytes(_png(128, mode="L"))
    (root / "b" / "rgba.png").write_bytes(_png((0, 0, 0, 0), mode="RGBA"))


def test_bad_images_quarantined_or_fatal(tmp_path, ray_local):
    src = tmp_path / "imgs"
    _bad_folder(src)
    cfg = small_config(data={"max_bad_fraction": 0.2})
    out = packing.pack(str(src), str(tmp_path / "ok"), cfg, quiet=True)
    assert out["bad_images"] == 3 and out["images"] == 32  # 30 good + gray + rgba converted
    assert out["bad_reasons"] == {"empty": 1, "not_an_image": 1, "truncated": 1}
    errs = pq.read_table(str(tmp_path / "ok" / "_errors")).to_pylist()
    assert sorted(os.path.basename(e["source"]) for e in errs) == ["text.jpg", "trunc.png", "zero.png"]
    assert all(":" in e["error"] for e in errs)
    # default threshold 1%: the job fails and commits nothing
    with pytest.raises(JobFailed, match="data.max_bad_fraction"):
        packing.pack(str(src), str(tmp_path / "strict"), small_config(), quiet=True)
    assert not (tmp_path / "strict" / "manifest.json").exists()


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(UserError, match="source not found"):
        packing.pack(str(tmp_path / "nope"), str(tmp_path / "d"), small_config(), quiet=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images found"):
        packing.pack(str(tmp_path / "empty"), str(tmp_path / "d"), small_config(), quiet=True)


def test_pack_on_s3(digits_dir, s3_bucket, s3_server, ray_local):
    cfg = small_config(storage={"s3": {"endpoint_url": s3_server}})
    fs, path = storage.filesystem(s3_bucket)
    for f in list(storage.iter_files(digits_dir))[::4]:
        rel = f.uri[len(digits_dir) + 1:]
        fs.pipe_file(f"{path}/images/{rel}", open(f.uri, "rb").read())
    out = packing.pack(s3_bucket + "/images", s3_bucket + "/shards", cfg, quiet=True)
    assert out["images"] == 50
    m, rows = _all_rows(s3_bucket + "/shards")
    assert sum(len(r) for r in rows.values()) == 50
    assert all(r["source"].startswith(s3_bucket + "/images/") for rs in rows.values() for r in rs)


def test_killed_pack_resumes_without_loss_or_duplicates(digits_dir, tmp_path):
    dst = tmp_path / "shards"
    cmd = [sys.executable, "-m", "pipeline", "--quiet", "pack", digits_dir, str(dst), "--shard-rows", "4",
           "--set", "ray.num_cpus=2"]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(dst.glob("*/part-*.parquet")):
        time.sleep(0.1)
    os.killpg(p.pid, signal.SIGKILL)  # the driver and the Ray instance it started
    p.wait()
    assert not (dst / "manifest.json").exists(), "killed too late: pack already committed"
    done_before = len(list(dst.glob("*/part-*.parquet")))
    assert done_before < 50
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["reused_shards"] >= 1
    _, rows = _all_rows(str(dst))
    sources = [x["source"] for rs in rows.values() for x in rs]
    assert len(sources) == len(set(sources)) == 10 * PER_CLASS

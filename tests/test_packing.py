"""Packing and reading shards: layout, manifest, splits, integrity, resume, bad images."""

import collections
import hashlib
import io
import json
import os
import pathlib
import re
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
from pipeline.names import LEASE
from pipeline.ops import lease
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


def test_split_does_not_depend_on_where_the_images_are(digits_dir, tmp_path):
    """The same files under another folder or bucket get the same split (a workdir's
    path must not change the demo's test set)."""
    import shutil

    moved = tmp_path / "elsewhere" / "images"
    shutil.copytree(digits_dir, moved)
    here, there = listings.list_source(digits_dir), listings.list_source(str(moved))
    assert here.column("source").to_pylist() != there.column("source").to_pylist()
    assert packing.assign_splits(here, 0.15, 0.15, seed=0) == packing.assign_splits(there, 0.15, 0.15, seed=0)


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


def test_repack_is_a_noop_when_committed(packed, digits_dir):
    # same source and settings: nothing is read or written (a different source: see
    # test_committed_dst_refuses_another_source_or_settings)
    before = {p: os.stat(os.path.join(packed, p)).st_mtime_ns for p in os.listdir(packed)}
    out = packing.pack(digits_dir, packed, small_config(), seed=0, quiet=True)
    assert out["already_committed"] is True
    assert {p: os.stat(os.path.join(packed, p)).st_mtime_ns for p in os.listdir(packed)} == before


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


def _pack_cmd(src: str, dst) -> list[str]:
    """``imgpipe pack`` as a real process: 4-row shards, a 2-CPU Ray of its own."""
    return [sys.executable, "-m", "pipeline", "--quiet", "pack", src, str(dst), "--shard-rows", "4",
            "--set", "ray.num_cpus=2"]


def test_killed_pack_resumes_without_loss_or_duplicates(digits_dir, tmp_path):
    dst = tmp_path / "shards"
    cmd = _pack_cmd(digits_dir, dst)
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300  # a loaded machine starts Ray slowly
    while time.time() < deadline and not list(dst.glob("*/part-*.parquet")):
        time.sleep(0.1)
    started = bool(list(dst.glob("*/part-*.parquet")))  # so the run held its lease: kill it mid-way
    os.killpg(p.pid, signal.SIGKILL)  # the driver and the Ray instance it started
    assert started, "pack wrote no shard within 300 s"
    p.wait()
    assert not (dst / "manifest.json").exists(), "killed too late: pack already committed"
    done_before = len(list(dst.glob("*/part-*.parquet")))
    assert done_before < 50
    # the killed run's lease is live until it expires: a rerun now is refused, naming it
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "in use by a live run" in r.stderr, r.stderr[-2000:]
    _expire_lease(dst)  # as if lease.DEFAULT_TTL_S had passed
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["reused_shards"] >= 1
    _, rows = _all_rows(str(dst))
    sources = [x["source"] for rs in rows.values() for x in rs]
    assert len(sources) == len(set(sources)) == 10 * PER_CLASS


def _expire_lease(dst):
    """Move the expiry of ``dst``'s lease into the past (a crashed holder, TTL passed)."""
    path = dst / LEASE
    record = json.loads(path.read_text())
    record["expires"] = "2000-01-01T00:00:00.000+00:00"
    path.write_text(json.dumps(record))


def _two_classes(root, per_class=12, size=(12, 12)):
    """``root/<a|b>/<i>.png``, all distinct."""
    for cls, base in (("a", 0), ("b", 100)):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (root / cls / f"{i}.png").write_bytes(_png((base + i, 7, 0), size=size))
    return root


# ------------------------------------------------ issue 14: arguments, DST, SRC


@pytest.mark.parametrize("data, needle", [
    ({"val_fraction": -0.1}, r"--val \(data.val_fraction\) must be in \[0, 1\); got -0.1"),
    ({"test_fraction": -0.1, "val_fraction": 0.2}, r"--test \(data.test_fraction\) must be in \[0, 1\)"),
    ({"val_fraction": 1.0}, r"--val \(data.val_fraction\) must be in \[0, 1\); got 1.0"),
    ({"val_fraction": 0.5, "test_fraction": 0.5}, r"--val \+ --test .* must be < 1"),
    ({"val_fraction": float("nan")}, r"--val .* must be in \[0, 1\); got nan"),
    ({"shard_rows": -5}, r"--shard-rows \(data.shard_rows\) must be >= 0 .*got -5"),
])
def test_split_and_shard_arguments_are_validated(tmp_path, digits_dir, data, needle):
    cfg = small_config()
    for k, v in data.items():  # set after loading: some of these the config file check refuses too
        setattr(cfg.data, k, v)
    with pytest.raises(UserError, match=needle):
        packing.pack(digits_dir, str(tmp_path / "d"), cfg, quiet=True)
    assert not (tmp_path / "d").exists()


def test_one_class_is_refused(tmp_path):
    src = tmp_path / "imgs"
    (src / "only").mkdir(parents=True)
    (src / "only" / "1.png").write_bytes(_png((1, 2, 3)))
    with pytest.raises(UserError, match=r"has 1 class \(only\); a classifier needs at least two classes"):
        packing.pack(str(src), str(tmp_path / "d"), small_config(), quiet=True)
    assert not (tmp_path / "d" / "manifest.json").exists() and not (tmp_path / "d" / LEASE).exists()


def test_committed_dst_refuses_another_source_or_settings(packed, digits_dir, tmp_path):
    other = _two_classes(tmp_path / "other")
    with pytest.raises(UserError, match=f"already committed from {re.escape(digits_dir)} .*source "
                                        f"'{re.escape(digits_dir)}' \\(committed\\) vs '{re.escape(str(other))}'"):
        packing.pack(str(other), packed, small_config(), quiet=True)
    for kwargs, data, needle in [({"seed": 1}, {}, r"seed 0 \(committed\) vs 1 \(this run\)"),
                                 ({}, {"val_fraction": 0.2}, r"fractions .*'val': 0.15.* vs .*'val': 0.2"),
                                 ({}, {"shard_rows": 100}, r"shard_rows 24 \(committed\) vs 100"),
                                 ({"classes": ["0", "1"]}, {}, r"classes .* vs \['0', '1'\]")]:
        with pytest.raises(UserError, match=needle):
            packing.pack(digits_dir, packed, small_config(data=data), quiet=True, **kwargs)
    # a manifest written before settings were recorded: what it lacks is not compared
    old = tmp_path / "old"
    old.mkdir()
    raw = json.loads((pathlib.Path(packed) / "manifest.json").read_text())
    for k in ("source", "seed", "fractions", "shard_rows"):
        raw.pop(k)
    for shards in raw["splits"].values():
        for s in shards:
            s["path"] = os.path.join(packed, s["path"])  # absolute: still the packed shards
    (old / "manifest.json").write_text(json.dumps(raw))
    assert packing.pack(str(other), str(old), small_config(), seed=3, quiet=True)["already_committed"]


def test_dst_or_src_that_is_a_file(tmp_path, digits_dir):
    (tmp_path / "dst-file").write_text("x")
    with pytest.raises(UserError, match="DST .*dst-file is a file; pack writes a dataset folder"):
        packing.pack(digits_dir, str(tmp_path / "dst-file"), small_config(), quiet=True)
    image = os.path.join(digits_dir, "3", os.listdir(os.path.join(digits_dir, "3"))[0])
    with pytest.raises(UserError, match="SRC .*png is a file; pack reads a folder"):
        packing.pack(image, str(tmp_path / "d"), small_config(), quiet=True)
    assert not (tmp_path / "d").exists()


def test_dst_that_is_an_s3_object(s3_bucket, digits_dir):
    storage.write_bytes(f"{s3_bucket}/dst", b"x")
    with pytest.raises(UserError, match=f"DST {s3_bucket}/dst is a file"):
        packing.pack(digits_dir, f"{s3_bucket}/dst", small_config(), quiet=True)


@pytest.mark.parametrize("extra, needle", [
    (["--val", "-0.1"], "--val (data.val_fraction) must be in [0, 1); got -0.1"),
    (["--shard-rows", "-5"], "--shard-rows (data.shard_rows) must be >= 0"),
    (["DST-IS-FILE"], "is a file; pack writes a dataset folder"),
    (["ONE-CLASS"], "a classifier needs at least two classes"),
])
def test_cli_bad_pack_arguments_exit_2_with_one_line(tmp_path, digits_dir, extra, needle):
    src, dst = digits_dir, str(tmp_path / "d")
    if extra == ["DST-IS-FILE"]:
        (tmp_path / "d").write_text("x")
        extra = []
    elif extra == ["ONE-CLASS"]:
        src = str(tmp_path / "one")
        os.makedirs(os.path.join(src, "cat"))
        with open(os.path.join(src, "cat", "1.png"), "wb") as f:
            f.write(_png((1, 1, 1)))
        extra = []
    r = subprocess.run([sys.executable, "-m", "pipeline", "--quiet", "pack", src, dst, *extra],
                       capture_output=True, text=True, timeout=300)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and needle in lines[0], r.stderr[-2000:]


# ------------------------------------------ issue 14: duplicates, missing URIs


def test_identical_images_never_land_in_two_splits(tmp_path, ray_local):
    src = _two_classes(tmp_path / "imgs")
    dup = _png((250, 250, 250))
    # one image under 8 names in one class (the same bytes under two classes is a label
    # conflict, quarantined: tests/test_audit.py)
    for i in range(8):
        (src / "a" / f"copy-{i}.png").write_bytes(dup)
    dup_id = hashlib.sha256(dup).hexdigest()
    cfg = small_config(data={"val_fraction": 0.25, "test_fraction": 0.25, "shard_rows": 5})
    naive = packing.assign_splits(listings.list_source(str(src)), 0.25, 0.25, seed=0)
    sources = listings.list_source(str(src)).column("source").to_pylist()
    assert len({s for s, idx in naive.items() for i in idx if "copy-" in sources[i]}) > 1, "no collision planted"

    out = packing.pack(str(src), str(tmp_path / "ds"), cfg, quiet=True)
    m, rows = _all_rows(str(tmp_path / "ds"))
    splits_of = collections.defaultdict(set)
    for split, rs in rows.items():
        for r in rs:
            splits_of[r["image_id"]].add(split)
    assert all(len(s) == 1 for s in splits_of.values()), {k: v for k, v in splits_of.items() if len(v) > 1}
    kept_in = splits_of[dup_id].pop()
    assert kept_in == next(s for s in packing.KEEP_ORDER if s in {s for s, idx in naive.items()
                                                                   for i in idx if "copy-" in sources[i]})
    assert out["cross_split_duplicates"] == m.raw["cross_split_duplicates"] > 0
    assert out["images"] == 24 + 8 - out["cross_split_duplicates"]
    # re-splitting that dataset with another seed keeps the copies together too
    packing.pack(str(tmp_path / "ds"), str(tmp_path / "ds2"), cfg, seed=5, quiet=True)
    _, rows2 = _all_rows(str(tmp_path / "ds2"))
    assert len({s for s, rs in rows2.items() for r in rs if r["image_id"] == dup_id}) == 1
    # rerun: a no-op with the same settings
    assert packing.pack(str(src), str(tmp_path / "ds"), cfg, quiet=True)["already_committed"]


def test_missing_listing_uris_are_named(tmp_path, ray_local):
    src = _two_classes(tmp_path / "imgs")
    gone = str(tmp_path / "imgs" / "a" / "deleted-after-listing.png")
    csv = tmp_path / "list.csv"
    csv.write_text("uri,label\n" + "".join(f"{p},{p.parent.name}\n" for p in sorted(src.glob("*/*.png")))
                   + f"{gone},a\n")
    out = packing.pack(str(csv), str(tmp_path / "ok"), small_config(data={"max_bad_fraction": 0.1}), quiet=True)
    assert out["bad_reasons"] == {"missing": 1} and out["missing_sources"] == [gone]
    (err,) = pq.read_table(str(tmp_path / "ok" / "_errors")).to_pylist()
    assert err["source"] == gone and err["error"] == f"missing: not found: {gone}"
    with pytest.raises(JobFailed, match=f"1 of 25 images are bad .*; missing: {re.escape(gone)}"):
        packing.pack(str(csv), str(tmp_path / "strict"), small_config(), quiet=True)


# ----------------------------------- issue 14: errors from Ray tasks, the lease


def test_task_error_reaches_the_caller_as_its_cause(packed, tmp_path, monkeypatch, capsys):
    """A shard changed after it was listed: write_shard raises ShardIntegrityError in a
    Ray task; pack raises it as itself (one line, both hashes), at once (no retries)."""
    import shutil

    from pipeline import cli

    src = tmp_path / "src"
    shutil.copytree(packed, src)
    real = packing.list_source

    def list_then_tamper(s):
        listing = real(s)
        for shard in (src / "train").glob("part-*.parquet"):
            pq.write_table(pq.read_table(shard).slice(1), shard)  # valid Parquet, other bytes
        return listing

    monkeypatch.setattr(packing, "list_source", list_then_tamper)
    t0 = time.monotonic()
    with pytest.raises(shardset.ShardIntegrityError) as e:
        packing.pack(str(src), str(tmp_path / "d"), small_config(), quiet=True)
    assert time.monotonic() - t0 < 120
    msg = str(e.value)
    assert "\n" not in msg and "retry" not in msg and "sha256" in msg and "!= manifest" in msg
    assert "/train/part-" in msg
    shutil.rmtree(src)
    shutil.copytree(packed, src)  # untampered again: the CLI run tampers it after listing
    assert cli.main(["--quiet", "pack", str(src), str(tmp_path / "d2")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("imgpipe:")]
    assert len(err) == 1 and err[0].startswith("imgpipe: error: shard ") and "sha256" in err[0], err


@pytest.mark.slow  # ~2 min: three pack processes; leases: tests/test_lease.py, predict's both orders in test_predict_output.py
def test_second_pack_into_a_live_dst_exits_2(tmp_path, digits_dir):
    """Both orders, real processes: a running pack refuses a second; a held lease refuses pack."""
    dst = tmp_path / "shards"
    cmd = _pack_cmd(digits_dir, dst)
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (dst / LEASE).exists() and first.poll() is None:
        time.sleep(0.05)
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert first.wait(timeout=600) == 0, first.stderr.read()[-2000:]
    lines = [line for line in second.stderr.splitlines() if line.strip()]
    assert second.returncode == 2 and len(lines) == 1 and "pack" in lines[0] and "in use by a live run" in lines[0]
    assert not (dst / LEASE).exists() and (dst / "manifest.json").exists()
    # the other order: a live holder first (this process), then a pack process
    other = tmp_path / "other"
    with lease.hold(str(other), what="pack"):
        r = subprocess.run([*cmd[:5], digits_dir, str(other)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "in use by a live run" in r.stderr, r.stderr[-2000:]
    assert not (other / "manifest.json").exists()

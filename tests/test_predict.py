"""Batch inference: schema, one row per image, errors, resume after a kill, incremental."""

import io
import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from pipeline import registry, storage
from pipeline.errors import UserError
from pipeline.inference import predict
from pipeline.names import LEASE
from tests.conftest import small_config


def expire_lease(dst):
    """Move the expiry of ``dst``'s lease into the past (a crashed holder, ray.lease_ttl_s passed)."""
    path = dst / LEASE
    record = json.loads(path.read_text())
    record["expires"] = "2000-01-01T00:00:00.000+00:00"
    path.write_text(json.dumps(record))

COLUMNS = [("image_id", "string"), ("source", "string"), ("label", "int32"), ("label_name", "string"),
           ("score", "float"), ("topk_labels", "list<element: int32>"),
           ("topk_scores", "list<element: float>"), ("model", "string"), ("run_id", "string"),
           ("topk_label_names", "list<element: string>")]


def _committed(dst):
    t = predict.read_predictions(dst)
    return t, json.loads(storage.read_text(storage.join(dst, "_SUCCESS")))


def _images(tmp_path, digits_dir, n=60, bad=True):
    """A prefix of n real digit PNGs (+ 1 unreadable file)."""
    import shutil

    src = tmp_path / "in"
    files = sorted(f.uri for f in storage.iter_files(digits_dir))[:n]
    for f in files:
        rel = os.path.relpath(f, digits_dir)
        os.makedirs(src / os.path.dirname(rel), exist_ok=True)
        shutil.copy(f, src / rel)
    if bad:
        (src / "0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return str(src), len(files)


def test_predict_prefix_schema_errors(trained, digits_dir, tmp_path):
    src, n = _images(tmp_path, digits_dir)
    cfg = small_config(predict={"topk": 3, "rows_per_file": 25}, data={"max_bad_fraction": 0.05})
    out = predict.run(trained["best_checkpoint_uri"], src, str(tmp_path / "out"), cfg, quiet=True)
    t, success = _committed(str(tmp_path / "out"))
    assert [(f.name, str(f.type)) for f in t.schema] == COLUMNS
    assert t.num_rows == n == out["rows"] and out["errors"] == 1
    assert sorted(t.column("source").to_pylist()) == sorted(set(t.column("source").to_pylist()))
    assert all(len(x) == 3 for x in t.column("topk_labels").to_pylist())
    assert success["rows"] == n and success["errors"] == 1 and len(success["files"]) == 3
    errs = pq.read_table(str(tmp_path / "out" / "_errors")).to_pylist()
    assert [os.path.basename(e["source"]) for e in errs] == ["broken.png"]
    assert errs[0]["error"].split(":")[0] in ("truncated", "not_an_image")


def test_predict_manifest_split_and_registry_ref(trained, packed, tmp_path):
    reg = str(tmp_path / "reg")
    v = registry.register(reg, "digits", trained["best_checkpoint_uri"], metrics={"holdout_accuracy": 0.5})
    registry.promote(reg, v["ref"])
    cfg = small_config(registry={"uri": reg})
    out = predict.run("digits@champion", f"{packed}:test", str(tmp_path / "p"), cfg, quiet=True)
    t, _ = _committed(str(tmp_path / "p"))
    assert t.num_rows == 30 and set(t.column("model").to_pylist()) == {"digits@v1"}
    assert "accuracy" in out


def test_bad_model_refs_fail_at_start(tmp_path, digits_dir):
    cfg = small_config(registry={"uri": str(tmp_path / "reg")})
    with pytest.raises(UserError, match="no model .nope. in registry"):
        predict.run("nope@v3", digits_dir, str(tmp_path / "o"), cfg, quiet=True)
    with pytest.raises(UserError, match="model not found"):
        predict.run(str(tmp_path / "no-such-ckpt"), digits_dir, str(tmp_path / "o"), cfg, quiet=True)
    assert not (tmp_path / "o" / "_SUCCESS").exists()


def test_class_mismatch_fails(trained, tmp_path):
    from pipeline.data import digits, packing

    digits.write_digits(str(tmp_path / "imgs"), limit=6)
    import shutil
    shutil.rmtree(tmp_path / "imgs" / "9")  # 9 classes: does not match the 10-class model
    packing.pack(str(tmp_path / "imgs"), str(tmp_path / "ds"), small_config(), quiet=True)
    with pytest.raises(UserError, match="do not match"):
        predict.run(trained["best_checkpoint_uri"], f"{tmp_path}/ds:test", str(tmp_path / "o"), small_config(),
                    quiet=True)


def test_skip_existing_scores_only_new_images(trained, digits_dir, tmp_path):
    src, n = _images(tmp_path, digits_dir, n=40, bad=False)
    dst = str(tmp_path / "out")
    cfg = small_config(predict={"skip_existing": True, "rows_per_file": 16})
    first = predict.run(trained["best_checkpoint_uri"], src, dst, cfg, quiet=True)
    assert first["scored"] == n and first["skipped"] == 0
    # a new night: 5 new images arrive, one old image is rewritten
    extra = sorted(f.uri for f in storage.iter_files(digits_dir))[100:105]
    import shutil
    for i, f in enumerate(extra):
        shutil.copy(f, os.path.join(src, "0", f"new{i}.png"))
    changed = sorted(f.uri for f in storage.iter_files(src))[0]
    time.sleep(0.01)
    with open(changed, "ab") as fh:
        fh.write(b"")  # touch: new mtime
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))
    second = predict.run(trained["best_checkpoint_uri"], src, dst, cfg, quiet=True)
    assert second["scored"] == 6 and second["skipped"] == n - 1
    t, success = _committed(dst)
    srcs = t.column("source").to_pylist()
    assert len(srcs) == len(set(srcs)) == n + 5 == success["rows"]
    # no orphan files: every part file on disk is listed in _SUCCESS
    on_disk = sorted(f for f in os.listdir(dst) if f.startswith("part-"))
    assert on_disk == sorted(success["files"])


def test_killed_predict_rerun_is_exactly_once(trained, digits_dir, tmp_path):
    src, n = _images(tmp_path, digits_dir, n=200, bad=False)
    dst = tmp_path / "out"
    cmd = [sys.executable, "-m", "pipeline", "--quiet", "predict", "--model", trained["best_checkpoint_uri"],
           "--input", src, "--output", str(dst), "--rows-per-file", "8",
           "--set", "ray.num_cpus=2", "--set", "predict.batch_size=8"]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300  # a loaded machine starts Ray slowly
    while time.time() < deadline and not list(dst.glob("part-*.parquet")):
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert not (dst / "_SUCCESS").exists(), "killed too late"
    partial = len(list(dst.glob("part-*.parquet")))
    assert partial >= 1
    # an image arriving after the crash belongs to the next run: the resumed run must
    # reuse its listing snapshot instead of listing the prefix again
    import shutil
    shutil.copy(sorted(f.uri for f in storage.iter_files(digits_dir))[-1], os.path.join(src, "0", "late.png"))
    # the killed run's lease is live until ray.lease_ttl_s passes: a rerun now is refused
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "in use by a live run" in r.stderr, r.stderr[-2000:]
    expire_lease(dst)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["skipped"] >= 8  # the parts written before the kill were kept
    t, success = _committed(str(dst))
    srcs = t.column("source").to_pylist()
    assert len(srcs) == len(set(srcs)) == n
    assert not any(s.endswith("late.png") for s in srcs)
    assert sorted(f for f in os.listdir(dst) if f.startswith("part-")) == sorted(success["files"])


def test_predict_on_s3(trained, digits_dir, s3_bucket, s3_server):
    fs, path = storage.filesystem(s3_bucket)
    files = sorted(f.uri for f in storage.iter_files(digits_dir))[:30]
    for f in files:
        fs.pipe_file(f"{path}/in/{os.path.relpath(f, digits_dir)}", open(f, "rb").read())
    fs.put(trained["best_checkpoint_uri"], f"{path}/model", recursive=True)
    cfg = small_config(storage={"s3": {"endpoint_url": s3_server}})
    out = predict.run(s3_bucket + "/model", s3_bucket + "/in", s3_bucket + "/out", cfg, quiet=True)
    assert out["rows"] == 30
    t, success = _committed(s3_bucket + "/out")
    assert sorted(t.column("source").to_pylist()) == sorted(f"{s3_bucket}/in/{os.path.relpath(f, digits_dir)}" for f in files)
    data = storage.read_bytes(s3_bucket + "/out/" + success["files"][0])
    assert pq.read_table(io.BytesIO(data)).num_rows == 30


def test_too_many_bad_images_fail_without_commit(trained, digits_dir, tmp_path):
    from pipeline.errors import JobFailed

    src, n = _images(tmp_path, digits_dir, n=20)  # 1 bad of 21 > 1%, and >= a minimum count of 1
    cfg = small_config(predict={"max_bad_min_count": 1})
    with pytest.raises(JobFailed, match=r"predict.max_bad_fraction.*broken.png"):
        predict.run(trained["best_checkpoint_uri"], src, str(tmp_path / "o"), cfg, quiet=True)
    assert not (tmp_path / "o" / "_SUCCESS").exists()


def test_batched_jpeg_decode_in_model_actor_matches_cpu_path(trained, digits_dir, tmp_path):
    """predict.gpu_decode runs torchvision's batched decode_jpeg on the model's device; on
    this CPU machine that is libjpeg, so the path is exercised here: same rows, same
    errors, same labels as the PIL decode actors."""
    from PIL import Image

    src = tmp_path / "jpegs"
    for i, f in enumerate(sorted(x.uri for x in storage.iter_files(digits_dir))[::7]):
        cls = f.split("/")[-2]
        os.makedirs(src / cls, exist_ok=True)
        Image.open(f).convert("RGB").save(src / cls / f"{i}.jpg", quality=95)
    Image.open(f).save(src / cls / "still.png")  # not a JPEG: safe CPU path
    (src / cls / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 50)  # JPEG magic, no image
    outs = {}
    for flag in (False, True):
        cfg = small_config(predict={"gpu_decode": flag}, data={"max_bad_fraction": 0.1})
        out = predict.run(trained["best_checkpoint_uri"], str(src), str(tmp_path / f"o{flag}"), cfg, quiet=True)
        t = predict.read_predictions(str(tmp_path / f"o{flag}")).sort_by("source")
        outs[flag] = (out, t)
    (a, ta), (b, tb) = outs[False], outs[True]
    assert a["rows"] == b["rows"] == ta.num_rows == tb.num_rows and a["errors"] == b["errors"] == 1
    assert ta.column("source").to_pylist() == tb.column("source").to_pylist()
    same = sum(x == y for x, y in zip(ta.column("label").to_pylist(), tb.column("label").to_pylist()))
    assert same >= 0.95 * ta.num_rows

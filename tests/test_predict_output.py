"""Predict's output contract (issues 14 and 15): one model per output folder, replaced
atomically with --overwrite; a lease per output (real processes, both orders); an
output path that is a file; bad images quarantined and named; Ray task errors as their
cause; every reader's usual way of reading the folder gives one row per image."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import duckdb
import pandas as pd
import polars as pl
import pyarrow.dataset as pads
import pytest

from pipeline import cli, storage
from pipeline.errors import UserError
from pipeline.inference import predict
from pipeline.names import LEASE
from pipeline.ops import lease
from tests.conftest import small_config
from tests.s3_fault_proxy import FaultProxy
from tests.test_predict import expire_lease


def _photos(root, digits_dir, n, bad=()):
    """``root/<class>/<name>.png``: the first ``n`` digits, plus the named unreadable files."""
    files = sorted(f.uri for f in storage.iter_files(digits_dir))[:n]
    for f in files:
        rel = os.path.relpath(f, digits_dir)
        os.makedirs(root / os.path.dirname(rel), exist_ok=True)
        shutil.copy(f, root / rel)
    for name in bad:
        (root / "0" / name).write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return str(root), len(files)


def _read_every_way(dst: str) -> dict[str, list[str]]:
    """The ``source`` column as each reader sees the folder."""
    return {
        "duckdb *": [r[0] for r in duckdb.sql(f"SELECT source FROM read_parquet('{dst}/*.parquet')").fetchall()],
        "duckdb **": [r[0] for r in duckdb.sql(f"SELECT source FROM read_parquet('{dst}/**/*.parquet')").fetchall()],
        "polars *": pl.read_parquet(f"{dst}/*.parquet")["source"].to_list(),
        "polars **": pl.read_parquet(f"{dst}/**/*.parquet")["source"].to_list(),
        "pandas": pd.read_parquet(dst)["source"].tolist(),
        "pyarrow": pads.dataset(dst).to_table(columns=["source"]).column("source").to_pylist(),
    }


def _predict_cmd(model, src, dst, *extra):
    return [sys.executable, "-m", "pipeline", "--quiet", "predict", "--model", model, "--input", src,
            "--output", str(dst), "--rows-per-file", "8", "--set", "ray.num_cpus=2", "--set", "predict.batch_size=8",
            *extra]


def test_bad_images_readers_and_one_model_per_output(trained, digits_dir, tmp_path):
    """9 images, 2 bad: committed (defaults), the bad ones named; every reader reads 7 rows;
    another model or top-k is refused naming both; --overwrite replaces."""
    src, n = _photos(tmp_path / "in", digits_dir, 7, bad=("upload1.png", "upload2.png"))
    dst = str(tmp_path / "out")
    model_a = trained["best_checkpoint_uri"]
    out = predict.run(model_a, src, dst, small_config(), quiet=True)
    assert out["rows"] == n == 7 and out["errors"] == 2
    assert sorted(os.path.basename(b["source"]) for b in out["bad_images"]) == ["upload1.png", "upload2.png"]
    report = json.loads(open(os.path.join(dst, "_report", "report.json")).read())
    assert sorted(os.path.basename(b["source"]) for b in report["bad_images"]) == ["upload1.png", "upload2.png"]
    for how, sources in _read_every_way(dst).items():
        assert len(sources) == len(set(sources)) == n, (how, sources)
    t = predict.read_predictions(dst)
    names = t.column("topk_label_names").to_pylist()
    assert [x[0] for x in names] == t.column("label_name").to_pylist()
    assert all(len(x) == 5 for x in names)

    model_b = str(tmp_path / "model_b")
    shutil.copytree(model_a, model_b)  # same weights, another model: its URI names it
    before = open(os.path.join(dst, "_SUCCESS")).read()
    with pytest.raises(UserError, match="holds committed predictions") as e:
        predict.run(model_b, src, dst, small_config(), quiet=True)
    assert model_a in str(e.value) and model_b in str(e.value) and "--overwrite" in str(e.value)
    with pytest.raises(UserError, match="top-5.*top-3"):
        predict.run(model_a, src, dst, small_config(predict={"topk": 3}), quiet=True)
    assert open(os.path.join(dst, "_SUCCESS")).read() == before  # refused before anything was written

    old_parts = set(json.loads(before)["files"])
    out = predict.run(model_b, src, dst, small_config(predict={"overwrite": True}), quiet=True)
    assert out["replaced"] and out["rows"] == n
    t = predict.read_predictions(dst)
    assert set(t.column("model").to_pylist()) == {model_b} and t.num_rows == n
    on_disk = {f for f in os.listdir(dst) if f.endswith(".parquet")}
    assert not on_disk & old_parts and on_disk == set(json.loads(open(os.path.join(dst, "_SUCCESS")).read())["files"])
    for how, sources in _read_every_way(dst).items():
        assert len(sources) == len(set(sources)) == n, (how, sources)


def test_output_that_is_a_file_exits_2(trained, tmp_path, capsys):
    (tmp_path / "out.parquet").write_bytes(b"x")
    code = cli.main(["--quiet", "predict", "--model", trained["best_checkpoint_uri"], "--input", str(tmp_path),
                     "--output", str(tmp_path / "out.parquet")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and "is a file" in err[0], err


def test_live_predict_refuses_a_second_both_orders(trained, digits_dir, tmp_path):
    src, n = _photos(tmp_path / "in", digits_dir, 120)
    dst = tmp_path / "out"
    cmd = _predict_cmd(trained["best_checkpoint_uri"], src, dst)
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (dst / LEASE).exists() and first.poll() is None:
        time.sleep(0.05)
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert first.wait(timeout=600) == 0, first.stderr.read()[-2000:]
    lines = [line for line in second.stderr.splitlines() if line.strip()]
    assert second.returncode == 2 and len(lines) == 1 and "predict output" in lines[0], lines
    assert "in use by a live run" in lines[0]
    assert not (dst / LEASE).exists() and predict.read_predictions(str(dst)).num_rows == n
    # the other order: a live holder first (this process), then a predict process
    other = tmp_path / "other"
    with lease.hold(str(other), what="predict output"):
        r = subprocess.run(_predict_cmd(trained["best_checkpoint_uri"], src, other), capture_output=True,
                           text=True, timeout=300)
    assert r.returncode == 2 and "in use by a live run" in r.stderr, r.stderr[-2000:]
    assert not (other / "_SUCCESS").exists()


@pytest.mark.slow  # three predict runs, one killed mid-way
def test_killed_overwrite_keeps_the_old_commit_then_resumes(trained, digits_dir, tmp_path):
    """An --overwrite run killed mid-way: readers of _SUCCESS still get the old model's
    complete set; the rerun waits for the lease to expire, then resumes and replaces."""
    src, n = _photos(tmp_path / "in", digits_dir, 160)
    dst = tmp_path / "out"
    model_a = trained["best_checkpoint_uri"]
    predict.run(model_a, src, str(dst), small_config(predict={"rows_per_file": 8, "batch_size": 8}), quiet=True)
    model_b = str(tmp_path / "model_b")
    shutil.copytree(model_a, model_b)
    old = set(json.loads((dst / "_SUCCESS").read_text())["files"])
    cmd = _predict_cmd(model_b, src, dst, "--overwrite")
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300  # a loaded machine starts Ray slowly
    while time.time() < deadline and not {f.name for f in dst.glob("part-*.parquet")} - old:
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    t = predict.read_predictions(str(dst))
    assert set(t.column("model").to_pylist()) == {model_a} and t.num_rows == n  # the old set, whole
    assert {f.name for f in dst.glob("part-*.parquet")} - old, "killed before it wrote a part"
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "in use by a live run" in r.stderr, r.stderr[-2000:]
    expire_lease(dst)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["skipped"] >= 8  # resumed, not restarted
    t = predict.read_predictions(str(dst))
    srcs = t.column("source").to_pylist()
    assert set(t.column("model").to_pylist()) == {model_b} and len(srcs) == len(set(srcs)) == n
    assert sorted(f.name for f in dst.glob("part-*.parquet")) == sorted(json.loads((dst / "_SUCCESS").read_text())["files"])


def test_forbidden_image_reaches_the_user_as_its_cause(trained, digits_dir, s3_bucket, s3_server):
    """A 403 inside a Ray read task: exit-2 error naming the object, not Ray's retry hint."""
    fs, path = storage.filesystem(s3_bucket)
    files = sorted(f.uri for f in storage.iter_files(digits_dir))[:6]
    for f in files:
        fs.pipe_file(f"{path}/in/{os.path.relpath(f, digits_dir)}", open(f, "rb").read())
    denied = os.path.relpath(files[2], digits_dir)
    with FaultProxy(s3_server) as proxy:
        proxy.add_fault(method="GET", path_contains=f"in/{denied}", status=403, code="AccessDenied")
        cfg = small_config(storage={"s3": {"endpoint_url": proxy.url}, "retries": 2})
        storage.configure(storage.StorageOptions(endpoint_url=proxy.url, retries=2))
        with pytest.raises(UserError) as e:
            predict.run(trained["best_checkpoint_uri"], s3_bucket + "/in", s3_bucket + "/out", cfg, quiet=True)
    msg = str(e.value)
    assert "403" in msg and denied in msg and "\n" not in msg, msg
    assert "retry" not in msg.lower() and "DataContext" not in msg, msg

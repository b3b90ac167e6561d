"""Smoke runs of the benchmark scripts (``--smoke``): they keep working and print one
valid JSON line per measurement with the required keys. Slow (each starts Ray), so
not in CI's default ``-m "not slow"`` run: ``python -m pytest -m slow tests/test_benchmarks.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
REQUIRED = ("name", "ours_images_per_second", "baseline_images_per_second", "ratio", "peak_rss_mb", "machine")
COMPARISONS = ("ingest.py", "train.py", "predict.py", "pack.py")


def _run(script: str, tmp_path, *extra: str) -> list[dict]:
    results = tmp_path / "results.jsonl"
    env = {**os.environ, "IMGPIPE_BENCH_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / script), "--smoke", "--workdir",
                             str(tmp_path / "work"), "--results", str(results), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=420)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the script, its Ray instance and pools
        stdout, stderr = proc.communicate()
        pytest.fail(f"{script} --smoke took over 420 s: {stderr[-3000:]}")
    assert proc.returncode == 0, stderr[-3000:]
    lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    assert lines, stdout[-2000:]
    for rec in lines:
        missing = [k for k in REQUIRED if k not in rec]
        assert not missing, f"{script}: {rec.get('name')} lacks {missing}"
        assert rec["ours_images_per_second"] > 0
        assert rec["machine"]["cpus"] >= 1 and rec["machine"]["torch"]
        assert rec["command"].startswith(f"python benchmarks/{script}") and rec["mode"] == "smoke"
    # every printed line was appended to the results file too
    appended = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["name"] for r in appended] == [r["name"] for r in lines]
    return lines


@pytest.mark.parametrize("script", COMPARISONS)
def test_comparison_smoke(script, tmp_path):
    (rec,) = _run(script, tmp_path)
    assert rec["baseline_images_per_second"] > 0
    assert rec["ratio"] == pytest.approx(rec["ours_images_per_second"] / rec["baseline_images_per_second"], rel=0.01)
    assert rec["images_ours"] == rec["images_baseline"]
    assert rec["peak_rss_mb"] > 0 and rec["baseline_peak_rss_mb"] > 0


def test_pack_smoke_from_moto_s3(tmp_path):
    (rec,) = _run("pack.py", tmp_path, "--s3")
    assert rec["source"].startswith("moto S3") and rec["baseline_images_per_second"] > 0


def test_scaling_smoke(tmp_path):
    recs = _run("scaling.py", tmp_path)
    names = [r["name"] for r in recs]
    assert [n for n in names if "actors" in n] == ["scaling_ingest_small_actors_1", "scaling_ingest_small_actors_2"]
    memory = [r for r in recs if "_rss_n" in r["name"]]
    assert len(memory) == 2 and "rss_growth" in memory[1]


def test_make_images_smoke(tmp_path):
    (rec,) = _run("make_images.py", tmp_path, str(tmp_path / "imgs"), "--size", "large", "--n", "20")
    files = sorted((tmp_path / "imgs").rglob("*.jpg"))
    assert len(files) == 20 and 30_000 < rec["bytes"] / 20 < 100_000  # ~60 KB at 500x375, quality 90
    from PIL import Image

    with Image.open(files[0]) as im:
        assert im.size == (500, 375) and im.format == "JPEG"


def test_ablation_smoke(tmp_path):
    """benchmarks/ablation.py: one JSON line per cell of init x augment, appended too; the table on stderr."""
    results = tmp_path / "results.jsonl"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ablation.py"), "--smoke",
                           "--results", str(results)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [(r["init"], r["augment"]) for r in rows] == [("imagenet", "on"), ("imagenet", "off"),
                                                         ("scratch", "on"), ("scratch", "off")]
    for r in rows:
        assert r["name"] == "ablation_efficientnet_lite0_digits" and r["mode"] == "smoke"
        assert r["images_per_class"] == 2 and r["seeds"] == [0] and len(r["per_seed"]) == 1
        assert 0.0 <= r["accuracy_min"] <= r["accuracy_mean"] <= r["accuracy_max"] <= 1.0
        assert r["augment_recipe"] == {"preset": "digits", "pad": 4, "rotation": 10.0}  # 2 px at 16 px, scaled to 32
        assert r["test_images"] == 50 and r["seconds"] > 0
    assert [json.loads(line) for line in results.read_text().splitlines()] == rows
    assert "| labels per class | init | augment |" in proc.stderr and proc.stderr.count("| 2 |") == 4


def test_scale_smoke(tmp_path):
    """benchmarks/scale.py: predict at two small sizes, each line with its phases and its
    growth against the smallest size."""
    lines = _run("scale.py", tmp_path)
    assert len(lines) == 2
    assert "rss_growth" in lines[1] and "s_per_image_ratio" in lines[1]

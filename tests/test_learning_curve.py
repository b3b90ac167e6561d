"""Learning curves: stratified, nested training subsets sharing val/test, and
``imgpipe learning-curve`` at tiny size (real Ray, real Parquet)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest

from pipeline.data import shardset, subsets
from pipeline.errors import UserError
from pipeline.workflows import learning_curve
from tests.conftest import small_config


def _train_ids(m: shardset.Manifest) -> dict[str, int]:
    out = {}
    for t in shardset.iter_split(m, "train", columns=["image_id", "label"]):  # verifies sha256s
        out.update(zip(t.column("image_id").to_pylist(), t.column("label").to_pylist()))
    return out


def test_subsets_are_stratified_nested_and_share_val_and_test(packed, tmp_path):
    full = shardset.read_manifest(packed)
    per_class_full = Counter(_train_ids(full).values())
    small = subsets.stratified_subset(full, 0.25, 0, str(tmp_path / "a"))
    large = subsets.stratified_subset(full, 0.5, 0, str(tmp_path / "b"))
    other = subsets.stratified_subset(full, 0.25, 1, str(tmp_path / "c"))
    small_ids, large_ids = _train_ids(small), _train_ids(large)

    for sub, f in ((small, 0.25), (large, 0.5)):
        counts = Counter(_train_ids(sub).values())
        assert counts == {c: max(1, round(f * n)) for c, n in per_class_full.items()}
        for split in ("val", "test"):
            assert sub.shard_uris(split) == full.shard_uris(split)
            assert [s["sha256"] for s in sub.splits[split]] == [s["sha256"] for s in full.splits[split]]
            assert sub.rows(split) == full.rows(split)
        assert sub.raw["subset_of"]["manifest_sha256"] == full.sha256
    assert set(small_ids) < set(large_ids)  # one seed: nested
    assert set(_train_ids(other)) != set(small_ids)  # another seed: other images
    assert all(_train_ids(full)[i] == lab for i, lab in small_ids.items())  # labels kept

    again = subsets.stratified_subset(full, 0.25, 0, str(tmp_path / "a"))
    assert again.sha256 == small.sha256  # reused, not rewritten
    with pytest.raises(UserError, match="holds another dataset"):
        subsets.stratified_subset(full, 0.5, 0, str(tmp_path / "a"))


@pytest.mark.slow  # ~2.5 min: two training runs and a rerun; the fit and the errors are tested below
def test_learning_curve_trains_fits_and_reuses_points(packed, tmp_path):
    cfg = small_config(data={"manifest": packed}, train={"epochs": 1, "storage": str(tmp_path / "runs")})
    out = str(tmp_path / "lc")
    s = learning_curve.run(cfg, [0.5, 1.0], [0], out, quiet=True)

    full = shardset.read_manifest(packed)
    per_class_full = Counter(_train_ids(full).values())
    half = sum(max(1, round(0.5 * n)) for n in per_class_full.values()) / len(full.classes)
    assert [p["fraction"] for p in s["points"]] == [0.5, 1.0]
    assert [c["images_per_class"] for c in s["curve"]] == [round(half, 2), round(full.rows("train") / 10, 2)]
    assert s["points"][1]["train_images"] == full.rows("train")
    assert all(0.0 <= p["test_accuracy"] <= 1.0 for p in s["points"])
    a, b = s["fit"]["a"], s["fit"]["b"]
    for k in (2, 10):
        expected = max(0.0, 1.0 - a * (k * s["full_images_per_class"]) ** -b)
        assert s[f"estimated_accuracy_{k}x"] == pytest.approx(expected, abs=2e-3)
    with open(s["plot"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(tmp_path / "lc" / "learning_curve.json") as f:
        assert json.load(f)["points"] == s["points"]

    again = learning_curve.run(cfg, [0.5, 1.0], [0], out, quiet=True)
    assert again["points"] == s["points"]  # finished points reused: same runs, same seconds


def test_power_law_fit_recovers_its_parameters():
    xs = [5.0, 20.0, 80.0]
    a, b = learning_curve.fit_power_law(xs, [0.3 * x ** -0.5 for x in xs], floor=1e-6)
    assert a == pytest.approx(0.3) and b == pytest.approx(0.5)
    assert learning_curve.fit_power_law([5.0, 5.0], [0.1, 0.2], floor=1e-6) is None
    a, b = learning_curve.fit_power_law([10.0, 100.0], [0.1, 0.0], floor=0.001)  # a perfect score counts as the floor
    assert b == pytest.approx(2.0)


def test_bad_fractions_exit_2_with_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pipeline", "learning-curve", "/dev/null", "--fractions", "0,1",
                        "--set", f"data.manifest={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-1500:]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "must be in (0, 1]" in lines[0], r.stderr


@pytest.mark.parametrize("text, kind, needle", [
    ("half", float, "expected comma-separated floats"),
    ("1,1", int, "each once"),
    ("", int, "at least one value"),
])
def test_bad_lists_are_user_errors(text, kind, needle):
    with pytest.raises(UserError, match=needle):
        learning_curve.parse_list(text, kind, "seeds")
    assert learning_curve.parse_list("1,0.25", float, "fractions") == [0.25, 1.0]

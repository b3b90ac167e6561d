"""Registering what was trained: ``imgpipe train --register`` and ``imgpipe models
register MODEL --name NAME [--gate | --promote]`` (real Ray, real runs, real processes)."""

import json
import subprocess
import sys

import pytest
import yaml

from pipeline import storage
from pipeline.cli import main
from pipeline.models import artifact


def imgpipe(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, timeout=timeout)


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


@pytest.mark.slow  # trains a run and starts Ray in two CLI processes: minutes on 2 cores
def test_train_register_then_models_register(packed, tmp_path, capsys):
    reg, runs = str(tmp_path / "registry"), str(tmp_path / "runs")
    cfg = tmp_path / "train.yaml"
    cfg.write_text(yaml.safe_dump({
        "data": {"manifest": packed}, "train": {"epochs": 1, "batch_size": 16, "storage": runs, "run_name": "r1"},
        "registry": {"uri": reg, "name": "digits"}, "ray": {"num_cpus": 2}}))

    # train --register: the best checkpoint goes through the gate; no champion yet -> promoted
    assert main(["train", str(cfg), "--register", "--quiet"]) == 0
    summary = last_json(capsys.readouterr().out)
    r = summary["registered"]
    assert (r["ref"], r["promoted"], r["champion"], r["mode"]) == ("digits@v1", True, 1, "gate")
    assert r["holdout_accuracy"] == summary["test_accuracy"] and r["source"] == summary["best_checkpoint_uri"]
    copied = artifact.read_meta(r["uri"])
    assert copied["weights_sha256"] == artifact.sha256(storage.read_bytes(storage.join(r["uri"], "weights.pt")))
    assert copied["weights_sha256"] == artifact.read_meta(summary["best_checkpoint_uri"])["weights_sha256"]

    # the run folder names its best checkpoint: the same one is not registered twice
    p = imgpipe("models", "register", summary["run_uri"], "--name", "digits", "--gate", "--registry", reg)
    assert p.returncode == 0, p.stderr[-2000:]
    again = last_json(p.stdout)
    assert again["ref"] == "digits@v1" and again["promoted"] is False and "already the champion" in again["reason"]

    # --gate under a new name scores the challenger on the holdout (--data's test split)
    p = imgpipe("models", "register", summary["best_checkpoint_uri"], "--name", "gated", "--gate",
                "--data", packed, "--registry", reg, "--set", "ray.num_cpus=2")
    assert p.returncode == 0, p.stderr[-2000:]
    gated = last_json(p.stdout)
    assert gated["promoted"] is True and gated["holdout_accuracy"] == summary["test_accuracy"]
    assert "core_worker" not in p.stderr  # no Ray C++ lines on a normal run

    # --promote forces it; no flag only registers
    p = imgpipe("models", "register", summary["run_uri"], "--name", "photos", "--promote", "--registry", reg)
    assert p.returncode == 0 and last_json(p.stdout)["champion"] == 1, p.stderr[-2000:]
    p = imgpipe("models", "register", str(tmp_path / "runs" / "r1"), "--name", "plain", "--registry", reg)
    assert p.returncode == 0 and last_json(p.stdout)["champion"] is None, p.stderr[-2000:]

    # readable tables by default, JSON with --json
    p = imgpipe("models", "list", "--registry", reg)
    assert p.returncode == 0 and p.stdout.splitlines()[1].split() == ["NAME", "VERSIONS", "CHAMPION"]
    assert {tuple(line.split()) for line in p.stdout.splitlines()[2:]} == {
        ("digits", "1", "v1"), ("gated", "1", "v1"), ("photos", "1", "v1"), ("plain", "1", "-")}
    p = imgpipe("models", "list", "digits", "--registry", reg)
    assert "VERSION" in p.stdout and "champion" in p.stdout.splitlines()[-1]
    p = imgpipe("models", "show", "photos@champion", "--registry", reg)
    assert p.returncode == 0 and ["weights_sha256", copied["weights_sha256"]] in [
        line.split() for line in p.stdout.splitlines()]
    p = imgpipe("models", "show", "photos@champion", "--registry", reg, "--json")
    assert last_json(p.stdout)["weights_sha256"] == copied["weights_sha256"]


def test_register_bad_model_exits_2(tmp_path):
    (tmp_path / "empty").mkdir()
    p = imgpipe("models", "register", str(tmp_path / "empty"), "--name", "x", "--registry", str(tmp_path / "r"))
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "neither a checkpoint folder" in lines[0], p.stderr
    p = imgpipe("models", "register", str(tmp_path), "--name", "x", "--gate", "--promote")
    assert p.returncode == 2 and "not allowed with argument" in p.stderr

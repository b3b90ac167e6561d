"""The thin Ray job entrypoints under ``jobs/`` behave exactly like the CLI."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
JOBS = ["train", "predict", "retrain", "pack", "evaluate"]


def test_missing_config_exits_2_with_one_line():
    r = subprocess.run([sys.executable, "-m", "jobs.train", "/nonexistent.yaml"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "/nonexistent.yaml" in lines[0]
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("name", JOBS)
def test_each_job_forwards_to_its_subcommand(name, monkeypatch):
    """`python -m jobs.X ARGS` is `imgpipe X ARGS`: same parser, same help."""
    assert name in build_parser()._subparsers._group_actions[0].choices
    mod = importlib.import_module(f"jobs.{name}")
    assert f"python -m jobs.{name}" in mod.__doc__
    r = subprocess.run([sys.executable, "-m", f"jobs.{name}", "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"usage: imgpipe {name} ")

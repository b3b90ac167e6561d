"""The command line: exit codes and one-line errors for bad input (no traceback)."""

import json
import subprocess
import sys
import threading

import pytest

from pipeline import cli
from pipeline.cli import build_parser


def imgpipe(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args, needle", [
    (["pack", "/nonexistent/src", "/tmp/x-dst"], "source not found: /nonexistent/src"),
    (["train", "/nonexistent.yaml"], "config file not found: /nonexistent.yaml"),
    (["train", "/dev/null", "--set", "train.epoch=3"], "unknown config key 'train.epoch'; valid keys in 'train': epochs"),
    (["train", "/dev/null", "--set", "train.epochs=many"], "config key 'train.epochs' must be an integer"),
    (["train", "/dev/null"], "data.manifest is not set"),
    (["predict", "--model", "digits@v7", "--input", "/tmp", "--output", "/tmp/o", "--set", "registry.uri=/nonexistent-reg"],
     "no model 'digits' in registry /nonexistent-reg"),
    (["evaluate", "--model", "/nonexistent/ckpt", "--data", "/nonexistent/ds"], "model not found"),
    (["models", "show", "nope@v1", "--registry", "/nonexistent-reg"], "nope"),
])
def test_bad_input_exits_2_with_one_line(args, needle):
    r = imgpipe(*args)
    assert r.returncode == 2, (r.returncode, r.stderr[-1500:])
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("imgpipe: error:"), r.stderr
    assert needle in lines[0]
    assert "Traceback" not in r.stderr


def test_empty_folder_exits_2(tmp_path):
    (tmp_path / "empty").mkdir()
    r = imgpipe("pack", str(tmp_path / "empty"), str(tmp_path / "dst"))
    assert r.returncode == 2 and "no images found" in r.stderr


def test_help_lists_every_command():
    r = imgpipe("--help")
    for cmd in ("demo", "pack", "train", "evaluate", "predict", "models", "retrain", "submit"):
        assert cmd in r.stdout


def test_demo_per_class_is_a_user_option():
    """`imgpipe demo --per-class N`: a smaller, quicker demo (tests use it too)."""
    assert build_parser().parse_args(["demo", "--per-class", "15"]).per_class == 15
    assert build_parser().parse_args(["demo"]).per_class is None
    r = imgpipe("demo", "--help")
    assert r.returncode == 0 and "--per-class N" in r.stdout


def test_models_list_prints_a_table_or_json(tmp_path):
    r = imgpipe("models", "list", "--registry", str(tmp_path))
    assert r.returncode == 0 and r.stdout.strip() == f"no models in {tmp_path}"
    r = imgpipe("models", "list", "--registry", str(tmp_path), "--json")
    assert r.returncode == 0
    assert json.loads(r.stdout.strip().splitlines()[-1])["models"] == []


def test_stdout_holds_only_the_summary(monkeypatch, capsys, tmp_path):
    """Ray's driver prints its raylet's notes ("8 PYTHON worker processes have been
    started ...") on stdout from a thread of its own: while a command runs they go to
    stderr, and stdout is the summary line alone (`imgpipe --quiet train ... | jq` works)."""
    def command(args):
        note = threading.Thread(target=print, args=("(raylet) WARNING: a note from Ray",))
        note.start()
        note.join()
        return {"config": str(tmp_path / "x.yaml")}

    monkeypatch.setitem(cli.HANDLERS, "init", command)
    assert cli.main(["--quiet", "init", "--preset", "digits"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [json.dumps({"config": str(tmp_path / "x.yaml")})]
    assert "(raylet) WARNING: a note from Ray" in err


def test_impossible_gpu_request_fails_fast(packed, tmp_path):
    """Pre-flight: GPUs asked of a CPU-only local cluster fail at once, before any work:
    the run folder holds no config, metrics or checkpoint (a timeout, not a clock, guards
    against a hang)."""
    runs = tmp_path / "runs"
    r = imgpipe("train", "/dev/null", "--set", f"data.manifest={packed}", "--set", "train.use_gpu=true",
                "--set", "ray.num_cpus=2", "--set", f"train.storage={runs}")
    assert r.returncode == 2, r.stderr[-1500:]
    assert "train.use_gpu=true needs 2 GPUs" in r.stderr and "the cluster has 0" in r.stderr
    written = [p.name for p in runs.rglob("*") if p.is_file()]
    assert not [n for n in written if n.endswith((".yaml", ".jsonl", ".pt", ".json"))], written

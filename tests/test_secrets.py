"""Secrets stay in the process that needs them (issue 14, item 3).

Credentials in the environment are never forwarded to Ray (local workers inherit the
environment; a cluster's workers use their node's own credential chain), and a URI's
``user:password@`` is redacted wherever imgpipe writes it: config.yaml, meta.json, the
registry, reports, log lines. The end-to-end test runs pack -> train -> predict as real
``imgpipe`` processes, each starting its own Ray instance under a private temp dir, with
sentinel credentials, then searches every file of the workdir and of Ray's session
folders for them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from pipeline import config, storage
from pipeline.models import artifact
from pipeline.ops import runtime
from pipeline.report import pages

SECRET_ENV = {"AWS_ACCESS_KEY_ID": "AKIA_SENTINEL_123", "AWS_SECRET_ACCESS_KEY": "SECRET_SENTINEL_456",
              "AWS_SESSION_TOKEN": "TOKEN_SENTINEL_789"}
PASSWORD = "PASSWORD_SENTINEL_0AB"
ENDPOINT = f"http://sentinel-user:{PASSWORD}@127.0.0.1:9"  # never contacted: storage is local
SENTINELS = (*SECRET_ENV.values(), PASSWORD)


# ------------------------------------------------------------------- redaction


@pytest.mark.parametrize("text, expected", [
    ("http://user:pw@host:9000/x", "http://user:***@host:9000/x"),
    ("s3a://AKIA:se/cr+et@bucket/k", "s3a://AKIA:***@bucket/k"),  # an unencoded '/' in a secret too
    ("https://token@example.com/a", "https://***@example.com/a"),
    ("endpoint http://a:b@h:1 and http://c:d@h:2.", "endpoint http://a:***@h:1 and http://c:***@h:2."),
    ("s3://bucket/models/digits@v3", "s3://bucket/models/digits@v3"),  # '@' in a path is no userinfo
    ("/runs/a@b/ckpt", "/runs/a@b/ckpt"),
    ("digits@champion", "digits@champion"),
    ("http://127.0.0.1:9000", "http://127.0.0.1:9000"),
])
def test_redact_masks_userinfo_only(text, expected):
    assert storage.redact(text) == expected


def test_redact_walks_containers_and_keeps_other_values():
    value = {"a": [ENDPOINT, 1.5, None], "b": ("x", {"c": ENDPOINT}), "n": 3}
    out = storage.redact(value)
    assert out == {"a": ["http://sentinel-user:***@127.0.0.1:9", 1.5, None],
                   "b": ("x", {"c": "http://sentinel-user:***@127.0.0.1:9"}), "n": 3}
    assert value["a"][0] == ENDPOINT  # the input is not modified


def test_config_dump_redacts_but_the_connecting_value_stays():
    cfg = config.from_dict({"storage": {"s3": {"endpoint_url": ENDPOINT}}})
    dumped = config.dump(cfg)
    assert PASSWORD not in dumped
    assert yaml.safe_load(dumped)["storage"]["s3"]["endpoint_url"] == "http://sentinel-user:***@127.0.0.1:9"
    assert cfg.storage.s3.endpoint_url == ENDPOINT
    assert config.storage_options(cfg).endpoint_url == ENDPOINT
    assert config.to_dict(cfg)["storage"]["s3"]["endpoint_url"] == ENDPOINT


def test_artifact_meta_is_redacted_on_disk(tmp_path):
    import torch  # deferred: only this test needs a state dict

    meta = {"arch": "smallcnn", "classes": ["0", "1"], "image_size": 8, "mean": [0.5] * 3, "std": [0.5] * 3,
            "config": {"storage": {"s3": {"endpoint_url": ENDPOINT}}}}
    written = artifact.save(str(tmp_path / "a"), {"w": torch.zeros(2)}, meta)
    assert PASSWORD not in (tmp_path / "a" / "meta.json").read_text()
    assert PASSWORD not in json.dumps(written)
    assert meta["config"]["storage"]["s3"]["endpoint_url"] == ENDPOINT
    assert artifact.load(str(tmp_path / "a")).meta["config"]["storage"]["s3"]["endpoint_url"].endswith(":***@127.0.0.1:9")


def test_report_pages_and_json_are_redacted(tmp_path):
    from pipeline.report import outputs

    html = pages.render("train.html", title=ENDPOINT, final_rows=[], best_val_accuracy=0.5, epochs=1,
                        curves=[], epoch_rows=[], evaluation=None, mistakes=None, config_text=ENDPOINT)
    assert PASSWORD not in html and "sentinel-user:***@" in html
    outputs.write_json(str(tmp_path / "r.json"), {"run_uri": ENDPOINT})
    assert PASSWORD not in (tmp_path / "r.json").read_text()


def test_log_lines_are_redacted(caplog):
    with caplog.at_level(logging.INFO, logger="imgpipe"):
        logging.getLogger("imgpipe").info("endpoint %s", ENDPOINT)
    assert PASSWORD not in caplog.text and "sentinel-user:***@" in caplog.text


def test_only_non_secret_settings_are_forwarded(monkeypatch):
    for k, v in SECRET_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_ENDPOINT_URL", ENDPOINT)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_PROFILE", "prod")
    monkeypatch.delenv("AWS_REGION", raising=False)
    env = runtime.forwarded_env()
    assert env == {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_DEFAULT_REGION": "eu-west-1"}


# ------------------------------------------------------------ end to end


def _imgpipe(args: list[str], env: dict[str, str], cwd: Path) -> dict:
    r = subprocess.run([sys.executable, "-m", "pipeline", "--quiet", *args], env=env, cwd=cwd,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (args, r.stderr[-3000:])
    for s in SENTINELS:
        assert s not in r.stdout and s not in r.stderr, (args, s)
    return json.loads(r.stdout.strip().splitlines()[-1])


def _files_holding(root: Path, needles: tuple[str, ...]) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink() and not path.is_socket():
            data = path.read_bytes()
            hits += [f"{path}: {n}" for n in needles if n.encode() in data]
    return hits


@pytest.fixture
def ray_tmp():
    """A short private RAY_TMPDIR (AF_UNIX socket paths must stay under 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="imgpipe-secrets-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.timeout(1200)  # three imgpipe processes, each starting Ray: ~2 min idle, ~7 min on a loaded 2-core box
def test_no_secret_reaches_any_file(tmp_path, ray_tmp):
    from pipeline import registry
    from pipeline.data import digits

    repo = Path(__file__).resolve().parents[1]
    work = tmp_path / "work"
    images = str(work / "images")
    digits.write_digits(images, limit=8)  # 80 images
    cfg_file = tmp_path / "secret-config.yaml"  # the user's own file: outside the workdir
    cfg_file.write_text(yaml.safe_dump({
        "storage": {"s3": {"endpoint_url": ENDPOINT}},
        "data": {"shard_rows": 32, "manifest": str(work / "packed")},
        "train": {"epochs": 1, "batch_size": 16, "warmup_epochs": 0.5, "num_workers": 1,
                  "storage": str(work / "runs"), "run_name": "s1"},
        "ray": {"num_cpus": 2},
    }))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "AWS_ENDPOINT_URL")}
    env.update(SECRET_ENV, RAY_TMPDIR=str(ray_tmp), PYTHONPATH=str(repo))

    _imgpipe(["pack", images, str(work / "packed"), "--config", str(cfg_file)], env, repo)
    trained = _imgpipe(["train", str(cfg_file)], env, repo)
    _imgpipe(["predict", "--model", trained["best_checkpoint_uri"], "--input", images,
              "--output", str(work / "pred"), "--config", str(cfg_file), "--summary", str(work / "s.json")], env, repo)
    registry.register(str(work / "registry"), "digits", trained["best_checkpoint_uri"], metrics={"acc": 1.0})

    sessions = list(ray_tmp.glob("ray/session_*"))
    assert len(sessions) >= 3, sorted(os.listdir(ray_tmp))  # one Ray instance per command
    assert any(ray_tmp.rglob("*.log")), "Ray wrote no logs where the test looks"
    assert _files_holding(work, SENTINELS) == []
    assert _files_holding(ray_tmp, SENTINELS) == []
    # the endpoint is still recorded, redacted
    run_config = (work / "runs" / "s1" / "config.yaml").read_text()
    assert "http://sentinel-user:***@127.0.0.1:9" in run_config

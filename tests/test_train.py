"""Ray Train on a 2-CPU local Ray: no starvation, exact epochs, checkpoints, resume."""

import collections
import contextlib
import json
import os
import re
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from pipeline import storage
from pipeline.config import load
from pipeline.data import shardset
from pipeline.errors import UserError
from pipeline.models import artifact
from pipeline.ops.runtime import (
    TRAIN_POLL_INTERVAL_S,
    ensure_ray,
    train_resources,
    training_threads,
)
from pipeline.training import callbacks, driver
from tests.conftest import small_config
from tests.train_callbacks import CrashOnce, TraceIds, crash_once, trace_ids


def _train_ids(packed) -> collections.Counter:
    ids = collections.Counter()
    for t in shardset.iter_split(shardset.read_manifest(packed), "train", columns=["image_id"]):
        ids.update(t.column("image_id").to_pylist())
    return ids


def test_resources_leave_room_for_ray_data():
    cfg = load()
    r = train_resources(cfg, 2.0)
    assert r.cpus_per_worker * 2 + 1.0 + 0.2 <= 2.0  # workers + augment actor + a read task
    assert r.cpus_per_worker == 0.25 and r.data_cpus == 1.5
    big = train_resources(load(None, ["augment.actors=4"]), 64.0)
    assert big.cpus_per_worker == 1.0


@pytest.mark.timeout(600)  # a starved run hangs forever: fail instead
def test_two_workers_train_on_two_cpus(trained):
    """Runs the default shape (2 DDP workers + augment actor pool) on 2 logical CPUs."""
    assert trained["epochs"] == 2
    hist = [json.loads(x) for x in open(os.path.join(trained["run_uri"], "metrics.jsonl"))]
    assert [h["epoch"] for h in hist] == [1, 2]
    assert all(0.0 <= h["val_accuracy"] <= 1.0 and h["train_loss"] > 0 for h in hist)
    assert hist[-1]["val_images"] == 30
    assert trained["train_images_per_second"] > 0


def test_every_training_image_once_per_epoch(trained, packed):
    ids = _train_ids(packed)
    trace = trained["trace_dir"]
    for epoch in (0, 1):
        seen = collections.Counter()
        per_rank = []
        for rank in (0, 1):
            lines = open(os.path.join(trace, f"rank{rank}-epoch{epoch}.txt")).read().split()
            per_rank.append(len(lines))
            seen.update(lines)
        assert per_rank[0] == per_rank[1], "ranks must run the same number of samples"
        missing = ids - seen
        extra = seen - ids
        assert not extra, f"duplicated or foreign ids in epoch {epoch}: {list(extra)[:3]}"
        # equal split drops at most world_size - 1 images, and reports it
        dropped = sum(missing.values())
        assert dropped == len(ids) % 2 == json.loads(open(os.path.join(trained["run_uri"], "metrics.jsonl")).readline())["dropped_train_images"]


def test_checkpoint_is_a_model_artifact(trained):
    art = artifact.load(trained["best_checkpoint_uri"])
    assert art.meta["arch"] == "smallcnn" and art.classes == [str(i) for i in range(10)]
    assert art.meta["data_manifest_sha256"] == trained["data_manifest_sha256"]
    assert os.path.exists(os.path.join(trained["best_checkpoint_uri"], "train_state.pt"))
    assert os.path.exists(os.path.join(trained["run_uri"], "config.yaml"))


def test_rerun_same_name_resumes(trained):
    cfg = trained["config"]
    cfg.train.epochs = 3
    again = driver.run(cfg, quiet=True)
    hist = [json.loads(x) for x in open(os.path.join(again["run_uri"], "metrics.jsonl"))]
    assert [h["epoch"] for h in hist] == [1, 2, 3]  # epochs 1-2 restored, only 3 trained
    assert again["run_uri"] == trained["run_uri"]


def test_missing_manifest_is_user_error(tmp_path):
    with pytest.raises(UserError, match="data.manifest is not set"):
        driver.run(small_config(), quiet=True)
    with pytest.raises(UserError, match="no dataset at"):
        driver.run(small_config(data={"manifest": str(tmp_path)}), quiet=True)


def test_unknown_arch_lists_choices(packed):
    with pytest.raises(UserError, match="unknown model.arch 'resnet9000'; valid: smallcnn, alexnet"):
        driver.run(small_config(data={"manifest": packed}, model={"arch": "resnet9000"}), quiet=True)


def test_train_on_s3(packed, s3_bucket, s3_server, tmp_path):
    """Shards read from and checkpoints written to s3:// through the moto server."""
    fs, path = storage.filesystem(s3_bucket)
    fs.put(packed, f"{path}/shards", recursive=True)
    cfg = small_config(data={"manifest": s3_bucket + "/shards"},
                       train={"storage": s3_bucket + "/runs", "run_name": "s3run", "epochs": 1},
                       storage={"s3": {"endpoint_url": s3_server}})
    out = driver.run(cfg, quiet=True)
    assert out["best_checkpoint_uri"].startswith(s3_bucket + "/runs/s3run/checkpoint_")
    art = artifact.load(out["best_checkpoint_uri"])
    assert art.meta["epoch"] == 1
    lines = storage.read_text(s3_bucket + "/runs/s3run/metrics.jsonl").splitlines()
    assert len(lines) == 1
    assert pq  # pyarrow used by fixtures


def _final_weights_sha256(run_uri: str, epochs: int) -> str:
    return artifact.read_meta(os.path.join(run_uri, f"checkpoint_epoch_{epochs:04d}"))["weights_sha256"]


@contextlib.contextmanager
def _busy(n: int):
    """``n`` processes spinning on the CPU: timing changes, results must not. At the
    lowest priority (Ray's workers run at nice 15): they take what the run leaves,
    rather than starving it on a 2-core machine."""
    spin = "import os; os.nice(19)\nwhile True: pass"
    procs = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(n)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


@pytest.mark.slow  # ~80 s on 2 cores (was ~3 min before the 0.2-s poll): two full training runs and a killed one
@pytest.mark.timeout(900)
def test_worker_killed_mid_epoch_resumes_exactly(trained, packed, tmp_path):
    """One worker dies mid-epoch, after a step checkpoint, with the CPU busy: Ray Train
    restarts the group, the loop restores model/optimizer/schedule *and the data
    position* from that checkpoint, every training image is trained on exactly once
    per epoch, and the run ends with bitwise the weights of the uninterrupted run of
    the same config (the ``trained`` fixture, on a quiet CPU).

    The trace records the ids each rank trained on as checkpoints commit them; a resume
    that restarted the epoch's data would repeat the images of the checkpointed steps."""
    trace = tmp_path / "trace"
    trace.mkdir()
    marker = tmp_path / "crashed"
    # 140 train images, 2 ranks x batch 16: epoch 2 is steps 6-10; checkpoints at 6 and 8;
    # rank 1 dies at its 4th batch of epoch 2 (step 9), after the step-8 checkpoint
    cfg = small_config(data={"manifest": packed}, train={
        "storage": str(tmp_path), "run_name": "ft", "epochs": 2, "max_failures": 1, "checkpoint_every_steps": 2,
        "callbacks": [trace_ids(str(trace)), crash_once(rank=1, epoch=1, batch=3, marker=str(marker), wait_s=5.0)]})
    with _busy(2):
        out = driver.run(cfg, quiet=True)
    assert marker.exists(), "the fault was not injected"
    hist = [json.loads(x) for x in open(os.path.join(out["run_uri"], "metrics.jsonl"))]
    assert [h["epoch"] for h in hist] == [1, 2]
    assert [h["step"] for h in hist] == [5, 10]  # the schedule continued, no step repeated
    ids = _train_ids(packed)
    for epoch in (0, 1):
        seen = collections.Counter()
        for rank in (0, 1):
            seen.update(open(trace / f"rank{rank}-epoch{epoch}.txt").read().split())
        assert not seen - ids, f"epoch {epoch}: repeated images {list(seen - ids)[:3]}"
        missing = sum((ids - seen).values())
        assert missing == hist[epoch]["dropped_train_images"] <= 1
        assert hist[epoch]["train_images"] == sum(ids.values()) - missing  # sums carried across the restart
    assert _final_weights_sha256(out["run_uri"], 2) == trained["final_weights_sha256"]


def test_every_epoch_reports_its_overhead(trained):
    """metrics.jsonl books each epoch's wall time and the part outside optimizer steps."""
    for h in [json.loads(x) for x in open(os.path.join(trained["run_uri"], "metrics.jsonl"))]:
        assert 0 < h["step_seconds"] <= h["wall_seconds"]
        assert h["overhead_seconds"] == pytest.approx(h["wall_seconds"] - h["step_seconds"])


def test_workers_share_the_node_cores_by_default(trained):
    """train.torch_threads=0: the node's CPUs over the workers on it, recorded per epoch;
    an explicit value wins."""
    hist = [json.loads(x) for x in open(os.path.join(trained["run_uri"], "metrics.jsonl"))]
    assert hist and {h["torch_threads"] for h in hist} == {1}  # 2 workers on the 2-CPU local Ray
    assert training_threads(0, 1) == 2 and training_threads(0, 2) == 1 and training_threads(0, 4) == 1
    assert training_threads(3, 2) == 3


def test_ray_train_polls_its_workers_often(trained, monkeypatch):
    """Ray Train's controller takes a worker's report when it polls the workers (Ray's
    default: every 2 s), so an epoch shorter than that waited in its report: a run sets
    the interval to TRAIN_POLL_INTERVAL_S for the controller; a value already set wins."""
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == str(TRAIN_POLL_INTERVAL_S) == "0.2"
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "5")
    ensure_ray(load(None))  # Ray is up already: only the environment is looked at
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "5"


@pytest.mark.timeout(600)
def test_augment_in_worker(packed, tmp_path):
    """augment.device=worker: the training workers decode and augment (the code path of
    augment.device=cuda, on CPU); no augment actor pool."""
    trace = tmp_path / "trace"
    trace.mkdir()
    cfg = small_config(data={"manifest": packed}, augment={"device": "worker"},
                       train={"storage": str(tmp_path), "run_name": "w", "epochs": 1,
                              "callbacks": [trace_ids(str(trace))]})
    out = driver.run(cfg, quiet=True)
    seen = collections.Counter()
    for rank in (0, 1):
        seen.update(open(trace / f"rank{rank}-epoch0.txt").read().split())
    assert seen == _train_ids(packed)
    assert out["test_accuracy"] is not None


@pytest.mark.timeout(600)
def test_failures_beyond_max_exit_1(packed, tmp_path):
    from pipeline.errors import JobFailed

    crash = crash_once(rank=0, epoch=1, batch=0, marker=str(tmp_path / "m"))
    cfg = small_config(data={"manifest": packed}, train={"storage": str(tmp_path), "run_name": "ft0",
                                                         "epochs": 2, "max_failures": 0, "callbacks": [crash]})
    with pytest.raises(JobFailed, match="training run ft0 failed"):
        driver.run(cfg, quiet=True)


def test_callback_entries_are_built_with_yaml_parameters(tmp_path):
    """``train.callbacks``: 'module:Class?key=value' -> Class(**params), values parsed as YAML."""
    built = callbacks.load([trace_ids(str(tmp_path)), crash_once(rank=1, epoch=2, batch=3, marker="m", wait_s=0.5)])
    trace, crash = built.items
    assert isinstance(trace, TraceIds) and trace.folder == str(tmp_path)
    assert isinstance(crash, CrashOnce) and (crash.rank, crash.epoch, crash.batch, crash.wait_s) == (1, 2, 3, 0.5)
    trace.on_step(0, 1, {"image_id": ["a", "b"]})
    built.on_checkpoint(0, 1)
    assert (tmp_path / "rank0-epoch1.txt").read_text() == "a\nb\n"
    assert isinstance(callbacks.build("pipeline.training.callbacks:Callback"), callbacks.Callback)
    for bad, match in [("nocolon", "must be"), ("tests.nope:X", "No module"),
                       ("tests.train_callbacks:Nope", "has no attribute"),
                       (trace_ids("d") + "&extra=1", "unexpected keyword")]:
        with pytest.raises(UserError, match=match):
            callbacks.build(bad)


def test_bad_callback_fails_before_training(packed):
    with pytest.raises(UserError, match="train.callbacks entry"):
        driver.run(small_config(data={"manifest": packed}, train={"callbacks": ["tests.nope:X"]}), quiet=True)


# ------------------------------------------------------------------ refusing bad input (issues 14, 16)


def _cli_train(cfg, tmp_path, capsys) -> tuple[int, str]:
    """``imgpipe --quiet train CONFIG`` with ``cfg`` written to a file: (exit code, stderr)."""
    from pipeline import cli, config

    path = tmp_path / f"train-{len(list(tmp_path.glob('train-*.yaml')))}.yaml"
    path.write_text(config.dump(cfg))
    capsys.readouterr()
    rc = cli.main(["--quiet", "train", str(path)])
    return rc, capsys.readouterr().err


def _copy_dataset(packed, dst) -> str:
    import shutil

    shutil.copytree(packed, dst)
    return str(dst)


def test_default_run_names_never_collide():
    cfg = small_config()
    names = {driver.run_name(cfg) for _ in range(50)}  # the same second, mostly
    assert len(names) == 50
    assert all(re.fullmatch(re.escape(cfg.registry.name) + r"-\d{8}-\d{6}-[0-9a-f]{6}", n) for n in names)
    cfg.train.run_name = "mine"
    assert driver.run_name(cfg) == "mine"


def test_resume_on_another_dataset_exits_2(trained, packed, tmp_path, capsys):
    """A run resumes only on the dataset it started on: another manifest (here the same
    shards, manifest.json re-serialized) exits 2 naming the run and both hashes; the run's
    checkpoints are untouched."""
    from pipeline import config

    run_uri = trained["run_uri"]
    record = json.load(open(os.path.join(run_uri, "dataset.json")))
    assert record == {"manifest": packed, "sha256": trained["data_manifest_sha256"]}
    other = _copy_dataset(packed, tmp_path / "other")
    raw = json.load(open(os.path.join(other, "manifest.json")))
    with open(os.path.join(other, "manifest.json"), "w") as f:
        json.dump(raw, f, indent=4)
    other_sha = shardset.read_manifest(other).sha256
    before = {p: os.stat(os.path.join(run_uri, p)).st_mtime_ns for p in os.listdir(run_uri) if p.startswith("checkpoint_")}
    assert before
    cfg = config.from_dict(config.to_dict(trained["config"]))
    cfg.data.manifest = other
    rc, err = _cli_train(cfg, tmp_path, capsys)
    assert rc == 2, err
    line = err.strip()
    assert "\n" not in line and "training run t1" in line
    assert trained["data_manifest_sha256"] in line and other_sha in line
    after = {p: os.stat(os.path.join(run_uri, p)).st_mtime_ns for p in os.listdir(run_uri) if p.startswith("checkpoint_")}
    assert after == before


def test_resume_of_a_run_without_record_checks_its_checkpoints(packed, tmp_path):
    """Runs from before RUN/dataset.json: the checkpoints' meta.json names the dataset."""
    run = tmp_path / "runs" / "old"
    (run / "checkpoint_epoch_0001").mkdir(parents=True)
    (run / "checkpoint_epoch_0001" / "meta.json").write_text(json.dumps(
        {"data_manifest": "s3://b/old", "data_manifest_sha256": "ab" * 32}))
    cfg = small_config(data={"manifest": packed}, train={"storage": str(tmp_path / "runs"), "run_name": "old"})
    with pytest.raises(UserError, match=f"training run old .*manifest sha256 {'ab' * 32}.*"
                                        f"{shardset.read_manifest(packed).sha256}"):
        driver.run(cfg, quiet=True)
    assert not (run / "dataset.json").exists()


def test_train_storage_that_is_a_file_exits_2(packed, tmp_path, capsys):
    f = tmp_path / "runs"
    f.write_text("not a folder")
    rc, err = _cli_train(small_config(data={"manifest": packed}, train={"storage": str(f), "run_name": "x"}),
                         tmp_path, capsys)
    assert rc == 2
    assert err.strip() == f"imgpipe: error: train.storage {f} is a file; expected a folder (or a path that does not exist yet)"


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("kind", ["malicious", "garbage", "not a state dict"])
def test_bad_pretrained_file_exits_2_before_training(packed, tmp_path, capsys, kind):
    """A pickle that would run code, an unreadable file, or another object as
    model.pretrained: exit 2 naming the file and why, on the driver (no worker starts);
    the pickle's code never runs."""
    import torch

    marker = tmp_path / "pwned"
    bad = tmp_path / "weights.pt"
    if kind == "malicious":
        torch.save({"conv.weight": _Evil(str(marker))}, str(bad))
    elif kind == "garbage":
        bad.write_bytes(b"\x00not a torch file" * 10)
    else:
        torch.save({"model": {"w": torch.zeros(1)}}, str(bad))
    cfg = small_config(data={"manifest": packed}, model={"pretrained": str(bad)},
                       train={"storage": str(tmp_path / "runs"), "run_name": "pt"})
    rc, err = _cli_train(cfg, tmp_path, capsys)
    assert rc == 2, err
    line = err.strip()
    assert "\n" not in line and f"model.pretrained {bad} refused" in line
    if kind == "malicious":
        assert "posix.system" in line or "os.system" in line
    assert not marker.exists()
    assert not (tmp_path / "runs" / "pt" / "config.yaml").exists()  # refused before the run started


@pytest.mark.timeout(900)
def test_tampered_shard_exits_2_at_once_naming_it(packed, tmp_path, capsys):
    """A train shard cut short (its sha256 no longer the manifest's), read in a Ray Data
    task inside a Ray Train worker: exit 2 with one line naming the shard and both
    hashes, without restarting the workers (train.max_failures=2) and without Ray's
    retry hint."""
    import hashlib
    import time

    data = _copy_dataset(packed, tmp_path / "data")
    manifest = shardset.read_manifest(data)
    entry = manifest.splits["train"][1]
    shard = shardset.shard_uri(data, entry["path"])
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 100)
    actual = hashlib.sha256(open(shard, "rb").read()).hexdigest()
    cfg = small_config(data={"manifest": data}, train={"storage": str(tmp_path / "runs"), "run_name": "tampered",
                                                       "epochs": 1, "max_failures": 2})
    t0 = time.monotonic()
    rc, err = _cli_train(cfg, tmp_path, capsys)
    elapsed = time.monotonic() - t0
    assert rc == 2, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("imgpipe: error: training run tampered: shard ") and shard in line
    assert actual[:12] in line and entry["sha256"][:12] in line
    assert "restarting" not in err and "To change retry attempts" not in err
    assert elapsed < 300, f"took {elapsed:.0f} s"


def test_tampered_val_shard_exits_2_before_training(packed, tmp_path, capsys):
    """A small val set is transformed in the driver before Ray Train starts: a val shard
    that fails its sha256 stops the run there, exit 2, one line naming the shard."""
    data = _copy_dataset(packed, tmp_path / "data")
    entry = shardset.read_manifest(data).splits["val"][0]
    shard = shardset.shard_uri(data, entry["path"])
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 100)
    cfg = small_config(data={"manifest": data}, train={"storage": str(tmp_path / "runs"), "run_name": "badval",
                                                       "epochs": 1})
    rc, err = _cli_train(cfg, tmp_path, capsys)
    assert rc == 2, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("imgpipe: error: ") and shard in line and entry["sha256"][:12] in line
    assert "epoch 1/" not in err  # no training started


def test_second_run_with_the_same_name_exits_2(packed, tmp_path, capsys):
    """Another process holds the run's lease: `imgpipe train` exits 2 naming it."""
    import subprocess
    import sys

    runs = tmp_path / "runs"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pipeline.ops import lease\n"
         f"with lease.hold({str(runs / 'busy')!r}, what='training run busy'):\n"
         "    print('held', flush=True)\n    time.sleep(300)\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        rc, err = _cli_train(small_config(data={"manifest": packed},
                                          train={"storage": str(runs), "run_name": "busy"}), tmp_path, capsys)
    finally:
        holder.kill()
        holder.wait()
    assert rc == 2, err
    assert "training run busy" in err and f"pid {holder.pid}" in err
    assert not (runs / "busy" / "config.yaml").exists()


@pytest.mark.slow  # 95 s in CI; the lease itself is tested in tests/test_lease.py
@pytest.mark.timeout(900)
def test_run_holds_its_lease_while_training(packed, tmp_path):
    """While a run trains, a second `python -m pipeline train` with the same run_name
    (started from inside the run, at its first step) exits 2; the first run finishes."""
    from pipeline import config
    from tests.train_callbacks import run_again

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    train = {"storage": str(tmp_path / "runs"), "run_name": "leased", "epochs": 1}
    second = tmp_path / "second.yaml"
    second.write_text(config.dump(small_config(data={"manifest": packed}, train=train)))
    out = tmp_path / "second"
    cfg = small_config(data={"manifest": packed},
                       train={**train, "callbacks": [run_again(config=str(second), cwd=repo, out=str(out))]})
    summary = driver.run(cfg, quiet=True)
    assert summary["epochs"] == 1
    assert open(f"{out}.rc").read() == "2", open(f"{out}.err").read()
    err = open(f"{out}.err").read()
    assert "training run leased" in err and f"pid {os.getpid()}" in err
    assert not os.path.exists(os.path.join(summary["run_uri"], "_lease.json"))  # released at the end

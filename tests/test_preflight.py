"""Pre-flight resource check: impossible requests fail at once with exit-2 errors that
name the config keys; feasible ones pass; autoscaling clusters wait, bounded."""

from __future__ import annotations

import logging
import time

import pytest

from pipeline.errors import UserError
from pipeline.ops import preflight
from tests.conftest import small_config


def _cpus(ray) -> float:
    return ray.cluster_resources().get("CPU", 1.0)


def test_gpus_on_a_cpu_only_cluster_fail_fast(ray_local, monkeypatch):
    monkeypatch.delenv("IMGPIPE_AUTOSCALING", raising=False)
    cfg = small_config(train={"use_gpu": True})
    t0 = time.monotonic()
    with pytest.raises(UserError) as e:
        preflight.check(preflight.train_request(cfg, _cpus(ray_local)), "train", cfg)
    assert time.monotonic() - t0 < 30
    msg = str(e.value)
    assert "train.use_gpu=true needs 2 GPUs" in msg and "has 0" in msg, msg
    assert "\n" not in msg


def test_more_workers_than_cpus_fail_naming_the_keys(ray_local, monkeypatch):
    monkeypatch.delenv("IMGPIPE_AUTOSCALING", raising=False)
    cfg = small_config(train={"num_workers": 8, "cpus_per_worker": 1.0})
    req = preflight.train_request(cfg, _cpus(ray_local))
    # 8 workers, and each rank's stream at its floor: an actor of 0.01 CPU, 0.2 CPU of reads
    assert req.cpu == pytest.approx(8 * 1 + 8 * 0.01 + 8 * 0.2)
    with pytest.raises(UserError) as e:
        preflight.check(req, "train", cfg)
    msg = str(e.value)
    assert "train.num_workers=8 x train.cpus_per_worker=1" in msg and "augment.actors=1" in msg, msg
    assert "needs 9.68 CPUs; the cluster has 2 CPUs" in msg, msg


def test_one_worker_bigger_than_any_node_is_named(ray_local):
    cfg = small_config(train={"num_workers": 1, "cpus_per_worker": 3.0})
    found = preflight.problems(preflight.train_request(cfg, _cpus(ray_local)), preflight.current_capacity())
    assert any("one training worker (train.num_workers=1 x train.cpus_per_worker=3) needs a node "
               "with 3 CPUs; the largest node has 2 CPUs and 0 GPUs" in p for p in found), found


def test_default_train_predict_and_pack_pass(ray_local, monkeypatch):
    monkeypatch.delenv("IMGPIPE_AUTOSCALING", raising=False)
    cfg = small_config()
    cpus = _cpus(ray_local)
    for what, req in (("train", preflight.train_request(cfg, cpus)),
                      ("predict", preflight.predict_request(cfg, cpus)),
                      ("pack", preflight.pack_request(cfg))):
        assert req.cpu <= cpus and req.gpu == 0, (what, req.lines)
        preflight.check(req, what, cfg)
    req = preflight.train_request(cfg, cpus)
    assert req.lines[0].startswith("2 training workers x ")
    assert req.lines[1].startswith("2 augment actors x ")  # one per rank's stream
    assert req.lines[2].startswith("2 read shares x ")


def test_workers_that_leave_ray_data_nothing_fail(ray_local, monkeypatch):
    monkeypatch.delenv("IMGPIPE_AUTOSCALING", raising=False)
    cfg = small_config(train={"cpus_per_worker": 1.0})
    with pytest.raises(UserError, match=r"train\.num_workers=2 x train\.cpus_per_worker=1"):
        preflight.check(preflight.train_request(cfg, _cpus(ray_local)), "train", cfg)


def test_predict_gpu_and_too_many_decode_actors_fail(ray_local, monkeypatch):
    monkeypatch.delenv("IMGPIPE_AUTOSCALING", raising=False)
    cpus = _cpus(ray_local)
    cfg = small_config(predict={"num_gpus": 1.0})
    with pytest.raises(UserError, match=r"predict\.num_gpus=1 x predict\.model_actors=1 needs 1 GPU .*has 0"):
        preflight.check(preflight.predict_request(cfg, cpus), "predict", cfg)
    cfg = small_config(predict={"decode_actors": 16})
    with pytest.raises(UserError, match=r"predict\.decode_actors=16 x 0\.1 CPU"):
        preflight.check(preflight.predict_request(cfg, cpus), "predict", cfg)


def test_object_store_too_small_names_the_batch_size(ray_local, monkeypatch):
    monkeypatch.delenv("IMGPIPE_AUTOSCALING", raising=False)
    cfg = small_config(augment={"batch_size": 100_000}, data={"image_size": 224})
    with pytest.raises(UserError, match=r"augment\.batch_size=100000 at data\.image_size=224 needs ~.* GB of object store"):
        preflight.check(preflight.train_request(cfg, _cpus(ray_local)), "train", cfg)


def test_local_cluster_has_no_autoscaler(ray_local, monkeypatch):
    monkeypatch.delenv("IMGPIPE_AUTOSCALING", raising=False)
    assert preflight.autoscaler() is None
    monkeypatch.setenv("IMGPIPE_AUTOSCALING", "1")
    assert preflight.autoscaler() is not None


def test_autoscaling_cluster_waits_then_fails(ray_local, monkeypatch, caplog):
    monkeypatch.setenv("IMGPIPE_AUTOSCALING", "1")  # node types unknown: wait, then give up
    monkeypatch.setattr(preflight, "LOG_EVERY_S", 0.5)
    cfg = small_config(train={"use_gpu": True}, ray={"resource_wait_s": 1.5})
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="imgpipe"), pytest.raises(UserError) as e:
        preflight.check(preflight.train_request(cfg, _cpus(ray_local)), "train", cfg)
    assert 1.4 < time.monotonic() - t0 < 10
    assert "needs 2 GPUs" in str(e.value) and "after waiting 1.5s for the autoscaler" in str(e.value)
    waits = [r.getMessage() for r in caplog.records if "waiting for the autoscaler" in r.getMessage()]
    assert len(waits) >= 2 and "needs 2 GPUs" in waits[0], waits


def test_autoscaler_node_types_bound_the_wait(ray_local, monkeypatch):
    """Node types that can never give a GPU: fail at once, naming them."""
    monkeypatch.setattr(preflight, "autoscaler", lambda joined=False: preflight.Autoscaler(
        {"CPU": 64.0, "GPU": 0.0}, [{"CPU": 8.0}], "cpu-worker (8 CPUs) x 0-8"))
    cfg = small_config(train={"use_gpu": True}, ray={"resource_wait_s": 60})
    t0 = time.monotonic()
    with pytest.raises(UserError, match=r"needs 2 GPUs .*the autoscaler can reach at most 0 GPUs \(node types: cpu-worker"):
        preflight.check(preflight.train_request(cfg, _cpus(ray_local)), "train", cfg)
    assert time.monotonic() - t0 < 5


def test_a_joined_cluster_may_autoscale_unless_told_not_to(monkeypatch):
    monkeypatch.delenv("IMGPIPE_AUTOSCALING", raising=False)
    auto = preflight.autoscaler(joined=True)  # ray.address / $RAY_ADDRESS: limits unknown
    assert auto is not None and auto.limits == {} and auto.described == ""
    monkeypatch.setenv("IMGPIPE_AUTOSCALING", "0")
    assert preflight.autoscaler(joined=True) is None


def test_the_wait_ends_once_the_request_fits_and_withdraws_its_placement_group(ray_local):
    from ray.util import placement_group_table

    cfg = small_config()
    req = preflight.train_request(cfg, _cpus(ray_local))
    t0 = time.monotonic()
    preflight.wait_to_fit(req, "train", 30, ["(a problem the cluster has since outgrown)"])
    assert time.monotonic() - t0 < 15
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        states = {g["state"] for g in placement_group_table().values()}
        if states <= {"REMOVED"} and ray_local.available_resources().get("CPU", 0) == _cpus(ray_local):
            break
        time.sleep(0.2)
    assert states <= {"REMOVED"}, states
    assert ray_local.available_resources().get("CPU", 0) == _cpus(ray_local)

"""Stall detection: beats keep the watchdog quiet; a stalled Ray Data UDF trips it,
leaving a dump with the driver's and the workers' stacks and a JobFailed (exit 1)."""

from __future__ import annotations

import os
import time

import pytest

from pipeline.errors import JobFailed
from pipeline.ops import watchdog
from pipeline.ops.watchdog import Watchdog


def test_beats_keep_it_quiet(tmp_path):
    with Watchdog("quiet", str(tmp_path), timeout_s=0.5) as w:
        for _ in range(15):
            time.sleep(0.1)
            w.beat()
    time.sleep(0.7)  # nothing fires after a normal exit either
    assert not w.fired and w.beats == 15
    assert list(tmp_path.iterdir()) == []


def test_stall_without_ray_interrupts_a_blocking_wait(tmp_path):
    import threading

    t0 = time.monotonic()
    with pytest.raises(JobFailed, match=r"idle: no progress for 1s \(ray.stall_timeout_s\); stacks written to "):
        with Watchdog("idle", str(tmp_path), timeout_s=1):
            threading.Event().wait()  # blocks forever without the watchdog
    assert time.monotonic() - t0 < 10
    (dump,) = tmp_path.iterdir()
    assert "test_stall_without_ray_interrupts_a_blocking_wait" in dump.read_text()


def test_stall_in_a_non_main_thread(tmp_path):
    """No signal reaches a non-main thread: its loop calls check(), which raises once fired."""
    import threading

    box: list[BaseException] = []

    def work() -> None:
        try:
            with Watchdog("side", str(tmp_path), timeout_s=0.5) as w:
                for _ in range(200):  # 20 s of "work" that never reports progress
                    time.sleep(0.1)
                    w.check()
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            box.append(e)

    t = threading.Thread(target=work)
    t.start()
    t.join(15)
    assert not t.is_alive() and len(box) == 1 and isinstance(box[0], JobFailed), box
    assert "side: no progress for 0.5s" in str(box[0])
    assert threading.main_thread().is_alive()  # the main thread was not interrupted


def test_check_is_quiet_until_fired(tmp_path):
    with Watchdog("busy", str(tmp_path), timeout_s=30) as w:
        w.check()
    assert not w.fired and list(tmp_path.iterdir()) == []


def _stuck(batch, flag):
    open(flag + ".started", "w").close()
    while not os.path.exists(flag):  # a UDF that hangs until the test releases it
        time.sleep(0.05)
    return batch


def test_stalled_udf_trips_and_leaves_stacks(ray_local, tmp_path):
    import threading

    import ray.data

    flag = str(tmp_path / "release")
    dumps = tmp_path / "run"
    ds = ray.data.range(4, override_num_blocks=1).map_batches(_stuck, fn_kwargs={"flag": flag})
    it = iter(ds.iter_batches(batch_size=2))
    try:
        with pytest.raises(JobFailed) as e:
            with Watchdog("test", str(dumps), timeout_s=5) as w:
                def startup() -> None:  # worker start-up counts as progress on a busy machine:
                    while not os.path.exists(flag + ".started"):  # the stall starts in the UDF
                        w.beat(0)
                        time.sleep(0.1)
                threading.Thread(target=startup, daemon=True).start()
                for _ in it:
                    w.beat()
        failed_at = time.time()
    finally:
        open(flag, "w").close()  # let the stuck task finish, freeing its CPU for later tests
        it.close()
    stalled_for = failed_at - os.path.getmtime(flag + ".started")  # from the UDF's hang on
    assert 5 <= stalled_for < 20, stalled_for
    msg = str(e.value)
    assert msg.startswith("test: no progress for 5s (ray.stall_timeout_s); stacks written to ")
    path = msg.rsplit(" ", 1)[-1]
    assert os.path.dirname(path) == str(dumps) and os.path.basename(path).startswith("stall-")
    text = open(path).read()
    assert "=== driver threads ===" in text
    assert "test_stalled_udf_trips_and_leaves_stacks" in text  # the driver's own stack
    assert "=== Ray workers of this job on this node ===" in text
    assert "task worker" in text and "pid " in text
    if watchdog.py_spy_path():
        assert "_stuck" in text  # py-spy shows the stuck UDF inside the worker
    # the stuck task is released: its CPU comes back
    deadline = time.monotonic() + 15
    while ray_local.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray_local.available_resources().get("CPU", 0) == 2

"""Leases (pipeline.ops.lease) and storage's conditional writes, with real processes.

Each scenario runs on local disk and on S3 (moto over HTTP on 127.0.0.1): two runs race
for one folder, a second run is refused while the first holds it (both orders), a holder
killed with SIGKILL leaves a lease that expires and is taken over, and the heartbeat
keeps a run longer than the ttl alive. The simultaneous race runs on local disk only:
moto checks ``If-None-Match`` and then stores the object in two steps, so two requests in
the same millisecond could both pass it there (S3 itself decides atomically); on moto the
ordered tests cover the conditional writes.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone

import pytest

from pipeline import names, storage
from pipeline.errors import JobFailed, UserError
from pipeline.ops import lease

ROOT = pathlib.Path(__file__).resolve().parents[1]
TTL_S = 1.5  # tiny leases keep the file fast; renewals every TTL_S / 4

# One run: take the lease on FOLDER (after GO appears, if given), touch MARK, hold it
# (checking it) until RELEASE appears. Exit 0 when kept, 2 when refused, 1 when lost.
CHILD = r"""
import os, sys, time
from pipeline.errors import JobFailed
from pipeline.ops import lease
folder, what, ttl, mark, release, go = sys.argv[1:7]
open(mark + ".ready", "w").close()
while go and not os.path.exists(go):
    time.sleep(0.002)
try:
    with lease.hold(folder, what, ttl_s=float(ttl)) as held:
        open(mark, "w").close()
        deadline = time.monotonic() + 60
        while not os.path.exists(release) and time.monotonic() < deadline:
            held.check()
            time.sleep(0.02)
        held.check()
        print("KEPT", os.getpid(), flush=True)
except lease.LeaseHeld as e:
    print("HELD", e, flush=True)
    sys.exit(2)
except JobFailed as e:
    print("LOST", e, flush=True)
    sys.exit(1)
"""


@pytest.fixture(params=["local", "s3"])
def folder(request, tmp_path):
    """An output folder URI on local disk or in a fresh moto bucket."""
    if request.param == "local":
        return str(tmp_path / "out")
    return request.getfixturevalue("s3_bucket") + "/out"


@pytest.fixture
def runs(tmp_path):
    """Starts CHILD processes; kills any still running at the end."""
    started: list[subprocess.Popen] = []

    def start(folder: str, name: str, go: str = "", release: str | None = None) -> subprocess.Popen:
        mark = str(tmp_path / name)
        args = [folder, name, str(TTL_S), mark, release or str(tmp_path / "release"), go]
        p = subprocess.Popen([sys.executable, "-c", CHILD, *args], cwd=ROOT, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        p.mark = mark  # type: ignore[attr-defined]
        started.append(p)
        return p

    yield start
    for p in started:
        if p.poll() is None:
            p.kill()
            p.communicate()


def _wait_for(path: str, proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """Wait until ``path`` exists; fail with the process's output if it exits first."""
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path):
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"run exited {proc.returncode} before {path}: {out}{err}")
        assert time.monotonic() < deadline, f"timed out waiting for {path}"
        time.sleep(0.02)


def _finish(proc: subprocess.Popen, timeout_s: float = 60.0) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout_s)
    return proc.returncode, out, err


def _record(folder: str) -> lease.Record:
    rec = lease.Record.from_bytes(storage.read_bytes(storage.join(folder, names.LEASE)))
    assert rec is not None
    return rec


# --------------------------------------------------------------- real processes


def test_two_runs_race_exactly_one_wins(tmp_path, runs):
    out = str(tmp_path / "out")
    go = str(tmp_path / "go")
    a, b = runs(out, "model A", go=go), runs(out, "model B", go=go)
    _wait_for(a.mark + ".ready", a)
    _wait_for(b.mark + ".ready", b)
    open(go, "w").close()  # both start taking the lease now
    winner = None
    deadline = time.monotonic() + 60
    while winner is None:  # the winner holds until released: the loser meets a live lease
        winner = next((p for p in (a, b) if os.path.exists(p.mark)), None)
        assert time.monotonic() < deadline and (a.poll() is None or b.poll() is None)
        time.sleep(0.02)
    loser = b if winner is a else a
    code, msg, _ = _finish(loser)
    open(tmp_path / "release", "w").close()
    assert _finish(winner)[:2] == (0, f"KEPT {winner.pid}\n")
    assert code == 2 and not os.path.exists(loser.mark)
    assert f"pid {winner.pid} on " in msg and "in use by a live run" in msg


@pytest.mark.parametrize("order", ["A then B", "B then A"])
def test_second_run_is_refused_while_the_first_holds(folder, runs, tmp_path, order):
    first_name, second_name = ("model A", "model B") if order == "A then B" else ("model B", "model A")
    first = runs(folder, first_name)
    _wait_for(first.mark, first)
    code, out, err = _finish(runs(folder, second_name))
    assert code == 2, out + err
    assert out.startswith(f"HELD {first_name} {folder} is in use by a live run: 'python' (pid {first.pid} on ")
    assert "or wait until " in out and "UTC, when a crashed run's lease expires" in out
    open(tmp_path / "release", "w").close()
    assert _finish(first)[:2] == (0, f"KEPT {first.pid}\n")
    assert not storage.exists(storage.join(folder, names.LEASE))  # released on exit
    with lease.hold(folder, second_name, ttl_s=TTL_S):  # now the second run gets it
        assert _record(folder).what == second_name


def test_killed_holder_lease_expires_and_is_taken_over(folder, runs, tmp_path):
    holder = runs(folder, "model A")
    _wait_for(holder.mark, holder)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with pytest.raises(lease.LeaseHeld, match=f"pid {holder.pid} on "):  # not expired yet
        lease.acquire(folder, "model B", ttl_s=TTL_S)
    expires = datetime.fromisoformat(_record(folder).expires)
    time.sleep(max(0.0, (expires - datetime.now(timezone.utc)).total_seconds()) + 0.1)
    rerun = runs(folder, "model B", release=str(tmp_path / "rerun-done"))
    _wait_for(rerun.mark, rerun)
    assert _record(folder).pid == rerun.pid
    open(tmp_path / "rerun-done", "w").close()
    code, out, err = _finish(rerun)
    assert code == 0, out + err
    assert f"took over the expired lease of 'python' (pid {holder.pid} on " in err


def test_heartbeat_keeps_a_long_run_alive(folder, runs, tmp_path):
    holder = runs(folder, "model A")
    _wait_for(holder.mark, holder)
    first = _record(folder)
    time.sleep(2.5 * TTL_S)  # well past the first expiry
    with pytest.raises(lease.LeaseHeld, match=f"pid {holder.pid} on "):
        lease.acquire(folder, "model B", ttl_s=TTL_S)
    later = _record(folder)
    assert later.token == first.token and later.acquired == first.acquired
    assert datetime.fromisoformat(later.expires) > datetime.fromisoformat(first.expires)
    open(tmp_path / "release", "w").close()
    assert _finish(holder)[:2] == (0, f"KEPT {holder.pid}\n")  # check() never raised
    assert not storage.exists(storage.join(folder, names.LEASE))


# ------------------------------------------------------------------ in process


def test_a_lease_taken_over_meanwhile_fails_check(folder):
    with lease.hold(folder, "model A", ttl_s=TTL_S) as held:
        uri = storage.join(folder, names.LEASE)
        theirs = lease.Record(owner="bob", host="elsewhere", pid=4242, command="imgpipe predict",
                              what="model B", acquired="2026-01-01T00:00:00+00:00",
                              heartbeat="2026-01-01T00:00:00+00:00",
                              expires="2999-01-01T00:00:00+00:00", token="theirs")
        storage.write_bytes(uri, theirs.to_bytes())  # as if our lease expired and B took over
        deadline = time.monotonic() + 10 * TTL_S
        while held.lost is None and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(JobFailed, match="lost the lease.*taken over by 'imgpipe predict' "
                                            r"\(pid 4242 on elsewhere, user bob\)"):
            held.check()
    assert _record(folder).token == "theirs"  # our exit left their lease alone


def test_output_path_that_is_a_file_and_bad_ttl(tmp_path):
    path = tmp_path / "out"
    path.write_text("x")
    with pytest.raises(UserError, match="is a file; expected a folder"):
        lease.acquire(str(path), "predict output")
    with pytest.raises(UserError, match="ttl must be > 0"):
        lease.acquire(str(tmp_path / "ok"), "predict output", ttl_s=0)


def test_an_unreadable_lease_file_is_taken_over(folder):
    storage.write_bytes(storage.join(folder, names.LEASE), b"not json")
    with lease.hold(folder, "model A", ttl_s=TTL_S):
        assert _record(folder).what == "model A"


def test_conditional_writes(folder):
    uri = storage.join(folder, "obj")
    assert storage.read_versioned(uri) is None
    v1 = storage.create_if_absent(uri, b"one")
    assert v1 and storage.create_if_absent(uri, b"two") is None
    assert storage.read_versioned(uri) == storage.Versioned(b"one", v1)
    assert storage.replace_if_version(uri, b"two", "stale") is None
    v2 = storage.replace_if_version(uri, b"two", v1)
    assert v2 and v2 != v1 and storage.replace_if_version(uri, b"three", v1) is None
    assert not storage.remove_if_version(uri, v1)
    assert storage.read_bytes(uri) == b"two"
    assert storage.remove_if_version(uri, v2) and storage.read_versioned(uri) is None
    assert storage.replace_if_version(uri, b"x", v2) is None  # gone: nothing to replace
    assert not storage.remove_if_version(uri, v2)


def test_local_create_race_between_threads(tmp_path):
    uri = str(tmp_path / "obj")
    won: list[bytes] = []
    barrier = threading.Barrier(8)

    def racer(i: int) -> None:
        barrier.wait()
        if storage.create_if_absent(uri, b"racer %d" % i) is not None:
            won.append(b"racer %d" % i)

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and storage.read_bytes(uri) == won[0]
    assert [n for n in os.listdir(tmp_path) if ".tmp-" in n] == []

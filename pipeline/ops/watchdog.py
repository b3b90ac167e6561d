"""Stall detection: fail with the stacks instead of hanging.

The driver calls :meth:`Watchdog.beat` whenever rows or batches move. When nothing
has moved for ``timeout_s`` (``ray.stall_timeout_s``), a daemon thread writes the
stacks of every driver thread and of this job's busy Ray workers on this node (found
through Ray's state API, ``ray.util.state``, which the Ray dashboard serves; ``py-spy
dump`` per worker pid when py-spy is on PATH or beside the interpreter, otherwise the
pid table and a note) to ``<dump_dir>/stall-<UTC time>.txt`` through
:mod:`pipeline.storage`, then interrupts the main thread with a SIGINT
(``signal.pthread_kill``, so blocking waits such as ``ray.get`` wake up) that the
watchdog's own handler turns into :class:`Stalled`. Leaving the block after a stall
raises ``JobFailed`` (exit 1) naming the dump::

    with Watchdog("train", run_uri, cfg.ray.stall_timeout_s) as dog:
        for batch in ds.iter_batches():
            ...
            dog.beat()

Checks run every ``min(1, timeout_s / 10)`` s; nothing fires after the block exits.
Python can interrupt only the main thread from outside: a block entered in another
thread gets :class:`Stalled` at its next :meth:`Watchdog.check` (and ``JobFailed`` on
leaving the block), so loops there call ``check()`` between units of work.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import psutil
import ray

from pipeline import storage
from pipeline.errors import JobFailed

log = logging.getLogger("imgpipe")

T = TypeVar("T")

PY_SPY_TIMEOUT_S = 10.0  # per worker
LIST_TIMEOUT_S = 10  # per state API listing (actors, tasks)
MAX_WORKERS_DUMPED = 32
RESEND_EVERY_S = 15.0  # interrupt again if the first one was swallowed


class Stalled(BaseException):
    """Raised in the watched thread when the watchdog fires (a BaseException, like
    KeyboardInterrupt, so ``except Exception`` blocks in between do not swallow it)."""


class Watchdog:
    """Context manager that fails a run whose progress stops for ``timeout_s``."""

    def __init__(self, what: str, dump_dir: str, timeout_s: float) -> None:
        self.what = what
        self.dump_dir = dump_dir
        self.timeout_s = float(timeout_s)
        self.beats = 0  # total units reported through beat()
        self.path: str | None = None  # the stack dump, once fired
        self._last = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._closing = False
        self._fired = False
        self._thread: threading.Thread | None = None
        self._target: int | None = None  # ident of the watched thread
        self._old_handler: Any = None
        self._installed = False

    # ------------------------------------------------------------------ public

    def beat(self, n: int = 1) -> None:
        """Progress: ``n`` rows or batches moved. Cheap enough to call per batch."""
        self._last = time.monotonic()
        self.beats += n

    @property
    def fired(self) -> bool:
        return self._fired

    def check(self) -> None:
        """Raise :class:`Stalled` once the watchdog has fired. The main thread gets it
        from a signal; a watched thread of any other kind must call this."""
        if self._fired and not self._closing:
            raise Stalled(self.what)

    def __enter__(self) -> Watchdog:
        self._target = threading.get_ident()
        if self._target == threading.main_thread().ident:
            self._old_handler = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._on_sigint)
            self._installed = True
        self._last = time.monotonic()
        self._thread = threading.Thread(target=self._watch, name=f"watchdog-{self.what}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        with self._lock:
            self._closing = True  # from here on the watcher never fires
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        # a SIGINT sent just before we took the lock is handled by _on_sigint (ignored
        # once closing and fired) while our handler is still installed
        if self._installed:
            signal.signal(signal.SIGINT, self._old_handler)
            self._installed = False
        if self._fired:
            msg = (f"{self.what}: no progress for {self.timeout_s:g}s (ray.stall_timeout_s); "
                   f"stacks written to {self.path}")
            if exc_type is None or issubclass(exc_type, (Stalled, KeyboardInterrupt, SystemExit)):
                raise JobFailed(msg) from None
            raise JobFailed(msg) from exc
        return False

    # ---------------------------------------------------------------- internals

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self._fired:
            if self._closing:
                return  # a late duplicate: __exit__ already turns the stall into JobFailed
            raise Stalled(self.what)
        old = self._old_handler
        if callable(old):
            old(signum, frame)
        elif old != signal.SIG_IGN:
            raise KeyboardInterrupt

    def _watch(self) -> None:
        every = max(0.01, min(1.0, self.timeout_s / 10))
        while not self._stop.wait(every):
            if time.monotonic() - self._last < self.timeout_s:
                continue
            idle = time.monotonic() - self._last
            log.warning("%s: no progress for %.0fs; writing stacks", self.what, idle)
            try:
                path = self._dump(idle)
            except Exception as e:  # noqa: BLE001 - fail the run even when the dump fails
                path = f"(dump failed: {e})"
            with self._lock:
                if self._closing:
                    return
                if time.monotonic() - self._last < self.timeout_s:
                    log.warning("%s: progress resumed while the stacks were written (%s)", self.what, path)
                    continue
                self.path = path
                self._fired = True
                self._interrupt()
            while not self._stop.wait(RESEND_EVERY_S):
                with self._lock:
                    if self._closing:
                        return
                    self._interrupt()
            return

    def _interrupt(self) -> None:
        if self._installed and self._target is not None:  # the main thread: _on_sigint raises Stalled
            signal.pthread_kill(self._target, signal.SIGINT)  # wakes blocking waits, unlike interrupt_main

    def _dump(self, idle: float) -> str:
        now = dt.datetime.now(dt.timezone.utc)
        head = [f"imgpipe stall dump: {self.what}",
                f"time: {now.isoformat()}",
                f"no progress for {idle:.1f}s (timeout {self.timeout_s:g}s); {self.beats} units moved before",
                f"driver pid {os.getpid()}", ""]
        text = "\n".join(head + [driver_stacks(), "", worker_stacks()]) + "\n"
        name = f"stall-{now.strftime('%Y%m%dT%H%M%S.%fZ')}.txt"
        uri = storage.join(self.dump_dir, name)
        try:
            storage.write_bytes(uri, text.encode())
            return uri
        except Exception as e:  # noqa: BLE001 - keep the stacks somewhere local
            local = os.path.join(tempfile.gettempdir(), name)
            with open(local, "w") as f:
                f.write(f"(could not write {uri}: {e})\n{text}")
            return local


def driver_stacks() -> str:
    """Every thread of this process (main first), innermost call last."""
    names = {t.ident: t.name for t in threading.enumerate()}
    main, me = threading.main_thread().ident, threading.get_ident()
    frames = sorted(sys._current_frames().items(), key=lambda kv: kv[0] != main)  # main thread first
    out = ["=== driver threads ==="]
    for ident, frame in frames:
        if ident == me:
            continue  # the thread writing this dump
        out.append(f"--- thread {names.get(ident, '?')} ({ident}) ---")
        out.append("".join(traceback.format_stack(frame)).rstrip())
    return "\n".join(out)


def _with_timeout(fn: Callable[[], T], seconds: float, default: T) -> T:
    """``fn()`` on a daemon thread; ``default`` if it does not return in time (so a hung
    GCS cannot hang the dump)."""
    box: list[tuple[bool, Any]] = []

    def run() -> None:
        try:
            box.append((True, fn()))
        except Exception as e:  # noqa: BLE001 - re-raised in the caller
            box.append((False, e))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if not box:
        return default
    ok, value = box[0]
    if not ok:
        raise value
    return value


def job_workers() -> list[tuple[int, str]]:
    """(pid, what it runs) of this job's busy Ray workers on this node: its alive actors
    and the workers of its running tasks, from Ray's state API."""
    # deferred: ~0.8 s to import (the dashboard's client), and only a stall dump lists workers
    from ray.util import state

    ctx = ray.get_runtime_context()
    mine = [("job_id", "=", ctx.get_job_id()), ("node_id", "=", ctx.get_node_id())]
    # the GCS address names this cluster even when other Ray instances run on the machine
    opts: dict[str, Any] = dict(address=ctx.gcs_address, timeout=LIST_TIMEOUT_S, raise_on_missing_output=False)
    kinds = {a.pid: f"actor {a.class_name}"
             for a in state.list_actors(filters=mine + [("state", "=", "ALIVE")], **opts) if a.pid}
    running: dict[int, list[str]] = {}
    for t in state.list_tasks(filters=mine + [("state", "=", "RUNNING")], **opts):
        if t.worker_pid:
            running.setdefault(t.worker_pid, []).append(t.name)
            kinds.setdefault(t.worker_pid, "task worker")
    return sorted((pid, kind + (f" running {', '.join(sorted(running[pid]))}" if pid in running else ""))
                  for pid, kind in kinds.items())


def child_workers() -> list[tuple[int, str]]:
    """(pid, process title) of the Ray workers a local instance started from this process:
    descendants whose title Ray set to ``ray::<task or actor>`` (idle ones excluded)."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            title = " ".join(proc.cmdline())
        except psutil.Error:  # exited meanwhile
            continue
        if title.startswith("ray::") and not title.startswith("ray::IDLE"):
            kind = "actor" if "." in title.split()[0] else "task worker"  # ray::Class.method
            found.append((proc.pid, f"{kind} {title.strip()}"))
    return sorted(found)


def py_spy_path() -> str | None:
    """The py-spy executable: on PATH or beside the interpreter; None when absent."""
    here = os.path.join(os.path.dirname(sys.executable), "py-spy")
    return shutil.which("py-spy") or (here if os.access(here, os.X_OK) else None)


def _spy(exe: str, pid: int) -> str:
    try:
        r = subprocess.run([exe, "dump", "--pid", str(pid)], capture_output=True, text=True,
                           timeout=PY_SPY_TIMEOUT_S)
        return (r.stdout + r.stderr).rstrip()
    except subprocess.TimeoutExpired:
        return f"(py-spy dump timed out after {PY_SPY_TIMEOUT_S:g}s)"
    except OSError as e:
        return f"(py-spy failed: {e})"


def worker_stacks() -> str:
    """Stacks of this job's Ray workers on this node (py-spy), or their pid table."""
    out = ["=== Ray workers of this job on this node ==="]
    if not ray.is_initialized():  # never start a Ray instance from here
        return "\n".join(out + ["(Ray is not initialised in this process)"])
    try:
        workers = _with_timeout(job_workers, 3 * LIST_TIMEOUT_S, None)
    except Exception as e:  # noqa: BLE001 - no dashboard (local runs start none): the process table
        out.append(f"(Ray's state API, served by the dashboard, is unavailable: {type(e).__name__}; "
                   "workers below are this driver's child processes titled ray::...)")
        workers = child_workers()
    if workers is None:
        return "\n".join(out + ["(listing workers timed out: is the GCS reachable?)"])
    if not workers:
        return "\n".join(out + ["(none busy: no alive actor, no running task)"])
    for pid, desc in workers:
        out.append(f"pid {pid}: {desc}")
    exe = py_spy_path()
    if exe is None:
        out.append("(py-spy not found: `pip install py-spy` for the workers' Python stacks)")
        return "\n".join(out)
    shown = workers[:MAX_WORKERS_DUMPED]
    with ThreadPoolExecutor(max_workers=4) as pool:
        dumps = list(pool.map(lambda w: _spy(exe, w[0]), shown))
    for (pid, desc), text in zip(shown, dumps):
        out += ["", f"--- pid {pid}: {desc} (py-spy dump) ---", text]
    if len(workers) > len(shown):
        out.append(f"({len(workers) - len(shown)} more workers not dumped)")
    return "\n".join(out)

"""Shared helpers of the benchmark scripts (not part of the ``pipeline`` package).

- :func:`parser` gives every script the same flags: ``--n``, ``--smoke``, ``--gpu``,
  ``--s3``, ``--workdir``, ``--results``.
- :func:`machine` describes the machine a figure was measured on.
- :func:`compare` runs each side (baseline, ours) of a measurement in a fresh child
  process (the same script with ``--side``), back to back, and :class:`PeakRSS`
  samples the resident memory of that child and all its descendants every 0.2 s.
  A local Ray instance started by ``ray.init`` is a descendant of the driver
  (driver -> raylet -> ``ray::`` workers; gcs_server, dashboard and log monitor are
  direct children: checked on Ray 2.60), so the tree covers the driver, Ray's own
  processes and every worker/actor; the moto S3 server, a child of the parent, is not
  in it.
- :func:`emit` prints one JSON line and appends it to ``benchmarks/results.jsonl``.

RSS of a process counts the shared pages it touched (Ray's object store is shared
memory mapped into workers), so sums over processes over-count shared memory: treat
``peak_rss_mb`` as an upper bound and compare it between runs of the same shape.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results.jsonl"
REQUIRED_KEYS = ("name", "ours_images_per_second", "baseline_images_per_second", "ratio",
                 "peak_rss_mb", "machine")

if str(ROOT) not in sys.path:  # `python benchmarks/x.py` from anywhere
    sys.path.insert(0, str(ROOT))
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


# ----------------------------------------------------------------------- arguments


def parser(description: str, default_n: int, smoke_n: int) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--n", default=None,
                   help=f"number of images (default {default_n}; --smoke: {smoke_n}); "
                        "scripts that compare sizes take a list: --n 10000,100000")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, ~30 s: keeps the script working (CI)")
    p.add_argument("--gpu", action="store_true", help="GPU mode (ResNet-50, 500x375 JPEGs, bf16, channels_last)")
    p.add_argument("--s3", action="store_true", help="read the images from a moto S3 server on 127.0.0.1")
    p.add_argument("--repeat", type=int, default=1,
                   help="measure each side this many times, alternating; report the median")
    p.add_argument("--ours-only", action="store_true",
                   help="skip the baseline (long size sweeps: RSS growth of ours only)")
    p.add_argument("--cpus", type=int, default=None, help="cores for both sides (default: all)")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a fresh temp dir)")
    p.add_argument("--results", default=str(RESULTS), help="JSON lines file to append to ('' = none)")
    p.add_argument("--side", choices=["baseline", "ours"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--state", default=None, help=argparse.SUPPRESS)
    p.add_argument("--side-result", default=None, help=argparse.SUPPRESS)
    p.set_defaults(default_n=default_n, smoke_n=smoke_n)
    return p


def parse(p: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    args.argv = argv  # children get the same flags (+ --side)
    if args.n is None:
        args.n = str(args.smoke_n if args.smoke else args.default_n)
    args.sizes = [int(float(x)) for x in str(args.n).split(",") if x.strip()]
    args.n = args.sizes[0]
    args.cpus = args.cpus or os.cpu_count() or 1
    args.command = "python " + " ".join(shlex.quote(a) for a in [_rel(sys.argv[0]), *sys.argv[1:]])
    if args.workdir is None and args.side:
        raise SystemExit("--side needs --workdir")
    if args.workdir is None:
        import tempfile

        args.workdir = tempfile.mkdtemp(prefix="imgpipe-bench-")
    os.makedirs(args.workdir, exist_ok=True)
    return args


def _rel(path: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return path


# ------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return 0.0


_MACHINE: dict[str, Any] | None = None


def machine() -> dict[str, Any]:
    """cpu count, cpu model, RAM, GPU, versions: where a figure was measured."""
    global _MACHINE
    if _MACHINE is None:
        import torch

        try:
            import ray

            ray_version = ray.__version__
        except ImportError:
            ray_version = None
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        _MACHINE = {"cpus": os.cpu_count(), "cpu_model": _cpu_model(), "ram_gib": _ram_gib(),
                    "gpu": gpu, "torch": torch.__version__, "ray": ray_version,
                    "python": platform.python_version(), "host": socket.gethostname()}
    return _MACHINE


def git_revision() -> str | None:
    """The project's commit (``+dirty`` when pipeline/ has uncommitted changes)."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "pipeline"], cwd=ROOT, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (rev + ("+dirty" if dirty else "")) or None


def describe(m: dict[str, Any] | None = None) -> str:
    m = m or machine()
    gpu = f", {m['gpu']}" if m.get("gpu") else ", no GPU"
    return f"{m['cpus']} x {m['cpu_model']}, {m['ram_gib']:g} GiB{gpu}; torch {m['torch']}, ray {m['ray']}"


# ------------------------------------------------------------------------ peak RSS


def _psutil():
    try:
        import psutil
    except ImportError:  # Ray vendors psutil under ray/thirdparty_files
        import importlib

        import ray  # noqa: F401  (puts thirdparty_files on sys.path)

        return importlib.import_module("psutil")
    return psutil


RAY_SYSTEM = ("gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent", "ray::IDLE_SPILL")


class PeakRSS:
    """Peak resident memory (MB) of this process and its descendants, sampled every
    ``interval`` s in a daemon thread. Use as a context manager; read ``.result()``.

    Reports the peak of the tree's total, of the driver (this process) alone, and of
    the sum of Ray worker processes (``ray::*`` tasks/actors, Ray's own agents excluded);
    and ``cpu_seconds``: user + system CPU time of every process seen in the tree, each
    at its last sample (a process's last ``interval`` before it exits, and processes
    shorter than one interval, are missed: a slight undercount, alike for both sides).
    """

    def __init__(self, interval: float = 0.2, exclude: set[int] | None = None, root: int | None = None) -> None:
        self.interval = interval
        self.root = root
        self.exclude = set(exclude or ())
        self.peak_total = self.peak_driver = self.peak_workers = self.peak_worker_max = 0.0
        self.samples = 0
        self.cpu: dict[int, float] = {}  # pid -> user + system seconds at its last sample
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> None:
        psutil = _psutil()
        try:
            me = psutil.Process(self.root) if self.root else psutil.Process()
        except psutil.Error:
            return
        total = driver = workers = worker_max = 0.0
        procs = [me]
        try:
            procs += me.children(recursive=True)
        except psutil.Error:
            pass
        parent: dict[int, int] = {}
        for p in procs:
            try:
                parent[p.pid] = p.ppid()
            except psutil.Error:
                parent[p.pid] = 0

        def excluded(pid: int) -> bool:  # an excluded process and all its descendants
            while pid and pid != me.pid:
                if pid in self.exclude:
                    return True
                pid = parent.get(pid, 0)
            return False

        for p in procs:
            if excluded(p.pid):
                continue
            try:
                rss = p.memory_info().rss / 2**20
                name = p.name()
                cpu = p.cpu_times()
            except psutil.Error:
                continue
            self.cpu[p.pid] = cpu.user + cpu.system
            total += rss
            if p.pid == me.pid:
                driver = rss
            elif name.startswith("ray::") and not name.startswith(RAY_SYSTEM):
                workers += rss
                worker_max = max(worker_max, rss)
        self.peak_total = max(self.peak_total, total)
        self.peak_driver = max(self.peak_driver, driver)
        self.peak_workers = max(self.peak_workers, workers)
        self.peak_worker_max = max(self.peak_worker_max, worker_max)
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread = threading.Thread(target=self._run, daemon=True, name="peak-rss")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()

    def result(self) -> dict[str, float]:
        return {"peak_rss_mb": round(self.peak_total, 1), "peak_driver_rss_mb": round(self.peak_driver, 1),
                "peak_workers_rss_mb": round(self.peak_workers, 1),
                "peak_one_worker_rss_mb": round(self.peak_worker_max, 1),
                "cpu_seconds": round(sum(self.cpu.values()), 1)}


# ------------------------------------------------------------------------- results


def emit(record: dict[str, Any], args: argparse.Namespace | None = None) -> dict[str, Any]:
    """Complete ``record`` (ratio, machine, date, command, mode), print it as one JSON
    line, append it to the results file."""
    rec = dict(record)
    ours, base = rec.get("ours_images_per_second"), rec.get("baseline_images_per_second")
    if "ratio" not in rec:
        rec["ratio"] = round(ours / base, 3) if ours and base else None
    rec.setdefault("peak_rss_mb", None)
    rec["machine"] = machine()
    rec["machine_description"] = describe(rec["machine"])
    rec["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    rec["git"] = git_revision()
    if args is not None:
        rec["command"] = args.command
        rec["mode"] = "smoke" if args.smoke else ("gpu" if args.gpu else "cpu")
    line = json.dumps(rec, sort_keys=False, default=str)
    print(line, flush=True)
    path = getattr(args, "results", str(RESULTS)) if args is not None else str(RESULTS)
    if path and not (args is not None and args.smoke and path == str(RESULTS)):
        with open(path, "a") as f:
            f.write(line + "\n")
    return rec


def rate(n: int, seconds: float) -> float:
    return round(n / max(seconds, 1e-9), 1)


class Timer:
    def __enter__(self) -> Timer:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------- S3 (moto)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_MOTO_CHILD = """
import sys, time
from moto.server import ThreadedMotoServer
s = ThreadedMotoServer(ip_address="127.0.0.1", port=int(sys.argv[1]), verbose=False)
s.start()
print("ready", flush=True)
sys.stdin.read()  # until the parent closes our stdin (or dies)
s.stop()
"""


class MotoS3:
    """A moto S3 server (``ThreadedMotoServer``) on 127.0.0.1 only, in a child process.

    A child process rather than a thread of the benchmark, so that the objects moto
    holds in memory and its request handling stay out of the driver's RSS and GIL;
    :class:`PeakRSS` excludes its pid. Sets ``AWS_ENDPOINT_URL`` and dummy credentials
    (Ray workers started afterwards inherit them) and configures ``pipeline.storage``.
    """

    def __init__(self, child: str = _MOTO_CHILD, args: tuple[str, ...] = ()) -> None:
        self.child, self.args = child, args  # a server script run as `python -c CHILD PORT *ARGS`

    def __enter__(self) -> MotoS3:
        for k, v in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                     ("AWS_DEFAULT_REGION", "us-east-1")):
            os.environ.setdefault(k, v)
        port = _free_port()
        self.proc = subprocess.Popen([sys.executable, "-c", self.child, str(port), *self.args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"moto server did not start (got {line!r})")
        self.endpoint = f"http://127.0.0.1:{port}"
        os.environ["AWS_ENDPOINT_URL"] = self.endpoint
        from pipeline import storage

        storage.configure(storage.StorageOptions(endpoint_url=self.endpoint))
        return self

    def bucket(self, name: str) -> str:
        from pipeline import storage

        fs, _ = storage.filesystem("s3://" + name)
        fs.mkdir(name)
        return "s3://" + name

    @property
    def pid(self) -> int:
        return self.proc.pid

    def __exit__(self, *exc) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except Exception:  # noqa: BLE001
            self.proc.kill()


class PlainStore:
    """Plain object access a user would write: boto3 for s3://, files otherwise."""

    def __init__(self) -> None:
        self._client = None

    @property
    def client(self):
        if self._client is None:  # one client per process (made after the fork)
            import boto3
            from botocore.config import Config

            self._client = boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL"),
                                        config=Config(max_pool_connections=32))
        return self._client

    def list(self, prefix: str) -> list[tuple[str, int]]:
        if not prefix.startswith("s3://"):
            out = []
            for d, _, files in os.walk(prefix):
                out += [(os.path.join(d, f), os.path.getsize(os.path.join(d, f))) for f in files if f.endswith(".jpg")]
            return sorted(out)
        bucket, _, key = prefix[5:].partition("/")
        out = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key.rstrip("/") + "/"):
            out += [(f"s3://{bucket}/{o['Key']}", o["Size"]) for o in page.get("Contents", []) if o["Key"].endswith(".jpg")]
        return out

    def get(self, uri: str) -> bytes:
        if not uri.startswith("s3://"):
            with open(uri, "rb") as f:
                return f.read()
        bucket, _, key = uri[5:].partition("/")
        return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()

    def put(self, uri: str, data: bytes) -> None:
        if not uri.startswith("s3://"):
            os.makedirs(os.path.dirname(uri), exist_ok=True)
            with open(uri, "wb") as f:
                f.write(data)
            return
        bucket, _, key = uri[5:].partition("/")
        self.client.put_object(Bucket=bucket, Key=key, Body=data)


# --------------------------------------------------------------------------- Ray


def start_ray(cpus: int) -> float:
    """Start a local Ray instance of ``cpus`` logical CPUs the way imgpipe does; returns seconds."""
    from pipeline import config
    from pipeline.ops.runtime import ensure_ray

    t0 = time.perf_counter()
    ensure_ray(config.load(None, [f"ray.num_cpus={cpus}"]), quiet=True)
    return time.perf_counter() - t0


def stop_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def compare(args: argparse.Namespace, state: dict[str, Any], label: str = "",
            sides: tuple[str, ...] = ("baseline", "ours")) -> dict[str, Any]:
    """Measure each side in a fresh child process, back to back, ``args.repeat`` times.

    A child is this same script run with ``--side baseline|ours --state FILE`` (see
    :func:`child`): it rebuilds nothing but reads ``state`` (paths prepared by the
    parent), times only its own work and reports ``images``; ours starts a local Ray
    instance of ``args.cpus`` CPUs before its clock (a cluster is usually up: the
    start is reported apart, as ``ray_start_seconds`` and ``ours_cold_images_per_second``).
    The parent samples the peak RSS of the child's process tree (for ours: the driver,
    raylet, gcs and every Ray worker), so each side's memory is its own. Rates are
    medians over repeats.
    """
    import statistics

    if getattr(args, "ours_only", False):
        sides = tuple(s for s in sides if s != "baseline")
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in sides}
    for r in range(args.repeat):
        for side in sides:
            log(f"{label} {side} (repeat {r + 1}/{args.repeat})")
            res = run_side(args, side, state)
            log(f"{label} {side}: {res['images']} images in {res['seconds']:.1f}s"
                + (f" (+{res['ray_start']:.1f}s Ray start)" if res.get("ray_start") else ""))
            runs[side].append(res)
    med = statistics.median
    o = runs["ours"]
    out: dict[str, Any] = {
        "ours_images_per_second": med(rate(x["images"], x["seconds"]) for x in o),
        "baseline_images_per_second": None,
        **{k: max(x["mem"][k] for x in o) for k in o[0]["mem"] if k != "cpu_seconds"},
        "ours_seconds": round(med(x["seconds"] for x in o), 2),
        "ray_start_seconds": round(med(x["ray_start"] for x in o), 2),
        "ours_cold_images_per_second": med(rate(x["images"], x["seconds"] + x["ray_start"]) for x in o),
        "images_ours": o[0]["images"], "repeat": args.repeat, "ours_extra": o[-1].get("extra", {}),
        # the side's whole process tree (for ours: Ray's start and every Ray process included)
        "ours_cpu_ms_per_image": round(med(1e3 * x["mem"]["cpu_seconds"] / x["images"] for x in o), 2),
    }
    if args.repeat > 1:
        out["ours_runs"] = [rate(x["images"], x["seconds"]) for x in o]
    b = runs.get("baseline")
    if b:
        out.update({
            "baseline_images_per_second": med(rate(x["images"], x["seconds"]) for x in b),
            "baseline_peak_rss_mb": max(x["mem"]["peak_rss_mb"] for x in b),
            "baseline_peak_driver_rss_mb": max(x["mem"]["peak_driver_rss_mb"] for x in b),
            "baseline_seconds": round(med(x["seconds"] for x in b), 2),
            "images_baseline": b[0]["images"], "baseline_extra": b[-1].get("extra", {}),
            "baseline_cpu_ms_per_image": round(med(1e3 * x["mem"]["cpu_seconds"] / x["images"] for x in b), 2)})
        if args.repeat > 1:
            out["baseline_runs"] = [rate(x["images"], x["seconds"]) for x in b]
        out["ratio"] = round(out["ours_images_per_second"] / max(out["baseline_images_per_second"], 1e-9), 3)
        out["cold_ratio"] = round(out["ours_cold_images_per_second"] / max(out["baseline_images_per_second"], 1e-9), 3)
        # CPU time per image, ours / baseline: lower is better (the figure load disturbs least)
        out["cpu_per_image_ratio"] = round(out["ours_cpu_ms_per_image"] / max(out["baseline_cpu_ms_per_image"], 1e-9), 3)
    else:
        out["ratio"] = None
    return out


def run_side(args: argparse.Namespace, side: str, state: dict[str, Any]) -> dict[str, Any]:
    """Run one side in a child process; returns its report plus ``mem`` (peak RSS)."""
    import tempfile

    fd, state_path = tempfile.mkstemp(prefix=f"state-{side}-", suffix=".json", dir=args.workdir)
    run_id = f"{side}-{time.time_ns()}"  # unique per run: repeats must not find the last one's output
    with os.fdopen(fd, "w") as f:
        json.dump({**state, "run_id": run_id}, f)
    result_path = state_path.replace("state-", "result-")
    cmd = [sys.executable, os.path.abspath(sys.argv[0]), *args.argv, "--workdir", args.workdir,
           "--side", side, "--state", state_path, "--side-result", result_path]
    proc = subprocess.Popen(cmd)
    with PeakRSS(root=proc.pid) as mem:
        rc = proc.wait()
    if rc != 0:
        raise RuntimeError(f"{side} side failed (exit {rc}): {' '.join(cmd)}")
    with open(result_path) as f:
        out = json.load(f)
    out["mem"] = mem.result()
    return out


def child(args: argparse.Namespace, work: Callable[[str, argparse.Namespace, dict[str, Any]], Any]) -> None:
    """Child mode (``--side``): run ``work(side, args, state)`` and write its report.

    ``work`` returns the number of images it processed, or ``(images, extra dict)``.
    """
    with open(args.state) as f:
        state = json.load(f)
    ray_s = start_ray(args.cpus) if args.side == "ours" else 0.0
    with Timer() as t:
        res = work(args.side, args, state)
    images, extra = res if isinstance(res, tuple) else (res, {})
    if args.side == "ours":
        stop_ray()
    with open(args.side_result, "w") as f:
        json.dump({"images": images, "seconds": t.seconds, "ray_start": ray_s, "extra": extra}, f, default=str)

"""scale: ``imgpipe predict`` at growing sizes (issue #18): seconds per image and peak RSS
of the whole process tree, by phase, against the smallest size; and listing S3 keys.

1. ``--part predict`` (default): for each size of ``--n``, that many tiny JPEGs (~1 KB
   32x32, copies of a bank of 200 images from ``make_images.py``, written once and cached
   under ``$IMGPIPE_BENCH_CACHE``) through :func:`pipeline.inference.predict.run` with the
   small CNN, in a fresh child process with a fresh local Ray instance. The parent samples
   every process of the child's tree every 0.5 s (RSS, and its shared-memory part: Ray's
   object store pages) and splits the peaks by predict's phases (``phase_seconds`` of
   the summary: model, existing, listing, snapshot, skip, start, scoring, commit,
   report). Each line after the first gives ``rss_growth`` and ``s_per_image_ratio``
   against the smallest size (targets: <= 1.2x and <= 1.15x from 10^5 to 10^6).
2. ``--part listing``: ``--n`` keys in a moto S3 server on 127.0.0.1 (a child process,
   outside the figures; keys put into its backend directly, pages served from a sorted
   index: see ``_INDEXED_MOTO``), then predict's listing of that prefix
   (:func:`pipeline.data.listings.write_input_listing`: streamed, paginated, written to a
   Parquet snapshot in row groups) in a child process: seconds and peak RSS against the
   smallest size, and the driver's growth per key.
3. ``--part incremental``: 1% new images added to the largest size's prefix (removed
   after), then predict with ``--skip-existing`` into item 1's output (same
   ``--workdir``): seconds against the full run's (target <= 5%), only the new ones scored.
4. ``--part resume``: a fresh predict of the largest size, killed (its whole process
   group) once half its rows are in part files, rerun after its lease expires: the
   rerun's seconds against the full run's times the share of images left; duckdb
   counts one row per image in the committed output.
5. ``--part writes``: a predict of the largest size, its output folder polled every
   second (the part files' footers): when the first file appeared, and the share of the
   images in files at a quarter, half and three quarters of the scoring phase (a kill
   then keeps those). Pass ``--set predict.rows_per_file=N`` for more, smaller files.
6. ``--part pack``: ``imgpipe pack`` (:func:`pipeline.data.packing.pack`) of ``--n``
   distinct tiny JPEGs from local disk (the bank's images, each with its index in a JPEG
   comment: distinct bytes, so no image is a duplicate of another), in a child process
   sampled as in item 1: seconds and peak RSS against the smallest size (target <= 1.3x
   from 10^5 to 10^6), the largest shard's rows and bytes against the caps, and the
   manifest's size.

    python benchmarks/scale.py --n 100000 1000000            # item 1 (the 10^6 run: ~25 min on 2 cores)
    python benchmarks/scale.py --n 20000 100000
    python benchmarks/scale.py --part listing --n 10000 100000        # from moto S3
    python benchmarks/scale.py --part listing --local --n 20000 100000
    python benchmarks/scale.py --part incremental --n 1000000 --workdir W   # item 4, after item 1 in W
    python benchmarks/scale.py --part resume --n 1000000 --workdir W        # item 3
    python benchmarks/scale.py --part pack --n 100000 1000000                 # item 5 (~20 min)
    python benchmarks/scale.py --part writes --n 100000 --set predict.rows_per_file=10000
    python benchmarks/scale.py --smoke
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import make_images  # noqa: E402
import predict as predict_bench  # noqa: E402

BANK = 200  # distinct JPEGs the tiny sets are copied from
CLASSES = 10
INTERVAL_S = 0.5
SIZE = 16  # px: the demo's small CNN (data.image_size's default); its forward ~0.9 ms an image on one core, 4.5 at 32 px


# -------------------------------------------------------------------------- images


def tiny_images(n: int, distinct: bool = False) -> str:
    """A local ImageFolder of ``n`` ~1 KB JPEGs (``cXX/NNNNNNN.jpg``), cached. Copies of the
    bank's images; ``distinct``: each with its index in a comment segment after the JPEG's
    start marker (pack dedupes by content; a comment changes the bytes, not the pixels)."""
    name = f"tiny-distinct-n{n}" if distinct else f"tiny-n{n}"
    root = os.path.join(os.environ.get("IMGPIPE_BENCH_CACHE", "/tmp/imgpipe-bench-images"), name)
    marker = os.path.join(root, ".complete")
    if os.path.exists(marker):
        return root
    bank_dir = make_images.images(BANK, "small")
    bank = []
    for d, _, files in sorted(os.walk(bank_dir)):
        bank += [open(os.path.join(d, f), "rb").read() for f in sorted(files) if f.endswith(".jpg")]
    shutil.rmtree(root, ignore_errors=True)
    for c in range(CLASSES):
        os.makedirs(os.path.join(root, f"c{c:02d}"))
    for i in range(n):
        blob = bank[i % len(bank)]
        if distinct:
            note = b"%d" % i
            blob = blob[:2] + b"\xff\xfe" + (len(note) + 2).to_bytes(2, "big") + note + blob[2:]
        with open(os.path.join(root, f"c{i % CLASSES:02d}", f"{i:07d}.jpg"), "wb") as f:
            f.write(blob)
    with open(marker, "w") as f:
        json.dump({"n": n, "bank": len(bank)}, f)
    return root


# ------------------------------------------------------------------------- sampler


def _status_kb(pid: int) -> tuple[float, float]:
    """(RSS, its shared-memory part) of ``pid`` in MB, from /proc/PID/status."""
    rss = shm = 0.0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) / 1024
                elif line.startswith("RssShmem:"):
                    shm = int(line.split()[1]) / 1024
    except OSError:
        pass
    return rss, shm


class Timeline:
    """Samples a process tree every :data:`INTERVAL_S`: time, whole tree, driver (the
    root), Ray workers, private memory (RSS less shared pages, summed) and the largest
    shared part of one process (object store pages it touched)."""

    def __init__(self, root: int) -> None:
        self.root, self.rows = root, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        psutil = common._psutil()
        try:
            me = psutil.Process(self.root)
            procs = [me, *me.children(recursive=True)]
        except psutil.Error:
            return
        total = driver = workers = private = shm_max = 0.0
        for p in procs:
            try:
                name = p.name()
            except psutil.Error:
                continue
            rss, shm = _status_kb(p.pid)
            total += rss
            private += rss - shm
            shm_max = max(shm_max, shm)
            if p.pid == self.root:
                driver = rss
            elif name.startswith("ray::") and not name.startswith(common.RAY_SYSTEM):
                workers += rss
        self.rows.append((time.time(), total, driver, workers, private, shm_max))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(INTERVAL_S)

    def __enter__(self) -> Timeline:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def peaks(self, t0: float = 0.0, t1: float = float("inf")) -> dict[str, float]:
        rows = [r for r in self.rows if t0 <= r[0] <= t1] or [(0, 0, 0, 0, 0, 0)]
        keys = ("peak_rss_mb", "peak_driver_rss_mb", "peak_workers_rss_mb", "peak_private_mb", "peak_shared_mb")
        return {k: round(max(r[i + 1] for r in rows), 1) for i, k in enumerate(keys)}


def rss_growth(rec: dict, first: dict) -> dict[str, float]:
    """Each peak of ``rec`` (:meth:`Timeline.peaks`) against the same peak of ``first``."""
    keys = ("peak_rss_mb", "peak_driver_rss_mb", "peak_workers_rss_mb", "peak_private_mb", "peak_shared_mb")
    return {k: round(rec[k] / max(first[k], 1e-9), 3) for k in keys}


def start_child(args: argparse.Namespace, state: dict, **popen) -> tuple[subprocess.Popen, str, list[str]]:
    """Start this script in ``--side ours`` mode on ``state``: the process, the path its
    result will be written next to (``PATH.out``), and its command line."""
    path = os.path.join(args.workdir, f"state-{time.time_ns()}.json")
    with open(path, "w") as f:
        json.dump(state, f)
    cmd = [sys.executable, os.path.abspath(__file__), *args.argv, "--workdir", args.workdir, "--side", "ours",
           "--state", path, "--side-result", path + ".out"]
    return subprocess.Popen(cmd, **popen), path, cmd


def run_child(args: argparse.Namespace, state: dict) -> tuple[dict, Timeline]:
    """This script in ``--side ours`` mode on ``state``; its result and its tree's timeline."""
    proc, path, cmd = start_child(args, state)
    with Timeline(proc.pid) as tl:
        rc = proc.wait()
    if rc:
        raise RuntimeError(f"child failed (exit {rc}): {' '.join(cmd)}")
    with open(path + ".out") as f:
        return json.load(f), tl


# ------------------------------------------------------------------------- predict


def predict_child(args: argparse.Namespace, state: dict) -> dict:
    from pipeline import config
    from pipeline.inference import predict

    ray_s = common.start_ray(args.cpus)
    t_start = time.time()
    s = predict.run(state["model"], state["src"], state["dst"],
                    config.load(None, [f"ray.num_cpus={args.cpus}", *args.set]), quiet=True)
    return {"t_start": t_start, "seconds": time.time() - t_start, "ray_start": ray_s,
            "images": s["rows"] + s["errors"], "phase_seconds": s["phase_seconds"],
            "scored": s["scored"], "skipped": s["skipped"], "resumed": s["resumed"]}


def phase_peaks(res: dict, tl: Timeline) -> dict[str, dict[str, float]]:
    out, t = {}, res["t_start"]
    for name, sec in res["phase_seconds"].items():
        out[name] = tl.peaks(t - INTERVAL_S, t + sec + INTERVAL_S)
        t += sec
    return out


def predict_part(args: argparse.Namespace) -> None:
    model = predict_bench.make_model(args.workdir, "smallcnn", SIZE, "digits")
    first = None
    for n in args.sizes:
        with common.Timer() as tg:
            src = tiny_images(n)
        common.log(f"predict {n} tiny JPEGs ({src}, ready in {tg.seconds:.0f} s)")
        res, tl = run_child(args, {"model": model, "src": src, "dst": os.path.join(args.workdir, f"pred-{n}")})
        assert res["images"] == n, res
        rec = {"n": n, "seconds": round(res["seconds"], 2), "s_per_image": res["seconds"] / n,
               "ours_images_per_second": common.rate(n, res["seconds"]), **tl.peaks(),
               "phase_seconds": res["phase_seconds"], "phase_peaks": phase_peaks(res, tl),
               "ray_start_seconds": round(res["ray_start"], 2), "cpus": args.cpus, "set": args.set}
        name = f"scale_predict_n{n}"
        if first is None:
            first = rec
            common.emit({"name": name, **rec, "baseline_images_per_second": None, "ratio": None,
                         "note": "reference size"}, args)
            continue
        growth = rss_growth(rec, first)
        common.emit({"name": name, **rec, "baseline_images_per_second": first["ours_images_per_second"],
                     "ratio": round(rec["ours_images_per_second"] / first["ours_images_per_second"], 3),
                     "s_per_image_ratio": round(rec["s_per_image"] / first["s_per_image"], 3),
                     "rss_growth": growth, "note": f"baseline = ours at n={first['n']}"}, args)


def full_run(n: int, args: argparse.Namespace) -> dict:
    """The latest uninterrupted ``scale_predict_n{n}`` record of the results file (item 1)."""
    name, rec = f"scale_predict_n{n}", None
    with open(args.results or common.RESULTS) as f:
        for line in f:
            r = json.loads(line)
            if r.get("name") == name and r.get("mode") != "smoke":
                rec = r
    if rec is None:
        raise SystemExit(f"no {name} record in the results: run `python benchmarks/scale.py --n {n}` first")
    return rec


def _part_rows(dst: str) -> int:
    """Rows in the predictions files written so far (their Parquet footers)."""
    import pyarrow.parquet as pq

    rows = 0
    with contextlib.suppress(FileNotFoundError):
        for f in os.listdir(dst):
            if f.startswith("part-") and f.endswith(".parquet"):
                with contextlib.suppress(OSError, ValueError):  # a file being written
                    rows += pq.read_metadata(os.path.join(dst, f)).num_rows
    return rows


def one_row_per_image(dst: str, n: int) -> dict:
    """duckdb over the committed output (``_SUCCESS``'s files): rows and distinct sources."""
    import duckdb

    files = [os.path.join(dst, f) for f in json.load(open(os.path.join(dst, "_SUCCESS")))["files"]]
    rows, distinct = duckdb.sql(f"SELECT count(*), count(DISTINCT source) FROM read_parquet({files!r})").fetchall()[0]
    assert rows == distinct == n, (rows, distinct, n)
    return {"duckdb_rows": rows, "duckdb_distinct_sources": distinct}


def resume_part(args: argparse.Namespace) -> None:
    """Item 3: kill a predict once about half its rows are in part files, rerun it, and
    compare the rerun's seconds with the remaining share of the uninterrupted run."""
    n = int(max(args.sizes))
    full = full_run(n, args)
    model = predict_bench.make_model(args.workdir, "smallcnn", SIZE, "digits")
    src, dst = tiny_images(n), os.path.join(args.workdir, f"resume-{n}")
    shutil.rmtree(dst, ignore_errors=True)
    ttl = 20  # s: the lease a killed run leaves behind expires this long after its last heartbeat
    rows_per_file = max(500, n // 20)  # 50,000 (the default) at 10^6
    args.argv = [*args.argv, "--set", f"ray.lease_ttl_s={ttl}", "--set", f"predict.rows_per_file={rows_per_file}"]
    t0 = time.time()
    # its own process group: the kill takes Ray's processes too
    proc, _, _ = start_child(args, {"model": model, "src": src, "dst": dst}, start_new_session=True)
    while proc.poll() is None and _part_rows(dst) < n // 2:
        time.sleep(2)
    killed_at = time.time() - t0
    os.killpg(proc.pid, 9)
    proc.wait()
    done = _part_rows(dst)
    if os.path.exists(os.path.join(dst, "_SUCCESS")):
        raise SystemExit(f"the run committed before it was killed ({killed_at:.0f} s): use a larger --n")
    common.log(f"killed after {killed_at:.0f} s with {done} rows in part files; waiting {ttl} s for the lease")
    time.sleep(ttl + 1)
    res, tl = run_child(args, {"model": model, "src": src, "dst": dst})
    left = (n - res["resumed"]) / n
    expected = full["seconds"] * left
    common.emit({"name": f"scale_resume_n{n}", "n": n, "killed_after_seconds": round(killed_at, 1),
                 "resumed": res["resumed"], "scored": res["scored"], "rerun_seconds": round(res["seconds"], 2),
                 "full_run_seconds": full["seconds"], "remaining_share": round(left, 4),
                 "rerun_vs_remaining_share": round(res["seconds"] / expected, 3), **tl.peaks(),
                 "phase_seconds": res["phase_seconds"], **one_row_per_image(dst, n),
                 "ours_images_per_second": None, "baseline_images_per_second": None, "ratio": None,
                 "note": "rerun seconds / (full run seconds x share of images left)"}, args)


def writes_part(args: argparse.Namespace) -> None:
    """How far the writer lags the model: rows in part files over the scoring phase."""
    n = args.sizes[-1]
    model = predict_bench.make_model(args.workdir, "smallcnn", SIZE, "digits")
    dst = os.path.join(args.workdir, f"writes-{n}")
    shutil.rmtree(dst, ignore_errors=True)
    proc, path, cmd = start_child(args, {"model": model, "src": tiny_images(n), "dst": dst})
    seen = []  # (time, rows in part files)
    while proc.poll() is None:
        seen.append((time.time(), _part_rows(dst)))
        time.sleep(1.0)
    if proc.returncode:
        raise RuntimeError(f"child failed (exit {proc.returncode}): {' '.join(cmd)}")
    with open(path + ".out") as f:
        res = json.load(f)
    ph = res["phase_seconds"]
    end = res["t_start"] + res["seconds"] - ph.get("commit", 0) - ph.get("report", 0)  # scoring is the last long phase
    start = end - ph["scoring"]
    first = next((t for t, rows in seen if rows), end)

    def share_at(frac: float) -> float:
        return round(max((rows for t, rows in seen if t <= start + frac * (end - start)), default=0) / n, 3)

    common.emit({"name": f"scale_predict_writes_n{n}", "n": n, "seconds": round(res["seconds"], 2),
                 "scoring_seconds": ph["scoring"], "first_file_at_scoring_fraction": round((first - start) / (end - start), 3),
                 "share_in_files_at_scoring_25_50_75": [share_at(0.25), share_at(0.5), share_at(0.75)],
                 "ours_images_per_second": None, "baseline_images_per_second": None, "ratio": None,
                 "cpus": args.cpus, "set": args.set}, args)


def incremental_part(args: argparse.Namespace) -> None:
    """Item 4: add 1% new images to the prefix item 1 scored and rerun with
    ``--skip-existing`` into its output: only the new ones are scored."""
    n = int(max(args.sizes))
    full, extra = full_run(n, args), n // 100
    dst = os.path.join(args.workdir, f"pred-{n}")
    if not os.path.exists(os.path.join(dst, "_SUCCESS")):
        raise SystemExit(f"{dst} holds no committed output: run item 1 with this --workdir first")
    model = predict_bench.make_model(args.workdir, "smallcnn", SIZE, "digits")
    src = tiny_images(n)
    bank = [os.path.join(src, "c00", f"{i:07d}.jpg") for i in range(0, 10 * BANK, CLASSES)]
    added = [os.path.join(src, f"c{i % CLASSES:02d}", f"new-{i:07d}.jpg") for i in range(extra)]
    try:
        for i, f in enumerate(added):
            shutil.copyfile(bank[i % len(bank)], f)
        args.argv = [*args.argv, "--set", "predict.skip_existing=true"]
        res, tl = run_child(args, {"model": model, "src": src, "dst": dst})
    finally:
        for f in added:
            with contextlib.suppress(FileNotFoundError):
                os.remove(f)
    assert res["scored"] == extra and res["images"] == n + extra, res
    common.emit({"name": f"scale_incremental_n{n}", "n": n, "added": extra, "scored": res["scored"],
                 "skipped": res["skipped"], "seconds": round(res["seconds"], 2), "full_run_seconds": full["seconds"],
                 "share_of_full_run": round(res["seconds"] / full["seconds"], 4), **tl.peaks(),
                 "phase_seconds": res["phase_seconds"], **one_row_per_image(dst, n + extra),
                 "ours_images_per_second": None, "baseline_images_per_second": None, "ratio": None,
                 "note": "target: share_of_full_run <= 0.05"}, args)


# ---------------------------------------------------------------------------- pack


def pack_child(args: argparse.Namespace, state: dict) -> dict:
    from pipeline import config
    from pipeline.data import packing

    ray_s = common.start_ray(args.cpus)
    t0 = time.time()
    s = packing.pack(state["src"], state["dst"], config.load(None, [f"ray.num_cpus={args.cpus}", *args.set]),
                     quiet=True)
    return {"seconds": time.time() - t0, "ray_start": ray_s, "images": s["images"] + s["bad_images"],
            "bad_images": s["bad_images"], "shards": s["shards"]}


def shard_sizes(dst: str) -> dict:
    """The manifest's size, and the largest shard's rows and bytes against their caps."""
    from pipeline.data import packing, shardset

    m = shardset.read_manifest(dst)
    entries = [e for split in m.splits.values() for e in split]
    return {"manifest_bytes": os.path.getsize(os.path.join(dst, "manifest.json")),
            "max_shard_rows": max(e["rows"] for e in entries), "rows_cap": m.raw["rows_per_shard"],
            "max_shard_mb": round(max(os.path.getsize(os.path.join(dst, e["path"])) for e in entries) / 1e6, 2),
            "mb_cap": m.raw.get("shard_mb"), "rows_cap_by_bytes": packing.MAX_SHARD_ROWS_BY_BYTES}


def pack_part(args: argparse.Namespace) -> None:
    first = None
    for n in args.sizes:
        with common.Timer() as tg:
            src = tiny_images(n, distinct=True)
        common.log(f"pack {n} distinct tiny JPEGs ({src}, ready in {tg.seconds:.0f} s)")
        dst = os.path.join(args.workdir, f"pack-{n}")
        shutil.rmtree(dst, ignore_errors=True)
        res, tl = run_child(args, {"src": src, "dst": dst})
        assert res["images"] == n and res["bad_images"] == 0, res
        sizes = shard_sizes(dst)
        assert sizes["max_shard_rows"] <= sizes["rows_cap"], sizes
        rec = {"n": n, "seconds": round(res["seconds"], 2), "s_per_image": res["seconds"] / n,
               "ours_images_per_second": common.rate(n, res["seconds"]), **tl.peaks(), "shards": res["shards"],
               **sizes, "ray_start_seconds": round(res["ray_start"], 2), "cpus": args.cpus, "set": args.set}
        name = f"scale_pack_local_n{n}"
        if first is None:
            first = rec
            common.emit({"name": name, **rec, "baseline_images_per_second": None, "ratio": None,
                         "note": "reference size"}, args)
        else:
            growth = rss_growth(rec, first)
            common.emit({"name": name, **rec, "baseline_images_per_second": first["ours_images_per_second"],
                         "ratio": round(rec["ours_images_per_second"] / first["ours_images_per_second"], 3),
                         "rss_growth": growth, "note": f"baseline = ours at n={first['n']}"}, args)
        shutil.rmtree(dst, ignore_errors=True)  # 10^6 images' shards: ~1 GB


# ------------------------------------------------------------------------- listing


def listing_child(args: argparse.Namespace, state: dict) -> dict:
    from pipeline import storage
    from pipeline.data import listings

    if state.get("endpoint"):
        storage.configure(storage.StorageOptions(endpoint_url=state["endpoint"]))
    listings.write_input_listing(tiny_images(500), state["dst"] + ".warm")  # imports, first-use caches
    t0 = time.time()
    rows = listings.write_input_listing(state["src"], state["dst"])
    return {"seconds": time.time() - t0, "images": rows}


# A moto server holding ``N`` keys put straight into its backend (HTTP PUTs run at ~100 a
# second here: 10^6 keys would take ~3 h), with ListObjectsV2 served from a sorted index.
# moto sorts every key of the prefix on each page request (O(n log n) a page: 10^4 keys
# listed in 24 s, 10^6 would take about an hour of server time); real S3 serves a page in
# time independent of the bucket's size, and the client under test sees the same requests
# and XML pages either way.
_INDEXED_MOTO = """
import bisect, hashlib, sys
from moto.core import DEFAULT_ACCOUNT_ID
from moto.s3.models import S3Backend, s3_backends
from moto.server import ThreadedMotoServer

port, name, n, classes = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
backend.create_bucket(name, "us-east-1")
body = b"\\xff\\xd8" + b"x" * 1000
for i in range(n):
    backend.put_object(name, f"imgs/c{i % classes:02d}/{i:08d}.jpg", body)
names = sorted(backend.get_bucket(name).keys.keys())
slow = S3Backend.list_objects_v2

def indexed(self, bucket, prefix, delimiter, continuation_token, start_after, max_keys):
    b = bucket  # moto passes it by keyword
    if delimiter or b.name != name:
        return slow(self, bucket=b, prefix=prefix, delimiter=delimiter, continuation_token=continuation_token,
                    start_after=start_after, max_keys=max_keys)
    prefix = prefix or ""
    lo, hi = bisect.bisect_left(names, prefix), bisect.bisect_left(names, prefix + "\\uffff")
    after = self._pagination_tokens.get(continuation_token) if continuation_token else start_after
    if after:
        lo = max(lo, bisect.bisect_right(names, after))
    page = names[lo:min(hi, lo + max_keys)]
    token = None
    if lo + max_keys < hi:
        token = hashlib.md5(page[-1].encode()).hexdigest()
        self._pagination_tokens[token] = page[-1]
    return [b.keys[k] for k in page], token is not None, token

S3Backend.list_objects_v2 = indexed
s = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
s.start()
print("ready", flush=True)
sys.stdin.read()
s.stop()
"""


def listing_part(args: argparse.Namespace) -> None:
    first = None
    where = "local" if args.local else "s3"
    for n in args.sizes:
        with contextlib.ExitStack() as stack:
            s3 = None
            if not args.local:
                common.log(f"starting moto with {n} keys")
                s3 = stack.enter_context(common.MotoS3(_INDEXED_MOTO, ("scale", str(n), str(CLASSES))))
            src = "s3://scale/imgs" if s3 else tiny_images(n)
            res, tl = run_child(args, {"endpoint": s3.endpoint if s3 else "", "src": src,
                                       "dst": os.path.join(args.workdir, f"listing-{n}.pq")})
        assert res["images"] == n, res
        rec = {"n": n, "seconds": round(res["seconds"], 2), "keys_per_second": common.rate(n, res["seconds"]),
               "ours_images_per_second": None, **tl.peaks()}
        if first is None:
            first = rec
            common.emit({"name": f"scale_listing_{where}_n{n}", **rec, "baseline_images_per_second": None,
                         "ratio": None, "note": "reference size"}, args)
            continue
        per_key = (rec["peak_driver_rss_mb"] - first["peak_driver_rss_mb"]) * 2**20 / (n - first["n"])
        common.emit({"name": f"scale_listing_{where}_n{n}", **rec, "baseline_images_per_second": None,
                     "ratio": None, "rss_growth": round(rec["peak_rss_mb"] / first["peak_rss_mb"], 3),
                     "driver_bytes_per_extra_key": round(per_key, 1),
                     "note": f"growth against n={first['n']}"}, args)


# ---------------------------------------------------------------------------- main

PARTS = {"predict": predict_part, "listing": listing_part, "resume": resume_part, "incremental": incremental_part,
         "pack": pack_part, "writes": writes_part}
CHILDREN = {"listing": listing_child, "pack": pack_child}


def main(argv: list[str] | None = None) -> None:
    p = common.parser(__doc__.splitlines()[0], default_n=0, smoke_n=0)
    p.add_argument("sizes_pos", nargs="*", type=float, help=argparse.SUPPRESS)
    p.add_argument("--part", choices=list(PARTS), default="predict")
    p.add_argument("--set", action="append", default=[], help="predict config override key=value")
    p.add_argument("--local", action="store_true", help="--part listing: tiny JPEGs on local disk, not moto")
    raw = list(sys.argv[1:] if argv is None else argv)
    # `--n 100000 1000000` (issue #18's form) as well as `--n 100000,1000000`
    for i, a in enumerate(raw):
        if a == "--n":
            j = i + 1
            while j + 1 < len(raw) and not raw[j + 1].startswith("-"):
                raw[i + 1] = f"{raw[i + 1]},{raw.pop(j + 1)}"
            break
    args = common.parse(p, raw)
    if args.sizes == [0]:
        args.sizes = [500, 1500] if args.smoke else [100_000, 1_000_000]
    if args.side:
        state = json.load(open(args.state))
        out = CHILDREN.get(args.part, predict_child)(args, state)
        with open(args.side_result, "w") as f:
            json.dump(out, f)
        return
    PARTS[args.part](args)


if __name__ == "__main__":
    main()

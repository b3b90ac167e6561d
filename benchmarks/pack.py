"""pack: ImageFolder of small JPEGs -> Parquet shards. imgpipe's ``pack`` vs a plain script.

Ours: :func:`pipeline.shards.pack` (Ray Data tasks that read with threads, validate by
decoding, write one shard each; manifest last), on a local Ray instance of ``--cpus``.
Baseline: what a user would write without Ray: list the prefix, assign splits by a
hash, and a ``multiprocessing.Pool(cpus)`` that, per shard, downloads with 16 threads,
validates each image with the same full decode, and writes the shard with pyarrow.
Both write the same number of shards of the same size (imgpipe's ``data.shard_mb``
rule). Throughput excludes Ray's start (a cluster is usually up), which is reported
separately (``ray_start_seconds``, ``ours_cold_images_per_second``).

Peak RSS (driver, Ray workers, whole tree) is measured per size; with several sizes
(``--n 10000,100000``) a second line per size compares it with the smallest size.

    python benchmarks/pack.py --s3                    # 10k small JPEGs from moto S3
    python benchmarks/pack.py --s3 --n 10000,100000   # RSS at 10k vs 100k (long)
    python benchmarks/pack.py --smoke
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import get_context

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import make_images  # noqa: E402

SHARD_MB = 128.0  # imgpipe's default data.shard_mb


# ------------------------------------------------------------------------ baseline


def _baseline_shard(task: dict) -> dict:
    """One shard: download (16 threads), validate by decoding, write with pyarrow."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from pipeline import storage

    storage.configure(storage.StorageOptions(endpoint_url=task["endpoint"]))

    def fetch(uri: str) -> bytes:
        return storage.read_bytes(uri)

    with ThreadPoolExecutor(16) as pool:
        blobs = list(pool.map(fetch, task["sources"]))
    cols: dict[str, list] = {"image_id": [], "image": [], "label": [], "source": []}
    bad = 0
    for uri, label, blob in zip(task["sources"], task["labels"], blobs):
        try:
            with Image.open(io.BytesIO(blob)) as im:
                im.convert("RGB").load()
        except Exception:  # noqa: BLE001
            bad += 1
            continue
        cols["image_id"].append(hashlib.sha256(blob).hexdigest())
        cols["image"].append(blob)
        cols["label"].append(label)
        cols["source"].append(uri)
    buf = io.BytesIO()
    pq.write_table(pa.table(cols, schema=pa.schema([("image_id", pa.string()), ("image", pa.binary()),
                                                   ("label", pa.int32()), ("source", pa.string())])),
                   buf, compression="none")
    storage.write_bytes(task["dst"], buf.getvalue())
    return {"path": task["dst"], "rows": len(cols["source"]), "bad": bad,
            "sha256": hashlib.sha256(buf.getvalue()).hexdigest()}


def baseline_pack(src: str, dst: str, cpus: int) -> int:
    from pipeline import storage

    files = list(storage.iter_files(src, (".jpg",)))
    prefix = len(src.rstrip("/")) + 1
    classes = sorted({f.uri[prefix:].split("/", 1)[0] for f in files})
    by_split: dict[str, list] = {"train": [], "val": [], "test": []}
    for f in files:
        h = int(hashlib.sha256(f.uri.encode()).hexdigest()[:8], 16) % 100
        split = "test" if h < 15 else ("val" if h < 30 else "train")
        by_split[split].append((f.uri, classes.index(f.uri[prefix:].split("/", 1)[0])))
    mean = sum(f.size for f in files) / max(len(files), 1)
    per_shard = max(1, int(SHARD_MB * 1e6 / max(mean, 1.0)))
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    tasks = []
    for split, rows in by_split.items():
        for k, start in enumerate(range(0, len(rows), per_shard)):
            chunk = rows[start:start + per_shard]
            tasks.append({"sources": [u for u, _ in chunk], "labels": [lab for _, lab in chunk],
                          "dst": storage.join(dst, f"{split}/part-{k:05d}.parquet"), "endpoint": endpoint})
    del files
    with get_context("spawn").Pool(cpus) as pool:
        results = list(pool.imap_unordered(_baseline_shard, tasks))
    storage.write_json(storage.join(dst, "manifest.json"), {"classes": classes, "shards": results})
    return sum(r["rows"] + r["bad"] for r in results)


# ---------------------------------------------------------------------------- main


def _source(args, n: int, s3) -> str:
    local = make_images.images(n, "small")
    if s3 is None:
        return local
    src = f"s3://bench/n{n}"
    with common.Timer() as t:
        make_images.upload(local, src, n)
    common.log(f"uploaded {n} images to moto in {t.seconds:.0f}s")
    return src


def run(args) -> list[dict]:
    from pipeline import config, shards

    sizes = args.sizes
    records = []
    s3 = common.MotoS3().__enter__() if args.s3 else None
    try:
        if s3:
            s3.bucket("bench")
        exclude = {s3.pid} if s3 else set()
        root = "s3://bench/out" if s3 else os.path.join(args.workdir, "out")
        for n in sizes:
            src = _source(args, n, s3)
            common.log(f"pack {n}: baseline (multiprocessing.Pool({args.cpus}))")
            with common.PeakRSS(exclude=exclude) as mem_b, common.Timer() as tb:
                done = baseline_pack(src, f"{root}/baseline-{n}-{time.time_ns()}", args.cpus)
            assert done == n, (done, n)
            common.log(f"pack {n}: ours (imgpipe pack on Ray, {args.cpus} CPUs)")
            with common.PeakRSS(exclude=exclude) as mem_o:
                ray_start = common.start_ray(args.cpus)
                with common.Timer() as to:
                    cfg = config.load(None, [f"ray.num_cpus={args.cpus}"])
                    summary = shards.pack(src, f"{root}/ours-{n}-{time.time_ns()}", cfg, quiet=True)
                common.stop_ray()
            assert summary["images"] + summary["bad_images"] == n, summary
            rec = {"name": f"pack_{'s3' if s3 else 'local'}_small_jpeg", "n": n,
                   "ours_images_per_second": common.rate(n, to.seconds),
                   "baseline_images_per_second": common.rate(n, tb.seconds),
                   **mem_o.result(),
                   "baseline_peak_rss_mb": mem_b.result()["peak_rss_mb"],
                   "baseline_peak_driver_rss_mb": mem_b.result()["peak_driver_rss_mb"],
                   "ours_seconds": round(to.seconds, 2), "baseline_seconds": round(tb.seconds, 2),
                   "ray_start_seconds": round(ray_start, 2),
                   "ours_cold_images_per_second": common.rate(n, to.seconds + ray_start),
                   "shards": summary["shards"], "source": "moto S3 (127.0.0.1)" if s3 else "local disk",
                   "cpus": args.cpus,
                   "baseline": f"multiprocessing.Pool({args.cpus}) x 16 download threads, PIL decode check, pyarrow"}
            records.append(common.emit(rec, args))
        if len(records) > 1:
            small = records[0]
            for r in records[1:]:
                growth = {k: round(r[k] / max(small[k], 1e-9), 2)
                          for k in ("peak_rss_mb", "peak_driver_rss_mb", "peak_workers_rss_mb",
                                    "peak_one_worker_rss_mb", "baseline_peak_rss_mb")}
                records.append(common.emit({
                    "name": f"pack_rss_growth_{small['n']}_to_{r['n']}", "n": r["n"],
                    "ours_images_per_second": r["ours_images_per_second"],
                    "baseline_images_per_second": small["ours_images_per_second"],
                    "ratio": round(r["ours_images_per_second"] / small["ours_images_per_second"], 3),
                    "peak_rss_mb": r["peak_rss_mb"], "rss_growth": growth,
                    "rss_growth_within_1_5x": all(v <= 1.5 for k, v in growth.items() if k.startswith("peak")),
                    "note": f"ours at n={r['n']} vs ours at n={small['n']} (baseline columns = the small run)"},
                    args))
    finally:
        if s3:
            s3.__exit__(None, None, None)
    return records


def main(argv=None) -> None:
    args = common.parse(common.parser(__doc__.splitlines()[0], default_n=10_000, smoke_n=300), argv)
    run(args)


if __name__ == "__main__":
    main()

"""pack: ImageFolder of small JPEGs -> Parquet shards. imgpipe's ``pack`` vs a plain script.

Ours: :func:`pipeline.data.packing.pack` (Ray Data tasks that read with threads, validate by
decoding, write one shard each; manifest last), on a local Ray instance of ``--cpus``.
Baseline: what a user would write without Ray: list the prefix with boto3, assign
splits by a hash, and a ``multiprocessing.Pool(cpus)`` that, per shard, downloads with
16 threads (boto3), validates each image with a full PIL decode, and writes the shard
with pyarrow.
Both write the same number of shards of the same size (imgpipe's ``data.shard_mb``
rule). Throughput excludes Ray's start (a cluster is usually up), which is reported
separately (``ray_start_seconds``, ``ours_cold_images_per_second``).

Peak RSS (driver, Ray workers, whole tree) is measured per size; with several sizes
(``--n 10000,100000``) a second line per size compares it with the smallest size.

    python benchmarks/pack.py --s3                    # 10k small JPEGs from moto S3
    python benchmarks/pack.py --s3 --n 10000,50000 --ours-only   # RSS growth (long)
    python benchmarks/pack.py --s3 --shard-rows 1000  # more, smaller shards (both sides)
    python benchmarks/pack.py --smoke
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import make_images  # noqa: E402

SHARD_MB = 128.0  # imgpipe's default data.shard_mb


# ------------------------------------------------------------------------ baseline


STORE = common.PlainStore()


def _baseline_shard(task: dict) -> dict:
    """One shard: download (16 threads), validate by decoding, write with pyarrow."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    with ThreadPoolExecutor(16) as pool:
        blobs = list(pool.map(STORE.get, task["sources"]))
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
    STORE.put(task["dst"], buf.getvalue())
    return {"path": task["dst"], "rows": len(cols["source"]), "bad": bad,
            "sha256": hashlib.sha256(buf.getvalue()).hexdigest()}


def baseline_pack(src: str, dst: str, cpus: int, shard_rows: int = 0) -> int:
    import json
    from multiprocessing import Pool

    src = src.rstrip("/")
    files = STORE.list(src)
    classes = sorted({u[len(src) + 1:].split("/", 1)[0] for u, _ in files})
    by_split: dict[str, list] = {"train": [], "val": [], "test": []}
    for u, _ in files:
        h = int(hashlib.sha256(u.encode()).hexdigest()[:8], 16) % 100
        split = "test" if h < 15 else ("val" if h < 30 else "train")
        by_split[split].append((u, classes.index(u[len(src) + 1:].split("/", 1)[0])))
    mean = sum(size for _, size in files) / max(len(files), 1)
    per_shard = shard_rows or max(1, int(SHARD_MB * 1e6 / max(mean, 1.0)))  # imgpipe's rule: same shards
    tasks = []
    for split, rows in by_split.items():
        for k, start in enumerate(range(0, len(rows), per_shard)):
            chunk = rows[start:start + per_shard]
            tasks.append({"sources": [u for u, _ in chunk], "labels": [lab for _, lab in chunk],
                          "dst": f"{dst}/{split}/part-{k:05d}.parquet"})
    del files
    with Pool(cpus) as pool:
        results = list(pool.imap_unordered(_baseline_shard, tasks))
    STORE.put(f"{dst}/manifest.json", json.dumps({"classes": classes, "shards": results}).encode())
    return sum(r["rows"] + r["bad"] for r in results)


# ---------------------------------------------------------------------------- main


def work(side: str, args, state: dict):
    """One side, in a child process (see common.compare)."""
    if side == "baseline":
        return baseline_pack(state["src"], f"{state['dst']}-{state['run_id']}", args.cpus, args.shard_rows)
    from pipeline import config
    from pipeline.data import packing

    cfg = config.load(None, [f"ray.num_cpus={args.cpus}", f"data.shard_rows={args.shard_rows}"])
    summary = packing.pack(state["src"], f"{state['dst']}-{state['run_id']}", cfg, quiet=True)
    assert not summary["already_committed"], summary
    return summary["images"] + summary["bad_images"], {"shards": summary["shards"]}


def _source(n: int, s3) -> str:
    local = make_images.images(n, "small")
    if s3 is None:
        return local
    src = f"s3://bench/n{n}"
    with common.Timer() as t:
        make_images.upload(local, src, n)
    common.log(f"uploaded {n} images to moto in {t.seconds:.0f}s")
    return src


def run(args) -> list[dict]:
    records = []
    s3 = common.MotoS3().__enter__() if args.s3 else None
    try:
        if s3:
            s3.bucket("bench")
        root = "s3://bench/out" if s3 else os.path.join(args.workdir, "out")
        for n in args.sizes:
            src = _source(n, s3)
            res = common.compare(args, {"src": src, "dst": f"{root}/{n}-{time.time_ns()}"}, label=f"pack {n}")
            assert res["images_ours"] == n and res.get("images_baseline", n) == n, res
            rec = {"name": f"pack_{'s3' if s3 else 'local'}_small_jpeg", "n": n, **res,
                   "source": "moto S3 (127.0.0.1)" if s3 else "local disk", "cpus": args.cpus,
                   "shard_rows": args.shard_rows or "auto (128 MB)",
                   "baseline": f"boto3 listing; multiprocessing.Pool({args.cpus}) x 16 boto3 download threads, PIL decode check, pyarrow"}
            records.append(common.emit(rec, args))
        if len(records) > 1:
            small = records[0]
            for r in records[1:]:
                growth = {k: round(r[k] / max(small[k], 1e-9), 2)
                          for k in ("peak_rss_mb", "peak_driver_rss_mb", "peak_workers_rss_mb",
                                    "peak_one_worker_rss_mb", "baseline_peak_rss_mb") if r.get(k) is not None}
                records.append(common.emit({
                    "name": f"pack_rss_growth_{small['n']}_to_{r['n']}", "n": r["n"],
                    "ours_images_per_second": r["ours_images_per_second"],
                    "baseline_images_per_second": small["ours_images_per_second"],
                    "ratio": round(r["ours_images_per_second"] / small["ours_images_per_second"], 3),
                    "peak_rss_mb": r["peak_rss_mb"], "rss_growth": growth,
                    "rss_growth_within_1_5x": all(v <= 1.5 for k, v in growth.items() if k.startswith("peak")),
                    "note": f"ours at n={r['n']} vs ours at n={small['n']} (baseline_images_per_second = "
                            "ours at the small size; rss_growth = peak here / peak at the small size)"},
                    args))
    finally:
        if s3:
            s3.__exit__(None, None, None)
    return records


def main(argv=None) -> None:
    p = common.parser(__doc__.splitlines()[0], default_n=10_000, smoke_n=300)
    p.add_argument("--shard-rows", type=int, default=0,
                   help="rows per shard, both sides (default 0: imgpipe's 128 MB rule)")
    args = common.parse(p, argv)
    if args.side:
        common.child(args, work)
        return
    run(args)


if __name__ == "__main__":
    main()

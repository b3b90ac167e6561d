"""s3_get: small-object GETs from moto S3 in one process. imgpipe's storage vs boto3.

Explains ``pack.py --s3``: ours reads through :func:`pipeline.storage.read_bytes`
(s3fs: every call goes through fsspec's one event-loop thread, plus imgpipe's retry
wrapper); the baseline calls boto3's ``get_object``. Both with 16 threads in one
process, over the same small JPEGs on a moto server on 127.0.0.1, alternating
(``--repeat``, median). No Ray involved. When ``pipeline.storage`` has ``read_many``,
a third side reads the same objects with it, ``--batch`` URIs a call (as ``pack``'s
``write_shard`` does; the GETs run concurrently on s3fs' event loop, no threads), and a
second record compares it with the same boto3 runs.

    python benchmarks/s3_get.py --n 2000 --repeat 3
    python benchmarks/s3_get.py --smoke
"""

from __future__ import annotations

import os
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import make_images  # noqa: E402

THREADS = 16  # as pipeline.shards.READ_THREADS and predict's read tasks
BATCH = 256  # URIs per storage.read_many call (pipeline.shards.READ_BATCH)


def _read_many_all(uris: list[str], batch: int) -> int:
    from pipeline import storage

    total = 0
    for start in range(0, len(uris), batch):
        for blob in storage.read_many(uris[start:start + batch]):
            if isinstance(blob, Exception):
                raise blob
            total += len(blob)
    return total


def main(argv=None) -> None:
    p = common.parser(__doc__.splitlines()[0], default_n=2000, smoke_n=200)
    p.add_argument("--batch", type=int, default=BATCH, help="URIs per storage.read_many call")
    args = common.parse(p, argv)
    local = make_images.images(args.n, "small")
    with common.MotoS3() as s3:
        s3.bucket("bench")
        make_images.upload(local, "s3://bench/x", args.n)
        from pipeline import storage

        uris = [f.uri for f in storage.iter_files("s3://bench/x")]
        plain = common.PlainStore()
        batched = hasattr(storage, "read_many")
        rates: dict[str, list[float]] = {"ours": [], "baseline": [], "read_many": []}
        with common.PeakRSS(exclude={s3.pid}) as mem:
            for _ in range(args.repeat):
                for side, fn in (("baseline", plain.get), ("ours", storage.read_bytes)):
                    with common.Timer() as t, ThreadPoolExecutor(THREADS) as pool:
                        total = sum(len(b) for b in pool.map(fn, uris))
                    assert total > 0
                    rates[side].append(common.rate(len(uris), t.seconds))
                if batched:
                    with common.Timer() as t:
                        assert _read_many_all(uris, args.batch) == total
                    rates["read_many"].append(common.rate(len(uris), t.seconds))
    common.emit({"name": "s3_get_small_objects_1_process", "n": args.n, "threads": THREADS,
                 "ours_images_per_second": statistics.median(rates["ours"]),
                 "baseline_images_per_second": statistics.median(rates["baseline"]),
                 "ours_runs": rates["ours"], "baseline_runs": rates["baseline"], "repeat": args.repeat,
                 **mem.result(), "ours": "pipeline.storage.read_bytes (s3fs)", "baseline": "boto3 get_object"},
                args)
    if rates["read_many"]:
        common.emit({"name": "s3_get_small_objects_read_many", "n": args.n, "batch": args.batch,
                     "concurrency": storage.READ_MANY_CONCURRENCY,
                     "ours_images_per_second": statistics.median(rates["read_many"]),
                     "baseline_images_per_second": statistics.median(rates["baseline"]),
                     "ours_runs": rates["read_many"], "baseline_runs": rates["baseline"],
                     "read_bytes_16_threads_images_per_second": statistics.median(rates["ours"]),
                     "repeat": args.repeat, **mem.result(),
                     "ours": f"pipeline.storage.read_many, {args.batch} URIs a call, no threads (one process)",
                     "baseline": f"boto3 get_object, {THREADS} threads",
                     "note": "same run as the s3_get_small_objects_1_process record just before; "
                             "the three sides alternate within each repeat"},
                    args)


if __name__ == "__main__":
    main()

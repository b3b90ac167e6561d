"""s3_get: small-object GETs from moto S3 in one process. imgpipe's storage vs boto3.

Explains ``pack.py --s3``: ours reads through :func:`pipeline.storage.read_bytes`
(s3fs: every call goes through fsspec's one event-loop thread, plus imgpipe's retry
wrapper); the baseline calls boto3's ``get_object``. Both with 16 threads in one
process, over the same small JPEGs on a moto server on 127.0.0.1, alternating
(``--repeat``, median). No Ray involved. When ``pipeline.storage`` has ``read_many``,
a third side reads the same objects with it, ``--batch`` URIs a call (as ``pack``'s
``write_shard`` does; the GETs run concurrently on s3fs' event loop, no threads), and a
second record compares it with the same boto3 runs.

Wall-clock rates swing with the machine's load; each record also carries the CPU time
per object (median over repeats) of this process (the client) and of the moto server,
which a loaded machine disturbs far less: ``cpu_ms_per_object``.

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

THREADS = 16  # as pipeline.data.packing.READ_THREADS and predict's read tasks
BATCH = 256  # URIs per storage.read_many call (pipeline.data.packing.READ_BATCH)


class CPU:
    """CPU seconds (user + system) this process and the moto server spend in a block."""

    def __init__(self, server_pid: int) -> None:
        psutil = common._psutil()
        self.me, self.server = psutil.Process(), psutil.Process(server_pid)

    @staticmethod
    def _cpu(p) -> float:
        t = p.cpu_times()
        return t.user + t.system

    def __enter__(self) -> CPU:
        self.c0, self.s0 = self._cpu(self.me), self._cpu(self.server)
        return self

    def __exit__(self, *exc) -> None:
        self.client, self.server_s = self._cpu(self.me) - self.c0, self._cpu(self.server) - self.s0


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
        cpu_ms: dict[str, dict[str, list[float]]] = {k: {"client": [], "server": []} for k in rates}

        def took(side: str, t: common.Timer, cpu: CPU) -> None:
            rates[side].append(common.rate(len(uris), t.seconds))
            cpu_ms[side]["client"].append(round(1000 * cpu.client / len(uris), 3))
            cpu_ms[side]["server"].append(round(1000 * cpu.server_s / len(uris), 3))

        with common.PeakRSS(exclude={s3.pid}) as mem:
            for _ in range(args.repeat):
                for side, fn in (("baseline", plain.get), ("ours", storage.read_bytes)):
                    with CPU(s3.pid) as cpu, common.Timer() as t, ThreadPoolExecutor(THREADS) as pool:
                        total = sum(len(b) for b in pool.map(fn, uris))
                    assert total > 0
                    took(side, t, cpu)
                if batched:
                    with CPU(s3.pid) as cpu, common.Timer() as t:
                        assert _read_many_all(uris, args.batch) == total
                    took("read_many", t, cpu)
        cpu_med = {side: {k: statistics.median(v) for k, v in d.items()} for side, d in cpu_ms.items() if d["client"]}
    common.emit({"name": "s3_get_small_objects_1_process", "n": args.n, "threads": THREADS,
                 "ours_images_per_second": statistics.median(rates["ours"]),
                 "baseline_images_per_second": statistics.median(rates["baseline"]),
                 "ours_runs": rates["ours"], "baseline_runs": rates["baseline"], "repeat": args.repeat,
                 **mem.result(), "ours": "pipeline.storage.read_bytes (s3fs)", "baseline": "boto3 get_object",
                 "cpu_ms_per_object": {"ours": cpu_med["ours"], "baseline": cpu_med["baseline"]},
                 "cpu_ms_per_object_runs": {"ours": cpu_ms["ours"], "baseline": cpu_ms["baseline"]}},
                args)
    if rates["read_many"]:
        common.emit({"name": "s3_get_small_objects_read_many", "n": args.n, "batch": args.batch,
                     "concurrency": storage.READ_MANY_CONCURRENCY,
                     "ours_images_per_second": statistics.median(rates["read_many"]),
                     "baseline_images_per_second": statistics.median(rates["baseline"]),
                     "ours_runs": rates["read_many"], "baseline_runs": rates["baseline"],
                     "read_bytes_16_threads_images_per_second": statistics.median(rates["ours"]),
                     "repeat": args.repeat, **mem.result(),
                     "cpu_ms_per_object": {"ours": cpu_med["read_many"], "baseline": cpu_med["baseline"],
                                           "read_bytes_16_threads": cpu_med["ours"]},
                     "cpu_ms_per_object_runs": {"ours": cpu_ms["read_many"], "baseline": cpu_ms["baseline"]},
                     "ours": f"pipeline.storage.read_many, {args.batch} URIs a call, no threads (one process)",
                     "baseline": f"boto3 get_object, {THREADS} threads",
                     "note": "same run as the s3_get_small_objects_1_process record just before; "
                             "the three sides alternate within each repeat"},
                    args)


if __name__ == "__main__":
    main()

"""scaling: throughput vs number of actors, and peak RSS vs dataset size (ours only).

1. Actors: the ingest pipeline of ``benchmarks/ingest.py`` (shards -> ``AugmentBatch``
   actor pool -> iterator) with 1, 2, 4, ... actors up to ``--max-actors`` (default
   2 x cores) on one local Ray instance; each line's baseline is the 1-actor rate, so
   ``ratio`` is the speed-up. Actors share ``cpus - 0.2`` logical CPUs. No local
   shuffle window here (it would hold the first batch back), so each pass's
   ``seconds_to_first_batch`` shows the actor pool's start-up.
2. Memory: :func:`pipeline.inference.predict.run` (small CNN, 32x32 JPEGs) at each size of
   ``--n`` (default 10,000 and 100,000), a fresh Ray instance each; peak RSS of the
   driver, the Ray workers and the whole process tree. A streaming pipeline should
   stay flat: the line for the larger size gives its growth over the smallest
   (``rss_growth``, target within 1.5x); its baseline is the smallest size's rate.

    python benchmarks/scaling.py                    # both parts, CPU (< 10 min on 2 cores)
    python benchmarks/scaling.py --part actors --actor-images 2000 --epochs 2
    python benchmarks/scaling.py --gpu              # 16 cores: 1..16 actors, 500x375 JPEGs
    python benchmarks/scaling.py --smoke
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import ingest  # noqa: E402
import make_images  # noqa: E402
import predict as predict_bench  # noqa: E402


def actors_part(args, size_kind: str, n: int) -> None:
    from pipeline import config
    from pipeline.data import packing, shardset

    acfg, size = ingest.augment_config(size_kind)
    root = make_images.images(n, size_kind)
    dst = os.path.join(args.workdir, f"shards-{size_kind}-{n}")
    counts = []
    k = 1
    while k <= args.max_actors:
        counts.append(k)
        k *= 2
    common.start_ray(args.cpus)
    try:
        packing.pack(root, dst, config.load(None, [f"ray.num_cpus={args.cpus}", "data.shard_rows=100"]), quiet=True)
        manifest = shardset.read_manifest(dst)
        first = None
        for k in counts:
            timing: dict = {}
            with common.PeakRSS() as mem, common.Timer() as t:
                done = ingest.ours_ingest(manifest, acfg, size, args.cpus, k, 128 if size_kind == "large" else 256,
                                          args.epochs, timing, shuffle_buffer=None)
            r = common.rate(done, t.seconds)
            first = first or r
            common.log(f"actors={k}: {r} img/s, first batch after {timing['first_batch_s']} s")
            common.emit({"name": f"scaling_ingest_{size_kind}_actors_{k}", "n": n, "actors": k,
                         "ours_images_per_second": r, "baseline_images_per_second": first,
                         "ratio": round(r / first, 3),
                         "seconds_to_first_batch": [round(x, 2) for x in timing["first_batch_s"]],
                         **mem.result(), "epochs": args.epochs, "cpus": args.cpus, "shard_rows": 100,
                         "note": "baseline = the same pipeline with 1 actor (ratio = speed-up); "
                                 "seconds_to_first_batch per pass: actor start-up"}, args)
    finally:
        common.stop_ray()


def _predict_config(args) -> list[str]:
    sets = [f"ray.num_cpus={args.cpus}"]
    if args.gpu:
        sets += ["predict.num_gpus=1", f"predict.decode_actors={max(1, args.cpus - 2)}"]
    return sets


def work(side: str, args, state: dict):
    """The memory part's run at one size, in a child process (see common.run_side)."""
    from pipeline import config
    from pipeline.inference import predict

    s = predict.run(state["model"], state["src"], state["dst"], config.load(None, _predict_config(args)), quiet=True)
    return s["rows"] + s["errors"]


def memory_part(args, sizes: list[int]) -> None:
    arch, img, preset, kind = ("resnet50", 224, "imagenet", "large") if args.gpu else ("smallcnn", 32, "digits", "small")
    model_uri = predict_bench.make_model(args.workdir, arch, img, preset)
    first = None
    for n in sizes:
        src = make_images.images(n, kind)
        common.log(f"predict {n} images (ours, fresh Ray instance in a child process)")
        r = common.run_side(args, "ours", {"model": model_uri, "src": src,
                                           "dst": os.path.join(args.workdir, f"pred-{n}-{time.time_ns()}")})
        assert r["images"] == n, r
        rec = {"n": n, "ours_images_per_second": common.rate(n, r["seconds"]), **r["mem"],
               "ray_start_seconds": round(r["ray_start"], 2), "model": arch, "cpus": args.cpus,
               "ours_config": _predict_config(args)}
        if first is None:
            first = rec
            out = {"name": f"scaling_predict_{arch}_rss_n{n}", **rec, "baseline_images_per_second": None,
                   "ratio": None, "note": "reference size"}
        else:
            growth = {k: round(rec[k] / max(first[k], 1e-9), 2) for k in
                      ("peak_rss_mb", "peak_driver_rss_mb", "peak_workers_rss_mb", "peak_one_worker_rss_mb")}
            out = {"name": f"scaling_predict_{arch}_rss_n{n}", **rec,
                   "baseline_images_per_second": first["ours_images_per_second"],
                   "ratio": round(rec["ours_images_per_second"] / first["ours_images_per_second"], 3),
                   "rss_growth": growth, "rss_growth_within_1_5x": all(v <= 1.5 for v in growth.values()),
                   "note": f"baseline = ours at n={first['n']}; rss_growth = peak RSS here / at n={first['n']}"}
        common.emit(out, args)


def main(argv=None) -> None:
    p = common.parser(__doc__.splitlines()[0], default_n=0, smoke_n=0)
    p.add_argument("--part", choices=["actors", "memory", "both"], default="both")
    p.add_argument("--size", choices=["large", "small"], default=None,
                   help="images of the actors part (default large; --smoke small)")
    p.add_argument("--actor-images", type=int, default=None, help="images of the actors part (default 2000; --gpu 20000)")
    p.add_argument("--max-actors", type=int, default=None, help="default 2 x cores")
    p.add_argument("--epochs", type=int, default=1)
    args = common.parse(p, argv)
    if args.side:
        common.child(args, work)
        return
    if args.sizes == [0]:  # --n not given: the memory part's sizes
        args.sizes = [100, 200] if args.smoke else ([20_000, 200_000] if args.gpu else [10_000, 100_000])
    args.max_actors = args.max_actors or (2 if args.smoke else 2 * args.cpus)
    size_kind = args.size or ("small" if args.smoke else "large")
    actor_images = args.actor_images or (100 if args.smoke else (20_000 if args.gpu else 2000))
    if args.part in ("actors", "both"):
        actors_part(args, size_kind, actor_images)
    if args.part in ("memory", "both"):
        memory_part(args, args.sizes)


if __name__ == "__main__":
    main()

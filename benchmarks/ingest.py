"""ingest: decode + train-time augmentation feeding an iterator. Ray Data vs DataLoader.

Ours: what ``imgpipe train`` builds for one rank, consumed by the driver: the packed
shards (:func:`pipeline.data.stream.train_stream`, sha256-verified, one stream for all
passes) ->
:class:`pipeline.transforms.AugmentBatch` in an actor pool (decode + ``TrainPreset``,
uint8 out) -> ``iter_batches`` -> torch tensors. ``--actors`` actors (default: one per
core) share the cores with the 0.2-CPU read task, so each holds ``(cpus - 0.2) / actors``
logical CPUs; ``--actors 1`` is ``imgpipe train``'s default pool.
Baseline: ``torch.utils.data.DataLoader(num_workers=cpus)`` over the same images as
files (ImageFolder layout), with the same decode (:func:`pipeline.transforms.decode_tensor`)
and the same ``TrainPreset``; batches of the same size, shuffled.

Sizes: ``--size large`` (default): 500x375 JPEGs, ImageNet recipe (RandomResizedCrop 224
+ flip); ``--size small``: 32x32 JPEGs, the digits recipe (resize 32, pad-3 random crop,
rotation 10). Throughput is over ``--epochs`` passes (default 2) and excludes packing
and Ray's start (reported apart). Each side's ``seconds_to_first_batch`` and
``seconds_per_pass`` are in ``ours_extra`` / ``baseline_extra``; ours' first pass
includes the actors' start-up, later passes do not (the stream lives for the run).

    python benchmarks/ingest.py                       # 2,000 large JPEGs, all cores
    python benchmarks/ingest.py --size small --n 20000
    python benchmarks/ingest.py --gpu --n 20000       # lent H100: 16 cores (no GPU work)
    python benchmarks/ingest.py --smoke
"""

from __future__ import annotations

import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import make_images  # noqa: E402

READ_CPUS = 0.2  # pipeline.ops.runtime.READ_TASK_CPUS


def augment_config(size_kind: str):
    from pipeline.config import AugmentConfig

    if size_kind == "large":
        return AugmentConfig(preset="imagenet", hflip=True, rotation=0.0), 224
    return AugmentConfig(), 32


class FolderDataset:
    """ImageFolder-style: (uint8 CHW augmented image, label) per file."""

    def __init__(self, root: str, acfg, size: int) -> None:
        self.files = []
        for c, name in enumerate(sorted(d for d in os.listdir(root) if not d.startswith("."))):
            for f in sorted(os.listdir(os.path.join(root, name))):
                self.files.append((os.path.join(root, name, f), c))
        self.acfg, self.size, self.transform = acfg, size, None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from pipeline.transforms import TrainPreset, decode_tensor

        if self.transform is None:
            self.transform = TrainPreset(self.acfg, self.size)
        path, label = self.files[i]
        with open(path, "rb") as f:
            return self.transform(decode_tensor(f.read())), label


def baseline_ingest(root: str, acfg, size: int, cpus: int, batch: int, epochs: int, train_ids: set[str],
                    timing: dict | None = None) -> int:
    import time

    import torch
    from torch.utils.data import DataLoader, Subset

    ds = FolderDataset(root, acfg, size)
    keep = [i for i, (p, _) in enumerate(ds.files) if os.path.relpath(p, root) in train_ids]
    loader = DataLoader(Subset(ds, keep), batch_size=batch, shuffle=True, num_workers=cpus,
                        persistent_workers=False, prefetch_factor=4)
    n = 0
    for _ in range(epochs):
        t0 = time.perf_counter()
        first = True
        for x, y in loader:
            assert x.dtype == torch.uint8
            if first and timing is not None:
                timing.setdefault("first_batch_s", []).append(time.perf_counter() - t0)
                timing.setdefault("first_batch_n", []).append(len(y))
                first = False
            n += len(y)
        if timing is not None:
            timing.setdefault("pass_s", []).append(time.perf_counter() - t0)
    return n


def ours_ingest(manifest, acfg, size: int, cpus: int, actors: int, batch: int, epochs: int,
                timing: dict | None = None, shuffle_buffer: int | None = None) -> int:
    """Stream ``epochs`` passes as ``imgpipe train`` does for one rank: one ordered
    stream over all epochs (:func:`pipeline.data.stream.train_stream`, its read tasks
    and augment actors started once), cut into batches per epoch. ``timing`` gets each
    pass's seconds and the seconds to its first batch. ``shuffle_buffer`` is ignored
    (kept for callers): the training order needs no shuffle window."""
    import time

    import ray.data
    import torch

    from pipeline import transforms as augment
    from pipeline.data import stream

    ds = stream.train_stream(manifest, 0, 0, 1, 0, epochs)
    ds = ds.map_batches(augment.AugmentBatch,
                        fn_constructor_kwargs={"cfg": dataclasses.asdict(acfg), "size": size, "seed": 0},
                        compute=ray.data.ActorPoolStrategy(size=actors),
                        num_cpus=round((cpus - READ_CPUS) / actors, 2), batch_size=acfg.batch_size)
    n, current = 0, None
    t_start = t_last = time.perf_counter()  # this pass's start: the previous pass's last batch
    blocks = stream.ordered(ds).iter_batches(batch_size=None, batch_format="numpy")
    for epoch, b in stream.epoch_batches(blocks, batch):
        x = torch.from_numpy(b["image"])
        assert x.dtype == torch.uint8
        if epoch != current:
            if current is not None and timing is not None:
                timing.setdefault("pass_s", []).append(t_last - t_start)
            current, t_start = epoch, t_last
            if timing is not None:
                timing.setdefault("first_batch_s", []).append(time.perf_counter() - t_start)
                timing.setdefault("first_batch_n", []).append(len(x))
        n += len(x)
        t_last = time.perf_counter()
    if timing is not None:
        timing.setdefault("pass_s", []).append(t_last - t_start)
    return n


def _settings(args):
    size_kind = args.size or ("small" if args.smoke else "large")
    batch = args.batch or (128 if size_kind == "large" else 256)
    return size_kind, batch, args.actors or args.cpus


def work(side: str, args, state: dict):
    """One side, in a child process (see common.compare)."""
    size_kind, batch, actors = _settings(args)
    acfg, size = augment_config(size_kind)
    timing: dict = {}
    if side == "baseline":
        n = baseline_ingest(state["root"], acfg, size, args.cpus, batch, args.epochs, set(state["train_ids"]), timing)
    else:
        from pipeline.data import shardset

        n = ours_ingest(shardset.read_manifest(state["dst"]), acfg, size, args.cpus, actors, batch, args.epochs, timing,
                        shuffle_buffer=args.shuffle_buffer)
    return n, {"seconds_to_first_batch": [round(x, 2) for x in timing["first_batch_s"]],
               "seconds_per_pass": [round(x, 2) for x in timing["pass_s"]]}


def main(argv=None) -> None:
    p = common.parser(__doc__.splitlines()[0], default_n=2000, smoke_n=300)
    p.add_argument("--size", choices=["large", "small"], default=None, help="default: large (--smoke: small)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch", type=int, default=None, help="default 256 (large: 128)")
    p.add_argument("--actors", type=int, default=None, help="augment actors (default: cpus)")
    p.add_argument("--shuffle-buffer", type=int, default=None,
                   help="ours' local shuffle window in rows (default: data.shuffle_buffer; 0: none)")
    p.add_argument("--shard-rows", type=int, default=None,
                   help="rows per packed shard (default: large 100, small 1000): blocks the actors share")
    args = common.parse(p, argv)
    if args.side:
        common.child(args, work)
        return
    from pipeline import config
    from pipeline.data import packing, shardset

    size_kind, batch, actors = _settings(args)
    acfg, size = augment_config(size_kind)
    root = make_images.images(args.n, size_kind)
    # pack once (not timed). Each shard is one block of the stream, so enough shards to
    # keep every actor busy (imgpipe's default 128 MB shards would give one block here)
    shard_rows = args.shard_rows or (100 if size_kind == "large" else 1000)
    dst = os.path.join(args.workdir, "shards")
    common.start_ray(args.cpus)
    packing.pack(root, dst, config.load(None, [f"ray.num_cpus={args.cpus}", f"data.shard_rows={shard_rows}"]),
                quiet=True)
    common.stop_ray()
    manifest = shardset.read_manifest(dst)
    train_ids = []
    for t in shardset.iter_split(manifest, "train", columns=["source"]):
        train_ids += [os.path.relpath(s, root) for s in t.column("source").to_pylist()]
    res = common.compare(args, {"root": root, "dst": dst, "train_ids": train_ids},
                         label=f"ingest {size_kind} {len(train_ids)}x{args.epochs}")
    assert res["images_ours"] == len(train_ids) * args.epochs == res.get("images_baseline", res["images_ours"]), res
    common.emit({"name": f"ingest_{size_kind}_jpeg_{acfg.preset}", "n": args.n, "train_images": len(train_ids),
                 "epochs": args.epochs, **res, "batch_size": batch,
                 "shuffle_buffer": config.DataConfig().shuffle_buffer if args.shuffle_buffer is None else args.shuffle_buffer,
                 "shard_rows": shard_rows, "actors": actors, "cpus": args.cpus,
                 "image_size": size, "ours": f"read_split -> AugmentBatch x {actors} actors -> iter_batches",
                 "baseline": f"DataLoader(num_workers={args.cpus}, shuffle=True) over the files, same decode + TrainPreset"},
                args)


if __name__ == "__main__":
    main()

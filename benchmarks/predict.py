"""predict: stored JPEGs -> predictions Parquet. imgpipe's ``predict`` vs plain PyTorch.

Ours: :func:`pipeline.inference.predict.run` (Ray Data: read tasks -> decode actor pool -> model
actor pool -> Parquet writer tasks, exactly-once commit, report) with the default
config on a local Ray instance of ``--cpus`` CPUs (``--set k=v`` overrides ours).
Baseline: what a user would write: a ``torch.utils.data.DataLoader`` with
``num_workers=cpus`` workers that read + sha256 + decode + the same eval transform,
the same model in the main process (torch's default threads), and a
``pyarrow.parquet.ParquetWriter`` with the same columns. Same images, same model
weights, same cores. Throughput excludes Ray's start (reported apart).

CPU mode (default): 20k 32x32 JPEGs, the small CNN. GPU mode (``--gpu``): ResNet-50 on
500x375 JPEGs (eval: resize 256 + center crop 224), bf16, channels_last, batch 256,
``predict.num_gpus=1`` and ``cpus - 2`` decode actors; the baseline moves batches to the
GPU the same way (pinned memory, bf16 autocast, channels_last).

    python benchmarks/predict.py                       # 20k small JPEGs, local disk
    python benchmarks/predict.py --s3 --n 5000         # from moto S3
    python benchmarks/predict.py --gpu --n 20000       # lent H100
    python benchmarks/predict.py --smoke
"""

from __future__ import annotations

import hashlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import make_images  # noqa: E402

CLASSES = [f"c{i:02d}" for i in range(10)]
STORE = common.PlainStore()  # boto3 / files: what the baseline reads with


def make_model(workdir: str, arch: str, size: int, preset: str) -> str:
    """A model artifact with random weights (throughput does not depend on them)."""
    import torch

    from pipeline.models import artifact
    from pipeline.models import zoo as models

    torch.manual_seed(0)
    model = models.build_model(arch, len(CLASSES))
    uri = os.path.join(workdir, f"model-{arch}")
    mean, std = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]) if preset == "imagenet" else ([0.5] * 3, [0.5] * 3)
    artifact.save(uri, model.state_dict(), {"arch": arch, "classes": CLASSES, "image_size": size, "mean": mean,
                                            "std": std, "eval_preset": preset})
    return uri


# ------------------------------------------------------------------------ baseline


class FilesDataset:
    """(sha256 id, uint8 CHW image) of each file: read, hash, decode, eval transform."""

    def __init__(self, uris: list[str], size: int, preset: str) -> None:
        self.uris, self.size, self.preset = uris, size, preset
        self.transform = None

    def __len__(self) -> int:
        return len(self.uris)

    def __getitem__(self, i: int):
        import torch

        from pipeline.config import AugmentConfig
        from pipeline.transforms import EvalTransform

        if self.transform is None:
            self.transform = EvalTransform(AugmentConfig(preset=self.preset), self.size)
        data = STORE.get(self.uris[i])
        return hashlib.sha256(data).hexdigest(), torch.from_numpy(self.transform.one(data))


def _collate(items):
    import torch

    return [i for i, _ in items], torch.stack([x for _, x in items])


def baseline_predict(uris: list[str], dst: str, model_uri: str, cpus: int, gpu: bool, batch_size: int) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from torch.utils.data import DataLoader

    from pipeline.inference.predict import PRED_SCHEMA
    from pipeline.models import artifact
    from pipeline.models import zoo as models
    from pipeline.transforms import to_input

    art = artifact.load(model_uri)
    meta = art.meta
    device = torch.device("cuda" if gpu else "cpu")
    model = models.build_model(meta["arch"], len(meta["classes"]))
    model.load_state_dict(art.state_dict)
    model.eval().to(device)
    if gpu:
        model = model.to(memory_format=torch.channels_last)
    loader = DataLoader(FilesDataset(uris, meta["image_size"], meta["eval_preset"]), batch_size=batch_size,
                        num_workers=cpus, collate_fn=_collate, pin_memory=gpu, persistent_workers=False,
                        prefetch_factor=4)
    os.makedirs(dst, exist_ok=True)
    writer = pq.ParquetWriter(os.path.join(dst, "part-00000.parquet"), PRED_SCHEMA)
    k, n, pos = 5, 0, 0
    for ids, images in loader:
        x = to_input(images, meta["mean"], meta["std"], device, channels_last=gpu)
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
            probs = torch.softmax(model(x).float(), dim=1)
        s, lab = (t.cpu() for t in probs.topk(k, dim=1))
        m = len(ids)
        srcs = uris[pos:pos + m]
        pos += m
        writer.write_table(pa.table({
            "image_id": ids, "source": srcs, "label": lab[:, 0].int().numpy(),
            "label_name": [meta["classes"][i] for i in lab[:, 0].tolist()], "score": s[:, 0].numpy(),
            "topk_labels": lab.int().tolist(), "topk_scores": s.tolist(),
            "model": [model_uri] * m, "run_id": ["baseline"] * m}, schema=PRED_SCHEMA))
        n += m
    writer.close()
    return n


# ---------------------------------------------------------------------------- main


def _ours_config(args) -> list[str]:
    sets = [f"ray.num_cpus={args.cpus}", "predict.batch_size=256"]
    if args.gpu:
        sets += ["predict.num_gpus=1", f"predict.decode_actors={max(1, args.cpus - 2)}"]
        if args.gpu_decode:
            sets.append("predict.gpu_decode=true")
    return sets + args.overrides


def _threads(args) -> str:
    return f"torch.set_num_threads({args.baseline_threads})" if args.baseline_threads else "torch default threads"


def work(side: str, args, state: dict):
    """One side, in a child process (see common.compare)."""
    dst = f"{state['dst']}-{state['run_id']}"
    if side == "baseline":
        if args.baseline_threads:
            import torch

            torch.set_num_threads(args.baseline_threads)
        uris = [u for u, _ in STORE.list(state["src"])]
        return baseline_predict(uris, dst, state["model"], args.cpus, args.gpu, 256)
    from pipeline import config
    from pipeline.inference import predict

    summary = predict.run(state["model"], state["src"], dst, config.load(None, _ours_config(args)), quiet=True)
    return summary["rows"] + summary["errors"], {"reported_images_per_second": summary["images_per_second"]}


def main(argv=None) -> None:
    p = common.parser(__doc__.splitlines()[0], default_n=20_000, smoke_n=500)
    p.add_argument("--baseline-threads", type=int, default=None,
                   help="torch.set_num_threads in the baseline's main process (default: torch's default)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="config override for ours (repeatable), e.g. predict.decode_actors=2")
    p.add_argument("--gpu-decode", action="store_true", help="GPU mode: also set predict.gpu_decode=true")
    args = common.parse(p, argv)
    if args.side:
        common.child(args, work)
        return
    from pipeline import config

    config.load(None, _ours_config(args))  # fails fast on a bad --set
    size_kind = "large" if args.gpu else "small"
    arch, img, preset = ("resnet50", 224, "imagenet") if args.gpu else ("smallcnn", 32, "digits")
    local = make_images.images(args.n, size_kind)
    model_uri = make_model(args.workdir, arch, img, preset)
    s3 = common.MotoS3().__enter__() if args.s3 else None
    try:
        src, dst = local, os.path.join(args.workdir, "pred")
        if s3:
            s3.bucket("bench")
            src, dst = "s3://bench/images", "s3://bench/pred"
            make_images.upload(local, src, args.n)
        res = common.compare(args, {"src": src, "dst": dst, "model": model_uri}, label=f"predict {args.n}")
    finally:
        if s3:
            s3.__exit__(None, None, None)
    assert res["images_ours"] == args.n and res.get("images_baseline", args.n) == args.n, res
    common.emit({"name": f"predict_{arch}_{'s3' if s3 else 'local'}_{size_kind}_jpeg", "n": args.n, **res,
                 "ours_config": _ours_config(args), "model": arch, "image_size": img, "batch_size": 256,
                 "cpus": args.cpus,
                 "baseline": f"DataLoader(num_workers={args.cpus}) read+sha256+decode+EvalPreset, "
                             f"model in main process ({'cuda bf16' if args.gpu else _threads(args)}), "
                             "pyarrow ParquetWriter"}, args)


if __name__ == "__main__":
    main()

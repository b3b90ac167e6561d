"""Model evaluation on a packed split: accuracy, per-class accuracy, confusion matrix.

Runs the same Ray Data inference path as :mod:`pipeline.inference.predict` (decode actors ->
model actors) over the split's verified shards, and reduces on the driver.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from pipeline import storage
from pipeline.config import Config
from pipeline.data import shardset, stream
from pipeline.errors import UserError


def confusion_matrix(truth: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows: true class, columns: predicted class."""
    return np.bincount(truth * num_classes + pred, minlength=num_classes**2).reshape(num_classes, num_classes)


def metrics_from_confusion(cm: np.ndarray, classes: list[str]) -> dict[str, Any]:
    n = int(cm.sum())
    per_class = {c: (float(cm[i, i] / cm[i].sum()) if cm[i].sum() else None) for i, c in enumerate(classes)}
    return {"accuracy": float(np.trace(cm) / n) if n else 0.0, "images": n,
            "per_class_accuracy": per_class, "confusion_matrix": cm.tolist(), "classes": classes}


def run(model_ref: str, data: str, split: str, cfg: Config, quiet: bool = False) -> dict[str, Any]:
    """``imgpipe evaluate``: score ``split`` of dataset ``data`` with ``model_ref``."""
    import ray
    import ray.data

    from pipeline.inference import predict
    from pipeline.ops.runtime import READ_TASK_CPUS, ensure_ray, predict_resources

    t0 = time.time()
    art = predict.resolve(model_ref, cfg)
    manifest = shardset.read_manifest(data)
    manifest.check_split(split)
    if list(manifest.classes) != art.classes:
        raise UserError(f"model classes {art.classes} do not match dataset classes {manifest.classes}")
    if manifest.rows(split) == 0:
        raise UserError(f"split '{split}' of {manifest.root} is empty")
    ensure_ray(cfg, quiet=quiet)
    from pipeline.ops import preflight

    cpus = ray.cluster_resources().get("CPU", 1.0)
    preflight.check(preflight.predict_request(cfg, cpus, image_size=int(art.meta["image_size"])), "evaluate", cfg)
    res = predict_resources(cfg, cpus)
    name = predict.model_id(art.meta, art.uri)
    ds = stream.read_split(manifest, split, columns=["image_id", "image", "label", "source"])
    ds = ds.map_batches(predict._shard_rows, num_cpus=READ_TASK_CPUS, batch_size=predict.READ_BATCH)
    ds = ds.map_batches(predict.DecodeBatch, fn_constructor_kwargs={
        "augment_cfg": predict._augment_dict(cfg), "size": int(art.meta["image_size"]),
        "preset": art.meta.get("eval_preset", cfg.augment.preset)},
        compute=ray.data.ActorPoolStrategy(size=cfg.predict.decode_actors), num_cpus=res.decode_cpus, batch_size=predict.READ_BATCH)
    ds = ds.map_batches(predict.ModelBatch, fn_constructor_kwargs={
        "model_uri": art.uri, "model_name": name, "run_id": "evaluate", "topk": 1,
        "batch_size": cfg.predict.batch_size, "compile_model": False, "threads": res.model_threads,
        "opts": storage.default_options()},
        compute=ray.data.ActorPoolStrategy(size=cfg.predict.model_actors), num_cpus=res.model_cpus, num_gpus=cfg.predict.num_gpus,
        batch_size=cfg.predict.batch_size)
    truth, pred, errors, ids = [], [], 0, []
    for b in ds.select_columns(["truth", "label", "error", "image_id"]).iter_batches(batch_format="numpy"):
        ok = np.array([not e for e in b["error"]], dtype=bool)
        errors += int((~ok).sum())
        truth.append(b["truth"][ok].astype(np.int64))
        pred.append(b["label"][ok].astype(np.int64))
        ids.extend(b["image_id"][ok].tolist())
    t = np.concatenate(truth) if truth else np.zeros(0, np.int64)
    p = np.concatenate(pred) if pred else np.zeros(0, np.int64)
    cm = confusion_matrix(t, p, len(manifest.classes))
    out = metrics_from_confusion(cm, manifest.classes)
    out.update({"model": name, "model_uri": art.uri, "data": manifest.root, "split": split,
                "data_manifest_sha256": manifest.sha256, "errors": errors, "seconds": round(time.time() - t0, 3)})
    return out

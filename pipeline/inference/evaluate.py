"""Model evaluation on a packed split: accuracy, per-class accuracy, confusion matrix,
and, on request, the per-image results (so a report never scores again).

Runs the one inference path (read tasks of :mod:`pipeline.inference.tasks` -> decode
actors -> model actors of :mod:`pipeline.inference.actors`) over the split's verified
shards, and reduces on the driver. A small split on CPU (at most
:data:`pipeline.inference.actors.HERE_MAX_PIXELS` input pixels, e.g. 4,096 images at
32 px) runs the same stages in the driver instead: no Ray, no actor start.

Per-image results (``predictions_uri``): one Parquet file of :data:`RESULT_SCHEMA`,
one row per image scored: ``label`` the true class, ``predicted`` the model's,
``score`` the softmax probability of ``predicted``, ``label_score`` that of ``label``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import storage
from pipeline.config import Config
from pipeline.data import shardset
from pipeline.errors import UserError
from pipeline.inference import actors, tasks
from pipeline.ops import failures

RESULT_SCHEMA = pa.schema([("image_id", pa.string()), ("source", pa.string()), ("label", pa.int64()),
                           ("predicted", pa.int64()), ("score", pa.float32()), ("label_score", pa.float32())])


def confusion_matrix(truth: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows: true class, columns: predicted class."""
    return np.bincount(truth * num_classes + pred, minlength=num_classes**2).reshape(num_classes, num_classes)


def metrics_from_confusion(cm: np.ndarray, classes: list[str]) -> dict[str, Any]:
    n = int(cm.sum())
    per_class = {c: (float(cm[i, i] / cm[i].sum()) if cm[i].sum() else None) for i, c in enumerate(classes)}
    return {"accuracy": float(np.trace(cm) / n) if n else 0.0, "images": n,
            "per_class_accuracy": per_class, "confusion_matrix": cm.tolist(), "classes": classes}


def _split(data: str, split: str, scorer: actors.Scorer) -> shardset.Manifest:
    """The dataset's manifest, once the split is known, non-empty and the classes match."""
    manifest = shardset.read_manifest(data)
    manifest.check_split(split)
    if list(manifest.classes) != scorer.classes:
        raise UserError(f"model classes {scorer.classes} do not match dataset classes {manifest.classes}")
    if manifest.rows(split) == 0:
        raise UserError(f"split '{split}' of {manifest.root} is empty")
    return manifest


def _collect(batches: Iterable[dict[str, Any]]) -> tuple[pa.Table, int]:
    """Scored rows -> (per-image results of the images scored, images that failed)."""
    parts: list[pa.Table] = []
    errors = 0
    for b in batches:
        ok = np.array([not e for e in b["error"]], dtype=bool)
        errors += int((~ok).sum())
        parts.append(pa.table({
            "image_id": [str(x) for x in b["image_id"][ok]], "source": [str(x) for x in b["source"][ok]],
            "label": b["truth"][ok].astype(np.int64), "predicted": b["label"][ok].astype(np.int64),
            "score": b["score"][ok].astype(np.float32), "label_score": b["truth_score"][ok].astype(np.float32),
        }, schema=RESULT_SCHEMA))
    return (pa.concat_tables(parts) if parts else RESULT_SCHEMA.empty_table()), errors


def _rows_here(manifest: shardset.Manifest, split: str) -> Iterator[dict[str, Any]]:
    """The split's input rows (as :func:`pipeline.inference.tasks.read_split` makes
    them), read in this process from the verified shards."""
    for t in shardset.iter_split(manifest, split, columns=["image_id", "image", "label", "source"]):
        for i in range(0, t.num_rows, tasks.READ_BATCH):
            part = t.slice(i, tasks.READ_BATCH)
            yield tasks.shard_rows({c: part.column(c).to_numpy(zero_copy_only=False) for c in part.column_names})


def _scored(manifest: shardset.Manifest, split: str, scorer: actors.Scorer, cfg: Config,
            quiet: bool) -> Iterator[dict[str, Any]]:
    """Scored rows of the split: in this process when it is small and the model runs on
    CPU (no actor pools to start), else through the Ray Data stages."""
    spec = actors.ModelSpec(run_id="evaluate", topk=1, batch_size=cfg.predict.batch_size, threads=1,
                            gpu_decode=cfg.predict.gpu_decode)
    if cfg.predict.num_gpus == 0 and manifest.rows(split) * scorer.image_size**2 <= actors.HERE_MAX_PIXELS:
        return actors.score_here(_rows_here(manifest, split), scorer, spec)
    res = actors.start(cfg, scorer, "evaluate", quiet)
    ds = actors.score(tasks.read_split(manifest, split), scorer, dataclasses.replace(spec, threads=res.model_threads),
                      cfg, res)
    return ds.select_columns(["image_id", "source", "truth", "label", "score", "truth_score", "error"]).iter_batches(
        batch_format="numpy")


def run(model_ref: str, data: str, split: str, cfg: Config, quiet: bool = False,
        predictions_uri: str | None = None) -> dict[str, Any]:
    """``imgpipe evaluate``: score ``split`` of dataset ``data`` with ``model_ref``; with
    ``predictions_uri``, also write the per-image results there (one Parquet file)."""
    t0 = time.time()
    scorer = actors.load_scorer(model_ref, cfg)
    manifest = _split(data, split, scorer)
    try:
        table, errors = _collect(_scored(manifest, split, scorer, cfg, quiet))
    except Exception as e:  # noqa: BLE001 - Ray's wrappers -> the cause, as UserError / JobFailed
        raise failures.as_error(e, f"evaluate {scorer.name} on {manifest.root}:{split}") from e
    cm = confusion_matrix(table.column("label").to_numpy(), table.column("predicted").to_numpy(),
                          len(manifest.classes))
    if predictions_uri is not None:
        storage.write_table(predictions_uri, table)
    out = metrics_from_confusion(cm, manifest.classes)
    out.update({"model": scorer.name, "model_uri": scorer.uri, "data": manifest.root, "split": split,
                "data_manifest_sha256": manifest.sha256, "errors": errors, "seconds": round(time.time() - t0, 3),
                "predictions_uri": predictions_uri})
    return out

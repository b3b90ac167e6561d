"""``imgpipe demo``: the whole cycle on the embedded default.

digits PNGs (ImageFolder in a local "bucket") -> pack (Parquet shards + manifest)
-> Ray Train (2 DDP workers, augmentation in a Ray Data actor pool) -> evaluate the
best checkpoint on the test split -> register + promote through the gate -> batch
inference over the test images' PNG files -> predictions Parquet + ``_SUCCESS``.

Everything lives under ``--workdir``; rerunning reuses the images and shards.
"""

from __future__ import annotations

import csv
import io
import logging
import sys
import time
from typing import Any

from pipeline import registry, storage
from pipeline.config import Config
from pipeline.data import digits, packing, shardset
from pipeline.errors import JobFailed
from pipeline.inference import evaluate, predict
from pipeline.training import train

log = logging.getLogger("imgpipe")

SHARD_ROWS = 256  # several shards per split, so shard order shuffling and streaming matter


def _say(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def run(workdir: str, cfg: Config, quiet: bool = False, limit_per_class: int | None = None) -> dict[str, Any]:
    """Run the cycle under ``workdir``; ``limit_per_class`` shrinks the digits (tests)."""
    t0 = time.time()
    root = storage.normalize(workdir)
    images_uri = storage.join(root, "bucket", "images")
    shards_uri = storage.join(root, "bucket", "shards")
    cfg.train.storage = storage.join(root, "runs")
    cfg.registry.uri = storage.join(root, "registry")
    cfg.data.manifest = shards_uri

    _say(f"[1/6] writing scikit-learn digits as PNG files under {images_uri}", quiet)
    if not storage.exists(images_uri):
        n = digits.write_digits(images_uri, limit=limit_per_class)
        _say(f"      {n} images written", quiet)
    else:
        _say("      already there; reusing", quiet)

    _say(f"[2/6] packing into Parquet shards under {shards_uri}", quiet)
    cfg.data.shard_rows = cfg.data.shard_rows or SHARD_ROWS
    packed = packing.pack(images_uri, shards_uri, cfg, seed=cfg.train.seed, quiet=quiet)
    manifest = shardset.read_manifest(shards_uri)

    _say(f"[3/6] training {cfg.model.arch} with Ray Train: {cfg.train.num_workers} DDP workers, "
         f"{cfg.train.epochs} epochs", quiet)
    trained = train.run(cfg, quiet=quiet)

    _say(f"[4/6] best checkpoint on the test split: accuracy {trained['test_accuracy']:.4f}", quiet)
    ev = trained["test"]

    _say(f"[5/6] registering in {cfg.registry.uri}", quiet)
    version = registry.register(cfg.registry.uri, cfg.registry.name, trained["best_checkpoint_uri"],
                                metrics={"holdout_accuracy": ev["accuracy"], "test_accuracy": ev["accuracy"],
                                         "val_accuracy": trained["best_val_accuracy"]},
                                data_manifest_sha256=manifest.sha256)
    decision = _gate(cfg, version["version"], ev["accuracy"], shards_uri, quiet)

    test_listing = storage.join(root, "bucket", "test-images.csv")
    n_test = _write_test_listing(manifest, test_listing)
    out_uri = storage.join(root, "predictions")
    ref = version["ref"]
    _say(f"[6/6] batch inference with {ref} over the {n_test} test PNG files -> {out_uri}", quiet)
    pred = predict.run(ref, test_listing, out_uri, cfg, quiet=quiet)
    if pred["rows"] + pred["errors"] != n_test:
        raise JobFailed(f"predictions hold {pred['rows']} rows + {pred['errors']} errors for {n_test} images")

    summary = {
        "test_accuracy": round(ev["accuracy"], 6),
        "train_images": manifest.rows("train"), "val_images": manifest.rows("val"),
        "test_images": manifest.rows("test"),
        "predictions_uri": out_uri, "predictions_rows": pred["rows"], "prediction_errors": pred["errors"],
        "model": ref, "model_uri": trained["best_checkpoint_uri"], "registry_uri": cfg.registry.uri,
        "champion": decision.get("champion"), "promoted": decision.get("promoted"),
        "best_val_accuracy": trained["best_val_accuracy"], "run_uri": trained["run_uri"],
        "train_seconds": trained["seconds"],
        "seconds": round(time.time() - t0, 1),
        "train_images_per_second": trained["train_images_per_second"],
        "predict_images_per_second": pred["images_per_second"],
        "pack_images_per_second": packed.get("images_per_second"),
        "report": trained["report"], "predictions_report": pred.get("report"),
    }
    _say("", quiet)
    _say(f"demo done in {summary['seconds']:.0f}s: test accuracy {summary['test_accuracy']:.4f} on "
         f"{summary['test_images']} images (best val {trained['best_val_accuracy']:.4f})", quiet)
    _say(f"  model      {ref}  ({'champion' if decision.get('promoted') else decision.get('reason')})", quiet)
    _say(f"  checkpoint {summary['model_uri']}", quiet)
    _say(f"  predictions {out_uri}  ({pred['rows']} rows, {pred['errors']} errors)", quiet)
    _say(f"  report     {trained['report']}", quiet)
    _say(f"  speed      train {summary['train_images_per_second']:.0f} img/s, "
         f"predict {summary['predict_images_per_second']:.0f} img/s", quiet)
    return summary


def _gate(cfg: Config, version: int, score: float, data_uri: str, quiet: bool) -> dict[str, Any]:
    """Promote through the gate; the champion is re-scored on the same holdout first."""
    champ = registry.champion(cfg.registry.uri, cfg.registry.name)
    champ_score = None
    if champ is not None:
        champ_score = evaluate.run(f"{cfg.registry.name}@champion", data_uri, "test", cfg, quiet=quiet)["accuracy"]
    decision = registry.gate(cfg.registry.uri, cfg.registry.name, version, challenger_score=score,
                             champion_score=champ_score, min_improvement=cfg.registry.min_improvement)
    _say(f"      {decision['reason']}", quiet)
    return decision


def _write_test_listing(manifest: shardset.Manifest, uri: str) -> int:
    """CSV ``uri,label`` of the test split's original files (predict reads the PNGs)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["uri", "label"])
    n = 0
    for t in shardset.iter_split(manifest, "test", columns=["source", "label"]):
        for src, lab in zip(t.column("source").to_pylist(), t.column("label").to_pylist()):
            w.writerow([src, manifest.classes[lab]])
            n += 1
    storage.write_bytes(uri, buf.getvalue().encode())
    return n

"""``imgpipe demo``: the whole cycle on the embedded default.

digits PNGs (ImageFolder in a local "bucket") -> pack (Parquet shards + manifest)
-> Ray Train (2 DDP workers, augmentation in a Ray Data actor pool) -> evaluate the
best checkpoint on the test split -> register + promote through the gate -> batch
inference over the test images' PNG files -> predictions Parquet + ``_SUCCESS``.

Everything lives under ``--workdir`` (:class:`DemoLayout`); rerunning reuses the
images and shards. ``--per-class N`` makes a smaller, quicker demo.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any

from pipeline import registry, storage
from pipeline.config import Config
from pipeline.data import digits, packing, shardset
from pipeline.errors import JobFailed
from pipeline.inference import evaluate, predict
from pipeline.training import driver

log = logging.getLogger("imgpipe")

SHARD_ROWS = 256  # several shards per split, so shard order shuffling and streaming matter


def _say(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class DemoLayout:
    """Where the demo keeps things under its workdir (a local folder or any URI)."""

    root: str
    seed: int = 0  # the split seed: each seed packs its own shard set (pack refuses a re-split)

    @property
    def images(self) -> str:
        return storage.join(self.root, "bucket", "images")

    @property
    def shards(self) -> str:
        name = "shards" if self.seed == 0 else f"shards-seed{self.seed}"
        return storage.join(self.root, "bucket", name)

    @property
    def test_listing(self) -> str:
        return storage.join(self.root, "bucket", "test-images.csv")

    @property
    def predictions(self) -> str:
        return storage.join(self.root, "predictions")


def run(workdir: str, cfg: Config, quiet: bool = False, per_class: int | None = None) -> dict[str, Any]:
    """Run the cycle under ``workdir``; returns the summary.

    ``per_class`` (``imgpipe demo --per-class N``) makes a smaller, quicker demo: only
    the first N digits of each class are written. It applies when the workdir holds no
    images yet; a rerun reuses what is there.
    """
    t0 = time.time()
    where = DemoLayout(storage.normalize(workdir), seed=cfg.train.seed)
    cfg.train.storage = storage.join(where.root, "runs")
    cfg.registry.uri = storage.join(where.root, "registry")
    cfg.data.manifest = where.shards

    _say(f"[1/6] writing scikit-learn digits as PNG files under {where.images}", quiet)
    if not storage.exists(where.images):
        n = digits.write_digits(where.images, limit=per_class)
        _say(f"      {n} images written", quiet)
    else:
        _say("      already there; reusing", quiet)

    _say(f"[2/6] packing into Parquet shards under {where.shards}", quiet)
    cfg.data.shard_rows = cfg.data.shard_rows or SHARD_ROWS
    packed = packing.pack(where.images, where.shards, cfg, seed=cfg.train.seed, quiet=quiet)
    manifest = shardset.read_manifest(where.shards)

    _say(f"[3/6] training {cfg.model.arch} with Ray Train: {cfg.train.num_workers} DDP workers, "
         f"{cfg.train.epochs} epochs", quiet)
    trained = driver.run(cfg, quiet=quiet)
    accuracy = trained["test"]["accuracy"]
    _say(f"[4/6] best checkpoint on the test split: accuracy {trained['test_accuracy']:.4f}", quiet)

    _say(f"[5/6] registering in {cfg.registry.uri}", quiet)
    version = registry.register(cfg.registry.uri, cfg.registry.name, trained["best_checkpoint_uri"],
                                metrics={"holdout_accuracy": accuracy, "test_accuracy": accuracy,
                                         "val_accuracy": trained["best_val_accuracy"]},
                                data_manifest_sha256=manifest.sha256)
    decision = _gate(cfg, version["version"], accuracy, where.shards, quiet)

    n_test = _write_test_listing(manifest, where.test_listing)
    _say(f"[6/6] batch inference with {version['ref']} over the {n_test} test PNG files "
         f"-> {where.predictions}", quiet)
    # the demo owns its predictions folder: a rerun replaces the last run's predictions
    own = dataclasses.replace(cfg, predict=dataclasses.replace(cfg.predict, overwrite=True))
    pred = predict.run(version["ref"], where.test_listing, where.predictions, own, quiet=quiet)
    if pred["rows"] + pred["errors"] != n_test:
        raise JobFailed(f"predictions hold {pred['rows']} rows + {pred['errors']} errors for {n_test} images")

    summary = _summary(cfg, manifest, trained, version["ref"], decision, packed, pred, where.predictions)
    summary["seconds"] = round(time.time() - t0, 1)
    _say_done(summary, decision, quiet)
    return summary


def _summary(cfg: Config, manifest: shardset.Manifest, trained: dict[str, Any], ref: str,
             decision: dict[str, Any], packed: dict[str, Any], pred: dict[str, Any],
             out_uri: str) -> dict[str, Any]:
    """The demo's summary line (without ``seconds``)."""
    return {
        "test_accuracy": round(trained["test"]["accuracy"], 6),
        "train_images": manifest.rows("train"), "val_images": manifest.rows("val"),
        "test_images": manifest.rows("test"),
        "predictions_uri": out_uri, "predictions_rows": pred["rows"], "prediction_errors": pred["errors"],
        "model": ref, "model_uri": trained["best_checkpoint_uri"], "registry_uri": cfg.registry.uri,
        "champion": decision.get("champion"), "promoted": decision.get("promoted"),
        "best_val_accuracy": trained["best_val_accuracy"], "run_uri": trained["run_uri"],
        "train_seconds": trained["seconds"],
        "train_images_per_second": trained["train_images_per_second"],
        "predict_images_per_second": pred["images_per_second"],
        "pack_images_per_second": packed.get("images_per_second"),
        "report": trained["report"], "predictions_report": pred.get("report"),
    }


def _say_done(s: dict[str, Any], decision: dict[str, Any], quiet: bool) -> None:
    """The closing lines on stderr: accuracy, model, where things are, speed."""
    _say("", quiet)
    _say(f"demo done in {s['seconds']:.0f}s: test accuracy {s['test_accuracy']:.4f} on "
         f"{s['test_images']} images (best val {s['best_val_accuracy']:.4f})", quiet)
    _say(f"  model      {s['model']}  ({'champion' if decision.get('promoted') else decision.get('reason')})", quiet)
    _say(f"  checkpoint {s['model_uri']}", quiet)
    _say(f"  predictions {s['predictions_uri']}  ({s['predictions_rows']} rows, "
         f"{s['prediction_errors']} errors)", quiet)
    _say(f"  report     {s['report']}", quiet)
    _say(f"  speed      train {s['train_images_per_second']:.0f} img/s, "
         f"predict {s['predict_images_per_second']:.0f} img/s", quiet)


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

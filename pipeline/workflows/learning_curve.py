"""``imgpipe learning-curve``: would more labelled data help?

For each fraction ``f`` of the training split and each seed ``s``, train the config's
model on the stratified subset ``f`` cut with seed ``s``
(:func:`pipeline.data.subsets.stratified_subset`; ``f = 1`` is the dataset itself) with
``train.seed = s``, and score its best checkpoint on the test split (val and test are
the full dataset's, for every point). Then fit a power law to the test error against
training images per class, ``error(n) = a * n**-b`` (least squares on log error vs log
n, over the per-fraction means), and extrapolate it to 2x and 10x the full training
split. Error curves of this shape are the common empirical finding (Hestness et al.,
2017, "Deep learning scaling is predictable, empirically"); without an asymptote term
the extrapolation is optimistic once the error nears its floor, so read 10x as an
upper bound.

Layout under ``--output`` (default ``train.storage/learning-curve``)::

    OUT/subsets/f<f>-s<s>/      the subset datasets (train shards; val/test referenced)
    OUT/runs/lc-f<f>-s<s>/      the training runs (rerunning resumes or reuses them)
    OUT/points/lc-f<f>-s<s>.json  a finished point: reused by a rerun with the same config
    OUT/learning_curve.json     points, per-fraction means and ranges, the fit, estimates
    OUT/learning_curve.png      the figure
"""

from __future__ import annotations

import copy
import hashlib
import math
import sys
import time
from typing import Any

import numpy as np

from pipeline import config, names, storage
from pipeline.config import Config
from pipeline.data import shardset, subsets
from pipeline.errors import UserError
from pipeline.report import plots
from pipeline.training import driver

DEFAULT_FRACTIONS = (0.1, 0.25, 0.5, 1.0)
DEFAULT_SEEDS = (0, 1)


def _say(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def parse_list(text: str, kind: type, what: str) -> list[Any]:
    """``"0.1,0.5,1"`` -> ``[0.1, 0.5, 1.0]``; one clear UserError otherwise."""
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--{what} {text!r}: expected comma-separated {kind.__name__}s, e.g. "
                        f"{','.join(str(v) for v in (DEFAULT_FRACTIONS if kind is float else DEFAULT_SEEDS))}") from None
    if not values or len(set(values)) != len(values):
        raise UserError(f"--{what} {text!r}: give at least one value, each once")
    return sorted(values)


def _point_config(cfg: Config, manifest_uri: str, seed: int, name: str, runs: str) -> Config:
    point = copy.deepcopy(cfg)
    point.data.manifest = manifest_uri
    point.train.seed = seed
    point.train.run_name = name
    point.train.storage = runs
    return point


def _train_point(cfg: Config, out: str, manifest: shardset.Manifest, fraction: float, seed: int,
                 quiet: bool) -> dict[str, Any]:
    """One (fraction, seed) point: its subset, its run, its test accuracy (reused when
    a finished point with the same resolved config is on record)."""
    name = f"lc-f{fraction:g}-s{seed}"
    data = manifest if fraction == 1.0 else subsets.stratified_subset(
        manifest, fraction, seed, storage.join(out, "subsets", name[3:]))
    point_cfg = _point_config(cfg, data.root, seed, name, storage.join(out, "runs"))
    digest = hashlib.sha256(config.dump(point_cfg).encode()).hexdigest()
    record_uri = storage.join(out, "points", f"{name}.json")
    if storage.exists(record_uri):
        record = storage.read_json(record_uri)
        if record.get("config_sha256") == digest:
            return record
    t0 = time.time()
    trained = driver.run(point_cfg, quiet=quiet)
    record = {"fraction": fraction, "seed": seed, "train_images": data.rows("train"),
              "images_per_class": data.rows("train") / len(data.classes),
              "test_accuracy": trained["test_accuracy"], "best_val_accuracy": trained["best_val_accuracy"],
              "run_uri": trained["run_uri"], "seconds": round(time.time() - t0, 1), "config_sha256": digest}
    storage.write_json(record_uri, record)
    return record


def fit_power_law(per_class: list[float], error: list[float], floor: float) -> tuple[float, float] | None:
    """``(a, b)`` of ``error = a * n**-b`` by least squares in log-log space (errors
    below ``floor`` count as ``floor``); None with fewer than two distinct sizes."""
    if len(set(per_class)) < 2:
        return None
    slope, intercept = np.polyfit(np.log(per_class), np.log(np.maximum(error, floor)), 1)
    return float(math.exp(intercept)), float(-slope)


def _curve(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per fraction: images per class and the seeds' mean, min and max test accuracy."""
    rows = []
    for fraction in sorted({p["fraction"] for p in points}):
        accs = [p["test_accuracy"] for p in points if p["fraction"] == fraction]
        per_class = [p["images_per_class"] for p in points if p["fraction"] == fraction]
        rows.append({"fraction": fraction, "images_per_class": round(float(np.mean(per_class)), 2),
                     "mean": round(float(np.mean(accs)), 4), "min": round(min(accs), 4),
                     "max": round(max(accs), 4), "seeds": len(accs)})
    return rows


def run(cfg: Config, fractions: list[float], seeds: list[int], out: str | None = None,
        quiet: bool = False) -> dict[str, Any]:
    """Train every (fraction, seed) point, fit, plot; the summary (see the module doc)."""
    for f in fractions:
        subsets.check_fraction(f)
    if cfg.data.manifest is None:
        raise UserError("data.manifest is not set: name the packed dataset (--set data.manifest=DST)")
    manifest = shardset.read_manifest(cfg.data.manifest)
    out = storage.normalize(out or storage.join(cfg.train.storage, "learning-curve"))
    t0, points = time.time(), []
    todo = [(f, s) for f in fractions for s in seeds]
    for i, (fraction, seed) in enumerate(todo, 1):
        _say(f"[{i}/{len(todo)}] training on {fraction:g} of the training split, seed {seed}", quiet)
        p = _train_point(cfg, out, manifest, fraction, seed, quiet)
        _say(f"      {p['train_images']} images ({p['images_per_class']:.1f} per class): "
             f"test accuracy {p['test_accuracy']:.4f}", quiet)
        points.append(p)
    return _finish(points, manifest, out, time.time() - t0, quiet)


def _finish(points: list[dict[str, Any]], manifest: shardset.Manifest, out: str, seconds: float,
            quiet: bool) -> dict[str, Any]:
    """Fit, extrapolate, plot and write the summary."""
    curve = _curve(points)
    xs = [c["images_per_class"] for c in curve]
    floor = 0.5 / max(1, manifest.rows("test"))  # half an error: a perfect score is not zero error
    fit = fit_power_law(xs, [1.0 - c["mean"] for c in curve], floor)
    full = manifest.rows("train") / len(manifest.classes)
    summary: dict[str, Any] = {"dataset": manifest.root, "test_images": manifest.rows("test"),
                               "full_images_per_class": round(full, 2), "curve": curve, "points": points,
                               "fit": None, "estimated_accuracy_2x": None, "estimated_accuracy_10x": None}
    drawn = None
    if fit is not None:
        a, b = fit
        summary["fit"] = {"a": round(a, 6), "b": round(b, 4), "formula": "test error = a * images_per_class ** -b"}
        for k in (2, 10):
            summary[f"estimated_accuracy_{k}x"] = round(max(0.0, 1.0 - a * (k * full) ** -b), 4)
        grid = np.geomspace(min(xs), 10 * full, 50)
        drawn = (grid.tolist(), (1.0 - a * grid ** -b).tolist())
    png = plots.learning_curve_plot(xs, [c["mean"] for c in curve], [c["min"] for c in curve],
                                    [c["max"] for c in curve], drawn, f"learning curve: {len(points)} runs")
    summary["plot"] = storage.join(out, names.LEARNING_CURVE_PLOT)
    storage.write_bytes(summary["plot"], png)
    summary["seconds"] = round(seconds, 1)
    storage.write_json(storage.join(out, names.LEARNING_CURVE), summary)
    for c in curve:
        _say(f"  {c['images_per_class']:8.1f} images/class: test accuracy {c['mean']:.4f} "
             f"[{c['min']:.4f}, {c['max']:.4f}] over {c['seeds']} seed(s)", quiet)
    if fit is not None:
        _say(f"  power law: error = {fit[0]:.3g} * n^-{fit[1]:.3f}; estimated test accuracy at 2x the data "
             f"{summary['estimated_accuracy_2x']:.4f}, at 10x {summary['estimated_accuracy_10x']:.4f}", quiet)
    return summary

"""``imgpipe pack`` with its audit page, and ``imgpipe audit DATASET``.

``pack`` computes the audit while it packs (:mod:`pipeline.data.audit`, stored in
``manifest.json``); this module adds the page, ``DST/_report/dataset.html``
(:mod:`pipeline.report.dataset_report`), which the data layer may not draw.

``imgpipe audit DATASET`` re-runs the audit on a committed dataset from its verified
shards and writes it to ``DST/_report/audit.json`` and the page. ``manifest.json`` is
left as it is: its sha256 identifies the dataset version that runs trained on.

``imgpipe audit DATASET --model MODEL`` also ranks suspected label errors with confident
learning (``cleanlab.filter.find_label_issues``, the ``[audit]`` extra). It needs
out-of-sample probabilities, so it scores only the held-out splits (``val``, ``test``):
the model never trained on them (train-split images, which it memorised, would look
clean). The full distribution comes from ``imgpipe predict`` with top-k = the number of
classes, into ``DST/_report/_scores/<split>/``. Output: ``DST/_report/label_issues.parquet``
(source, image_id, split, given_label, suggested_label, score = the model's probability of
the given label: lower is more suspect), ranked, and thumbnails on the page.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import storage
from pipeline.config import Config
from pipeline.data import audit, packing
from pipeline.data.shardset import Manifest, iter_split, read_manifest
from pipeline.errors import UserError
from pipeline.inference import predict
from pipeline.names import DATASET_AUDIT, DATASET_REPORT_DIR, LABEL_ISSUES
from pipeline.report import dataset_report
from pipeline.report.outputs import write_json


def pack(src: str, dst: str, cfg: Config, seed: int = 0, quiet: bool = False) -> dict[str, Any]:
    """:func:`pipeline.data.packing.pack`, then the audit page; its summary gains ``report``
    and the audit's headline counts."""
    out = packing.pack(src, dst, cfg, seed=seed, quiet=quiet)
    out["report"] = dataset_report.write_dataset_report(out["dataset_uri"])
    a = read_manifest(out["dataset_uri"]).raw.get("audit") or {}
    out.update(_headline(a))
    return out


def _headline(a: dict[str, Any]) -> dict[str, Any]:
    near = a.get("near_duplicates", {})
    return {"label_conflicts": a.get("label_conflicts", {}).get("quarantined", 0),
            "near_duplicate_pairs": near.get("pairs"),
            **({"near_duplicates_skipped": near["skipped"]} if near.get("skipped") else {})}


def run(dataset: str, cfg: Config, model: str | None = None, quiet: bool = False) -> dict[str, Any]:
    """``imgpipe audit DATASET [--model MODEL]``: the audit of a committed dataset, its JSON
    and its page; with ``model``, the suspected label errors too."""
    t0 = time.time()
    m = read_manifest(dataset)
    a = audit.audit_dataset(m, cfg.data.near_dup_distance)
    write_json(storage.join(m.root, DATASET_REPORT_DIR, DATASET_AUDIT), a)
    issues = label_issues(m, model, cfg, quiet) if model else None
    page = dataset_report.write_dataset_report(m.root, a, *(_with_thumbnails(m, issues) if issues is not None
                                                            else ()))
    extra = {"label_issues": len(issues), "label_issues_uri": storage.join(m.root, DATASET_REPORT_DIR, LABEL_ISSUES)
             } if issues is not None else {}
    return {**extra, "dataset_uri": m.root, "report": page, "audit": storage.join(m.root, DATASET_REPORT_DIR, DATASET_AUDIT),
            "images": sum(v["total"] for v in a["classes"]["counts"].values()), **_headline(a),
            "imbalance_ratio": a["classes"]["imbalance_ratio"], "seconds": round(time.time() - t0, 3)}


# ------------------------------------------------------------------ label issues

HELD_OUT = ("val", "test")  # splits a trained model has not seen: out-of-sample probabilities
THUMBNAILS = 12


def label_issues(m: Manifest, model: str, cfg: Config, quiet: bool) -> list[dict[str, Any]]:
    """Suspected label errors in ``m``'s held-out splits, most suspect first; also written to
    ``DST/_report/label_issues.parquet``."""
    try:
        from cleanlab.filter import find_label_issues  # deferred: the optional [audit] extra
    except ImportError:
        raise UserError("audit --model needs cleanlab: pip install 'imgpipe[audit]'") from None
    given, probs, rows = _held_out_scores(m, model, cfg, quiet)
    if len(rows) == 0:
        raise UserError(f"{m.root} has no held-out images ({', '.join(HELD_OUT)}) to look for label errors in")
    ranked = find_label_issues(given, probs, return_indices_ranked_by="self_confidence")
    out = [{**rows[i], "given_label": m.classes[given[i]], "suggested_label": m.classes[int(probs[i].argmax())],
            "score": float(probs[i, given[i]])} for i in ranked]
    cols = ["source", "image_id", "split", "given_label", "suggested_label", "score"]
    table = pa.table({c: [r[c] for r in out] for c in cols},
                     schema=pa.schema([(c, pa.float32() if c == "score" else pa.string()) for c in cols]))
    storage.write_table(storage.join(m.root, DATASET_REPORT_DIR, LABEL_ISSUES), table)
    return out


def _held_out_scores(m: Manifest, model: str, cfg: Config, quiet: bool
                     ) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """(given labels, n x classes probabilities, rows: source, image_id, split) of the held-out splits."""
    k = len(m.classes)
    pcfg = copy.deepcopy(cfg)
    pcfg.predict.topk, pcfg.predict.overwrite, pcfg.predict.skip_existing = k, True, False
    given: list[int] = []
    probs: list[np.ndarray] = []
    rows: list[dict[str, Any]] = []
    for split in (s for s in HELD_OUT if m.rows(s) > 0):
        labels = {r["source"]: r["label"] for t in iter_split(m, split, columns=["source", "label"])
                  for r in t.to_pylist()}
        out = storage.join(m.root, DATASET_REPORT_DIR, "_scores", split)
        predict.run(model, f"{m.root}:{split}", out, pcfg, quiet=quiet)
        for r in predict.read_predictions(out).select(["source", "image_id", "topk_labels", "topk_scores"]).to_pylist():
            p = np.zeros(k, np.float64)
            p[np.asarray(r["topk_labels"], int)] = r["topk_scores"]
            given.append(labels[r["source"]])
            probs.append(p / max(p.sum(), 1e-12))
            rows.append({"source": r["source"], "image_id": r["image_id"], "split": split})
    return np.asarray(given, int), np.asarray(probs).reshape(len(rows), k), rows


def _with_thumbnails(m: Manifest, issues: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[tuple[str, bytes]]]:
    """(issues, thumbnails of the first :data:`THUMBNAILS`: caption 'given -> suggested')."""
    wanted = {r["source"]: r for r in issues[:THUMBNAILS]}
    tiles: dict[str, tuple[str, bytes]] = {}
    for split in {r["split"] for r in wanted.values()}:
        for t in iter_split(m, split, columns=["source", "image"]):
            for src, image in zip(t.column("source").to_pylist(), t.column("image").to_pylist()):
                if src in wanted:
                    tiles[src] = (f"{wanted[src]['given_label']} -> {wanted[src]['suggested_label']}", image)
    return issues, [tiles[s] for s in wanted if s in tiles]

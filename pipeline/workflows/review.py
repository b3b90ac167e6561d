"""``imgpipe review``: the annotation queue. The N images of a committed ``imgpipe predict``
output that the model is least sure of, as a Label Studio import file and a CSV.

Uncertainty comes from each row's top-k scores (predictions keep the top k, not the full
distribution):

- ``least-confident``: 1 - p1;
- ``margin``: 1 - (p1 - p2) (p2 = 0 with top-1 only);
- ``entropy``: of the top-k scores plus the remaining mass 1 - sum(top-k) as one more
  outcome (a lower bound of the full distribution's entropy), in nats.

``FILE`` is a JSON list of Label Studio tasks: ``data.image`` is the image URI and
``predictions[0]`` the model's top-1 label as a ``choices`` pre-annotation (labeling config:
``<Image name="image" value="$image"/><Choices name="choice" toName="image">...``).
``FILE.csv`` holds ``uri,predicted,score`` (score: the top-1 probability). Labels coming
back, a Label Studio JSON export or a CSV ``uri,label``, are listings ``pack`` reads
(:mod:`pipeline.data.listings`).
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import storage
from pipeline.errors import UserError
from pipeline.inference.predict import read_predictions

STRATEGIES = ("margin", "entropy", "least-confident")


def uncertainty(scores: list[list[float]], strategy: str) -> np.ndarray:
    """Per row, higher = less sure; ``scores``: each row's top-k probabilities, best first."""
    k = max((len(s) for s in scores), default=1)
    p = np.zeros((len(scores), max(k, 2)), np.float64)
    for i, s in enumerate(scores):
        p[i, :len(s)] = s
    if strategy == "least-confident":
        return 1.0 - p[:, 0]
    if strategy == "margin":
        return 1.0 - (p[:, 0] - p[:, 1])
    if strategy == "entropy":
        q = np.concatenate([p, np.clip(1.0 - p.sum(axis=1, keepdims=True), 0.0, 1.0)], axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            return -np.where(q > 0, q * np.log(q), 0.0).sum(axis=1)
    raise UserError(f"--strategy {strategy!r}: valid: {', '.join(STRATEGIES)}")


def select(table: pa.Table, k: int, strategy: str) -> list[dict[str, Any]]:
    """The ``k`` least sure rows of a predictions table, least sure first (ties: by source)."""
    rows = table.select(["source", "image_id", "label_name", "score", "topk_scores", "model"]).to_pylist()
    u = uncertainty([r["topk_scores"] or [r["score"]] for r in rows], strategy)
    order = sorted(range(len(rows)), key=lambda i: (-u[i], rows[i]["source"]))[:k]
    return [{**rows[i], "uncertainty": float(u[i])} for i in order]


def task(row: dict[str, Any], strategy: str) -> dict[str, Any]:
    """One Label Studio task with the model's top-1 label as its pre-annotation."""
    return {"data": {"image": row["source"], "image_id": row["image_id"]},
            "meta": {"strategy": strategy, "uncertainty": round(row["uncertainty"], 6)},
            "predictions": [{"model_version": row["model"], "score": float(row["score"]),
                             "result": [{"from_name": "choice", "to_name": "image", "type": "choices",
                                         "value": {"choices": [row["label_name"]]}}]}]}


def run(predictions: str, k: int, strategy: str, output: str, csv_path: str | None = None) -> dict[str, Any]:
    """``imgpipe review``: write the queue; returns the summary line."""
    if k < 1:
        raise UserError(f"--k must be >= 1; got {k}")
    if strategy not in STRATEGIES:
        raise UserError(f"--strategy {strategy!r}: valid: {', '.join(STRATEGIES)}")
    chosen = select(read_predictions(predictions), k, strategy)
    csv_path = csv_path or output + ".csv"
    storage.write_bytes(output, (json.dumps([task(r, strategy) for r in chosen], indent=1) + "\n").encode())
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["uri", "predicted", "score"])
    writer.writerows([r["source"], r["label_name"], f"{r['score']:.6f}"] for r in chosen)
    storage.write_bytes(csv_path, buf.getvalue().encode())
    return {"predictions": predictions, "strategy": strategy, "tasks": len(chosen), "output": output,
            "csv": csv_path, "max_uncertainty": chosen[0]["uncertainty"] if chosen else None}

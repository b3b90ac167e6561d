"""The training report's "most confident mistakes", read from evaluate's per-image results.

The report never scores images itself: :mod:`pipeline.inference.evaluate` writes one row
per scored image (``evaluation["predictions_uri"]``, a Parquet file with ``image_id``,
``source``, ``label``, ``predicted``, ``score`` = probability of the predicted class,
``label_score``). This module picks the wrong rows with the highest score and fetches
those few images' bytes from the dataset's shards for a thumbnail grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import storage
from pipeline.data import shardset
from pipeline.report import plots
from pipeline.report.outputs import Plot

WORST = 16  # mistakes shown (thumbnails and table), most confident first
COLUMNS = ["image_id", "source", "label", "predicted", "score"]  # read from the per-image results


@dataclass
class Mistakes:
    """Counts over the scored images and the ``WORST`` most confident wrong predictions."""

    predictions_uri: str
    split: str
    images: int
    correct: int
    errors: int  # undecodable images (evaluate's count; they have no row)
    shown: list[dict[str, Any]]  # {source, true, pred, prob}, most confident first
    image_ids: list[str]  # of ``shown``, same order
    grid: Plot | None = None  # the thumbnails, once drawn
    note: str | None = None  # why some or all thumbnails are missing
    data_uri: str | None = None  # the dataset the thumbnails come from

    @property
    def wrong(self) -> int:
        return self.images - self.correct

    @property
    def accuracy(self) -> float:
        return self.correct / self.images if self.images else 0.0

    @property
    def rows(self) -> list[list[Any]]:
        return [[m["source"], m["true"], m["pred"], m["prob"]] for m in self.shown]

    def check(self) -> dict[str, Any]:
        """The counts for ``report.json["model_check"]``."""
        return {"images": self.images, "correct": self.correct, "wrong": self.wrong, "errors": self.errors,
                "accuracy": self.accuracy, "split": self.split, "predictions_uri": self.predictions_uri,
                "data_uri": self.data_uri}


def find_mistakes(predictions_uri: str, classes: list[str], split: str, errors: int = 0,
                  worst: int = WORST) -> Mistakes:
    """Count right and wrong rows of evaluate's per-image results; keep the ``worst`` wrong ones
    with the highest score (ties: by source)."""
    table = storage.read_table(predictions_uri, columns=COLUMNS)
    wrong = table.filter(pc.not_equal(table["label"], table["predicted"]))
    ranked = wrong.sort_by([("score", "descending"), ("source", "ascending")]).slice(0, max(worst, 0))
    shown = [{"source": str(r["source"]), "true": classes[r["label"]], "pred": classes[r["predicted"]],
              "prob": round(float(r["score"]), 6)} for r in ranked.to_pylist()]
    return Mistakes(predictions_uri=predictions_uri, split=split, images=table.num_rows,
                    correct=table.num_rows - wrong.num_rows, errors=errors, shown=shown,
                    image_ids=ranked.column("image_id").to_pylist())


def read_images(data_uri: str, split: str, image_ids: list[str]) -> dict[str, bytes]:
    """The encoded bytes of ``image_ids`` from ``split``'s shards; reading stops once all are found."""
    wanted = set(image_ids)
    found: dict[str, bytes] = {}
    manifest = shardset.read_manifest(data_uri)
    for table in shardset.iter_split(manifest, split, columns=["image_id", "image"]):
        missing = pa.array(sorted(wanted - found.keys()), pa.string())
        hits = table.filter(pc.is_in(table["image_id"], value_set=missing))
        for image_id, data in zip(hits.column("image_id").to_pylist(), hits.column("image").to_pylist()):
            found.setdefault(image_id, data)
        del table, hits
        if len(found) == len(wanted):
            break
    return found


def thumbnail_grid(mistakes: Mistakes, data_uri: str | None) -> tuple[bytes | None, str | None]:
    """The shown mistakes' images as one PNG grid, and a note if some could not be shown."""
    if not mistakes.shown:
        return None, None
    if not data_uri:
        return None, "Thumbnails need the dataset the model was evaluated on."
    found = read_images(data_uri, mistakes.split, mistakes.image_ids)
    tiles = [(f"true {plots.short(m['true'], 10)} / pred {plots.short(m['pred'], 10)} (p={m['prob']:.2f})",
              found[i]) for m, i in zip(mistakes.shown, mistakes.image_ids) if i in found]
    note = None
    if len(tiles) < len(mistakes.shown):
        note = (f"{len(mistakes.shown) - len(tiles)} of these images are not in split "
                f"'{mistakes.split}' of {data_uri}.")
    if not tiles:
        return None, note
    return plots.image_grid(tiles, f"The {len(tiles)} most confident wrong predictions"), note

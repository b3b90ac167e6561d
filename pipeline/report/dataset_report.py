"""A packed dataset's audit as a page: ``DST/_report/dataset.html`` and its PNG plots.

Reads the ``audit`` section of ``manifest.json`` (written by ``pack`` or ``imgpipe audit``,
:mod:`pipeline.data.audit`) and, when ``imgpipe audit --model`` found some, the suspected
label errors with their thumbnails. Draws nothing it has to compute from images itself.
"""

from __future__ import annotations

from typing import Any

from pipeline import storage
from pipeline.data.shardset import SPLITS, read_manifest
from pipeline.names import DATASET_REPORT, DATASET_REPORT_DIR
from pipeline.report import pages, plots
from pipeline.report.outputs import PlotSet

PLOTS = ("classes.png", "long_side.png", "formats.png", "bad_images.png", "label_issues.png")


def write_dataset_report(dataset: str, audit: dict[str, Any] | None = None, issues: list[dict[str, Any]] | None = None,
                         thumbnails: list[tuple[str, bytes]] | None = None) -> str:
    """Write ``dataset``'s audit page; returns its URI. ``audit``: a fresh audit (default: the
    manifest's), ``issues``: suspected label errors (rows of ``label_issues.parquet``),
    ``thumbnails``: (caption, image bytes) of the first of them."""
    m = read_manifest(dataset)
    a = audit if audit is not None else m.raw.get("audit")
    folder = storage.join(m.root, DATASET_REPORT_DIR)
    drawn = PlotSet(folder)
    if a is None:
        a = {"classes": {"counts": {}, "imbalance_ratio": None}, "long_side_px": {}, "formats": {},
             "bad_images": m.raw.get("bad_reasons", {}), "exact_duplicates": {}, "label_conflicts": {},
             "near_duplicates": {"skipped": "no audit in this manifest: run `imgpipe audit DATASET`"}}
    _draw(a, drawn)
    if thumbnails:
        drawn.add("label_issues.png", "suspected label errors",
                  plots.image_grid(thumbnails, "Suspected label errors (given -> suggested)"))
    drawn.drop_stale(PLOTS)
    uri = storage.join(folder, DATASET_REPORT)
    storage.write_bytes(uri, pages.render("dataset.html", **_page(m.root, a, drawn, issues or [])).encode("utf-8"))
    return uri


def _draw(a: dict[str, Any], drawn: PlotSet) -> None:
    counts = a["classes"]["counts"]
    if counts:
        names = list(counts)
        drawn.add("classes.png", "images per class", plots.bar_plot(
            names, [counts[c]["total"] for c in names], "Images per class (all splits)", "images", "class",
            labels=[str(counts[c]["total"]) for c in names], counts=True))
    for name, key, title, xlabel in (("long_side.png", "long_side_px", "Image size (long side)", "px"),
                                     ("formats.png", "formats", "Image formats", "format"),
                                     ("bad_images.png", "bad_images", "Bad images by reason", "reason")):
        if a.get(key):
            keys = list(a[key])
            drawn.add(name, title, plots.bar_plot(keys, [a[key][k] for k in keys], title, "images", xlabel,
                                                  labels=[str(a[key][k]) for k in keys], counts=True,
                                                  color="tab:red" if key == "bad_images" else "tab:blue"))


def _page(root: str, a: dict[str, Any], drawn: PlotSet, issues: list[dict[str, Any]]) -> dict[str, Any]:
    counts, near = a["classes"]["counts"], a["near_duplicates"]
    exact, conflicts = a["exact_duplicates"], a["label_conflicts"]
    summary = [("dataset", root), ("images", sum(v["total"] for v in counts.values())),
               ("classes", len(counts)), ("imbalance ratio (largest / smallest class)", a["classes"]["imbalance_ratio"]),
               ("exact copies removed across splits", exact.get("copies_removed_across_splits", 0)),
               ("exact copies kept (same split)", exact.get("extra_copies", 0)),
               ("label conflicts quarantined", conflicts.get("quarantined", 0)),
               ("near-duplicate pairs across splits", near.get("pairs", "n/a")),
               ("near duplicates moved into one split", near.get("moved_into_one_split", 0))]
    note = near.get("skipped", "") or (f"pHash within {near['max_distance']} bits; "
                                       f"{near['pairs']} pairs, first {len(near.get('examples', []))} shown")
    return {"title": f"Dataset audit: {root}", "summary_rows": summary, "plot_items": drawn.items,
            "class_rows": [(c, *(v[s] for s in SPLITS), v["total"]) for c, v in counts.items()],
            "bad_rows": sorted(a["bad_images"].items()), "near_note": note,
            "near_rows": [(e["a"]["source"], e["a"]["split"], e["b"]["source"], e["b"]["split"], e["distance"])
                          for e in near.get("examples", [])],
            "issue_note": f"{len(issues)} suspected (confident learning on held-out predictions)",
            "issue_rows": [(r["source"], r["split"], r["given_label"], r["suggested_label"], r["score"])
                           for r in issues[:50]]}

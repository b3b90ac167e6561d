"""The prediction report: the committed output of ``imgpipe predict`` -> plots, JSON and HTML.

:func:`write_predict_report` reads only the files listed in ``DST/_SUCCESS``, one at a
time and only the columns it needs (``label_name`` and ``score``; ``error`` for error
files), so memory stays flat for any output size. It writes the class distribution,
score histogram and error reasons under ``DST/_report/`` (PNGs, ``report.json``,
``report.html``); both name the first quarantined images (``_SUCCESS``'s ``bad_images``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.compute as pc

from pipeline import names, storage
from pipeline.errors import UserError
from pipeline.report import pages, plots
from pipeline.report.outputs import Plot, PlotSet, write_json

SCORE_BINS = 20  # score histogram: equal bins over [0, 1]
PREDICT_PLOTS = ("class_distribution.png", "score_histogram.png", "errors.png")


@dataclass
class Tally:
    """Counts over the committed prediction files."""

    edges: np.ndarray = field(default_factory=lambda: np.linspace(0.0, 1.0, SCORE_BINS + 1))
    hist: np.ndarray = field(default_factory=lambda: np.zeros(SCORE_BINS, dtype=np.int64))
    by_class: dict[str, int] = field(default_factory=dict)  # rows per predicted class
    score_sum: dict[str, float] = field(default_factory=dict)  # sum of top-1 scores per predicted class
    rows: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # undecodable images by reason
    error_rows: int = 0

    def add_predictions(self, uri: str) -> None:
        t = storage.read_table(uri, columns=["label_name", "score"])
        self.rows += t.num_rows
        scores = np.clip(t.column("score").to_numpy(zero_copy_only=False).astype(np.float64), 0.0, 1.0)
        self.hist += np.histogram(scores, bins=self.edges)[0]
        grouped = t.group_by("label_name").aggregate([("score", "count"), ("score", "sum")])
        for name, n, s in zip(grouped.column("label_name").to_pylist(), grouped.column("score_count").to_pylist(),
                              grouped.column("score_sum").to_pylist()):
            self.by_class[name] = self.by_class.get(name, 0) + int(n)
            self.score_sum[name] = self.score_sum.get(name, 0.0) + float(s or 0.0)

    def add_errors(self, uri: str) -> None:
        t = storage.read_table(uri, columns=["error"])
        self.error_rows += t.num_rows
        if not t.num_rows:
            return
        for entry in pc.value_counts(t.column("error").combine_chunks()).to_pylist():
            reason = (entry["values"] or "").split(":", 1)[0].strip() or "unknown"  # "decode: ..." -> decode
            self.errors[reason] = self.errors.get(reason, 0) + int(entry["counts"])

    def mean_scores(self) -> dict[str, float]:
        return {c: self.score_sum[c] / n for c, n in self.by_class.items() if n}


def write_predict_report(dst: str) -> str:
    """Write ``DST/_report/report.html`` (+ PNGs and ``report.json``) for committed predictions.

    Returns the URI of ``report.html``; UserError if ``DST`` holds no ``_SUCCESS``.
    """
    try:
        success = storage.read_json(storage.join(dst, names.SUCCESS))
    except storage.NotFound:
        raise UserError(f"no committed predictions at {dst} "
                        f"(missing {names.SUCCESS}; run `imgpipe predict` first)") from None
    tally = Tally()
    for f in success.get("files", []):
        tally.add_predictions(storage.join(dst, f))
    for f in success.get("error_files", []):
        tally.add_errors(storage.join(dst, f))
    model_classes = _model_classes(success)
    for c in model_classes:  # classes never predicted show as zero bars
        tally.by_class.setdefault(c, 0)
    classes = [*model_classes, *sorted(set(tally.by_class) - set(model_classes))]
    plot_set = PlotSet(storage.join(dst, names.PREDICT_REPORT_DIR))
    drawn = _draw(plot_set, tally, classes)
    mean = tally.mean_scores()
    report = {
        "predictions_uri": dst, "rows": tally.rows, "errors": tally.error_rows,
        "rows_in_success": success.get("rows"), "errors_in_success": success.get("errors"),
        "files": len(success.get("files", [])), "error_files": len(success.get("error_files", [])),
        "model": success.get("model"), "run_id": success.get("run_id"), "committed": success.get("committed"),
        "counts_by_class": {c: tally.by_class[c] for c in classes},
        "mean_score_by_class": {c: mean[c] for c in classes if c in mean},
        "score_histogram": {"bins": tally.edges.tolist(), "counts": tally.hist.tolist()},
        "errors_by_reason": dict(sorted(tally.errors.items())),
        "bad_images": success.get("bad_images", []),  # the first quarantined images: source, error
        "plots": plot_set.names,
    }
    plot_set.drop_stale(PREDICT_PLOTS)
    write_json(storage.join(plot_set.folder, names.JSON_NAME), report)
    html_uri = storage.join(plot_set.folder, names.HTML_NAME)
    storage.write_bytes(html_uri, pages.render("predict.html", **_page(success, report, tally, classes, drawn))
                        .encode("utf-8"))
    return html_uri


def _model_classes(success: dict[str, Any]) -> list[str]:
    """The model's class list from its artifact (``_SUCCESS`` names it), or [] if unreadable."""
    # deferred: artifact imports torch (seconds) and only this lookup needs it
    from pipeline.models import artifact

    uri = success.get("model_uri")
    if not uri:
        return []
    try:
        return [str(c) for c in artifact.read_meta(uri).get("classes", [])]
    except Exception:  # noqa: BLE001 - the report still works from the predictions alone
        return []


def _draw(plot_set: PlotSet, tally: Tally, classes: list[str]) -> list[Plot]:
    """Class distribution, score histogram (if any rows) and errors by reason, in that order."""
    title, shown = "Predicted class distribution", classes
    if len(classes) > plots.MAX_BARS:
        shown = sorted(classes, key=lambda c: (-tally.by_class[c], c))[: plots.MAX_BARS]
        title = f"Predicted class distribution: the {plots.MAX_BARS} most frequent of {len(classes)} classes"
    if tally.rows:
        drawn = [plot_set.add("class_distribution.png", "predicted class distribution", plots.bar_plot(
                     shown, [tally.by_class[c] for c in shown], title, "images", "predicted class",
                     labels=[str(tally.by_class[c]) for c in shown], counts=True)),
                 plot_set.add("score_histogram.png", "score histogram",
                              plots.hist_plot(tally.edges, tally.hist, tally.rows))]
    else:
        drawn = [plot_set.add("class_distribution.png", "predicted class distribution",
                              plots.note_plot(title, "no predictions were committed"))]
    errors = tally.errors
    if errors:
        reasons = sorted(errors, key=lambda r: (-errors[r], r))
        png = plots.bar_plot(reasons, [errors[r] for r in reasons],
                             f"Undecodable images by reason ({tally.error_rows} in all)", "images", "reason",
                             labels=[str(errors[r]) for r in reasons], color="tab:red", counts=True)
    else:
        png = plots.note_plot("Undecodable images by reason", "no errors: every image was decoded")
    return [*drawn, plot_set.add("errors.png", "errors by reason", png)]


def _page(success: dict[str, Any], report: dict[str, Any], tally: Tally, classes: list[str],
          drawn: list[Plot]) -> dict[str, Any]:
    """The context of templates/predict.html."""
    rows, edges, hist = tally.rows, tally.edges, tally.hist
    summary = [["predictions", report["predictions_uri"]], ["model", success.get("model", "")],
               ["run id", success.get("run_id", "")], ["committed", success.get("committed", "")],
               ["rows", rows], ["undecodable images", tally.error_rows],
               ["part files", report["files"]], ["error files", report["error_files"]]]
    summary += [[f"quarantined: {b.get('source', '')}", b.get("error", "")] for b in report["bad_images"]]
    if rows:
        summary.append(["mean score", sum(tally.score_sum.values()) / rows])
        summary.append(["share with score < 0.5", float(hist[: SCORE_BINS // 2].sum() / rows)])
    mean = report["mean_score_by_class"]
    return {
        "title": "Prediction report", "summary_rows": [[str(k), v] for k, v in summary],
        "success_rows_differ": bool(rows) and success.get("rows") not in (None, rows),
        "rows_in_success": success.get("rows"), "rows": rows, "plot_items": drawn,
        "class_rows": [[c, tally.by_class[c], tally.by_class[c] / rows, mean.get(c)] for c in classes] if rows else [],
        "histogram_rows": [[f"{edges[i]:.2f}", f"{edges[i + 1]:.2f}", int(hist[i])] for i in range(SCORE_BINS)],
        "error_rows": [[r, tally.errors[r]] for r in sorted(tally.errors)],
    }

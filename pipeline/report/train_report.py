"""The training report: a run folder's history and test evaluation -> plots, JSON and HTML.

:func:`write_train_report` reads ``RUN/metrics.jsonl`` (:func:`read_history`, the one
reader of that file), optionally the result of :func:`pipeline.inference.evaluate.run`
and the per-image results it wrote, and writes

- ``RUN/report/*.png``: training curves, confusion matrix, per-class accuracy and the
  most confident mistakes;
- ``RUN/report/report.json``: the exact numbers plotted;
- ``RUN/report.html``: one self-contained page (:mod:`pipeline.report.pages`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline import names, storage
from pipeline.errors import UserError
from pipeline.report import mistakes, pages, plots
from pipeline.report.outputs import Plot, PlotSet, write_json

CURVE_KEYS = ("train_loss", "val_loss", "train_accuracy", "val_accuracy", "best_val_accuracy", "lr",
              "images_per_second", "epoch_seconds")  # per-epoch series kept in report.json
TABLE_KEYS = ("train_loss", "val_loss", "train_accuracy", "val_accuracy", "lr", "images_per_second",
              "epoch_seconds")  # columns of the per-epoch table, after the epoch
TRAIN_PLOTS = ("loss.png", "accuracy.png", "lr.png", "throughput.png", "confusion.png",
               "per_class_accuracy.png", "misclassified.png")
EVALUATION_KEYS = ("model", "data", "split", "accuracy", "images", "errors")  # shown when present


def read_history(run_uri: str) -> list[dict[str, Any]]:
    """The per-epoch metrics of a run (``RUN_URI/metrics.jsonl``); UserError if absent or empty."""
    uri = storage.join(run_uri, names.METRICS)
    try:
        text = storage.read_text(uri)
    except storage.NotFound:
        raise UserError(f"no training metrics at {uri} (is {run_uri} a run folder of `imgpipe train`?)") from None
    history = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not history:
        raise UserError(f"{uri} is empty: the run finished no epoch")
    return history


@dataclass
class EvaluationSection:
    """What the page shows of an evaluation: summary rows, plots and per-class tables."""

    rows: list[list[Any]]
    plots: list[Plot]
    classes: list[str]
    per_class_rows: list[list[Any]]
    confusion_rows: list[list[Any]] | None  # None when there are too many classes to read


def write_train_report(run_uri: str, evaluation: dict | None = None, data_uri: str | None = None) -> str:
    """Write ``RUN_URI/report.html`` (+ ``RUN_URI/report/*.png`` and ``report.json``).

    ``evaluation`` is the result of :func:`pipeline.inference.evaluate.run`: it adds the
    confusion matrix and per-class accuracy; its ``predictions_uri`` (per-image results) adds
    the most confident mistakes, with thumbnails read from the dataset at ``data_uri``.
    Returns the URI of ``report.html``.
    """
    history = read_history(run_uri)
    plot_set = PlotSet(storage.join(run_uri, names.REPORT_DIR))
    epochs = [float(h.get("epoch", i + 1)) for i, h in enumerate(history)]
    plotted = {k: _series(history, k) for k in CURVE_KEYS}
    last = history[-1]
    curves = _curve_plots(plot_set, epochs, plotted, float(last["val_accuracy"]))
    report: dict[str, Any] = {
        "run_uri": run_uri, "epochs": len(history),
        "final_val_accuracy": float(last["val_accuracy"]),
        "best_val_accuracy": max(float(h["val_accuracy"]) for h in history),
        "final": last, "history": {"epoch": epochs, **plotted},
        "evaluation": None, "misclassified": None, "model_check": None,
    }
    run_name = storage.normalize(run_uri).rstrip("/").rsplit("/", 1)[-1]
    page: dict[str, Any] = {
        "title": f"Training report: {run_name}", "final_rows": [[k, last[k]] for k in sorted(last)],
        "best_val_accuracy": report["best_val_accuracy"], "epochs": len(history), "curves": curves,
        "epoch_rows": [[h.get("epoch"), *[h.get(k) for k in TABLE_KEYS]] for h in history],
        "evaluation": None, "mistakes": None, "config_text": _config_text(run_uri),
    }
    if evaluation is not None:
        report["evaluation"], page["evaluation"] = _evaluation_section(evaluation, plot_set)
        if evaluation.get("predictions_uri"):
            found = _mistakes_section(evaluation, data_uri, plot_set)
            report["misclassified"] = found.shown
            report["model_check"] = {**found.check(), "model_uri": evaluation.get("model_uri")}
            page["mistakes"] = found
    report["plots"] = plot_set.names
    plot_set.drop_stale(TRAIN_PLOTS)
    write_json(storage.join(plot_set.folder, names.JSON_NAME), report)
    html_uri = storage.join(run_uri, names.HTML_NAME)
    storage.write_bytes(html_uri, pages.render("train.html", **page).encode("utf-8"))
    return html_uri


def _series(history: list[dict[str, Any]], key: str) -> list[float]:
    return [float(h[key]) if h.get(key) is not None else float("nan") for h in history]


def _curve_plots(plot_set: PlotSet, epochs: list[float], plotted: dict[str, list[float]],
                 final_val_accuracy: float) -> list[Plot]:
    accs = [*plotted["train_accuracy"], *plotted["val_accuracy"]]
    return [
        plot_set.add("loss.png", "loss per epoch", plots.line_plot(
            epochs, [("train", plotted["train_loss"]), ("val", plotted["val_loss"])],
            "Loss per epoch", "cross-entropy loss")),
        plot_set.add("accuracy.png", "accuracy per epoch", plots.line_plot(
            epochs, [("train", plotted["train_accuracy"]), ("val", plotted["val_accuracy"])],
            f"Accuracy per epoch (final val {final_val_accuracy:.4f})", "accuracy", ylim=(min(0.0, *accs), 1.02))),
        plot_set.add("lr.png", "learning rate per epoch", plots.line_plot(
            epochs, [("lr", plotted["lr"])], "Learning rate (at the end of each epoch)", "learning rate")),
        plot_set.add("throughput.png", "training throughput per epoch", plots.line_plot(
            epochs, [("images/s", plotted["images_per_second"])], "Training throughput per epoch",
            "images / second", ylim=(0.0, max(plotted["images_per_second"], default=1.0) * 1.15 or 1.0))),
    ]


def _config_text(run_uri: str) -> str | None:
    try:
        return storage.read_text(storage.join(run_uri, names.RUN_CONFIG))
    except storage.NotFound:
        return None


def _evaluation_section(evaluation: dict[str, Any], plot_set: PlotSet) -> tuple[dict[str, Any], EvaluationSection]:
    """report.json's ``evaluation`` and the page's section: confusion matrix and per-class accuracy."""
    classes = [str(c) for c in evaluation["classes"]]
    cm = np.asarray(evaluation["confusion_matrix"], dtype=np.int64)
    if cm.shape != (len(classes), len(classes)):
        raise ValueError(f"confusion matrix of shape {cm.shape} does not match {len(classes)} classes")
    support = cm.sum(axis=1)
    per_class = evaluation.get("per_class_accuracy") or {
        c: (float(cm[i, i] / support[i]) if support[i] else None) for i, c in enumerate(classes)}
    total, correct = int(cm.sum()), int(np.trace(cm))
    out = {"accuracy": evaluation.get("accuracy"), "images": evaluation.get("images", total),
           "classes": classes, "confusion_matrix": cm.tolist(), "confusion_sum": total,
           "confusion_trace": correct, "per_class_accuracy": per_class,
           **{k: evaluation[k] for k in ("model", "data", "split", "errors") if k in evaluation}}
    section = EvaluationSection(
        rows=[[k, evaluation[k]] for k in EVALUATION_KEYS if k in evaluation] + [["correct (trace)", correct]],
        plots=[plot_set.add("confusion.png", "confusion matrix", plots.confusion_plot(cm, classes)),
               _per_class_plot(plot_set, classes, per_class)],
        classes=classes,
        per_class_rows=[[c, per_class.get(c), int(cm[i, i]), int(support[i])] for i, c in enumerate(classes)],
        confusion_rows=([[c, *map(int, cm[i])] for i, c in enumerate(classes)]
                        if len(classes) <= plots.MAX_ANNOTATED_CLASSES else None))
    return out, section


def _per_class_plot(plot_set: PlotSet, classes: list[str], per_class: dict[str, float | None]) -> Plot:
    accs = [(c, per_class.get(c)) for c in classes]
    shown = accs
    title = "Per-class accuracy"
    if len(accs) > plots.MAX_BARS:  # too many to read: show the weakest classes
        shown = sorted(accs, key=lambda ca: (-1.0 if ca[1] is None else ca[1], ca[0]))[: plots.MAX_BARS]
        title = f"Per-class accuracy: the {plots.MAX_BARS} lowest of {len(accs)} classes"
    return plot_set.add("per_class_accuracy.png", "per-class accuracy", plots.bar_plot(
        [c for c, _ in shown], [0.0 if a is None else float(a) for _, a in shown], title, "accuracy", "class",
        ylim=(0.0, 1.1), labels=["n/a" if a is None else f"{a:.2f}" for _, a in shown]))


def _mistakes_section(evaluation: dict[str, Any], data_uri: str | None, plot_set: PlotSet) -> mistakes.Mistakes:
    """The most confident mistakes among evaluate's per-image results, with their thumbnails."""
    found = mistakes.find_mistakes(evaluation["predictions_uri"], [str(c) for c in evaluation["classes"]],
                                   str(evaluation.get("split", "test")), errors=int(evaluation.get("errors") or 0))
    found.data_uri = data_uri
    png, found.note = mistakes.thumbnail_grid(found, data_uri)
    if png is not None:
        found.grid = plot_set.add("misclassified.png", "most confident misclassified images", png)
    return found

"""Human-readable reports: training curves, evaluation plots, prediction summaries.

What this module owns:

- :func:`write_train_report`: a run folder's ``metrics.jsonl`` (+ an optional
  evaluation result, + an optional in-process look at the worst misclassified test
  images) -> PNG plots under ``RUN_URI/report/``, the exact plotted numbers in
  ``RUN_URI/report/report.json`` and a self-contained ``RUN_URI/report.html``
  (PNGs embedded as base64 data URIs; no network access needed to view it);
- :func:`write_predict_report`: the committed output of ``imgpipe predict`` (only the
  files listed in ``_SUCCESS``) -> class distribution, score histogram and error
  reasons under ``DST/_report/``; reads one file at a time and only the columns it
  needs, so memory stays flat for any output size;
- :func:`write_tensorboard`: per-epoch scalars as TensorBoard event files for local
  run folders.

Plots are drawn headless (matplotlib's Agg backend, selected here). All reads and
writes of URIs go through :mod:`pipeline.storage`, so run folders on S3 work too.
"""

from __future__ import annotations

import base64
import heapq
import html
import io
import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: before pyplot is imported

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from pipeline import storage  # noqa: E402
from pipeline.errors import UserError  # noqa: E402

METRICS = "metrics.jsonl"  # same name as pipeline.training.train.METRICS (not imported: keeps this module light)
REPORT_DIR = "report"
PREDICT_REPORT_DIR = "_report"
SUCCESS = "_SUCCESS"
HTML_NAME = "report.html"
JSON_NAME = "report.json"
SCORE_BINS = 20  # score histogram: equal bins over [0, 1]
MAX_BARS = 30  # class bar charts show at most this many classes (all of them stay in the JSON)
MAX_ANNOTATED_CLASSES = 30  # confusion matrix cells get their counts written up to this size
DPI = 100
TRAIN_PLOTS = ("loss.png", "accuracy.png", "lr.png", "throughput.png", "confusion.png",
               "per_class_accuracy.png", "misclassified.png")
PREDICT_PLOTS = ("class_distribution.png", "score_histogram.png", "errors.png")

# -------------------------------------------------------------------- plotting helpers


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _short(name: str, n: int = 14) -> str:
    return name if len(name) <= n else name[: n - 1] + "…"


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return "n/a" if v is None else str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.4g}" if (abs(v) >= 1e4 or (v != 0 and abs(v) < 1e-3)) else f"{v:.4f}"
    return str(v)


def _line_plot(epochs: list[float], series: list[tuple[str, list[float]]], title: str, ylabel: str,
               ylim: tuple[float, float] | None = None, logy: bool = False) -> bytes:
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, ys in series:
        ax.plot(epochs, ys, marker="o", markersize=4, label=label)
    ax.set_title(title)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    if len(epochs) <= 20:
        ax.set_xticks(epochs, [f"{e:g}" for e in epochs])
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if len(epochs) == 1:
        ax.set_xlim(epochs[0] - 1, epochs[0] + 1)
    if ylim is not None:
        ax.set_ylim(*ylim)
    if logy and all(y > 0 for _, ys in series for y in ys):
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    if len(series) > 1:
        ax.legend()
    return _png(fig)


def _confusion_plot(cm: np.ndarray, classes: list[str]) -> bytes:
    n = len(classes)
    side = min(max(4.5, 0.45 * n + 2.0), 14.0)
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    total, correct = int(cm.sum()), int(np.trace(cm))
    acc = correct / total if total else 0.0
    annotate = n <= MAX_ANNOTATED_CLASSES
    ax.set_title(f"Confusion matrix: {total} images, accuracy {acc:.4f}" + ("\n(cell text = count)" if annotate else ""))
    named = n <= 60
    ax.set_xlabel("predicted class" if named else "predicted class (index in classes)")
    ax.set_ylabel("true class" if named else "true class (index in classes)")
    if named:
        names = [_short(c, 12) for c in classes]
        ax.set_xticks(range(n), names, rotation=45 if max(map(len, names)) > 2 else 0, ha="right"
                      if max(map(len, names)) > 2 else "center")
        ax.set_yticks(range(n), names)
    if annotate:
        size = 10 if n <= 12 else 8 if n <= 20 else 6
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=size,
                        color="white" if frac[i, j] > 0.5 else "black")
    return _png(fig)


def _bar_plot(names: list[str], values: list[float], title: str, ylabel: str, xlabel: str,
              ylim: tuple[float, float] | None = None, labels: list[str] | None = None,
              color: str = "tab:blue", counts: bool = False) -> bytes:
    n = len(names)
    fig, ax = plt.subplots(figsize=(min(max(6.0, 0.42 * n + 1.5), 20.0), 4.4))
    shown = [_short(c) for c in names]
    bars = ax.bar(range(n), values, color=color, width=0.8 if n > 4 else 0.5)
    if counts:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xticks(range(n), shown, rotation=45 if max(map(len, shown), default=0) > 3 else 0,
                  ha="right" if max(map(len, shown), default=0) > 3 else "center")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.set_xlabel(xlabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    else:
        ax.set_ylim(0, max(values, default=1) * 1.15 or 1)
    if labels is not None and n <= MAX_BARS:
        ax.bar_label(bars, labels=labels, fontsize=8 if n <= 15 else 6, padding=2)
    ax.grid(True, axis="y", alpha=0.3)
    return _png(fig)


def _note_plot(title: str, text: str) -> bytes:
    fig, ax = plt.subplots(figsize=(6.0, 2.2))
    ax.axis("off")
    ax.set_title(title)
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=12, transform=ax.transAxes)
    return _png(fig)


def _json_default(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    raise TypeError(f"not JSON serializable: {type(v).__name__}")


def _write_json(uri: str, obj: Any) -> None:
    """Like storage.write_json, but numpy scalars/arrays (from callers' dicts) are fine too."""
    text = json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n"
    storage.write_bytes(uri, text.encode("utf-8"))


# ------------------------------------------------------------------------- HTML helpers

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}
.plots{display:flex;flex-wrap:wrap;gap:12px}.plots img{max-width:100%;border:1px solid #eee}
.note{color:#555}pre{background:#f7f7f7;padding:8px;overflow-x:auto}
"""


def _img_tag(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table(header: list[str], rows: Iterable[list[Any]], left: int = 1) -> str:
    """An HTML table; the first ``left`` columns are left-aligned (names)."""
    def cell(tag: str, i: int, v: Any) -> str:
        cls = ' class="l"' if i < left else ""
        return f"<{tag}{cls}>{html.escape(_fmt(v) if not isinstance(v, str) else v)}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _page(title: str, sections: list[str]) -> str:
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>" + "\n".join(sections) + "</body></html>\n")


@dataclass
class _Plots:
    """PNG files written under one folder, kept in order for embedding."""

    folder: str
    items: list[tuple[str, str, bytes]] = field(default_factory=list)  # (file name, alt, png)

    def add(self, name: str, alt: str, png: bytes) -> str:
        storage.write_bytes(storage.join(self.folder, name), png)
        self.items.append((name, alt, png))
        return _img_tag(png, alt)

    @property
    def names(self) -> list[str]:
        return [n for n, _, _ in self.items]

    def drop_stale(self, known: tuple[str, ...]) -> None:
        """Remove plots of an earlier report that this one did not draw (e.g. no mistakes now)."""
        for name in known:
            if name not in self.names:
                storage.remove(storage.join(self.folder, name))


# ----------------------------------------------------------------------- train report


def read_history(run_uri: str) -> list[dict[str, Any]]:
    """The per-epoch metrics of a run (``RUN_URI/metrics.jsonl``); UserError if absent or empty."""
    uri = storage.join(run_uri, METRICS)
    try:
        text = storage.read_text(uri)
    except storage.NotFound:
        raise UserError(f"no training metrics at {uri} (is {run_uri} a run folder of `imgpipe train`?)") from None
    history = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not history:
        raise UserError(f"{uri} is empty: the run finished no epoch")
    return history


def _series(history: list[dict[str, Any]], key: str) -> list[float]:
    return [float(h[key]) if h.get(key) is not None else float("nan") for h in history]


def write_train_report(run_uri: str, evaluation: dict | None = None, model_uri: str | None = None,
                       data_uri: str | None = None, split: str = "test", max_images: int = 2000,
                       worst: int = 16) -> str:
    """Write ``RUN_URI/report.html`` (+ ``RUN_URI/report/*.png`` and ``report.json``).

    ``evaluation`` is the result of :func:`pipeline.inference.evaluate.run` (confusion matrix and
    per-class accuracy plots). With ``model_uri`` and ``data_uri`` the model also scores
    up to ``max_images`` images of ``split`` here, on CPU, and the ``worst`` most
    confident wrong predictions are shown. Returns the URI of ``report.html``.
    """
    history = read_history(run_uri)
    folder = storage.join(run_uri, REPORT_DIR)
    plots = _Plots(folder)
    epochs = [float(h.get("epoch", i + 1)) for i, h in enumerate(history)]
    keys = ("train_loss", "val_loss", "train_accuracy", "val_accuracy", "best_val_accuracy", "lr",
            "images_per_second", "epoch_seconds")
    plotted = {k: _series(history, k) for k in keys}
    last = history[-1]
    run_name = storage.normalize(run_uri).rstrip("/").rsplit("/", 1)[-1]

    curves = [
        plots.add("loss.png", "loss per epoch", _line_plot(
            epochs, [("train", plotted["train_loss"]), ("val", plotted["val_loss"])],
            "Loss per epoch", "cross-entropy loss")),
        plots.add("accuracy.png", "accuracy per epoch", _line_plot(
            epochs, [("train", plotted["train_accuracy"]), ("val", plotted["val_accuracy"])],
            f"Accuracy per epoch (final val {float(last['val_accuracy']):.4f})", "accuracy",
            ylim=(min(0.0, *plotted["train_accuracy"], *plotted["val_accuracy"]), 1.02))),
        plots.add("lr.png", "learning rate per epoch", _line_plot(
            epochs, [("lr", plotted["lr"])], "Learning rate (at the end of each epoch)", "learning rate")),
        plots.add("throughput.png", "training throughput per epoch", _line_plot(
            epochs, [("images/s", plotted["images_per_second"])], "Training throughput per epoch",
            "images / second", ylim=(0.0, max(plotted["images_per_second"], default=1.0) * 1.15 or 1.0))),
    ]
    report: dict[str, Any] = {
        "run_uri": run_uri, "epochs": len(history),
        "final_val_accuracy": float(last["val_accuracy"]),
        "best_val_accuracy": max(float(h["val_accuracy"]) for h in history),
        "final": last, "history": {"epoch": epochs, **plotted},
        "evaluation": None, "misclassified": None, "model_check": None,
    }
    sections = [
        "<h2>Final epoch</h2>",
        _table(["metric", "value"], [[k, last[k]] for k in sorted(last)]),
        f"<p>Best val accuracy {report['best_val_accuracy']:.4f} over {len(history)} epochs.</p>",
        "<h2>Training curves</h2>", '<div class="plots">' + "".join(curves) + "</div>",
        "<h2>Per-epoch metrics</h2>",
        _table(["epoch", "train loss", "val loss", "train acc", "val acc", "lr", "images/s", "seconds"],
               [[_fmt(h.get("epoch")), *[h.get(k) for k in ("train_loss", "val_loss", "train_accuracy",
                                                             "val_accuracy", "lr", "images_per_second",
                                                             "epoch_seconds")]] for h in history]),
    ]
    if evaluation is not None:
        report["evaluation"], ev_html = _evaluation_section(evaluation, plots)
        sections += ev_html
    if model_uri and data_uri:
        check, mis_html = _misclassified_section(model_uri, data_uri, split, max_images, worst, plots)
        report["misclassified"] = check.pop("misclassified")
        report["model_check"] = check
        sections += mis_html
    elif model_uri or data_uri:
        sections.append('<p class="note">Misclassified images need both a model and a dataset.</p>')
    try:
        config_text = storage.read_text(storage.join(run_uri, "config.yaml"))
        sections += ["<h2>Resolved config</h2>", f"<pre>{html.escape(config_text)}</pre>"]
    except storage.NotFound:
        pass
    report["plots"] = plots.names
    plots.drop_stale(TRAIN_PLOTS)
    _write_json(storage.join(folder, JSON_NAME), report)
    html_uri = storage.join(run_uri, HTML_NAME)
    storage.write_bytes(html_uri, _page(f"Training report: {run_name}", sections).encode("utf-8"))
    return html_uri


def _evaluation_section(evaluation: dict[str, Any], plots: _Plots) -> tuple[dict[str, Any], list[str]]:
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
    parts = ["<h2>Evaluation</h2>",
             _table(["metric", "value"], [[k, evaluation[k]] for k in
                                          ("model", "data", "split", "accuracy", "images", "errors")
                                          if k in evaluation] + [["correct (trace)", correct]]),
             '<div class="plots">', plots.add("confusion.png", "confusion matrix", _confusion_plot(cm, classes))]
    accs = [(c, per_class.get(c)) for c in classes]
    shown = accs
    title = "Per-class accuracy"
    if len(accs) > MAX_BARS:  # too many to read: show the weakest classes
        shown = sorted(accs, key=lambda ca: (-1.0 if ca[1] is None else ca[1], ca[0]))[:MAX_BARS]
        title = f"Per-class accuracy: the {MAX_BARS} lowest of {len(accs)} classes"
    parts.append(plots.add("per_class_accuracy.png", "per-class accuracy", _bar_plot(
        [c for c, _ in shown], [0.0 if a is None else float(a) for _, a in shown], title, "accuracy", "class",
        ylim=(0.0, 1.1), labels=["n/a" if a is None else f"{a:.2f}" for _, a in shown])))
    parts.append("</div>")
    parts += ["<h3>Per-class accuracy</h3>",
              _table(["class", "accuracy", "correct", "images"],
                     [[c, per_class.get(c), int(cm[i, i]), int(support[i])] for i, c in enumerate(classes)])]
    if len(classes) <= MAX_ANNOTATED_CLASSES:
        parts += ["<h3>Confusion matrix (rows: true, columns: predicted)</h3>",
                  _table(["true \\ pred", *classes], [[c, *map(int, cm[i])] for i, c in enumerate(classes)])]
    return out, parts


def _misclassified_section(model_uri: str, data_uri: str, split: str, max_images: int, worst: int,
                           plots: _Plots) -> tuple[dict[str, Any], list[str]]:
    check = find_misclassified(model_uri, data_uri, split, max_images, worst)
    items = check["misclassified"]
    parts = ["<h2>Most confident mistakes</h2>",
             f"<p>The model scored {check['images']} images of split '{html.escape(split)}' here "
             f"(CPU): {check['correct']} right, {check['wrong']} wrong"
             + (f", {check['errors']} undecodable" if check["errors"] else "")
             + f" (accuracy {check['accuracy']:.4f}). Showing the {len(items)} most confident wrong "
             "predictions.</p>"]
    if items:
        parts.append(plots.add("misclassified.png", "most confident misclassified images",
                               _grid_plot(items, check["_images"])))
        parts.append(_table(["source", "true", "pred", "prob"],
                            [[m["source"], m["true"], m["pred"], m["prob"]] for m in items], left=3))
    else:
        parts.append('<p class="note">No misclassified images among those scored.</p>')
    check.pop("_images")
    return check, parts


def find_misclassified(model_uri: str, data_uri: str, split: str = "test", max_images: int = 2000,
                       worst: int = 16) -> dict[str, Any]:
    """Score up to ``max_images`` of ``split`` in this process (CPU, batches of 256).

    Returns counts and ``misclassified``: the ``worst`` wrong predictions with the
    highest probability, most confident first (source, true, pred, prob), plus their
    encoded images under ``_images``. Only those few images are kept in memory.
    """
    import torch

    from pipeline import config
    from pipeline import transforms as augment
    from pipeline.data import shardset
    from pipeline.models import artifact
    from pipeline.models import zoo as models

    art = artifact.load(model_uri)
    manifest = shardset.read_manifest(data_uri)
    if list(manifest.classes) != art.classes:
        raise UserError(f"model classes {art.classes} do not match dataset classes {manifest.classes}")
    size = int(art.meta["image_size"])
    preset = augment.EvalPreset(config.AugmentConfig(preset=art.meta.get("eval_preset", "digits")), size)
    model = models.build_model(art.meta["arch"], len(art.classes))
    model.load_state_dict(art.state_dict)
    model.eval()
    classes = art.classes
    heap: list[tuple[float, int, dict[str, Any], bytes]] = []  # min-heap on prob: the `worst` kept
    counts = {"images": 0, "correct": 0, "wrong": 0, "errors": 0}
    batch: list[tuple[torch.Tensor, int, str, bytes]] = []
    seq = 0

    def flush() -> None:
        nonlocal seq
        if not batch:
            return
        x = augment.to_input(torch.stack([b[0] for b in batch]), art.meta["mean"], art.meta["std"],
                             torch.device("cpu"))
        with torch.inference_mode():
            probs = torch.softmax(model(x).float(), dim=1)
        prob, pred = probs.max(dim=1)
        for (_, truth, source, data), p, k in zip(batch, prob.tolist(), pred.tolist()):
            counts["images"] += 1
            if k == truth:
                counts["correct"] += 1
                continue
            counts["wrong"] += 1
            if worst <= 0:
                continue
            item = {"source": source, "true": classes[truth], "pred": classes[k], "prob": round(float(p), 6)}
            seq += 1
            entry = (float(p), -seq, item, data)
            if len(heap) < worst:
                heapq.heappush(heap, entry)
            elif entry[:2] > heap[0][:2]:
                heapq.heapreplace(heap, entry)
        batch.clear()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seen = 0
        for table in shardset.iter_split(manifest, split, columns=["image", "label", "source"]):
            for data, label, source in zip(table.column("image").to_pylist(), table.column("label").to_pylist(),
                                           table.column("source").to_pylist()):
                if seen >= max_images:
                    break
                seen += 1
                try:
                    img = preset(augment.decode_tensor(data))
                except Exception:  # noqa: BLE001 - an undecodable image is counted, not fatal
                    counts["errors"] += 1
                    continue
                batch.append((img, int(label), str(source), data))
                if len(batch) >= 256:
                    flush()
            del table
            if seen >= max_images:
                break
        flush()
    finally:
        torch.set_num_threads(threads)
    ranked = sorted(heap, key=lambda e: (-e[0], e[2]["source"]))
    scored = counts["images"]
    return {**counts, "accuracy": counts["correct"] / scored if scored else 0.0, "split": split,
            "model_uri": model_uri, "data_uri": data_uri, "max_images": max_images,
            "misclassified": [e[2] for e in ranked], "_images": [e[3] for e in ranked]}


def _grid_plot(items: list[dict[str, Any]], blobs: list[bytes]) -> bytes:
    from pipeline import images

    n = len(items)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.8 * cols, 2.9 * rows + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, item, data in zip(axes.flat, items, blobs):
        img = images.decode_rgb(data)
        small = max(img.shape[:2]) < 96
        ax.imshow(img, interpolation="nearest" if small else "antialiased")
        ax.set_title(f"true {_short(item['true'], 10)} / pred {_short(item['pred'], 10)} (p={item['prob']:.2f})",
                     fontsize=9)
    fig.suptitle(f"The {n} most confident wrong predictions", fontsize=12)
    fig.tight_layout(h_pad=1.5, rect=(0.0, 0.0, 1.0, 0.98 if rows > 1 else 0.93))
    return _png(fig)


# --------------------------------------------------------------------- predict report


def _read_parquet_columns(uri: str, columns: list[str]) -> Any:
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(storage.read_bytes(uri)), columns=columns)


def write_predict_report(dst: str) -> str:
    """Write ``DST/_report/report.html`` (+ PNGs and ``report.json``) for committed predictions.

    Only files listed in ``DST/_SUCCESS`` are read, one at a time, and only the
    ``label_name`` and ``score`` columns (``error`` for error files). Returns the URI of
    ``report.html``.
    """
    import pyarrow.compute as pc

    try:
        success = storage.read_json(storage.join(dst, SUCCESS))
    except storage.NotFound:
        raise UserError(f"no committed predictions at {dst} (missing {SUCCESS}; run `imgpipe predict` first)") from None
    edges = np.linspace(0.0, 1.0, SCORE_BINS + 1)
    hist = np.zeros(SCORE_BINS, dtype=np.int64)
    by_class: dict[str, int] = {}
    score_sum: dict[str, float] = {}
    rows = 0
    for f in success.get("files", []):
        t = _read_parquet_columns(storage.join(dst, f), ["label_name", "score"])
        rows += t.num_rows
        scores = np.clip(t.column("score").to_numpy(zero_copy_only=False).astype(np.float64), 0.0, 1.0)
        hist += np.histogram(scores, bins=edges)[0]
        grouped = t.group_by("label_name").aggregate([("score", "count"), ("score", "sum")])
        for name, n, s in zip(grouped.column("label_name").to_pylist(), grouped.column("score_count").to_pylist(),
                              grouped.column("score_sum").to_pylist()):
            by_class[name] = by_class.get(name, 0) + int(n)
            score_sum[name] = score_sum.get(name, 0.0) + float(s or 0.0)
        del t, scores, grouped
    errors: dict[str, int] = {}
    error_rows = 0
    for f in success.get("error_files", []):
        t = _read_parquet_columns(storage.join(dst, f), ["error"])
        error_rows += t.num_rows
        reasons = pc.value_counts(t.column("error").combine_chunks()) if t.num_rows else None
        if reasons is not None:
            for entry in reasons.to_pylist():
                reason = (entry["values"] or "").split(":", 1)[0].strip() or "unknown"
                errors[reason] = errors.get(reason, 0) + int(entry["counts"])
        del t

    folder = storage.join(dst, PREDICT_REPORT_DIR)
    plots = _Plots(folder)
    model_classes = _model_classes(success)
    for c in model_classes:  # classes never predicted show as zero bars
        by_class.setdefault(c, 0)
    classes = [*model_classes, *sorted(set(by_class) - set(model_classes))]
    title = "Predicted class distribution"
    shown = classes
    if len(classes) > MAX_BARS:
        shown = sorted(classes, key=lambda c: (-by_class[c], c))[:MAX_BARS]
        title = f"Predicted class distribution: the {MAX_BARS} most frequent of {len(classes)} classes"
    if rows:
        dist = plots.add("class_distribution.png", "predicted class distribution", _bar_plot(
            shown, [by_class[c] for c in shown], title, "images", "predicted class",
            labels=[str(by_class[c]) for c in shown], counts=True))
        hist_png = plots.add("score_histogram.png", "score histogram", _hist_plot(edges, hist, rows))
    else:
        dist = plots.add("class_distribution.png", "predicted class distribution",
                         _note_plot(title, "no predictions were committed"))
        hist_png = ""
    if errors:
        names = sorted(errors, key=lambda r: (-errors[r], r))
        err_png = plots.add("errors.png", "errors by reason", _bar_plot(
            names, [errors[r] for r in names], f"Undecodable images by reason ({error_rows} in all)",
            "images", "reason", labels=[str(errors[r]) for r in names], color="tab:red", counts=True))
    else:
        err_png = plots.add("errors.png", "errors by reason",
                            _note_plot("Undecodable images by reason", "no errors: every image was decoded"))
    report = {
        "predictions_uri": dst, "rows": rows, "errors": error_rows,
        "rows_in_success": success.get("rows"), "errors_in_success": success.get("errors"),
        "files": len(success.get("files", [])), "error_files": len(success.get("error_files", [])),
        "model": success.get("model"), "run_id": success.get("run_id"), "committed": success.get("committed"),
        "counts_by_class": {c: by_class[c] for c in classes},
        "mean_score_by_class": {c: score_sum[c] / by_class[c] for c in classes if by_class[c]},
        "score_histogram": {"bins": edges.tolist(), "counts": hist.tolist()},
        "errors_by_reason": dict(sorted(errors.items())),
        "plots": plots.names,
    }
    plots.drop_stale(PREDICT_PLOTS)
    _write_json(storage.join(folder, JSON_NAME), report)
    summary = [["predictions", dst], ["model", success.get("model", "")], ["run id", success.get("run_id", "")],
               ["committed", success.get("committed", "")], ["rows", rows], ["undecodable images", error_rows],
               ["part files", report["files"]], ["error files", report["error_files"]]]
    if rows:
        summary.append(["mean score", sum(score_sum.values()) / rows])
        summary.append(["share with score < 0.5", float(hist[: SCORE_BINS // 2].sum() / rows)])
    sections = ["<h2>Summary</h2>", _table(["", "value"], [[str(k), v] for k, v in summary], left=2)]
    if rows and (success.get("rows") not in (None, rows)):
        sections.append(f'<p class="note">_SUCCESS lists {success.get("rows")} rows; the committed files '
                        f"hold {rows}.</p>")
    sections += ['<h2>Plots</h2><div class="plots">', dist, hist_png, err_png, "</div>",
                 "<h2>Predictions by class</h2>",
                 _table(["class", "images", "share", "mean score"],
                        [[c, by_class[c], by_class[c] / rows, report["mean_score_by_class"].get(c)]
                         for c in classes]) if rows else "<p>none</p>",
                 "<h2>Score histogram</h2>",
                 _table(["score from", "to", "images"],
                        [[f"{edges[i]:.2f}", f"{edges[i + 1]:.2f}", int(hist[i])] for i in range(SCORE_BINS)],
                        left=0),
                 "<h2>Errors by reason</h2>",
                 _table(["reason", "images"], [[r, errors[r]] for r in sorted(errors)]) if errors
                 else "<p>No undecodable images.</p>"]
    html_uri = storage.join(folder, HTML_NAME)
    storage.write_bytes(html_uri, _page("Prediction report", sections).encode("utf-8"))
    return html_uri


def _model_classes(success: dict[str, Any]) -> list[str]:
    """The model's class list from its artifact (``_SUCCESS`` names it), or [] if unreadable."""
    from pipeline.models import artifact

    uri = success.get("model_uri")
    if not uri:
        return []
    try:
        return [str(c) for c in artifact.read_meta(uri).get("classes", [])]
    except Exception:  # noqa: BLE001 - the report still works from the predictions alone
        return []


def _hist_plot(edges: np.ndarray, counts: np.ndarray, rows: int) -> bytes:
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", edgecolor="white", color="tab:green")
    ax.set_title(f"Top-1 score histogram ({rows} images)")
    ax.set_xlabel("score (probability of the predicted class)")
    ax.set_ylabel("images")
    ax.set_xlim(0.0, 1.0)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, axis="y", alpha=0.3)
    return _png(fig)


# ------------------------------------------------------------------------ TensorBoard

_TB_TAGS = {"train_loss": "loss/train", "val_loss": "loss/val", "train_accuracy": "accuracy/train",
            "val_accuracy": "accuracy/val", "best_val_accuracy": "accuracy/best_val", "lr": "lr",
            "images_per_second": "throughput/images_per_second", "epoch_seconds": "time/epoch_seconds"}


def write_tensorboard(run_uri_local_dir: str, history: list[dict]) -> None:
    """Write every numeric per-epoch metric as TensorBoard scalars to ``<dir>/tensorboard/``.

    The step is the epoch number. Event files written here before are replaced, so
    calling this again with the full history does not duplicate points. Remote run
    folders (``s3://``) are skipped silently: TensorBoard files there would need a
    local copy first.
    """
    if storage.is_remote(run_uri_local_dir):
        return None
    from tensorboardX import SummaryWriter

    logdir = os.path.join(storage.normalize(run_uri_local_dir), "tensorboard")
    os.makedirs(logdir, exist_ok=True)
    for name in os.listdir(logdir):
        if name.startswith("events.out.tfevents."):
            os.unlink(os.path.join(logdir, name))
    writer = SummaryWriter(logdir=logdir)
    try:
        for i, h in enumerate(history):
            step = int(h.get("epoch", i + 1))
            for key, value in h.items():
                if key in ("epoch", "step") or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                writer.add_scalar(_TB_TAGS.get(key, f"other/{key}"), float(value), global_step=step)
    finally:
        writer.close()
    return None

"""Report plots: matplotlib figures drawn headless (Agg) and returned as PNG bytes.

Each function takes plain numbers and names and knows nothing about runs, storage or
HTML; the report assemblers (:mod:`pipeline.report.train_report`,
:mod:`pipeline.report.predict_report`) decide what to draw and where it goes.
"""

from __future__ import annotations

import io
import math
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: before pyplot is imported

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from pipeline import images  # noqa: E402

DPI = 100
MAX_BARS = 30  # class bar charts show at most this many classes (all of them stay in the JSON)
MAX_ANNOTATED_CLASSES = 30  # confusion matrix cells get their counts written up to this size
MAX_NAMED_CLASSES = 60  # above this, confusion matrix axes show class indices instead of names


def short(name: str, n: int = 14) -> str:
    """``name`` cut to ``n`` characters (with an ellipsis) for axis labels and titles."""
    return name if len(name) <= n else name[: n - 1] + "…"


def to_png(fig: Any) -> bytes:
    """Render ``fig`` as PNG bytes and close it (figures are never kept open)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def line_plot(epochs: list[float], series: list[tuple[str, list[float]]], title: str, ylabel: str,
              ylim: tuple[float, float] | None = None, logy: bool = False) -> bytes:
    """One line per ``(label, values)`` in ``series`` over ``epochs``."""
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
    return to_png(fig)


def _tick_style(labels: list[str], longest: int) -> dict[str, Any]:
    """Rotate tick labels longer than ``longest`` characters so they do not overlap."""
    slanted = max(map(len, labels), default=0) > longest
    return {"rotation": 45 if slanted else 0, "ha": "right" if slanted else "center"}


def confusion_plot(cm: np.ndarray, classes: list[str]) -> bytes:
    """Row-normalised confusion matrix (rows: true class); counts written in small matrices."""
    n = len(classes)
    side = min(max(4.5, 0.45 * n + 2.0), 14.0)  # inches
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    total, correct = int(cm.sum()), int(np.trace(cm))
    acc = correct / total if total else 0.0
    annotate = n <= MAX_ANNOTATED_CLASSES
    ax.set_title(f"Confusion matrix: {total} images, accuracy {acc:.4f}" + ("\n(cell text = count)" if annotate else ""))
    named = n <= MAX_NAMED_CLASSES
    ax.set_xlabel("predicted class" if named else "predicted class (index in classes)")
    ax.set_ylabel("true class" if named else "true class (index in classes)")
    if named:
        names = [short(c, 12) for c in classes]
        ax.set_xticks(range(n), names, **_tick_style(names, 2))
        ax.set_yticks(range(n), names)
    if annotate:
        size = 10 if n <= 12 else 8 if n <= 20 else 6
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=size,
                        color="white" if frac[i, j] > 0.5 else "black")
    return to_png(fig)


def bar_plot(names: list[str], values: list[float], title: str, ylabel: str, xlabel: str,
             ylim: tuple[float, float] | None = None, labels: list[str] | None = None,
             color: str = "tab:blue", counts: bool = False) -> bytes:
    """One bar per name; ``labels`` written over the bars (up to MAX_BARS); ``counts``: integer axis."""
    n = len(names)
    fig, ax = plt.subplots(figsize=(min(max(6.0, 0.42 * n + 1.5), 20.0), 4.4))
    shown = [short(c) for c in names]
    bars = ax.bar(range(n), values, color=color, width=0.8 if n > 4 else 0.5)
    if counts:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xticks(range(n), shown, **_tick_style(shown, 3))
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
    return to_png(fig)


def hist_plot(edges: np.ndarray, counts: np.ndarray, rows: int) -> bytes:
    """Top-1 score histogram: ``counts`` per bin between ``edges`` over [0, 1]."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", edgecolor="white", color="tab:green")
    ax.set_title(f"Top-1 score histogram ({rows} images)")
    ax.set_xlabel("score (probability of the predicted class)")
    ax.set_ylabel("images")
    ax.set_xlim(0.0, 1.0)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, axis="y", alpha=0.3)
    return to_png(fig)


def note_plot(title: str, text: str) -> bytes:
    """A plot-sized box holding only ``text``: says why a plot has nothing to show."""
    fig, ax = plt.subplots(figsize=(6.0, 2.2))
    ax.axis("off")
    ax.set_title(title)
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=12, transform=ax.transAxes)
    return to_png(fig)


def image_grid(tiles: list[tuple[str, bytes]], title: str) -> bytes:
    """Encoded images (PNG/JPEG/... bytes) in a grid of up to 4 columns, each with its caption."""
    n = len(tiles)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.8 * cols, 2.9 * rows + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (caption, data) in zip(axes.flat, tiles):
        img = images.decode_rgb(data)
        small = max(img.shape[:2]) < 96  # pixels: tiny images stay crisp instead of blurred
        ax.imshow(img, interpolation="nearest" if small else "antialiased")
        ax.set_title(caption, fontsize=9)
    fig.suptitle(title, fontsize=12)
    fig.tight_layout(h_pad=1.5, rect=(0.0, 0.0, 1.0, 0.98 if rows > 1 else 0.93))
    return to_png(fig)


def learning_curve_plot(per_class: list[float], mean: list[float], low: list[float], high: list[float],
                        fit: tuple[list[float], list[float]] | None, title: str) -> bytes:
    """Test accuracy (mean, and the seeds' range as error bars) against training images
    per class on a log axis, with the fitted curve ``fit = (xs, ys)`` drawn dashed."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    m = np.asarray(mean)
    ax.errorbar(per_class, m, yerr=[m - np.asarray(low), np.asarray(high) - m], marker="o", markersize=5,
                capsize=3, label="measured (mean, range over seeds)")
    if fit is not None:
        ax.plot(*fit, linestyle="--", color="gray", label="power-law fit of the error")
    ax.set_xscale("log")
    ax.set_title(title)
    ax.set_xlabel("training images per class")
    ax.set_ylabel("test accuracy")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    return to_png(fig)

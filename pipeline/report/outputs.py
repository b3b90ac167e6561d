"""Where a report's files go: its PNG folder (:class:`PlotSet`) and its ``report.json``.

A report writes every plot it draws as a PNG file next to ``report.json`` and also
embeds the same bytes in the HTML page; plots an earlier report drew but this one did
not are removed, so the folder always matches ``report.json["plots"]``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline import storage


@dataclass(frozen=True)
class Plot:
    """One drawn plot: its file name in the report folder, alt text and PNG bytes."""

    name: str
    alt: str
    png: bytes


@dataclass
class PlotSet:
    """PNG files written under one folder, kept in drawing order for embedding."""

    folder: str
    items: list[Plot] = field(default_factory=list)

    def add(self, name: str, alt: str, png: bytes) -> Plot:
        storage.write_bytes(storage.join(self.folder, name), png)
        plot = Plot(name, alt, png)
        self.items.append(plot)
        return plot

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.items]

    def drop_stale(self, known: tuple[str, ...]) -> None:
        """Remove plots of an earlier report that this one did not draw (e.g. no mistakes now)."""
        for name in known:
            if name not in self.names:
                storage.remove(storage.join(self.folder, name))


def _json_default(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    raise TypeError(f"not JSON serializable: {type(v).__name__}")


def write_json(uri: str, obj: Any) -> None:
    """Like storage.write_json, but numpy scalars/arrays (from callers' dicts) are fine too;
    URI passwords are redacted."""
    text = json.dumps(storage.redact(obj), indent=2, sort_keys=True, default=_json_default) + "\n"
    storage.write_bytes(uri, text.encode("utf-8"))

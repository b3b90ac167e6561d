"""The console's one progress bar (pack, train, predict): images done, img/s, ETA.

A bar on the driver's stderr, drawn by tqdm: redrawn at most every
:data:`REFRESH_S` seconds on a terminal; where stderr is not a terminal (a log file, a
Ray job's log) a plain line at most every :data:`LOG_EVERY_S`, so logs stay readable.
``quiet`` draws nothing.
"""

from __future__ import annotations

import sys

from tqdm import tqdm

REFRESH_S = 1.0  # terminal: redraw at most this often
LOG_EVERY_S = 30.0  # not a terminal: one line at most this often
BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar:24}| {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}, {rate_fmt}]"


class _Lines:
    """stderr for a bar where it is no terminal: each redraw becomes its own line."""

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip("\n")
        if text.strip():
            sys.stderr.write(text + "\n")

    def flush(self) -> None:
        sys.stderr.flush()


def bar(total: int | None, desc: str, quiet: bool = False, unit: str = "img", initial: int = 0) -> tqdm:
    """A progress bar of ``total`` ``unit`` s (``update(n)`` as they finish; ``close()`` at the end)."""
    tty = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, initial=initial, disable=quiet,
                file=sys.stderr if tty else _Lines(),
                mininterval=REFRESH_S if tty else LOG_EVERY_S, dynamic_ncols=tty, leave=True,
                bar_format=BAR_FORMAT, ascii=not tty, smoothing=0.3)

"""Report HTML: Jinja2 templates (``pipeline/report/templates/``) rendered with autoescaping.

Pages are self-contained: the CSS is inline and plots are embedded as base64 PNG data
URIs, so a report opens offline from any copy of the run folder. Every value reaches
the page through a template, escaped and with URI passwords redacted
(:func:`pipeline.storage.redact`); no HTML is built from strings in Python.
"""

from __future__ import annotations

import base64
import math
from typing import Any

import jinja2

from pipeline import storage

_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("pipeline.report", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,  # a missing context key is a bug, not an empty cell
    trim_blocks=True,
    lstrip_blocks=True,
    finalize=storage.redact,  # every value on a page: no URI's user:password@ (config text, URIs)
)


def fmt(v: Any) -> str:
    """A table cell's text: strings as they are, floats to 4 decimals (or 4 significant digits)."""
    if isinstance(v, str):
        return v
    if v is None:
        return "n/a"
    if isinstance(v, float) and not isinstance(v, bool):
        if math.isnan(v):
            return "nan"
        return f"{v:.4g}" if (abs(v) >= 1e4 or (v != 0 and abs(v) < 1e-3)) else f"{v:.4f}"
    return str(v)


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


_ENV.filters["fmt"] = fmt
_ENV.filters["png_data_uri"] = png_data_uri


def render(template: str, **context: Any) -> str:
    """The page ``template`` (a file name under templates/) filled with ``context``."""
    return _ENV.get_template(template).render(**context)

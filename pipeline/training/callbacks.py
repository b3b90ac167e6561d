"""Training callbacks: a small, documented way to observe (or disturb) the training
loop from outside, without parameters threaded through :func:`pipeline.training.driver.run`.

``train.callbacks`` lists entries ``package.module:Class``, optionally followed by
``?key=value&key=value`` (each value parsed as YAML, like ``--set``); every training
worker imports the module and builds ``Class(**params)``. The module must be importable
on the workers (for a local Ray the driver's working directory is on their path).

The loop calls, on every rank:

- :meth:`Callback.on_step` after each optimizer step, before any checkpoint that step
  triggers;
- :meth:`Callback.on_checkpoint` after a checkpoint (mid-epoch or epoch end) has been
  reported to Ray Train.

Tests use this for id tracing and fault injection (``tests/train_callbacks.py``).
"""

from __future__ import annotations

import importlib
from typing import Any
from urllib.parse import parse_qsl

import yaml

from pipeline.errors import UserError


class Callback:
    """Base class: every hook is a no-op; override the ones you need."""

    def on_step(self, rank: int, epoch: int, batch: dict[str, Any]) -> None:
        """After an optimizer step of epoch index ``epoch`` (0-based). ``batch`` holds
        ``image_id``, ``label`` and ``row`` (the rows' indices in the train split)."""

    def on_checkpoint(self, rank: int, epoch: int) -> None:
        """After a checkpoint taken during epoch index ``epoch`` was reported."""


class Callbacks(Callback):
    """Several callbacks called in order."""

    def __init__(self, items: list[Callback]) -> None:
        self.items = items

    def on_step(self, rank: int, epoch: int, batch: dict[str, Any]) -> None:
        for c in self.items:
            c.on_step(rank, epoch, batch)

    def on_checkpoint(self, rank: int, epoch: int) -> None:
        for c in self.items:
            c.on_checkpoint(rank, epoch)


def build(entry: str) -> Callback:
    """One ``package.module:Class[?key=value&...]`` entry -> an instance (UserError if
    the module, the class or its parameters do not fit)."""
    path, _, query = entry.partition("?")
    module_name, _, class_name = path.partition(":")
    if not module_name or not class_name:
        raise UserError(f"train.callbacks entry {entry!r} must be 'package.module:Class[?key=value&...]'")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as e:
        raise UserError(f"train.callbacks entry {entry!r}: {e}") from None
    params = {k: yaml.safe_load(v) for k, v in parse_qsl(query, keep_blank_values=True)}
    try:
        return cls(**params)
    except TypeError as e:
        raise UserError(f"train.callbacks entry {entry!r}: {e}") from None


def load(entries: list[str]) -> Callbacks:
    """All of ``train.callbacks``, built in order."""
    return Callbacks([build(e) for e in entries])

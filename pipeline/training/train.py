"""Compatibility alias: the training entry points now live in
:mod:`pipeline.training.driver` (``run``, ``run_name``). Kept only until the callers
(cli, workflows, tests) import from there; delete it then."""

from pipeline.training.driver import run, run_name

__all__ = ["run", "run_name"]

"""Workflows: whole cycles built from the stages, ``demo`` (``imgpipe demo``) and
``retrain`` (``imgpipe retrain``, the nightly cycle)."""

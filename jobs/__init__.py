"""Thin Ray job entrypoints: ``python -m jobs.<command> ARGS`` is ``imgpipe <command> ARGS``."""

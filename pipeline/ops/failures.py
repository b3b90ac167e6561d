"""Errors from Ray tasks and actors, as their cause: Ray Core's wrappers unwrapped
(:func:`cause`), the result as the CLI's one-line error (:func:`as_error`), and an
exception carried across a task boundary as text (:func:`describe`, :func:`reraise`).

Ray hands a driver a worker's error inside wrappers: ``RayTaskError`` (the remote
exception in ``cause``), ``ActorDiedError`` whose actor's ``__init__`` raised (the
``RayTaskError`` in its ``cause``), Ray Data's ``UserCodeException`` (the original in
``__cause__`` when raised in the driver). Their messages are tracebacks and retry
hints; the user gets the original's first line: exit 2 when it is bad input (a
:class:`~pipeline.errors.UserError`, e.g. a 403 on an image, a model whose weights
fail their sha256), exit 1 otherwise.

This module knows only Ray Core and Ray Data; Ray Train's wrappers are unwrapped by
:mod:`pipeline.training.failures`, which may build on :func:`cause` here.
"""

from __future__ import annotations

import importlib
import json
from typing import Any, NoReturn

from ray.exceptions import ActorDiedError, RayError, RayTaskError

from pipeline.errors import JobFailed, UserError

MAX_DEPTH = 16  # wrappers unwrapped at most (a guard against cycles)


def _inner(e: BaseException) -> BaseException | None:
    """The exception one Ray Core / Ray Data wrapper stands for, or None."""
    if isinstance(e, RayTaskError):
        return e.cause
    if isinstance(e, ActorDiedError):
        c = getattr(e, "cause", None)  # a RayTaskError when the actor's __init__ raised
        return c if isinstance(c, BaseException) else None
    if isinstance(e, RayError) and not isinstance(e, (UserError, JobFailed)):
        return e.__cause__  # e.g. Ray Data's UserCodeException, raised in this process
    return None


def cause(e: BaseException) -> BaseException:
    """The original exception inside Ray's wrappers (``e`` itself when it is none)."""
    for _ in range(MAX_DEPTH):
        inner = _inner(e)
        if inner is None or inner is e:
            break
        e = inner
    return e


def first_line(e: BaseException) -> str:
    """The first non-empty line of ``e``'s message ('' if none)."""
    return next((line.strip() for line in str(e).splitlines() if line.strip()), "")


def as_error(e: BaseException, what: str) -> UserError | JobFailed:
    """``e`` as the CLI's one-line error about ``what`` (e.g. "predict into DST"):
    a ``UserError`` (exit 2) for bad input, else ``JobFailed`` (exit 1). Raise it
    ``from e`` so ``--verbose`` still shows the whole chain."""
    c = cause(e)
    if isinstance(c, UserError):
        return type(c)(f"{what}: {first_line(c)}") if _plain_init(type(c)) else UserError(f"{what}: {first_line(c)}")
    if isinstance(c, JobFailed):
        return JobFailed(f"{what} failed: {first_line(c)}")
    return JobFailed(f"{what} failed: {type(c).__name__}: {first_line(c)}")


def _plain_init(cls: type) -> bool:
    """Whether ``cls(message)`` builds one (so the subclass survives :func:`as_error`)."""
    try:
        cls("")
    except Exception:  # noqa: BLE001 - a subclass with another constructor: use the base class
        return False
    return True


def describe(e: BaseException) -> str:
    """An exception as JSON text (its class's qualified name and message), to be returned
    by a task instead of raised (Ray Data would wrap or retry a raised one)."""
    return json.dumps({"type": f"{type(e).__module__}.{type(e).__qualname__}", "message": str(e)})


def reraise(described: str) -> NoReturn:
    """Raise what :func:`describe` described: the same class for pipeline's ``UserError``
    / ``JobFailed`` types (exit 2 / 1 with their one line), else ``JobFailed`` naming the
    type (exit 1)."""
    d = json.loads(described)
    module, _, name = d["type"].rpartition(".")
    cls: Any = None
    if module.split(".")[0] == "pipeline":  # only our own error types are re-created by name
        try:
            cls = getattr(importlib.import_module(module), name, None)
        except ImportError:
            cls = None
    if isinstance(cls, type) and issubclass(cls, (UserError, JobFailed)) and _plain_init(cls):
        raise cls(d["message"])
    raise JobFailed(f"{name}: {d['message']}")

"""Errors from Ray workers, as their cause: one function unwraps Ray's wrappers
(:func:`cause`), one turns the result into the CLI's one-line error (:func:`as_error`).

Ray hands a driver an error from a worker inside wrappers: Ray Train's
``WorkerGroupError`` (per-rank failures in ``worker_failures``) or ``ControllerError``
(``controller_failure``), around Ray Core's ``RayTaskError`` (the remote exception in
``cause``; a Ray Data reader's error only keeps its type when the dataset is built
with ``raise_original_map_exception``, see :func:`pipeline.data.stream.read_split`).
Their own messages are tracebacks and retry hints; the user gets the original's
first line: exit 2 when it is bad input (a :class:`~pipeline.errors.UserError`, e.g.
a shard whose sha256 disagrees with the manifest), exit 1 otherwise.

Whether a restart can help is decided here too (:func:`retryable`): bad input fails the
same way every time, so the driver does not restart workers for it.
"""

from __future__ import annotations

from ray.train import ControllerError, WorkerGroupError

from pipeline.errors import JobFailed, UserError
from pipeline.ops import failures as ray_failures
from pipeline.ops.failures import first_line

MAX_DEPTH = 16  # wrappers unwrapped at most (a guard against cycles)

__all__ = ["as_error", "cause", "first_line", "retryable"]


def _inner(e: BaseException) -> BaseException | None:
    """The exception one Ray Train wrapper stands for, or None when ``e`` is not one
    (Ray Core's and Ray Data's wrappers: :func:`pipeline.ops.failures.cause`)."""
    if isinstance(e, WorkerGroupError):
        failures = [cause(f) for _, f in sorted(e.worker_failures.items())]
        # every rank may fail, most of them because another one did: bad input explains the rest
        return next((f for f in failures if isinstance(f, UserError)), failures[0] if failures else None)
    if isinstance(e, ControllerError):
        return e.controller_failure
    return None


def cause(e: BaseException) -> BaseException:
    """The original exception inside Ray Train's and Ray's wrappers (``e`` itself when
    it is none)."""
    for _ in range(MAX_DEPTH):
        e = ray_failures.cause(e)
        inner = _inner(e)
        if inner is None or inner is e:
            break
        e = inner
    return e


def retryable(e: BaseException) -> bool:
    """Whether restarting the workers might get past ``e`` (bad input never does)."""
    return not isinstance(cause(e), (UserError, JobFailed))


def as_error(e: BaseException, what: str) -> UserError | JobFailed:
    """``e`` as the CLI's one-line error about ``what`` (e.g. "training run NAME"):
    a ``UserError`` (exit 2) for bad input, else ``JobFailed`` (exit 1)."""
    c = cause(e)
    if isinstance(c, UserError):
        return UserError(f"{what}: {first_line(c)}")
    if isinstance(c, JobFailed):
        return JobFailed(f"{what} failed: {first_line(c)}")
    return JobFailed(f"{what} failed: {type(c).__name__}: {first_line(c)}")

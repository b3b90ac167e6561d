"""Leases: at most one live run writes a given output folder, dataset or training run.

A run takes ``<folder>/_lease.json`` (:data:`pipeline.names.LEASE`) before it writes and
keeps it while it runs::

    with lease.hold(folder_uri, what="predict output", ttl_s=120) as held:
        ...
        held.check()  # before each commit: JobFailed if the lease was lost
        ...

The lease is a small JSON record (:class:`Record`: owner, host, pid, command, what,
acquired, heartbeat, expires, a random token). A background thread renews it every
``ttl_s / 4`` seconds; leaving the block deletes it. Another run that finds a live lease
stops with :class:`LeaseHeld` (a ``UserError``: exit 2) naming the holder and the time its
lease would expire. A lease whose expiry has passed belongs to a crashed run and is taken
over, so the documented rerun after a crash resumes (once ``ttl_s`` has passed). Expiry
is the only rule: the same host and pid get no exemption.

Every change to the lease is a conditional write (:mod:`pipeline.storage`'s
``create_if_absent`` / ``replace_if_version`` / ``remove_if_version``), so two runs can not
both win: on S3 the store decides (``If-None-Match: *`` to create, ``If-Match: <ETag>`` to
renew, take over or release; 412 means the other run won); on local disk (and NFS with
working ``flock``) a lock file serialises check-and-replace. A renewal that finds the
lease changed (this run stalled past its expiry and another run took over) stops renewing
and makes :meth:`Held.check` raise ``JobFailed``.

What this relies on: host clocks agree to well within ``ttl_s`` (NTP), since a reader
compares the writer's ``expires`` with its own clock; the heartbeat thread gets to run at
least once per ``ttl_s`` (a stalled process loses its lease, by design).
"""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import json
import logging
import os
import socket
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from pipeline import names, storage
from pipeline.errors import JobFailed, UserError

log = logging.getLogger("imgpipe")

DEFAULT_TTL_S = 120.0  # a crashed run's output is free again this long after its last heartbeat
ACQUIRE_ROUNDS = 5  # lost races (create/take-over) before giving up with LeaseHeld


class LeaseHeld(UserError):
    """Another live run holds the lease (exit 2)."""


@dataclass(frozen=True)
class Record:
    """The lease file's content. Times are ISO 8601 UTC."""

    owner: str  # the user running the command
    host: str
    pid: int
    command: str  # program and subcommand only (arguments may hold secrets)
    what: str  # what the lease guards, e.g. "predict output"
    acquired: str
    heartbeat: str
    expires: str
    token: str  # random per hold: tells this run's lease from any other

    def to_bytes(self) -> bytes:
        return (json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Record | None:
        """The record, or None for content that is not one (treated as expired)."""
        try:
            raw = json.loads(data)
            rec = cls(**{f.name: raw[f.name] for f in dataclasses.fields(cls)})
            _parse(rec.expires)
            return rec
        except (ValueError, TypeError, KeyError):
            return None

    def expired(self, now: datetime) -> bool:
        return _parse(self.expires) <= now

    def renewed(self, now: datetime, ttl_s: float) -> Record:
        return dataclasses.replace(self, heartbeat=_iso(now), expires=_iso(now + timedelta(seconds=ttl_s)))


@contextlib.contextmanager
def hold(folder_uri: str, what: str, ttl_s: float = DEFAULT_TTL_S) -> Iterator[Held]:
    """Hold the lease on ``folder_uri`` while the block runs (see the module docstring).
    Raises :class:`LeaseHeld` if a live run holds it."""
    held = acquire(folder_uri, what, ttl_s)
    try:
        yield held
    finally:
        held.release()


def acquire(folder_uri: str, what: str, ttl_s: float = DEFAULT_TTL_S) -> Held:
    """Take the lease on ``folder_uri`` and start renewing it; :meth:`Held.release` ends it.
    Prefer :func:`hold`."""
    if ttl_s <= 0:
        raise UserError(f"lease ttl must be > 0 seconds, got {ttl_s}")
    _refuse_file(folder_uri)
    uri = storage.join(folder_uri, names.LEASE)
    now = _now()
    mine = Record(owner=_user(), host=socket.gethostname(), pid=os.getpid(), command=_command(),
                  what=what, acquired=_iso(now), heartbeat=_iso(now),
                  expires=_iso(now + timedelta(seconds=ttl_s)), token=uuid.uuid4().hex)
    for _ in range(ACQUIRE_ROUNDS):
        current = storage.read_versioned(uri)
        if current is None:
            version = storage.create_if_absent(uri, mine.to_bytes())
        else:
            theirs = Record.from_bytes(current.data)
            if theirs is not None and not theirs.expired(_now()):
                raise LeaseHeld(_held_message(folder_uri, theirs))
            version = storage.replace_if_version(uri, mine.to_bytes(), current.version)
            if version is not None:
                log.warning("%s: took over the expired lease of %s", folder_uri,
                            _describe(theirs) if theirs else "an unreadable lease file")
        if version is not None:
            return Held(uri, folder_uri, mine, version, ttl_s)
    raise LeaseHeld(f"{what} {folder_uri} is contended: lost the race for {uri} "
                    f"{ACQUIRE_ROUNDS} times; try again")


class Held:
    """A lease this process holds: renewed by a background thread until :meth:`release`."""

    def __init__(self, uri: str, folder_uri: str, record: Record, version: str, ttl_s: float) -> None:
        self.uri = uri
        self.folder_uri = folder_uri
        self.ttl_s = ttl_s
        self._record = record
        self._version: str | None = version
        self._lost: str | None = None  # why the lease was lost, once it is
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="imgpipe-lease", daemon=True)
        self._thread.start()

    @property
    def record(self) -> Record:
        with self._lock:
            return self._record

    @property
    def lost(self) -> str | None:
        """Why the lease was lost, or None while this run holds it."""
        with self._lock:
            return self._lost

    def check(self) -> None:
        """Raise ``JobFailed`` if the lease was lost (call before committing output)."""
        reason = self.lost
        if reason is not None:
            raise JobFailed(f"{self.record.what} {self.folder_uri}: lost the lease, stopping "
                            f"before writing over another run: {reason}")

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still this run's."""
        self._stop.set()
        self._thread.join()
        with self._lock:
            version, self._version = self._version, None
        if version is None or self._lost is not None:
            return
        try:
            storage.remove_if_version(self.uri, version)
        except Exception as e:  # noqa: BLE001 - the lease then just expires
            log.warning("%s: could not release the lease (it expires in %.0f s): %s", self.uri, self.ttl_s, e)

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            if not self._renew():
                return

    def _renew(self) -> bool:
        """Renew once; False when the lease is lost (renewing stops)."""
        now = _now()
        with self._lock:
            record, version = self._record, self._version
        if version is None:
            return False
        new = record.renewed(now, self.ttl_s)
        try:
            new_version = storage.replace_if_version(self.uri, new.to_bytes(), version)
        except Exception as e:  # noqa: BLE001 - retried next beat while the lease is live
            if not record.expired(_now()):
                log.warning("%s: lease renewal failed (retrying): %s", self.uri, e)
                return True
            return self._lose(f"could not renew it before it expired at {_hms(record.expires)} UTC: {e}")
        if new_version is None:
            current = storage.read_versioned(self.uri)
            theirs = Record.from_bytes(current.data) if current else None
            by = f"taken over by {_describe(theirs)}" if theirs else "deleted by someone else"
            return self._lose(f"{self.uri} was {by} (this run did not renew it before "
                              f"{_hms(record.expires)} UTC)")
        with self._lock:
            if self._version is None:  # released meanwhile: leave it to release()
                return False
            self._record, self._version = new, new_version
        return True

    def _lose(self, reason: str) -> bool:
        with self._lock:
            self._lost = reason
            self._version = None
        log.error("%s", reason)
        return False


# ------------------------------------------------------------------------ helpers


def _refuse_file(folder_uri: str) -> None:
    """A local output path that is a regular file: one line, exit 2."""
    if not storage.is_remote(folder_uri):
        path = storage.normalize(folder_uri)
        if os.path.exists(path) and not os.path.isdir(path):
            raise UserError(f"{folder_uri} is a file; expected a folder (or a path that does not exist yet)")


def _held_message(folder_uri: str, rec: Record) -> str:
    return (f"{rec.what} {folder_uri} is in use by a live run: {_describe(rec)}, since "
            f"{_hms(rec.acquired)} UTC; let it finish, or wait until {_hms(rec.expires)} UTC, "
            f"when a crashed run's lease expires")


def _describe(rec: Record) -> str:
    return f"'{rec.command}' (pid {rec.pid} on {rec.host}, user {rec.owner})"


def _command() -> str:
    """Program name and subcommand, e.g. "imgpipe predict"; never the arguments."""
    argv = [a for a in sys.argv if a]
    if not argv:
        return "python"
    prog = os.path.basename(argv[0])
    if prog in ("-c", "-m"):
        prog = "python"
    elif prog == "__main__.py":  # python -m <package>
        prog = f"python -m {os.path.basename(os.path.dirname(argv[0]))}"
    sub = argv[1] if len(argv) > 1 and argv[1].isidentifier() else ""
    return f"{prog} {sub}".strip()


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        return f"uid {os.getuid()}"


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _iso(t: datetime) -> str:
    return t.isoformat(timespec="milliseconds")


def _parse(s: str) -> datetime:
    return datetime.fromisoformat(s)


def _hms(iso: str) -> str:
    return _parse(iso).strftime("%H:%M:%S")

"""Object storage: the only module that talks to S3 or the local disk by URI.

Everything else passes URIs (``/abs/path``, ``file:///abs/path``, ``s3://bucket/key``)
and calls the functions here. What this module owns:

- resolving a URI to an fsspec filesystem (s3fs for ``s3://``; S3-compatible stores
  through ``AWS_ENDPOINT_URL`` or ``storage.s3.endpoint_url``);
- classifying storage errors from their structure (:func:`classify`): exception
  types, ``errno``, and for S3 the error code and HTTP status of the botocore
  ``ClientError`` that s3fs chains as ``__cause__``; never the message text, which
  holds URLs, ports and keys (``127.0.0.1:40437``, ``img_404.png``);
- the retry policy, below;
- batched reads (:func:`read_many`): many small objects fetched concurrently on s3fs'
  event loop, under the same policy and error types, errors in place;
- atomic writes: local files are written to a temp name then ``os.replace``d;
  an S3 PUT is atomic by itself;
- paginated, streaming listing (:func:`iter_files`) so a prefix of millions of
  objects is never held in memory at once;
- a pyarrow filesystem view for Ray Data / Ray Train storage;
- conditional writes of small objects (:func:`read_versioned`, :func:`create_if_absent`,
  :func:`replace_if_version`, :func:`remove_if_version`): compare-and-swap for leases,
  with the guarantees of each store stated in that section below.

Retry policy, decided here and nowhere else. An operation makes up to
``StorageOptions.retries`` attempts; a :data:`ErrorKind.TRANSIENT` failure (throttling,
5xx, timeouts, dropped connections, truncated bodies) is retried after an exponential
backoff (``backoff_s``, doubling, capped at 10 s, jittered x0.5-1.5); NotFound (404) and
Forbidden (403) fail at once naming the URI; anything else is raised as is at once; an
operation still failing after the last attempt raises :class:`StorageError` naming the
URI. :func:`retry` runs the policy for one call, :func:`read_many` runs it in rounds
(each round retries only the objects that failed). Below it no layer retries: the
filesystems handed out here have botocore's retries off (one attempt per request) and
s3fs' retry loop off (``retries=1``), so one attempt is one request. The only other
executor is the pyarrow view (:func:`pyarrow_filesystem`), whose calls run inside
pyarrow / Ray Train where no :func:`retry` can wrap them: there botocore's ``standard``
mode makes the same ``retries`` attempts per request with its own backoff.

Options travel explicitly (``StorageOptions`` is a small picklable value) so Ray
workers on other nodes see the same endpoint as the driver.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import fcntl
import functools
import hashlib
import http.client
import io
import json
import os
import posixpath
import random
import re
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
import botocore.exceptions
import botocore.parsers
import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from fsspec.asyn import sync
from fsspec.exceptions import FSTimeoutError

from pipeline.errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class StorageOptions:
    """How to reach object storage. Defaults come from the standard AWS variables."""

    endpoint_url: str | None = None  # S3-compatible endpoint; None -> $AWS_ENDPOINT_URL or AWS
    anon: bool = False  # unsigned requests (public buckets)
    retries: int = 6  # attempts for transient faults, including the first
    backoff_s: float = 0.2  # first backoff; doubles each attempt, with jitter, capped at 10 s
    extra: dict[str, Any] = field(default_factory=dict)  # passed to s3fs.S3FileSystem as is

    def __hash__(self) -> int:  # frozen dataclass with a dict field: hash the stable parts
        return hash((self.endpoint_url, self.anon, self.retries, self.backoff_s))


_default = StorageOptions()


def configure(opts: StorageOptions) -> None:
    """Set the process-wide default options (the CLI calls this from the config)."""
    global _default
    _default = opts
    if opts.endpoint_url:
        # Ray workers started on this node inherit the environment: keep them in step.
        os.environ["AWS_ENDPOINT_URL"] = opts.endpoint_url


def default_options() -> StorageOptions:
    return _default


class StorageError(OSError):
    """A storage operation that failed after retries, or a permanent fault."""


class NotFound(UserError):
    """The URI does not exist (404 / no such file)."""


class Forbidden(UserError):
    """Access denied (403)."""


# --------------------------------------------------------------------------- URIs


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def _strip_file(uri: str) -> str:
    return uri[len("file://") :] if uri.startswith("file://") else uri


def join(uri: str, *parts: str) -> str:
    """Join URI path segments with '/' (also for local paths)."""
    if is_remote(uri):
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://" + posixpath.join(rest, *parts)
    return os.path.join(_strip_file(uri), *parts)


def normalize(uri: str) -> str:
    """Canonical form: absolute local paths, ``s3://`` kept as is, no trailing slash."""
    if is_remote(uri):
        return uri.rstrip("/")
    return os.path.abspath(os.path.expanduser(_strip_file(uri)))


_fs_cache: dict[tuple, fsspec.AbstractFileSystem] = {}


def filesystem(uri: str, opts: StorageOptions | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` and the path inside it. An S3 filesystem makes
    one request per call (no retries of its own): wrap calls in :func:`retry`."""
    opts = opts or _default
    if not is_remote(uri):
        return fsspec.filesystem("file"), normalize(uri)
    return _s3(uri, opts, botocore_attempts=1), uri.split("://", 1)[1].rstrip("/")


def _s3(uri: str, opts: StorageOptions, botocore_attempts: int) -> fsspec.AbstractFileSystem:
    """The cached s3fs filesystem for ``uri``'s scheme; botocore makes up to
    ``botocore_attempts`` attempts a request, s3fs' own retry loop is off."""
    scheme = uri.split("://", 1)[0]
    if scheme not in ("s3", "s3a"):
        raise UserError(f"unsupported URI scheme '{scheme}://' in {uri}; valid: local paths, file://, s3://")
    endpoint = opts.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
    key = (scheme, endpoint, opts.anon, botocore_attempts)
    fs = _fs_cache.get(key)
    if fs is None:
        fs = fsspec.filesystem(
            "s3",
            anon=opts.anon,
            client_kwargs={"endpoint_url": endpoint} if endpoint else {},
            use_listings_cache=False,  # listings change under us (pack resumes, new nights)
            skip_instance_cache=True,
            # "total_max_attempts" counts the first attempt ("max_attempts" would not)
            config_kwargs={"retries": {"total_max_attempts": botocore_attempts, "mode": "standard"}},
            **opts.extra,
        )
        fs.retries = 1  # s3fs' loop: 1 attempt, no retries (see the module's retry policy)
        _fs_cache[key] = fs
    return fs


# ------------------------------------------------------------- error classification


class ErrorKind(enum.Enum):
    """What a storage error means for the retry policy."""

    TRANSIENT = "transient"  # worth another attempt after a backoff
    NOT_FOUND = "not_found"  # 404 / no such file: raised at once as NotFound
    FORBIDDEN = "forbidden"  # 403: raised at once as Forbidden
    PERMANENT = "permanent"  # anything else: raised at once, as is


# S3 error codes (``ClientError.response["Error"]["Code"]``); the throttling codes as
# botocore's standard retry mode knows them (botocore.retries.standard).
_CODE_KINDS: dict[str, ErrorKind] = {
    **dict.fromkeys(("NoSuchKey", "NoSuchBucket", "NoSuchVersion", "NotFound"), ErrorKind.NOT_FOUND),
    **dict.fromkeys(("AccessDenied", "Forbidden", "AllAccessDisabled", "AccountProblem",
                     "InvalidAccessKeyId", "SignatureDoesNotMatch"), ErrorKind.FORBIDDEN),
    **dict.fromkeys((
        "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
        "RequestThrottledException", "TooManyRequestsException", "RequestLimitExceeded",
        "BandwidthLimitExceeded", "RequestTimeout", "RequestTimeoutException",
        "PriorRequestNotComplete", "InternalError", "ServiceUnavailable", "XAmzContentSHA256Mismatch",
        "ConditionalRequestConflict",  # 409: a concurrent conditional write; S3 says retry
    ), ErrorKind.TRANSIENT),
}
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})

# Exceptions for a request or a body read that broke off: connection refused/reset/closed,
# timeouts, a body shorter than its Content-Length, an unparsable (throttled) reply. The
# set s3fs retries itself (s3fs.core.S3_RETRYABLE_ERRORS), plus botocore's connection
# errors and the builtin ones.
_TRANSIENT_TYPES: tuple[type[BaseException], ...] = (
    botocore.exceptions.ConnectionError,  # EndpointConnectionError, ConnectTimeoutError
    botocore.exceptions.HTTPClientError,  # ConnectionClosedError, ReadTimeoutError, ResponseStreamingError
    botocore.exceptions.IncompleteReadError,
    botocore.parsers.ResponseParserError,
    aiohttp.ClientConnectionError,  # ServerDisconnectedError, ClientOSError, ServerTimeoutError
    aiohttp.ClientPayloadError,  # truncated body
    http.client.IncompleteRead,  # and urllib3's, a subclass
    FSTimeoutError,
    ConnectionError,
    TimeoutError,
)
_PERMANENT_TYPES = (FileExistsError, IsADirectoryError, NotADirectoryError)
# errno of an OSError with no ClientError behind it. s3fs maps SlowDown / 503 to EBUSY,
# InternalError / 500 to EREMOTEIO, an unknown S3 code to EIO.
_TRANSIENT_ERRNOS = frozenset({errno.EBUSY, getattr(errno, "EREMOTEIO", errno.EIO), errno.EIO,
                               errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE,
                               errno.EAGAIN})


def classify(exc: BaseException) -> ErrorKind:
    """What ``exc`` means for the retry policy, from its structure alone.

    The explicit cause chain (``raise ... from``, as s3fs wraps a botocore
    ``ClientError`` into an ``OSError``) is walked by type: a ``ClientError`` anywhere in
    it decides by its S3 error code, then its HTTP status; otherwise the first exception
    whose type or ``errno`` is known decides. Message text is never read.
    """
    if isinstance(exc, UserError):  # already classified (NotFound, Forbidden) or bad input
        return ErrorKind.PERMANENT
    chain = _cause_chain(exc)
    for e in chain:
        if isinstance(e, botocore.exceptions.ClientError):
            return _classify_response(e.response)
    for e in chain:
        kind = _classify_type(e)
        if kind is not None:
            return kind
    return ErrorKind.PERMANENT


def _cause_chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and its explicit causes, outermost first (cycle-safe)."""
    chain: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and not any(e is seen for seen in chain):
        chain.append(e)
        e = e.__cause__
    return chain


def _classify_response(response: dict[str, Any]) -> ErrorKind:
    """A botocore error response: its S3 error code, else its HTTP status. A reply
    without a body (any HEAD) carries the bare status as its code, e.g. "404"."""
    code = str(response.get("Error", {}).get("Code", ""))
    if code in _CODE_KINDS:
        return _CODE_KINDS[code]
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if status is None and code.isdigit():
        status = int(code)
    if status == 404:
        return ErrorKind.NOT_FOUND
    if status == 403:
        return ErrorKind.FORBIDDEN
    return ErrorKind.TRANSIENT if status in _TRANSIENT_STATUS else ErrorKind.PERMANENT


def _classify_type(e: BaseException) -> ErrorKind | None:
    """``e``'s kind from its type and ``errno``; None when neither tells."""
    if isinstance(e, FileNotFoundError):
        return ErrorKind.NOT_FOUND
    if isinstance(e, PermissionError):
        return ErrorKind.FORBIDDEN
    if isinstance(e, _PERMANENT_TYPES):
        return ErrorKind.PERMANENT
    if isinstance(e, aiohttp.ClientResponseError):
        return _classify_response({"ResponseMetadata": {"HTTPStatusCode": e.status}})
    if isinstance(e, _TRANSIENT_TYPES):
        return ErrorKind.TRANSIENT
    if isinstance(e, OSError) and e.errno is not None:
        return ErrorKind.TRANSIENT if e.errno in _TRANSIENT_ERRNOS else ErrorKind.PERMANENT
    return None


# ------------------------------------------------------------------- retry policy


def _attempts(opts: StorageOptions) -> Iterator[int]:
    """Attempt numbers 1..``opts.retries``; resuming after an attempt sleeps the backoff
    first (exponential from ``opts.backoff_s``, capped at 10 s, jittered)."""
    delay = opts.backoff_s
    for attempt in range(1, _max_attempts(opts) + 1):
        if attempt > 1:
            time.sleep(min(delay, 10.0) * (0.5 + random.random()))
            delay *= 2
        yield attempt


def _max_attempts(opts: StorageOptions) -> int:
    return max(1, opts.retries)


def _verdict(e: Exception, uri: str, attempt: int, opts: StorageOptions) -> Exception | None:
    """What attempt ``attempt`` failing with ``e`` leads to: None to try again, or the
    error to surface: :class:`NotFound` / :class:`Forbidden` naming ``uri``,
    :class:`StorageError` naming it once the attempts are spent, or ``e`` itself."""
    kind = classify(e)
    if kind is ErrorKind.TRANSIENT:
        if attempt < _max_attempts(opts):
            return None
        return _caused(StorageError(f"{uri}: still failing after {attempt} attempts: {e}"), e)
    if kind is ErrorKind.NOT_FOUND:
        return _caused(NotFound(f"not found: {uri}"), e)
    if kind is ErrorKind.FORBIDDEN:
        return _caused(Forbidden(f"access denied (403): {uri}"), e)
    return e


def _caused(err: Exception, cause: BaseException) -> Exception:
    err.__cause__ = cause
    return err


def retry(fn: Callable[[], T], uri: str, opts: StorageOptions | None = None) -> T:
    """Call ``fn()`` under the module's retry policy; failures name ``uri``."""
    opts = opts or _default
    for attempt in _attempts(opts):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified by _verdict
            err = _verdict(e, uri, attempt, opts)
            if err is e:
                raise
            if err is not None:
                raise err from e
    raise AssertionError("unreachable: the last attempt raises")


# ---------------------------------------------------------------- file operations


def exists(uri: str, opts: StorageOptions | None = None) -> bool:
    fs, path = filesystem(uri, opts)
    return retry(lambda: fs.exists(path), uri, opts)


def isdir(uri: str, opts: StorageOptions | None = None) -> bool:
    fs, path = filesystem(uri, opts)
    return retry(lambda: fs.isdir(path), uri, opts)


def read_bytes(uri: str, opts: StorageOptions | None = None) -> bytes:
    fs, path = filesystem(uri, opts)
    return retry(lambda: fs.cat_file(path), uri, opts)


READ_MANY_CONCURRENCY = 64  # GETs in flight at once in one read_many call (s3fs' event loop)
READ_MANY_LOCAL_THREADS = 16  # threads reading local files in one read_many call


def read_many(uris: list[str], opts: StorageOptions | None = None, *,
              concurrency: int = READ_MANY_CONCURRENCY) -> list[bytes | Exception]:
    """The contents of many objects, in the order of ``uris``, read concurrently.

    S3 objects are fetched by up to ``concurrency`` GETs at once as coroutines on s3fs'
    event loop (one GET each, no HEAD first; no thread per object); local files by a
    small thread pool. Per object, the error contract of :func:`read_bytes` holds:
    transient faults are retried under the module's retry policy (a round of retries
    takes only the objects that failed), and a failure is returned in that object's
    place instead of raised, so one bad object does not hide the others:
    :class:`NotFound` / :class:`Forbidden` naming the URI, :class:`StorageError` after
    ``opts.retries`` attempts, or any other non-transient error as raised.
    """
    opts = opts or _default
    uris = list(uris)
    out: list[bytes | Exception | None] = [None] * len(uris)
    _read_many_local(uris, [i for i, u in enumerate(uris) if not is_remote(u)], out, opts)
    by_fs: dict[int, tuple[Any, list[tuple[int, str]]]] = {}
    for i, uri in enumerate(uris):
        if is_remote(uri):
            fs, path = filesystem(uri, opts)  # UserError for an unsupported scheme: raised
            by_fs.setdefault(id(fs), (fs, []))[1].append((i, path))
    for fs, items in by_fs.values():
        _read_many_s3(fs, items, uris, out, opts, max(1, concurrency))
    return out  # type: ignore[return-value]


def _read_bytes_or_error(uri: str, opts: StorageOptions) -> bytes | Exception:
    try:
        return read_bytes(uri, opts)
    except Exception as e:  # noqa: BLE001 - returned in the object's place
        return e


def _read_many_local(uris: list[str], indices: list[int], out: list, opts: StorageOptions) -> None:
    """Fill ``out[i]`` for the local files at ``indices``, on a few threads."""
    if len(indices) <= 1:
        for i in indices:
            out[i] = _read_bytes_or_error(uris[i], opts)
        return
    with ThreadPoolExecutor(min(READ_MANY_LOCAL_THREADS, len(indices))) as pool:
        for i, r in zip(indices, pool.map(lambda i: _read_bytes_or_error(uris[i], opts), indices)):
            out[i] = r


def _read_many_s3(fs: Any, items: list[tuple[int, str]], uris: list[str], out: list,
                  opts: StorageOptions, concurrency: int) -> None:
    """Fill ``out[i]`` for each ``(i, path)``: one round of concurrent GETs per attempt
    of the retry policy; a round retries only the transient failures of the last."""
    pending = items
    for attempt in _attempts(opts):
        results = sync(fs.loop, _get_all, fs, [path for _, path in pending], concurrency)
        failed = []
        for (i, path), r in zip(pending, results):
            if not isinstance(r, BaseException):
                out[i] = r
            elif not isinstance(r, Exception):  # cancelled, interrupted: not a storage fault
                raise r
            elif (err := _verdict(r, uris[i], attempt, opts)) is None:
                failed.append((i, path))
            else:
                out[i] = err
        if not failed:
            return
        pending = failed


async def _get_all(fs: Any, paths: list[str], concurrency: int) -> list[bytes | BaseException]:
    """GET each of ``paths``, ``concurrency`` at a time; errors in place."""
    sem = asyncio.Semaphore(concurrency)
    return await asyncio.gather(*(_get_one(fs, sem, p) for p in paths), return_exceptions=True)


async def _get_one(fs: Any, sem: asyncio.Semaphore, path: str) -> bytes:
    async with sem:
        # max_concurrency=1: a single GET (s3fs would HEAD first to size a chunked
        # parallel download, doubling the requests for small objects)
        return await fs._cat_file(path, max_concurrency=1)


def read_text(uri: str, opts: StorageOptions | None = None) -> str:
    return read_bytes(uri, opts).decode("utf-8")


def read_json(uri: str, opts: StorageOptions | None = None) -> Any:
    return json.loads(read_bytes(uri, opts))


def write_bytes(uri: str, data: bytes, opts: StorageOptions | None = None) -> None:
    """Write ``data`` at ``uri`` atomically: readers see the old object or the new one."""
    fs, path = filesystem(uri, opts)
    if is_remote(uri):
        retry(lambda: fs.pipe_file(path, data), uri, opts)
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(uri: str, obj: Any, opts: StorageOptions | None = None) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), opts)


def read_table(uri: str, columns: list[str] | None = None, opts: StorageOptions | None = None) -> pa.Table:
    """A whole Parquet file at ``uri`` (one GET), optionally only ``columns``."""
    return pq.read_table(io.BytesIO(read_bytes(uri, opts)), columns=columns)


def write_table(uri: str, table: pa.Table, opts: StorageOptions | None = None, **parquet_kwargs: Any) -> bytes:
    """Write ``table`` as one Parquet file at ``uri`` atomically; returns the bytes written
    (callers hash them). ``parquet_kwargs`` go to ``pyarrow.parquet.write_table``."""
    buf = io.BytesIO()
    pq.write_table(table, buf, **parquet_kwargs)
    data = buf.getvalue()
    write_bytes(uri, data, opts)
    return data


def upload_file(local_path: str, uri: str, opts: StorageOptions | None = None) -> None:
    """Copy a local file to ``uri`` (atomically, as :func:`write_bytes`)."""
    fs, path = filesystem(uri, opts)
    if not is_remote(uri):
        with open(local_path, "rb") as f:
            write_bytes(uri, f.read(), opts)
        return
    retry(lambda: fs.put_file(local_path, path), uri, opts)


def makedirs(uri: str, opts: StorageOptions | None = None) -> None:
    fs, path = filesystem(uri, opts)
    if not is_remote(uri):
        os.makedirs(path, exist_ok=True)


def remove(uri: str, recursive: bool = False, opts: StorageOptions | None = None) -> None:
    """Delete ``uri`` (a folder with ``recursive``); a missing URI is not an error."""
    fs, path = filesystem(uri, opts)
    if not retry(lambda: fs.exists(path), uri, opts):
        return
    retry(lambda: fs.rm(path, recursive=recursive), uri, opts)


def listdir(uri: str, opts: StorageOptions | None = None) -> list[str]:
    """Names (not URIs) of the direct children of ``uri``; [] if it does not exist."""
    fs, path = filesystem(uri, opts)
    if not retry(lambda: fs.exists(path), uri, opts):
        return []
    entries = retry(lambda: fs.ls(path, detail=False), uri, opts)
    return sorted(posixpath.basename(e.rstrip("/")) for e in entries)


@dataclass(frozen=True)
class FileInfo:
    """One listed object. ``version`` is the ETag on S3, ``mtime_ns`` locally: it changes
    when the content does, so it keys incremental work."""

    uri: str
    size: int
    version: str


LIST_PAGE_KEYS = 1000  # keys per list_objects_v2 request (S3's maximum): one page in memory at a time


def iter_files(prefix: str, suffixes: tuple[str, ...] | None = None,
               opts: StorageOptions | None = None) -> Iterator[FileInfo]:
    """Yield every file under ``prefix``, recursively, in sorted key order, streaming.

    S3 is listed page by page (:data:`LIST_PAGE_KEYS` a request) so memory stays flat for any
    prefix size; a local tree is walked with ``os.scandir``. Names starting with '.'
    or '_' (temp files, ``_SUCCESS``, ``_errors``) are skipped. ``suffixes`` filters
    on the lower-cased name.
    """
    fs, path = filesystem(prefix, opts)
    keep = functools.partial(_keep, suffixes=suffixes)
    if is_remote(prefix):
        yield from _iter_s3(fs, prefix, path, keep, opts)
        return
    if not os.path.exists(path):
        raise NotFound(f"not found: {prefix}")
    if os.path.isfile(path):
        st = os.stat(path)
        yield FileInfo(path, st.st_size, str(st.st_mtime_ns))
        return
    yield from _walk_local(path, keep)


def _keep(name: str, suffixes: tuple[str, ...] | None) -> bool:
    """A listed file worth yielding: not hidden, not a temp file, one of ``suffixes``."""
    base = posixpath.basename(name)
    if base.startswith((".", "_")) or ".tmp-" in base:
        return False
    return suffixes is None or base.lower().endswith(suffixes)


def _iter_s3(fs: Any, prefix: str, path: str, keep: Callable[[str], bool],
             opts: StorageOptions | None) -> Iterator[FileInfo]:
    """:func:`iter_files` on S3: ``list_objects_v2`` page by page, each page retried."""
    bucket, _, key_prefix = path.partition("/")
    if key_prefix and not key_prefix.endswith("/"):
        key_prefix += "/"
    token: str | None = None
    found = False
    while True:
        kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": key_prefix, "MaxKeys": LIST_PAGE_KEYS}
        if token:
            kwargs["ContinuationToken"] = token
        page = retry(functools.partial(fs.call_s3, "list_objects_v2", **kwargs), prefix, opts)
        for obj in page.get("Contents", []):
            found = True
            # skip files inside hidden/underscore folders too (e.g. _errors/)
            rel = obj["Key"][len(key_prefix):]
            if any(part.startswith((".", "_")) for part in rel.split("/")[:-1]):
                continue
            if keep(obj["Key"]):
                yield FileInfo(f"s3://{bucket}/{obj['Key']}", int(obj["Size"]), obj.get("ETag", "").strip('"'))
        if not page.get("IsTruncated"):
            break
        token = page["NextContinuationToken"]
    # An empty prefix and a missing one look alike on S3: a single object is a file.
    if not found and key_prefix and retry(lambda: fs.isfile(path), prefix, opts):
        info = retry(lambda: fs.info(path), prefix, opts)
        yield FileInfo(prefix, int(info["size"]), str(info.get("ETag", "")).strip('"'))


def _walk_local(root: str, keep: Callable[[str], bool]) -> Iterator[FileInfo]:
    # a folder's sorted names (~100 B each), not its DirEntry objects (~400 B each): the
    # one list a walk holds is one folder's, and a folder may hold millions of images
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        try:
            st = os.stat(path)
        except FileNotFoundError:  # a broken link, or gone since the listing: as before, only an image fails
            if keep(name):
                raise
            continue
        if stat.S_ISDIR(st.st_mode):
            if not name.startswith((".", "_")):
                yield from _walk_local(path, keep)
        elif keep(name):
            yield FileInfo(path, st.st_size, str(st.st_mtime_ns))


def pyarrow_filesystem(uri: str, opts: StorageOptions | None = None) -> tuple[pafs.FileSystem, str]:
    """``(pyarrow.fs.FileSystem, path)`` for Ray Data readers and Ray Train storage.

    No :func:`retry` can wrap the calls pyarrow makes, so this view's S3 filesystem
    lets botocore's standard mode make the policy's ``opts.retries`` attempts instead.
    """
    opts = opts or _default
    if not is_remote(uri):
        return pafs.LocalFileSystem(), normalize(uri)
    fs = _s3(uri, opts, botocore_attempts=_max_attempts(opts))
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), uri.split("://", 1)[1].rstrip("/")


# ------------------------------------------------------------- conditional writes
#
# Compare-and-swap on one small object, for leases (pipeline.ops.lease). A write either
# happens against the version the caller last read, or does not happen and returns
# None / False ("someone else won"). What each store guarantees:
#
# - S3 (and stores implementing its conditional writes): create is ``PutObject`` with
#   ``If-None-Match: *``, replace is ``PutObject`` with ``If-Match: <ETag>``, remove is
#   ``DeleteObject`` with ``If-Match: <ETag>``; the store decides atomically, a
#   412 PreconditionFailed means another writer won, a 409 ConditionalRequestConflict (a
#   conflicting write in flight) is retried. AWS S3 has had conditional PUTs since 2024;
#   a store that answers a conditional DELETE with 501 NotImplemented gets a
#   read-compare-delete instead (a one-round-trip window), and a remove always reads
#   first. We rely on the store honouring If-None-Match / If-Match on PUT: one that
#   ignores them gives no mutual exclusion. The version is the ETag.
# - local disk (and NFS with working ``flock``): every mutation is check-then-act under an
#   exclusive ``flock`` on a sidecar ``<name>.lock`` file (left in place: deleting a lock
#   file races with its next user), and lands by ``os.replace`` of a fully written,
#   fsynced temp file, so readers (who take no lock) see no object or a whole one. The
#   version is the sha256 of the content.
#
# A conditional PUT retried after a lost reply may find its own earlier attempt in place
# (412): when the stored bytes equal the bytes being written, the write counts as done.
# Callers make their bytes unique (a lease carries a random token) so that this can not
# mistake another writer's object for their own.


@dataclass(frozen=True)
class Versioned:
    """A small object's bytes and the version they were read at (ETag; locally sha256)."""

    data: bytes
    version: str


def read_versioned(uri: str, opts: StorageOptions | None = None) -> Versioned | None:
    """The object at ``uri`` with its version, or None when there is none."""
    fs, path = filesystem(uri, opts)
    if not is_remote(uri):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return Versioned(data, _sha256(data))
    bucket, key = _bucket_key(path)
    try:
        return retry(lambda: _get_versioned(fs, bucket, key), uri, opts)
    except NotFound:
        return None


def create_if_absent(uri: str, data: bytes, opts: StorageOptions | None = None) -> str | None:
    """Write ``data`` at ``uri`` only if no object is there; its version, or None when one
    was (another writer won)."""
    fs, path = filesystem(uri, opts)
    if not is_remote(uri):
        return _local_swap(path, data, expected=None)
    bucket, key = _bucket_key(path)
    put = functools.partial(fs.call_s3, "put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
    return _conditional_put(put, uri, data, opts)


def replace_if_version(uri: str, data: bytes, version: str,
                       opts: StorageOptions | None = None) -> str | None:
    """Replace the object at ``uri`` with ``data`` only if it is still at ``version``; the
    new version, or None when it changed or is gone (another writer won)."""
    fs, path = filesystem(uri, opts)
    if not is_remote(uri):
        return _local_swap(path, data, expected=version)
    bucket, key = _bucket_key(path)
    put = functools.partial(fs.call_s3, "put_object", Bucket=bucket, Key=key, Body=data, IfMatch=version)
    try:
        return _conditional_put(put, uri, data, opts)
    except NotFound:  # If-Match on a missing key: 404
        return None


def remove_if_version(uri: str, version: str, opts: StorageOptions | None = None) -> bool:
    """Delete the object at ``uri`` only if it is still at ``version``; whether it was."""
    fs, path = filesystem(uri, opts)
    if not is_remote(uri):
        return _local_swap(path, None, expected=version) is not None
    current = read_versioned(uri, opts)  # cheap, and narrows the window of the fallback below
    if current is None or current.version != version:
        return False
    bucket, key = _bucket_key(path)
    delete = functools.partial(fs.call_s3, "delete_object", Bucket=bucket, Key=key, IfMatch=version)
    try:
        return _conditional(delete, uri, opts) is not None
    except NotFound:
        return False
    except OSError as e:
        if _s3_status(e) != 501:  # only a store without conditional deletes falls back
            raise
    remove(uri, opts=opts)
    return True


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _bucket_key(path: str) -> tuple[str, str]:
    bucket, _, key = path.partition("/")
    return bucket, key


def _get_versioned(fs: Any, bucket: str, key: str) -> Versioned:
    """One GET: the body and the ETag of the same object version."""
    resp = fs.call_s3("get_object", Bucket=bucket, Key=key)
    body = resp["Body"]
    try:
        data = sync(fs.loop, body.read)
    finally:
        body.close()
    return Versioned(data, resp["ETag"])


def _s3_status(exc: BaseException) -> int | None:
    """The HTTP status of the S3 error behind ``exc`` (None if there is none)."""
    for e in _cause_chain(exc):
        if isinstance(e, botocore.exceptions.ClientError):
            return e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return None


def _s3_code(exc: BaseException) -> str | None:
    """The S3 error code behind ``exc`` (None if there is none)."""
    for e in _cause_chain(exc):
        if isinstance(e, botocore.exceptions.ClientError):
            return str(e.response.get("Error", {}).get("Code", ""))
    return None


def _conditional(call: Callable[[], T], uri: str, opts: StorageOptions | None) -> T | None:
    """``call()`` (one conditional S3 request) under the retry policy; None when its
    precondition failed (412): another writer won."""
    lost = object()

    def attempt() -> Any:
        try:
            return call()
        except Exception as e:
            if _s3_code(e) == "PreconditionFailed" or _s3_status(e) == 412:
                return lost
            raise

    out = retry(attempt, uri, opts)
    return None if out is lost else out


def _conditional_put(put: Callable[[], dict[str, Any]], uri: str, data: bytes,
                     opts: StorageOptions | None) -> str | None:
    """A conditional PUT of ``data``: the new ETag, or None when another writer won. A
    412 after a retried attempt may be that attempt's own success: the stored bytes tell."""
    resp = _conditional(put, uri, opts)
    if resp is not None:
        return resp["ETag"]
    current = read_versioned(uri, opts)
    return current.version if current is not None and current.data == data else None


@contextlib.contextmanager
def _flocked(path: str) -> Iterator[None]:
    """An exclusive ``flock`` on ``<path>.lock`` while the block runs (blocking)."""
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _local_swap(path: str, data: bytes | None, expected: str | None) -> str | None:
    """Under the file's lock: if its version is ``expected`` (None: no file), put ``data``
    in its place (None: delete it). The new version ("" after a delete), or None when the
    file was not as expected."""
    if data is None and not os.path.exists(path):
        return None
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = None
    if data is not None:  # written before taking the lock: the lock is held for a rename only
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    try:
        with _flocked(path):
            try:
                with open(path, "rb") as f:
                    current: str | None = _sha256(f.read())
            except FileNotFoundError:
                current = None
            if current != expected:
                return None
            if tmp is None:
                os.unlink(path)
                return ""
            os.replace(tmp, path)
            tmp = None
            return _sha256(data)  # type: ignore[arg-type]
    finally:
        if tmp is not None:
            os.unlink(tmp)


# ------------------------------------------------------------------ redaction

# ``scheme://user:secret@`` or ``scheme://token@``: a user name has no ':', '/' or '@';
# a secret runs to the '@' (an unencoded '/' in it included), never across whitespace.
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:/@\s]*)(?P<secret>:[^@\s]*)?@")


def redact(value: T) -> T:
    """``value`` as it may be written to files, reports and logs: in every string, also
    inside dicts, lists and tuples, a URI's ``user:secret@`` becomes ``user:***@`` and a
    bare ``token@`` becomes ``***@``. Other values come back as they are; the input is
    not modified. Values used to connect are never passed through this."""
    if isinstance(value, str):
        return _USERINFO.sub(lambda m: m["scheme"] + (f"{m['user']}:***@" if m["secret"] else "***@"), value)
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}  # type: ignore[return-value]
    if type(value) in (list, tuple):  # exactly: a named tuple's fields are not one iterable
        return type(value)(redact(v) for v in value)  # type: ignore[arg-type, return-value]
    return value

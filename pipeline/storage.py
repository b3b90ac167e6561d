"""Object storage: the only module that talks to S3 or the local disk by URI.

Everything else passes URIs (``/abs/path``, ``file:///abs/path``, ``s3://bucket/key``)
and calls the functions here. What this module owns:

- resolving a URI to an fsspec filesystem (s3fs for ``s3://``; S3-compatible stores
  through ``AWS_ENDPOINT_URL`` or ``storage.s3.endpoint_url``);
- retry with exponential backoff for transient faults (503 SlowDown, 500, resets),
  in one place (:func:`retry`); 403/404 fail at once with the URI in the message;
- batched reads (:func:`read_many`): many small objects fetched concurrently on s3fs'
  event loop, under the same retry policy and error types, errors in place;
- atomic writes: local files are written to a temp name then ``os.replace``d;
  an S3 PUT is atomic by itself;
- paginated, streaming listing (:func:`iter_files`) so a prefix of millions of
  objects is never held in memory at once;
- a pyarrow filesystem view for Ray Data / Ray Train storage.

Options travel explicitly (``StorageOptions`` is a small picklable value) so Ray
workers on other nodes see the same endpoint as the driver.
"""

from __future__ import annotations

import errno
import io
import json
import os
import posixpath
import random
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

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


def _fs_cache_key(scheme: str, opts: StorageOptions) -> tuple:
    return (scheme, opts.endpoint_url or os.environ.get("AWS_ENDPOINT_URL"), opts.anon)


_fs_cache: dict[tuple, fsspec.AbstractFileSystem] = {}


def filesystem(uri: str, opts: StorageOptions | None = None, *,
               s3fs_retries: int | None = 1) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` and the path inside it.

    ``s3fs_retries``: tries of s3fs' own retry loop. 1 (no retries) for calls that
    :func:`retry` wraps: s3fs retries SlowDown 5 times with its own sleeps, under ours,
    hiding the faults and multiplying the attempts. None keeps s3fs' default, for
    callers that no :func:`retry` wraps (the pyarrow view).
    """
    opts = opts or _default
    if not is_remote(uri):
        return fsspec.filesystem("file"), normalize(uri)
    scheme, rest = uri.split("://", 1)
    if scheme not in ("s3", "s3a"):
        raise UserError(f"unsupported URI scheme '{scheme}://' in {uri}; valid: local paths, file://, s3://")
    key = (*_fs_cache_key(scheme, opts), s3fs_retries)
    fs = _fs_cache.get(key)
    if fs is None:
        endpoint = opts.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
        client_kwargs = {"endpoint_url": endpoint} if endpoint else {}
        fs = fsspec.filesystem(
            "s3",
            anon=opts.anon,
            client_kwargs=client_kwargs,
            use_listings_cache=False,  # listings change under us (pack resumes, new nights)
            skip_instance_cache=True,
            # Our retry() owns backoff; keep botocore's own retries short so faults surface:
            # 2 attempts in all ("max_attempts" would count retries only: 3 attempts).
            config_kwargs={"retries": {"total_max_attempts": 2, "mode": "standard"}},
            **opts.extra,
        )
        if s3fs_retries is not None:
            fs.retries = s3fs_retries
        _fs_cache[key] = fs
    return fs, rest.rstrip("/")


# ------------------------------------------------------------------------- retry


_PATHS = re.compile(r"\S*/\S*")  # URLs and object keys: "127.0.0.1:40437/b/img_404.png" is no status


def _status_text(exc: BaseException) -> str:
    """What an error says about its cause, for matching status codes and S3 error codes:
    type, message and cause, with URLs and paths removed (a port or a key can hold
    "404" or "503")."""
    return _PATHS.sub(" ", f"{type(exc).__name__} {exc} {exc.__cause__!r}")


def _says(text: str, *words: str) -> bool:
    """Any of ``words`` in ``text``; numeric codes only as whole numbers."""
    return any(re.search(rf"(?<!\d){w}(?!\d)" if w.isdigit() else re.escape(w), text) for w in words)


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    # s3fs turns S3 errors into OSError(errno, server message), e.g. SlowDown into
    # OSError(EBUSY, 'Please reduce your request rate.'): the code is in the cause.
    text = _status_text(exc)
    if _says(text, "403", "AccessDenied", "Forbidden", "404", "NoSuchKey", "NoSuchBucket", "InvalidAccessKeyId"):
        return False
    if _says(text, "SlowDown", "503", "500", "InternalError", "ServiceUnavailable", "Throttl",
             "RequestTimeout", "Connection", "timed out", "Timeout", "reset", "Broken pipe"):
        return True
    if _is_s3fs_retryable(exc):  # dropped connections, truncated bodies, s3fs timeouts
        return True
    return isinstance(exc, (ConnectionError, TimeoutError)) or (
        isinstance(exc, OSError) and exc.errno in (errno.EIO, errno.ECONNRESET, errno.ETIMEDOUT)
    )


def _is_s3fs_retryable(exc: BaseException) -> bool:
    try:
        from s3fs.core import S3_RETRYABLE_ERRORS
    except ImportError:
        return False
    return isinstance(exc, S3_RETRYABLE_ERRORS)


def retry(fn: Callable[[], T], uri: str, opts: StorageOptions | None = None) -> T:
    """Call ``fn()``; retry transient storage faults with backoff; name ``uri`` on failure."""
    opts = opts or _default
    delay = opts.backoff_s
    for attempt in range(1, opts.retries + 1):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified below
            err = _permanent_error(e, uri)
            if err is e:
                raise
            if err is not None:
                raise err from e
            if attempt == opts.retries:
                raise _exhausted(uri, attempt, e) from e
            time.sleep(_backoff(delay))
            delay *= 2
    raise AssertionError("unreachable")


def _backoff(delay: float) -> float:
    """Seconds to wait before the next attempt: ``delay`` capped at 10 s, with jitter."""
    return min(delay, 10.0) * (0.5 + random.random())


def _exhausted(uri: str, attempts: int, e: BaseException) -> StorageError:
    return StorageError(f"{uri}: still failing after {attempts} attempts: {e}")


def _permanent_error(e: Exception, uri: str) -> Exception | None:
    """What to surface at once for ``e``: :class:`NotFound` / :class:`Forbidden` naming
    ``uri``, or ``e`` itself (another non-transient error); None when ``e`` is a
    transient fault worth another attempt."""
    if isinstance(e, FileNotFoundError):
        return _caused(NotFound(f"not found: {uri}"), e)
    if isinstance(e, PermissionError):
        return _caused(Forbidden(f"access denied (403): {uri}"), e)
    if isinstance(e, UserError):
        return e
    if _is_transient(e):
        return None
    text = _status_text(e)
    if _says(text, "404", "NoSuch"):
        return _caused(NotFound(f"not found: {uri}"), e)
    if _says(text, "403", "AccessDenied"):
        return _caused(Forbidden(f"access denied (403): {uri}"), e)
    return e


def _caused(err: Exception, cause: BaseException) -> Exception:
    err.__cause__ = cause
    return err


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
    transient faults are retried with :func:`retry`'s backoff policy (a round of
    retries takes only the objects that failed), and a failure is returned in that
    object's place instead of raised, so one bad object does not hide the others:
    :class:`NotFound` / :class:`Forbidden` naming the URI, :class:`StorageError` after
    ``opts.retries`` attempts, or any other non-transient error as raised.
    """
    opts = opts or _default
    uris = list(uris)
    out: list[bytes | Exception | None] = [None] * len(uris)
    if not uris:
        return []
    remote = [i for i, u in enumerate(uris) if is_remote(u)]
    local = [i for i, u in enumerate(uris) if not is_remote(u)]
    if local:
        def one(i: int) -> bytes | Exception:
            try:
                return read_bytes(uris[i], opts)
            except Exception as e:  # noqa: BLE001 - returned in the object's place
                return e

        if len(local) == 1:
            out[local[0]] = one(local[0])
        else:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(min(READ_MANY_LOCAL_THREADS, len(local))) as pool:
                for i, r in zip(local, pool.map(one, local)):
                    out[i] = r
    by_fs: dict[int, tuple[Any, list[tuple[int, str]]]] = {}
    for i in remote:
        fs, path = filesystem(uris[i], opts)  # UserError for an unsupported scheme: raised
        by_fs.setdefault(id(fs), (fs, []))[1].append((i, path))
    for fs, items in by_fs.values():
        _read_many_s3(fs, items, uris, out, opts, max(1, concurrency))
    return out  # type: ignore[return-value]


def _read_many_s3(fs, items: list[tuple[int, str]], uris: list[str], out: list,
                  opts: StorageOptions, concurrency: int) -> None:
    """Fill ``out[i]`` for each ``(i, path)``: rounds of concurrent GETs on s3fs' loop;
    after each round, the transient failures alone are retried after :func:`retry`'s
    backoff (exponential, jittered, capped at 10 s)."""
    import asyncio

    from fsspec.asyn import sync

    async def fetch_all(batch: list[tuple[int, str]]) -> list:
        sem = asyncio.Semaphore(concurrency)

        async def one(path: str) -> bytes:
            async with sem:
                # max_concurrency=1: a single GET (s3fs would HEAD first to size a
                # chunked parallel download, doubling the requests for small objects)
                return await fs._cat_file(path, max_concurrency=1)

        return await asyncio.gather(*(one(p) for _, p in batch), return_exceptions=True)

    pending = items
    delay = opts.backoff_s
    for attempt in range(1, opts.retries + 1):
        results = sync(fs.loop, fetch_all, pending)
        failed = []
        for (i, path), r in zip(pending, results):
            if not isinstance(r, BaseException):
                out[i] = r
                continue
            if not isinstance(r, Exception):  # cancelled, interrupted: not a storage fault
                raise r
            err = _permanent_error(r, uris[i])
            if err is not None:
                out[i] = err
            elif attempt == opts.retries:
                out[i] = _caused(_exhausted(uris[i], attempt, r), r)
            else:
                failed.append((i, path))
        if not failed:
            return
        pending = failed
        time.sleep(_backoff(delay))
        delay *= 2


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


def _uri(uri_root: str, path: str) -> str:
    if is_remote(uri_root):
        return f"{uri_root.split('://', 1)[0]}://{path}"
    return path


def iter_files(prefix: str, suffixes: tuple[str, ...] | None = None,
               opts: StorageOptions | None = None) -> Iterator[FileInfo]:
    """Yield every file under ``prefix``, recursively, in sorted key order, streaming.

    S3 is listed page by page (1,000 keys a request) so memory stays flat for any
    prefix size; a local tree is walked with ``os.scandir``. Names starting with '.'
    or '_' (temp files, ``_SUCCESS``, ``_errors``) are skipped. ``suffixes`` filters
    on the lower-cased name.
    """
    fs, path = filesystem(prefix, opts)

    def keep(name: str) -> bool:
        base = posixpath.basename(name)
        if base.startswith((".", "_")) or ".tmp-" in base:
            return False
        return suffixes is None or base.lower().endswith(suffixes)

    if not is_remote(prefix):
        if not os.path.exists(path):
            raise NotFound(f"not found: {prefix}")
        if os.path.isfile(path):
            st = os.stat(path)
            yield FileInfo(path, st.st_size, str(st.st_mtime_ns))
            return
        yield from _walk_local(path, keep)
        return

    bucket, _, key_prefix = path.partition("/")
    if key_prefix and not key_prefix.endswith("/"):
        key_prefix += "/"
    token: str | None = None
    found = False
    while True:
        kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": key_prefix, "MaxKeys": 1000}
        if token:
            kwargs["ContinuationToken"] = token
        page = retry(lambda kw=kwargs: fs.call_s3("list_objects_v2", **kw), prefix, opts)
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
    if not found:
        # An empty prefix and a missing one look alike on S3: a single object is a file.
        if key_prefix and retry(lambda: fs.isfile(path), prefix, opts):
            info = retry(lambda: fs.info(path), prefix, opts)
            yield FileInfo(prefix, int(info["size"]), str(info.get("ETag", "")).strip('"'))


def _walk_local(root: str, keep: Callable[[str], bool]) -> Iterator[FileInfo]:
    entries = sorted(os.scandir(root), key=lambda e: e.name)
    for e in entries:
        if e.is_dir(follow_symlinks=True):
            if not e.name.startswith((".", "_")):
                yield from _walk_local(e.path, keep)
        elif keep(e.name):
            st = e.stat()
            yield FileInfo(e.path, st.st_size, str(st.st_mtime_ns))


def pyarrow_filesystem(uri: str, opts: StorageOptions | None = None):
    """``(pyarrow.fs.FileSystem, path)`` for Ray Data readers and Ray Train storage."""
    import pyarrow.fs as pafs

    if not is_remote(uri):
        return pafs.LocalFileSystem(), normalize(uri)
    fs, path = filesystem(uri, opts, s3fs_retries=None)  # no retry() around pyarrow's calls
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path

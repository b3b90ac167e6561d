"""Object-store faults, through a fault-injecting proxy in front of the moto server.

Throttling (503 SlowDown), 500s and connection resets are retried with backoff;
403/404 fail at once with a message naming the URI; a fault that persists ends in
StorageError after a bounded number of attempts. The proxy counts what reaches it:
storage.retry is the only retry loop, so each of its attempts is one request.
"""

from __future__ import annotations

import os
import re
import time

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError
from s3fs.errors import translate_boto_error

from pipeline import storage
from pipeline.storage import ErrorKind as Kind
from tests.s3_fault_proxy import FaultProxy

RETRIES = 4


@pytest.fixture
def proxy(s3_server, s3_bucket):
    """A FaultProxy in front of the moto server; storage is configured to go through it."""
    old_opts, old_env = storage.default_options(), os.environ.get("AWS_ENDPOINT_URL")
    with FaultProxy(s3_server) as p:
        storage.configure(storage.StorageOptions(endpoint_url=p.url, retries=RETRIES, backoff_s=0.01))
        try:
            yield p
        finally:
            storage.configure(old_opts)
            if old_env is None:
                os.environ.pop("AWS_ENDPOINT_URL", None)
            else:
                os.environ["AWS_ENDPOINT_URL"] = old_env
            for key in [k for k in storage._fs_cache if p.url in k]:
                del storage._fs_cache[key]


@pytest.fixture
def direct(s3_server):
    """The moto server's filesystem, bypassing the proxy (to seed and check objects)."""
    return storage.filesystem("s3://x", storage.StorageOptions(endpoint_url=s3_server))[0]


def _bucket(uri: str) -> str:
    return uri.split("://", 1)[1]


def test_get_slowdown_twice_then_success(proxy, direct, s3_bucket):
    direct.pipe_file(f"{_bucket(s3_bucket)}/a/key.png", b"\x89PNG data")
    fault = proxy.add_fault(method="GET", path_contains="/a/key.png", status=503, code="SlowDown", times=2)
    assert storage.read_bytes(f"{s3_bucket}/a/key.png") == b"\x89PNG data"
    assert fault.hits == 2
    assert proxy.count("GET", "/a/key.png") == 3


def test_put_internal_error_twice_then_success(proxy, direct, s3_bucket):
    fault = proxy.add_fault(method="PUT", path_contains="/out.bin", status=500, code="InternalError", times=2)
    storage.write_bytes(f"{s3_bucket}/out.bin", b"payload")
    assert fault.hits == 2
    assert proxy.count("PUT", "/out.bin") == 3
    assert direct.cat_file(f"{_bucket(s3_bucket)}/out.bin") == b"payload"


def test_listing_page_slowdown_then_success(proxy, direct, s3_bucket):
    names = [f"img/{c}/{i}.jpg" for c in ("cat", "dog") for i in range(3)]
    for n in names:
        direct.pipe_file(f"{_bucket(s3_bucket)}/{n}", b"x")
    fault = proxy.add_fault(method="GET", path_contains="list-type=2", status=503, code="SlowDown", times=2)
    uris = [f.uri for f in storage.iter_files(f"{s3_bucket}/img", (".jpg",))]
    assert uris == sorted(f"{s3_bucket}/{n}" for n in names)
    assert fault.hits == 2
    assert proxy.count("GET", "list-type=2") == 3


def test_persistent_slowdown_is_bounded_and_names_uri(proxy, direct, s3_bucket):
    direct.pipe_file(f"{_bucket(s3_bucket)}/hot.png", b"x")
    proxy.add_fault(method="GET", path_contains="/hot.png", status=503, code="SlowDown", times=None)
    uri = f"{s3_bucket}/hot.png"
    t0 = time.monotonic()
    with pytest.raises(storage.StorageError, match=re.escape(uri)) as info:
        storage.read_bytes(uri)
    elapsed = time.monotonic() - t0
    attempts = proxy.count("GET", "/hot.png")
    # every attempt of retry() reached the server once; no hidden inner retry loop multiplies them
    assert attempts == RETRIES
    assert f"after {RETRIES} attempts" in str(info.value)
    assert elapsed < 8  # tiny backoff_s; botocore's own jitter is at most 1 s per call


def test_forbidden_fails_at_once(proxy, direct, s3_bucket):
    direct.pipe_file(f"{_bucket(s3_bucket)}/secret.png", b"x")
    proxy.add_fault(path_contains="/secret.png", status=403, code="AccessDenied", times=None)
    uri = f"{s3_bucket}/secret.png"
    with pytest.raises(storage.Forbidden, match=re.escape(uri)):
        storage.read_bytes(uri)
    with pytest.raises(storage.Forbidden, match=re.escape(uri)):
        storage.write_bytes(uri, b"y")
    # HEAD (s3fs sizes the object first) answered 403 at once, or GET did; no retry loop
    assert proxy.count(None, "/secret.png") <= 2
    assert proxy.count("GET", "/secret.png") <= 1 and proxy.count("PUT", "/secret.png") == 1
    assert direct.cat_file(f"{_bucket(s3_bucket)}/secret.png") == b"x"


def test_missing_key_is_not_found_at_once(proxy, direct, s3_bucket):
    uri = f"{s3_bucket}/nope/missing.png"
    with pytest.raises(storage.NotFound, match=re.escape(uri)):
        storage.read_bytes(uri)
    assert proxy.count("HEAD", "/nope/missing.png") == 1
    assert proxy.count("GET", "/nope/missing.png") == 0
    # a 404 on the GET itself (object deleted between HEAD and GET): not retried either
    direct.pipe_file(f"{_bucket(s3_bucket)}/gone.png", b"x")
    proxy.add_fault(method="GET", path_contains="/gone.png", status=404, code="NoSuchKey", times=None)
    with pytest.raises(storage.NotFound, match=re.escape(f"{s3_bucket}/gone.png")):
        storage.read_bytes(f"{s3_bucket}/gone.png")
    assert proxy.count("GET", "/gone.png") == 1


def test_connection_reset_once_then_success(proxy, direct, s3_bucket):
    direct.pipe_file(f"{_bucket(s3_bucket)}/r.png", b"data")
    fault = proxy.add_fault(method="GET", path_contains="/r.png", reset=True, times=1)
    assert storage.read_bytes(f"{s3_bucket}/r.png") == b"data"
    assert fault.hits == 1
    assert proxy.count("GET", "/r.png") == 2


def test_persistent_resets_are_retried_then_fail_naming_uri(proxy, direct, s3_bucket):
    direct.pipe_file(f"{_bucket(s3_bucket)}/rr.png", b"data")
    proxy.add_fault(method="GET", path_contains="/rr.png", reset=True, times=None)
    uri = f"{s3_bucket}/rr.png"
    with pytest.raises(storage.StorageError, match=re.escape(uri)) as info:
        storage.read_bytes(uri)
    assert f"after {RETRIES} attempts" in str(info.value)
    # aiohttp itself re-sends once when a kept-alive connection drops: x2
    assert RETRIES < proxy.count("GET", "/rr.png") <= RETRIES * 2


def test_truncated_body_then_success(proxy, direct, s3_bucket):
    data = bytes(range(256)) * 64
    direct.pipe_file(f"{_bucket(s3_bucket)}/t.png", data)
    # two attempts cut short: storage.retry must retry the broken read (botocore cannot)
    fault = proxy.add_fault(method="GET", path_contains="/t.png", truncate=True, times=2)
    assert storage.read_bytes(f"{s3_bucket}/t.png") == data
    assert fault.hits == 2
    assert proxy.count("GET", "/t.png") == 3


def test_read_errors_s3fs_would_have_retried_stay_transient():
    # storage.filesystem turns s3fs' own retry loop off: retry() must take these over
    from botocore.parsers import ResponseParserError
    from urllib3.exceptions import IncompleteRead

    assert storage.classify(ResponseParserError("Unable to parse response")) is Kind.TRANSIENT
    assert storage.classify(IncompleteRead(10, 90)) is Kind.TRANSIENT


def test_status_codes_in_urls_and_keys_are_not_statuses():
    """A port or an object key holding "404" once made a dropped connection a NotFound
    (CI saw it: endpoint http://127.0.0.1:40437). Now only types and codes count."""
    dropped = EndpointConnectionError(endpoint_url="http://127.0.0.1:40437/b/rr.png")
    assert storage.classify(dropped) is Kind.TRANSIENT
    slow = ClientError({"Error": {"Code": "SlowDown", "Message": "b/img_404.png"}}, "GetObject")
    assert storage.classify(slow) is Kind.TRANSIENT
    gone = ClientError({"Error": {"Code": "404", "Message": "Not Found"}}, "HeadObject")
    assert storage.classify(gone) is Kind.NOT_FOUND
    denied = ClientError({"Error": {"Code": "AccessDenied", "Message": "denied"}}, "GetObject")
    assert storage.classify(denied) is Kind.FORBIDDEN


def _client_error(code: str, status: int, message: str, op: str = "GetObject") -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": message},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, op)


@pytest.mark.parametrize("exc, kind", [
    # (what s3fs / botocore / aiohttp raise, with status-like text in the message) -> kind
    (translate_boto_error(_client_error("SlowDown", 503, "b/img_404.png: 404 Not Found")), Kind.TRANSIENT),
    (translate_boto_error(_client_error("InternalError", 500, "key img_403.png AccessDenied")), Kind.TRANSIENT),
    (translate_boto_error(_client_error("NoSuchKey", 404, "503 SlowDown, reduce your request rate")), Kind.NOT_FOUND),
    (translate_boto_error(_client_error("AccessDenied", 403, "http://127.0.0.1:50300/b/k 503")), Kind.FORBIDDEN),
    (translate_boto_error(_client_error("404", 404, "Not Found", "HeadObject")), Kind.NOT_FOUND),
    (translate_boto_error(_client_error("503", 503, "Service Unavailable", "HeadObject")), Kind.TRANSIENT),
    (translate_boto_error(_client_error("InvalidArgument", 400, "503 SlowDown timed out reset")), Kind.PERMANENT),
    (EndpointConnectionError(endpoint_url="http://127.0.0.1:40437/b/img_404.png"), Kind.TRANSIENT),
    (FileNotFoundError("503 SlowDown Connection reset"), Kind.NOT_FOUND),
    (PermissionError("500 InternalError timed out"), Kind.FORBIDDEN),
    (OSError("404 NoSuchKey 403 AccessDenied"), Kind.PERMANENT),  # no errno, no cause: nothing to go by
    (OSError("An error occurred (SlowDown): 503 Connection reset, timed out"), Kind.PERMANENT),
    (ValueError("s3://b/img_503.png"), Kind.PERMANENT),
])
def test_message_text_can_not_change_the_classification(exc, kind):
    """Classification reads types, errno, S3 error codes and HTTP statuses only, by
    construction: status codes, S3 codes and words in a message (a key like img_404.png,
    a port, a server's wording) decide nothing."""
    assert storage.classify(exc) is kind


def test_key_and_message_naming_statuses_through_the_proxy(proxy, direct, s3_bucket):
    """End to end: keys named like statuses, server messages full of the wrong ones."""
    direct.pipe_file(f"{_bucket(s3_bucket)}/img_404.png", b"x")
    fault = proxy.add_fault(method="GET", path_contains="/img_404.png", status=503, code="SlowDown",
                            message="404 Not Found: NoSuchKey img_404.png, 403 AccessDenied", times=2)
    assert storage.read_bytes(f"{s3_bucket}/img_404.png") == b"x"
    assert fault.hits == 2 and proxy.count("GET", "/img_404.png") == 3
    missing = f"{s3_bucket}/img_503.png"
    proxy.add_fault(method="GET", path_contains="/img_503.png", status=404, code="NoSuchKey",
                    message="503 SlowDown: reduce your request rate, 500 InternalError", times=None)
    out = storage.read_many([missing, f"{s3_bucket}/img_404.png"])
    assert isinstance(out[0], storage.NotFound) and missing in str(out[0]) and out[1] == b"x"
    assert proxy.count("GET", "/img_503.png") == 1  # a 404, whatever the key and message say


def test_pyarrow_view_retries_through_botocore(proxy, direct, s3_bucket):
    """The pyarrow view (Ray Train storage) runs where no retry() wraps its calls: its
    requests get the same attempt budget from botocore's standard mode."""
    fs, path = storage.pyarrow_filesystem(f"{s3_bucket}/ckpt")
    fault = proxy.add_fault(method="PUT", path_contains="/ckpt/state.bin", status=500, code="InternalError", times=2)
    with fs.open_output_stream(f"{path}/state.bin") as f:
        f.write(b"weights")
    assert fault.hits == 2 and proxy.count("PUT", "/ckpt/state.bin") == 3
    assert direct.cat_file(f"{_bucket(s3_bucket)}/ckpt/state.bin") == b"weights"
    proxy.add_fault(method="GET", path_contains="/ckpt/state.bin", status=503, code="SlowDown", times=None)
    with pytest.raises(OSError), fs.open_input_stream(f"{path}/state.bin") as f:
        f.read()
    assert proxy.count("GET", "/ckpt/state.bin") == RETRIES  # bounded: botocore's attempts only


def test_proxy_is_loopback_only(s3_server):
    with pytest.raises(ValueError, match="loopback"):
        FaultProxy("http://10.1.2.3:9000")
    with pytest.raises(ValueError, match="loopback"):
        FaultProxy(s3_server, host="0.0.0.0")


# ------------------------------------------------------------------- read_many


def _seed(direct, s3_bucket, names):
    for n in names:
        direct.pipe_file(f"{_bucket(s3_bucket)}/{n}", f"data of {n}".encode())
    return [f"{s3_bucket}/{n}" for n in names]


def test_read_many_retries_only_the_throttled_objects(proxy, direct, s3_bucket):
    names = [f"m/{i:03d}.png" for i in range(24)]
    uris = _seed(direct, s3_bucket, names)
    hot = {"m/003.png", "m/010.png", "m/017.png"}
    faults = [proxy.add_fault(method="GET", path_contains=f"/{n}", status=503, code="SlowDown", times=2)
              for n in sorted(hot)]
    faults.append(proxy.add_fault(method="GET", path_contains="/m/020.png", status=500,
                                  code="InternalError", times=1))
    out = storage.read_many(uris)
    assert out == [f"data of {n}".encode() for n in names]  # in order, every one read
    assert all(f.hits == f.times for f in faults)
    for n in names:
        # one GET per object and round (no HEAD first): 2 more rounds for the objects
        # throttled twice, 1 more for the single 500
        want = 3 if n in hot else 2 if n == "m/020.png" else 1
        assert proxy.count("GET", f"/{n}") == want, n
    assert proxy.count("HEAD", "/m/") == 0


def test_read_many_missing_and_forbidden_in_place_named(proxy, direct, s3_bucket):
    uris = _seed(direct, s3_bucket, ["n/a.png", "n/secret.png", "n/c.png"])
    proxy.add_fault(path_contains="/n/secret.png", status=403, code="AccessDenied", times=None)
    missing = f"{s3_bucket}/n/missing.png"
    out = storage.read_many([uris[0], missing, uris[1], uris[2]])
    assert out[0] == b"data of n/a.png" and out[3] == b"data of n/c.png"
    assert isinstance(out[1], storage.NotFound) and missing in str(out[1])
    assert isinstance(out[2], storage.Forbidden) and uris[1] in str(out[2])
    # 403 / 404 are not retried
    assert proxy.count("GET", "/n/missing.png") == 1 and proxy.count("GET", "/n/secret.png") == 1
    assert proxy.count("HEAD", "/n/") == 0


def test_read_many_persistent_slowdown_exhausts_retries_naming_uri(proxy, direct, s3_bucket):
    uris = _seed(direct, s3_bucket, ["p/ok1.png", "p/hot.png", "p/ok2.png"])
    proxy.add_fault(method="GET", path_contains="/p/hot.png", status=503, code="SlowDown", times=None)
    t0 = time.monotonic()
    out = storage.read_many(uris)
    elapsed = time.monotonic() - t0
    assert out[0] == b"data of p/ok1.png" and out[2] == b"data of p/ok2.png"
    err = out[1]
    assert isinstance(err, storage.StorageError) and uris[1] in str(err)
    assert f"still failing after {RETRIES} attempts" in str(err) and "reduce your request rate" in str(err)
    assert proxy.count("GET", "/p/hot.png") == RETRIES  # one GET a round: no inner retry loop
    assert proxy.count("GET", "/p/ok1.png") == 1 and proxy.count("GET", "/p/ok2.png") == 1
    assert elapsed < 8


def test_read_many_reset_and_truncated_body_then_success(proxy, direct, s3_bucket):
    data = bytes(range(256)) * 64
    direct.pipe_file(f"{_bucket(s3_bucket)}/q/t.png", data)
    uris = _seed(direct, s3_bucket, ["q/r.png"]) + [f"{s3_bucket}/q/t.png"]
    proxy.add_fault(method="GET", path_contains="/q/r.png", reset=True, times=1)
    proxy.add_fault(method="GET", path_contains="/q/t.png", truncate=True, times=2)
    assert storage.read_many(uris) == [b"data of q/r.png", data]
    assert proxy.count("GET", "/q/r.png") == 2
    assert proxy.count("GET", "/q/t.png") == 3


def test_write_shard_batched_reads_keep_order_and_quarantine(proxy, direct, s3_bucket):
    """pack's write_shard over S3 through the proxy, in-process (no Ray): more rows than
    one read_many batch, a throttled object read after retries, a missing one quarantined
    as before, rows kept in order; a 403 fails the task (returned as data to the driver,
    which raises it as itself) naming the URI."""
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    from pipeline import images
    from pipeline.data import packing

    n = packing.READ_BATCH + 40
    names = [f"w/c{i % 3}/{i:04d}.png" for i in range(n)]
    for i, name in enumerate(names):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (i % 256, 0, 0)).save(buf, format="PNG")
        direct.pipe_file(f"{_bucket(s3_bucket)}/{name}", buf.getvalue())
    sources = [f"{s3_bucket}/{name}" for name in names]
    sources[7] = f"{s3_bucket}/w/c1/gone.png"  # listed, then deleted
    throttled = proxy.add_fault(method="GET", path_contains=names[n - 3], status=503, code="SlowDown", times=2)
    task = {"dst": f"{s3_bucket}/out", "split": "train", "index": 0, "sources": sources,
            "labels": [i % 3 for i in range(n)], "origins": [""] * n, "origin_sha256": [""] * n}
    r = packing.write_shard(task, storage.default_options(), images.MAX_PIXELS)
    assert (r["rows"], r["bad"], r["reasons"]) == (n - 1, 1, {"missing": 1})
    assert throttled.hits == 2
    shard = pq.read_table(io.BytesIO(storage.read_bytes(f"{s3_bucket}/out/train/part-00000.parquet")))
    assert shard.column("source").to_pylist() == sources[:7] + sources[8:]
    assert shard.column("label").to_pylist() == [i % 3 for i in range(n) if i != 7]
    errors = pq.read_table(io.BytesIO(storage.read_bytes(f"{s3_bucket}/out/_errors/train-part-00000.parquet")))
    assert errors.column("source").to_pylist() == [sources[7]]
    assert errors.column("error")[0].as_py() == f"missing: not found: {sources[7]}"

    proxy.add_fault(method="GET", path_contains=names[280], status=403, code="AccessDenied", times=None)
    failed = packing.write_shard({**task, "index": 1}, storage.default_options(), images.MAX_PIXELS)["failed"]
    with pytest.raises(storage.Forbidden, match=re.escape(sources[280])):  # re-raised by the driver as itself
        packing.raise_failure(failed)
    assert not direct.exists(f"{_bucket(s3_bucket)}/out/train/part-00001.parquet")

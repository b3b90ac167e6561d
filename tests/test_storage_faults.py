"""Object-store faults, through a fault-injecting proxy in front of the moto server.

Throttling (503 SlowDown), 500s and connection resets are retried with backoff;
403/404 fail at once with a message naming the URI; a fault that persists ends in
StorageError after a bounded number of attempts. The proxy counts what reaches it.
"""

from __future__ import annotations

import os
import re
import time

import pytest

from pipeline import storage
from tests.s3_fault_proxy import FaultProxy

RETRIES = 4
BOTOCORE_ATTEMPTS = 2  # storage.filesystem: botocore total_max_attempts


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
    # every attempt of retry() reached the server; no hidden inner retry loop multiplies them
    assert RETRIES < attempts <= RETRIES * BOTOCORE_ATTEMPTS
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
    assert RETRIES < proxy.count("GET", "/rr.png") <= RETRIES * BOTOCORE_ATTEMPTS * 2


def test_truncated_body_then_success(proxy, direct, s3_bucket):
    data = bytes(range(256)) * 64
    direct.pipe_file(f"{_bucket(s3_bucket)}/t.png", data)
    # both of botocore's attempts cut short: storage.retry must retry the broken read
    fault = proxy.add_fault(method="GET", path_contains="/t.png", truncate=True, times=2)
    assert storage.read_bytes(f"{s3_bucket}/t.png") == data
    assert fault.hits == 2
    assert proxy.count("GET", "/t.png") == 3


def test_read_errors_s3fs_would_have_retried_stay_transient():
    # storage.filesystem turns s3fs' own retry loop off: retry() must take these over
    from botocore.parsers import ResponseParserError
    from urllib3.exceptions import IncompleteRead

    assert storage._is_transient(ResponseParserError("Unable to parse response"))
    assert storage._is_transient(IncompleteRead(10, 90))


def test_status_codes_in_urls_and_keys_are_not_statuses():
    """A port or an object key holding "404" once made a dropped connection a NotFound
    (CI saw it: endpoint http://127.0.0.1:40437). Codes count only outside URLs/paths."""
    from botocore.exceptions import ClientError, EndpointConnectionError

    dropped = EndpointConnectionError(endpoint_url="http://127.0.0.1:40437/b/rr.png")
    assert storage._is_transient(dropped)
    assert storage._permanent_error(dropped, "s3://b/rr.png") is None
    slow = ClientError({"Error": {"Code": "SlowDown", "Message": "b/img_404.png"}}, "GetObject")
    assert storage._is_transient(slow)
    gone = ClientError({"Error": {"Code": "404", "Message": "Not Found"}}, "HeadObject")
    assert isinstance(storage._permanent_error(gone, "s3://b/x.png"), storage.NotFound)
    denied = ClientError({"Error": {"Code": "AccessDenied", "Message": "denied"}}, "GetObject")
    assert isinstance(storage._permanent_error(denied, "s3://b/x.png"), storage.Forbidden)


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
        # one GET per object (no HEAD first); botocore's 2 attempts + 1 more round for
        # the throttled ones; a single 500 is absorbed by botocore's second attempt
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
    attempts = proxy.count("GET", "/p/hot.png")
    assert RETRIES < attempts <= RETRIES * BOTOCORE_ATTEMPTS
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
    as before, rows kept in order; a 403 fails the task naming the URI."""
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
    with pytest.raises(storage.Forbidden, match=re.escape(sources[280])):
        packing.write_shard({**task, "index": 1}, storage.default_options(), images.MAX_PIXELS)
    assert not direct.exists(f"{_bucket(s3_bucket)}/out/train/part-00001.parquet")

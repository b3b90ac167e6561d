"""Storage: URIs, atomic writes, streaming listing, NotFound, on local disk and moto S3."""

import errno
import os

import pytest
from botocore.exceptions import ClientError
from s3fs.errors import translate_boto_error

from pipeline import storage


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path)
    return request.getfixturevalue("s3_bucket") + "/root"


def test_write_read_list(root):
    storage.write_json(storage.join(root, "a", "x.json"), {"k": 1})
    storage.write_bytes(storage.join(root, "a", "b", "y.png"), b"123")
    storage.write_bytes(storage.join(root, "a", "_errors", "z.png"), b"hidden")
    storage.write_bytes(storage.join(root, "a", ".tmp", "w.png"), b"hidden")
    assert storage.read_json(storage.join(root, "a", "x.json")) == {"k": 1}
    files = list(storage.iter_files(storage.join(root, "a")))
    # sorted key order; '_' and '.' folders skipped
    assert [os.path.basename(f.uri) for f in files] == ["y.png", "x.json"]
    pngs = list(storage.iter_files(storage.join(root, "a"), (".png",)))
    assert [f.size for f in pngs] == [3] and pngs[0].version
    assert storage.listdir(storage.join(root, "a")) == [".tmp", "_errors", "b", "x.json"]


def test_not_found_names_uri(root):
    missing = storage.join(root, "nope", "f.bin")
    with pytest.raises(storage.NotFound, match="nope/f.bin"):
        storage.read_bytes(missing)
    assert not storage.exists(missing)


def test_listing_paginates_s3(s3_bucket):
    # more than one list_objects_v2 page (1,000 keys)
    fs, path = storage.filesystem(s3_bucket)
    for i in range(1005):
        fs.pipe_file(f"{path}/many/{i:05d}.jpg", b"x")
    uris = [f.uri for f in storage.iter_files(s3_bucket + "/many", (".jpg",))]
    assert len(uris) == 1005 and len(set(uris)) == 1005 and uris == sorted(uris)


def test_local_atomic_write_leaves_no_temp(tmp_path):
    target = tmp_path / "d" / "f.bin"
    storage.write_bytes(str(target), b"a" * 1000)
    storage.write_bytes(str(target), b"b")
    assert target.read_bytes() == b"b"
    assert os.listdir(tmp_path / "d") == ["f.bin"]


def _s3fs_error(code: str, status: int) -> OSError:
    """What s3fs raises for an S3 error reply: an OSError with the botocore ClientError
    as its ``__cause__``."""
    return translate_boto_error(ClientError({"Error": {"Code": code, "Message": "server wording"},
                                             "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject"))


def test_retry_is_bounded_and_classifies():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise _s3fs_error("SlowDown", 503)
        return "ok"

    opts = storage.StorageOptions(retries=4, backoff_s=0.001)
    assert storage.retry(flaky, "s3://b/k", opts) == "ok" and len(calls) == 3

    def forbidden():
        calls.append(1)
        raise PermissionError("403 AccessDenied")

    calls.clear()
    with pytest.raises(storage.Forbidden, match="s3://b/k"):
        storage.retry(forbidden, "s3://b/k", opts)
    assert len(calls) == 1  # 403 is not retried

    def always_503():
        raise _s3fs_error("503", 503)

    with pytest.raises(storage.StorageError, match="still failing after 4 attempts"):
        storage.retry(always_503, "s3://b/k", opts)


def test_retry_raises_other_errors_at_once():
    calls = []

    def bad_request():
        calls.append(1)
        raise _s3fs_error("InvalidArgument", 400)

    opts = storage.StorageOptions(retries=4, backoff_s=0.001)
    with pytest.raises(OSError) as info:
        storage.retry(bad_request, "s3://b/k", opts)
    assert len(calls) == 1 and not isinstance(info.value, storage.StorageError)
    assert storage.classify(info.value) is storage.ErrorKind.PERMANENT


def test_local_errors_by_type(tmp_path):
    with pytest.raises(storage.NotFound, match="nope.bin"):
        storage.read_bytes(str(tmp_path / "nope.bin"))
    with pytest.raises(IsADirectoryError):  # not retried, not renamed
        storage.read_bytes(str(tmp_path))
    assert storage.classify(ConnectionResetError(errno.ECONNRESET, "reset")) is storage.ErrorKind.TRANSIENT
    assert storage.classify(OSError(errno.EBUSY, "busy")) is storage.ErrorKind.TRANSIENT
    assert storage.classify(OSError(errno.ENOSPC, "disk full")) is storage.ErrorKind.PERMANENT


def test_read_many_in_order_errors_in_place(root):
    uris = [storage.join(root, "m", f"{i:03d}.bin") for i in range(40)]
    for i, u in enumerate(uris):
        storage.write_bytes(u, f"object {i}".encode())
    missing = storage.join(root, "m", "nope.bin")
    out = storage.read_many([uris[5], missing, *uris])
    assert out[0] == b"object 5"
    assert isinstance(out[1], storage.NotFound) and "m/nope.bin" in str(out[1])
    assert out[2:] == [f"object {i}".encode() for i in range(40)]
    assert storage.read_many([]) == []
    # a small concurrency still reads everything, in order
    assert storage.read_many(uris, concurrency=3) == [f"object {i}".encode() for i in range(40)]

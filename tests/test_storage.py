"""segdist.storage: atomic writes (local and s3 on loopback), clear errors, URI helpers."""

from __future__ import annotations

import os
import threading

import pytest

from segdist import storage
from segdist.errors import StorageError


def test_atomic_write_local_creates_dirs_and_replaces(tmp_path):
    uri = str(tmp_path / "a" / "b" / "f.bin")
    storage.atomic_write(uri, b"one")
    assert storage.read_bytes(uri) == b"one"
    storage.atomic_write(uri, b"two")
    assert storage.read_bytes(uri) == b"two"
    assert os.listdir(tmp_path / "a" / "b") == ["f.bin"]  # no temp file left behind
    assert storage.exists(uri) and not storage.exists(uri + ".x")


def test_atomic_write_file_uri(tmp_path):
    uri = "file://" + str(tmp_path / "x.json")
    storage.atomic_write(uri, b"{}")
    assert (tmp_path / "x.json").read_bytes() == b"{}"


def test_exception_inside_atomic_open_keeps_old_content(tmp_path):
    uri = str(tmp_path / "f.bin")
    with pytest.raises(ValueError):
        with storage.atomic_open(uri) as f:
            f.write(b"x" * 1000)
            raise ValueError("boom")
    assert not os.path.exists(uri) and os.listdir(tmp_path) == []
    with storage.atomic_open(uri) as f:
        f.write(b"good")
    with pytest.raises(KeyboardInterrupt):
        with storage.atomic_open(uri) as f:
            f.write(b"bad")
            raise KeyboardInterrupt
    assert storage.read_bytes(uri) == b"good"


def test_readers_never_see_a_partial_file(tmp_path):
    """A reader polling the final name while a writer rewrites it sees only whole versions."""
    uri = str(tmp_path / "f.bin")
    versions = [bytes([k]) * (1 << 20) for k in range(1, 9)]
    storage.atomic_write(uri, versions[0])
    seen: set[bytes] = set()
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            data = open(uri, "rb").read()
            seen.add(data[:1] + len(data).to_bytes(4, "big") + data[-1:])

    t = threading.Thread(target=reader)
    t.start()
    try:
        for v in versions[1:]:
            storage.atomic_write(uri, v)
    finally:
        stop.set()
        t.join()
    whole = {v[:1] + len(v).to_bytes(4, "big") + v[-1:] for v in versions}
    assert seen and seen <= whole


def test_write_errors_are_storage_errors(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(StorageError, match="cannot write"):
        storage.atomic_write(str(blocker / "sub" / "x"), b"1")  # parent is a file
    with pytest.raises(StorageError, match="not writable"):
        storage.check_writable(str(blocker / "sub"))
    with pytest.raises(StorageError, match="does not exist"):
        storage.read_bytes(str(tmp_path / "missing"))
    with pytest.raises(StorageError, match="cannot open"):
        storage.url_to_fs("nosuchproto://bucket/x")


def test_check_writable_leaves_no_probe(tmp_path):
    storage.check_writable(str(tmp_path / "out"))
    assert os.listdir(tmp_path / "out") == []


def test_join_and_redact():
    assert storage.join("s3://b/p", "x", "y.json") == "s3://b/p/x/y.json"
    assert storage.join("/tmp/a", "b") == "/tmp/a/b"
    red = storage.redact({"key": "AKIA", "secret": "s", "anon": False,
                          "client_kwargs": {"endpoint_url": "http://h", "aws_session_token": "t"}})
    assert red == {"key": "***", "secret": "***", "anon": False,
                   "client_kwargs": {"endpoint_url": "http://h", "aws_session_token": "***"}}


def test_atomic_write_on_s3(s3_bucket):
    bucket, so = s3_bucket
    uri = f"s3://{bucket}/deep/prefix/f.bin"
    data = os.urandom(3 << 20)
    storage.atomic_write(uri, data, so)
    assert storage.read_bytes(uri, so) == data
    storage.check_writable(f"s3://{bucket}/deep", so)
    fs, path = storage.url_to_fs(f"s3://{bucket}/deep", so)
    assert [os.path.basename(p) for p in fs.find(path)] == ["f.bin"]  # probe removed
    with pytest.raises(StorageError, match="not writable"):
        storage.check_writable("s3://no-such-bucket-segdist/x", so)


def test_atomic_open_streams_to_s3_and_aborts_on_error(s3_bucket, s3_server):
    """Large outputs go up as a multipart upload: invisible until completed, aborted on error."""
    import boto3

    bucket, so = s3_bucket
    so = dict(so, default_block_size=5 << 20)  # S3's minimum part size: keep the test small
    uri = f"s3://{bucket}/exports/big.pkl"
    part = os.urandom(1 << 20)
    with pytest.raises(RuntimeError):
        with storage.atomic_open(uri, so) as f:
            for _ in range(12):  # > the 5 MiB block: parts are uploaded before the error
                f.write(part)
            assert f.mpu is not None  # a multipart upload really was in flight
            raise RuntimeError("export failed half way")
    assert not storage.exists(uri, so)
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    with storage.atomic_open(uri, so) as f:
        for _ in range(12):
            f.write(part)
    assert storage.read_bytes(uri, so) == part * 12


def test_atomic_open_other_filesystems_buffer(tmp_path):
    uri = "memory://segdist-test/x.bin"
    with pytest.raises(ValueError):
        with storage.atomic_open(uri) as f:
            f.write(b"partial")
            raise ValueError
    assert not storage.exists(uri)
    with storage.atomic_open(uri) as f:
        f.write(b"whole")
    assert storage.read_bytes(uri) == b"whole"


def test_local_atomic_files_get_ordinary_permissions(tmp_path):
    # mkstemp creates 0600 files; outputs must be readable as if written with open() (umask applies).
    import os

    from segdist.storage import atomic_open, atomic_write

    old = os.umask(0o022)
    try:
        atomic_write(str(tmp_path / "a.json"), b"{}")
        with atomic_open(str(tmp_path / "b.bin")) as f:
            f.write(b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.bin").stat().st_mode & 0o777 == 0o644


def test_storage_errors_say_what_to_check_and_whether_to_retry():
    """The clients' own exception classes (as they raise them) become one vocabulary."""
    import errno

    import aiohttp
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    from segdist.storage_errors import translate

    def client_error(code: str, status: int) -> ClientError:
        return ClientError({"Error": {"Code": code, "Message": code},
                            "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")

    cases = [  # (error, words in the message, transient)
        (OSError(errno.ENOSPC, "No space left on device"), "no space left on device", False),
        (NoCredentialsError(), "no usable credentials (NoCredentialsError); check the credentials",
         False),
        (EndpointConnectionError(endpoint_url="http://h:9"), "cannot connect to the store", True),
        (aiohttp.ServerDisconnectedError(), "check the endpoint", True),
        (client_error("SlowDown", 503), "throttling requests (SlowDown)", True),
        (client_error("InternalError", 500), "the store failed (InternalError)", True),
        (client_error("NoSuchBucket", 404), "check the bucket name", False),
        (client_error("AccessDenied", 403), "access denied (AccessDenied); check the credentials",
         False),
        (TimeoutError(), "timed out", True),
    ]
    for exc, words, transient in cases:
        err = translate(exc, "s3://b/x", "write")
        assert err.uri == "s3://b/x" and err.op == "write" and err.transient is transient, exc
        assert str(err).startswith("cannot write s3://b/x: ") and words in str(err), str(err)
        assert "\n" not in str(err)
    # As s3fs raises them: an OSError made from the ClientError, which is its cause.
    wrapped = OSError(errno.EBUSY, "SlowDown")
    wrapped.__cause__ = client_error("SlowDown", 503)
    assert translate(wrapped, "s3://b/x", "read").transient
    missing = translate(FileNotFoundError("x"), "s3://b/x", "read")
    assert str(missing) == "s3://b/x does not exist" and not missing.transient
    # Pickled across processes (Ray) with its fields.
    import pickle
    again = pickle.loads(pickle.dumps(err))
    assert (again.uri, again.op, again.transient, str(again)) == (err.uri, err.op, True, str(err))


def test_retry_retries_transient_errors_only_within_its_window():
    from segdist.storage_errors import retry

    calls = []

    def flaky(fail: int, transient: bool):
        def call():
            calls.append(1)
            if len(calls) <= fail:
                raise StorageError("down", transient=transient)
            return "ok"
        return call

    assert retry(flaky(2, True), 5.0, "t", first_delay_s=0.01) == "ok" and len(calls) == 3
    calls.clear()
    with pytest.raises(StorageError):
        retry(flaky(2, False), 5.0, "t", first_delay_s=0.01)  # permanent: no second try
    assert len(calls) == 1
    calls.clear()
    with pytest.raises(StorageError):
        retry(flaky(10**6, True), 0.2, "t", first_delay_s=0.01, max_delay_s=0.05)
    assert 2 < len(calls) < 100

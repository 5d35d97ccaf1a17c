"""Object storage through fsspec URIs (local paths, file://, s3://, gs://, memory://).

Every write that produces a final output goes through :func:`atomic_write`: a file never appears at
its final name half-written. Locally the bytes go to a temporary file in the same directory and are
renamed into place (``os.replace`` is atomic on POSIX). On object stores the object is uploaded in
one PUT (or a multipart upload that only becomes visible when completed), which is atomic by the
stores' semantics. Credentials come from the environment or from ``storage_options``; they are never
logged (see :func:`redact`).
"""

from __future__ import annotations

import contextlib
import io
import os
import posixpath
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from segdist.errors import StorageError

_SECRET_KEYS = ("key", "secret", "token", "password", "credential", "session")


def url_to_fs(uri: str, storage_options: Mapping[str, Any] | None = None):
    """Return ``(filesystem, path)`` for ``uri``; raises StorageError for an unknown protocol."""
    try:
        fs, path = fsspec.core.url_to_fs(str(uri), **dict(storage_options or {}))
    except (ImportError, ValueError) as exc:
        raise StorageError(
            f"cannot open {uri!r}: {exc}. Use a local path or an fsspec URI such as "
            "s3://bucket/prefix (needs s3fs) or gs://bucket/prefix (needs gcsfs)."
        ) from exc
    return fs, path


def is_local(uri: str) -> bool:
    fs, _ = url_to_fs(uri)
    return isinstance(fs, LocalFileSystem)


def _split_chain(uri: str) -> tuple[str, str, str]:
    """``(before, link, after)`` of an fsspec chained URL, ``link`` being the one with the path.

    That is the first link that is more than a bare protocol name: in
    ``tar://VOCdevkit/VOC2007::simplecache::http://host/x.tar`` the path inside the archive
    (``tar://VOCdevkit/VOC2007``), in ``simplecache::s3://bucket/photos`` the cached file's own
    URL (``s3://bucket/photos``: ``simplecache`` only names a layer). A plain URI is its own link.
    """
    links = str(uri).split("::")
    for k, link in enumerate(links):
        if "://" in link or "/" in link or k == len(links) - 1:
            before = "".join(x + "::" for x in links[:k])
            after = "".join("::" + x for x in links[k + 1:])
            return before, link, after
    return "", str(uri), ""  # unreachable: the last link is always taken


def path_link(uri: str) -> str:
    """The link of a (possibly chained) fsspec URL that holds the file's path (see ``join``)."""
    return _split_chain(uri)[1]


def join(base: str, *parts: str) -> str:
    """Join URI parts with '/', keeping the protocol (``s3://b/p`` + ``x`` -> ``s3://b/p/x``)."""
    base = str(base)
    if "::" in base:
        # fsspec chained URL: the parts belong to the link that carries the path (the archive's
        # inner path in tar://...::http://..., the target in simplecache::s3://...).
        before, link, after = _split_chain(base)
        return before + join(link, *parts) + after
    if "://" in base:
        proto, rest = base.split("://", 1)
        return proto + "://" + posixpath.join(rest, *parts)
    return os.path.join(base, *parts)


def read_bytes(uri: str, storage_options: Mapping[str, Any] | None = None) -> bytes:
    fs, path = url_to_fs(uri, storage_options)
    try:
        return fs.cat_file(path)
    except FileNotFoundError as exc:
        raise StorageError(f"{uri} does not exist") from exc
    except PermissionError as exc:
        raise StorageError(f"no permission to read {uri}") from exc


def exists(uri: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    fs, path = url_to_fs(uri, storage_options)
    return fs.exists(path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _local_atomic(uri: str, path: str) -> Iterator[io.IOBase]:
    """A temporary file beside ``path``, renamed onto it (atomic on POSIX) if the block succeeds."""
    directory = os.path.dirname(path) or "."
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + ".", dir=directory)
        # mkstemp makes the file 0600; give the final file the permissions open() would.
        os.fchmod(fd, 0o666 & ~_umask())
    except PermissionError as exc:
        raise StorageError(f"no permission to write {uri}") from exc
    except OSError as exc:
        raise StorageError(f"cannot write {uri}: {exc}") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write(uri: str, data: bytes, storage_options: Mapping[str, Any] | None = None) -> None:
    """Write ``data`` to ``uri`` so that readers see either nothing or the whole file."""
    fs, path = url_to_fs(uri, storage_options)
    try:
        if isinstance(fs, LocalFileSystem):
            with _local_atomic(uri, path) as f:
                f.write(data)
        else:
            # One PUT (s3fs switches to a multipart upload for large bodies, which stays invisible
            # until completed): never a partial object at the final key.
            fs.pipe_file(path, data)
    except PermissionError as exc:
        raise StorageError(f"no permission to write {uri}") from exc
    except OSError as exc:
        if isinstance(exc, StorageError):
            raise
        raise StorageError(f"cannot write {uri}: {exc}") from exc


@contextlib.contextmanager
def atomic_open(uri: str, storage_options: Mapping[str, Any] | None = None) -> Iterator[io.IOBase]:
    """Binary file-like object whose contents land at ``uri`` only if the block exits cleanly.

    An exception (or a killed process) inside the block leaves nothing at ``uri``. The bytes are
    streamed, not held in memory (exports of a whole run can be GBs): locally into a temporary file
    renamed into place; on stores whose files can be discarded (s3fs, gcsfs: a multipart/resumable
    upload, invisible until completed, aborted on error). Other filesystems get an in-memory buffer
    written with :func:`atomic_write`.
    """
    fs, path = url_to_fs(uri, storage_options)
    if isinstance(fs, LocalFileSystem):
        with _local_atomic(uri, path) as f:
            yield f
        return
    if _discardable(fs):
        f = fs.open(path, "wb")
        try:
            yield f
        except BaseException:
            f.discard()  # abort the upload; closing would commit it
            f.closed = True  # and keep the garbage collector's close() from trying to
            raise
        f.close()
        return
    buf = io.BytesIO()
    yield buf
    atomic_write(uri, buf.getvalue(), storage_options)


def _discardable(fs) -> bool:
    """Whether ``fs.open(path, "wb").discard()`` really aborts the write (not fsspec's no-op)."""
    import sys

    from fsspec.spec import AbstractBufferedFile

    # The file class is only known after opening, and opening may already create the file
    # (memory://), so look the class up by name in the filesystem's module instead.
    name = {"S3FileSystem": "S3File", "GCSFileSystem": "GCSFile"}.get(type(fs).__name__)
    cls = getattr(sys.modules.get(type(fs).__module__), name, None) if name else None
    return (isinstance(cls, type) and issubclass(cls, AbstractBufferedFile)
            and cls.discard is not AbstractBufferedFile.discard)


def check_writable(uri: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Fail fast, with a clear message, if nothing can be written under the directory ``uri``."""
    probe = join(uri, f".segdist-write-check-{uuid.uuid4().hex}")
    try:
        atomic_write(probe, b"ok", storage_options)
    except StorageError as exc:
        raise StorageError(
            f"output location {uri} is not writable ({exc}); check the URI, the bucket, "
            "and the credentials (environment or output.storage_options)"
        ) from exc
    fs, path = url_to_fs(probe, storage_options)
    with contextlib.suppress(Exception):
        fs.rm_file(path)


def redact(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Copy of storage options with every secret-looking value replaced by '***' (for logs/outputs)."""
    out: dict[str, Any] = {}
    for k, v in (options or {}).items():
        if isinstance(v, Mapping):
            out[k] = redact(v)
        elif any(s in k.lower() for s in _SECRET_KEYS):
            out[k] = "***"
        else:
            out[k] = v
    return out

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
from segdist.storage_errors import HINTS, classify, translate, translated

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
    """The bytes at ``uri``; StorageError (see :mod:`segdist.storage_errors`) if they cannot be
    read, ``"URI does not exist"`` when there is no such file."""
    fs, path = url_to_fs(uri, storage_options)
    with translated(uri, "read"):
        return fs.cat_file(path)


def exists(uri: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    fs, path = url_to_fs(uri, storage_options)
    with translated(uri, "check"):
        return fs.exists(path)


def list_dir(uri: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """``{base name: {"size": int, "etag": str | None}}`` of the files directly under the folder
    ``uri`` (empty when there is no such folder), from one listing.

    ``etag`` is what the store reports for the object (S3's ETag, quotes removed), None where the
    store has none (local files).
    """
    fs, path = url_to_fs(uri, storage_options)
    # s3fs caches listings; a listing from before this run's writes would hide new files.
    fs.invalidate_cache(path)
    with translated(uri, "list"):
        try:
            entries = fs.ls(path, detail=True)
        except FileNotFoundError:
            return {}
    out = {}
    for e in entries:
        if e.get("type") == "directory":
            continue
        etag = e.get("ETag") or e.get("etag")
        out[posixpath.basename(str(e["name"]).rstrip("/"))] = {
            "size": e.get("size"), "etag": etag.strip('"') if isinstance(etag, str) else None}
    return out


def remove(uri: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Delete the file at ``uri`` (nothing when there is none)."""
    fs, path = url_to_fs(uri, storage_options)
    with translated(uri, "delete"):
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _local_atomic(uri: str, path: str) -> Iterator[io.IOBase]:
    """A temporary file beside ``path``, renamed onto it (atomic on POSIX) if the block succeeds."""
    with translated(uri, "write"):
        tmp = _local_temp(path)
    try:
        with translated(uri, "write"):
            f = open(tmp, "wb")
        with f:
            yield f
            with translated(uri, "write"):
                f.flush()
                os.fsync(f.fileno())
        with translated(uri, "write"):
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _local_temp(path: str) -> str:
    """A new empty temporary file in ``path``'s folder, with the permissions open() would give."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + ".", dir=directory)
    # mkstemp makes the file 0600; give the final file the permissions open() would.
    os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    return tmp


def atomic_write(uri: str, data: bytes, storage_options: Mapping[str, Any] | None = None
                 ) -> str | None:
    """Write ``data`` to ``uri`` so that readers see either nothing or the whole file.

    Returns the ETag the store gave the object when it reports one with the write (S3: the PUT's
    response, quotes removed; no extra request), else None (local files). Raises StorageError
    (:mod:`segdist.storage_errors`: transient or permanent, with what to check).
    """
    fs, path = url_to_fs(uri, storage_options)
    if isinstance(fs, LocalFileSystem):
        with _local_atomic(uri, path) as f:
            with translated(uri, "write"):
                f.write(data)
        return None
    with translated(uri, "write"):
        # One PUT (s3fs switches to a multipart upload for large bodies, which stays invisible
        # until completed): never a partial object at the final key.
        response = fs.pipe_file(path, data)
    return _etag(response)


def _etag(response: Any) -> str | None:
    """The ETag of a PUT's response (s3fs returns botocore's dict), quotes removed."""
    etag = response.get("ETag") if isinstance(response, dict) else None
    return etag.strip('"') if isinstance(etag, str) else None


def _precondition_failed(exc: StorageError) -> bool:
    """Whether a write was refused because its condition did not hold (HTTP 412)."""
    cause = exc.__cause__
    return isinstance(cause, FileExistsError) or "PreconditionFailed" in repr(
        getattr(cause, "__cause__", None))


def create_new(uri: str, data: bytes, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Write ``data`` to ``uri`` only if no file is there; returns whether this call created it.

    Conditional where the store can do it atomically: locally a whole temporary file hard-linked
    to the name (``link`` fails when the name exists, as ``O_EXCL`` does), on S3 a PUT with
    ``If-None-Match: *`` (412 when the key exists). Other stores: an existence check, then the
    write (two writers racing in between would both succeed).
    """
    fs, path = url_to_fs(uri, storage_options)
    if isinstance(fs, LocalFileSystem):
        with translated(uri, "write"):
            tmp = _local_temp(path)
        try:
            with translated(uri, "write"):
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            except OSError as exc:
                raise translate(exc, uri, "write") from exc
            return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    if _is_s3(fs):
        try:
            with translated(uri, "write"):
                fs.pipe_file(path, data, mode="create")
            return True
        except StorageError as exc:
            if _precondition_failed(exc):
                return False
            raise
    if exists(uri, storage_options):
        return False
    atomic_write(uri, data, storage_options)
    return True


def replace_if(uri: str, data: bytes, etag: str | None,
               storage_options: Mapping[str, Any] | None = None) -> bool:
    """Overwrite ``uri`` with ``data`` only if the object there still has ``etag`` (S3:
    ``If-Match``); returns whether it did. Elsewhere (local files, or ``etag`` None) the file is
    overwritten unconditionally (True)."""
    fs, path = url_to_fs(uri, storage_options)
    if not (_is_s3(fs) and etag):
        atomic_write(uri, data, storage_options)
        return True
    try:
        with translated(uri, "write"):
            fs.pipe_file(path, data, IfMatch=f'"{etag}"')
        return True
    except StorageError as exc:
        if _precondition_failed(exc):
            return False
        raise


def etag_of(uri: str, storage_options: Mapping[str, Any] | None = None) -> str | None:
    """The ETag of the object at ``uri`` (one HEAD request on S3), None where there is none."""
    fs, path = url_to_fs(uri, storage_options)
    if not _is_s3(fs):
        return None
    with translated(uri, "check"):
        fs.invalidate_cache(path)
        etag = fs.info(path).get("ETag")
    return etag.strip('"') if isinstance(etag, str) else None


def _is_s3(fs) -> bool:
    return type(fs).__name__ == "S3FileSystem"


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
        with translated(uri, "write"):
            f = fs.open(path, "wb")
        try:
            yield f
        except BaseException:
            f.discard()  # abort the upload; closing would commit it
            f.closed = True  # and keep the garbage collector's close() from trying to
            raise
        with translated(uri, "write"):
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
    """Fail fast, with a clear one-line message, if nothing can be written under the directory
    ``uri`` (no bucket, no credentials, an unreachable endpoint, no space, no permission)."""
    probe = join(uri, f".segdist-write-check-{uuid.uuid4().hex}")
    try:
        atomic_write(probe, b"ok", storage_options)
    except StorageError as exc:
        reason, what, _ = classify(exc.__cause__ or exc)
        hint = (HINTS[what] if what not in (None, "missing") else
                "check the URI, the bucket, and the credentials (environment or "
                "output.storage_options)")
        raise StorageError(f"output location {uri} is not writable: {reason}; {hint}",
                           uri=uri, op="write", transient=exc.transient) from exc
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

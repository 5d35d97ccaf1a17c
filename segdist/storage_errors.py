"""What a storage failure means, in one vocabulary, and how long to keep trying.

fsspec's backends fail in their own words: s3fs raises ``OSError`` subclasses built from S3 error
codes (with the botocore ``ClientError`` as the cause), or botocore's own ``NoCredentialsError`` /
``EndpointConnectionError`` (not ``OSError`` at all); gcsfs raises ``HttpError`` with an HTTP code;
aiohttp raises ``ClientError``; the local filesystem ``OSError`` with an errno. :func:`translate`
turns any of them into a :class:`~segdist.errors.StorageError` that names the URI, the operation,
the reason, what to check (credentials, endpoint, bucket, space) and whether the error is
*transient* (connection, throttling, 5xx, timeouts: worth retrying) or *permanent* (no bucket,
access denied, no space: retrying cannot help).

:func:`retry` retries transient errors with exponential backoff and jitter within a time window
(``resources.storage_retry_s`` during a job); permanent ones are raised at once.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import random
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from segdist.errors import StorageError

log = logging.getLogger(__name__)
T = TypeVar("T")

# S3 / GCS error codes: transient ones are worth another try, the others name what to check.
_THROTTLE_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
                   "TooManyRequests", "TooManyRequestsException", "RequestThrottled", "429"}
_SERVER_CODES = {"InternalError", "ServiceUnavailable", "RequestTimeout", "RequestTimeTooSkewed",
                 "500", "502", "503", "504"}
_CREDENTIAL_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
                     "InvalidToken", "AllAccessDisabled", "AccountProblem", "NotSignedUp",
                     "401", "403"}
_BUCKET_CODES = {"NoSuchBucket", "InvalidBucketName", "PermanentRedirect"}
_TRANSIENT_ERRNOS = {errno.EBUSY, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED,
                     errno.ECONNABORTED, errno.EPIPE, errno.EAGAIN, errno.ENETUNREACH,
                     errno.EHOSTUNREACH, errno.ENETDOWN, getattr(errno, "EREMOTEIO", 121)}

HINTS = {
    "credentials": "check the credentials (the AWS_* / GOOGLE_* environment, the instance "
                   "profile, or storage_options) and their permissions on this location",
    "endpoint": "check the endpoint (storage_options client_kwargs.endpoint_url or "
                "AWS_ENDPOINT_URL) and that the store is reachable from here",
    "bucket": "check the bucket name and its region",
    "space": "free some space there, or write to another location",
    "permission": "check the permissions on this location",
    "missing": "check the URI",
}


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from (cause or context), outermost first."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _code(exc: BaseException) -> str | None:
    """The S3 error code of a botocore ClientError, or the HTTP status of a gcsfs HttpError."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = (response.get("Error") or {}).get("Code")
        status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        return str(code or status) if (code or status) else None
    code = getattr(exc, "code", None)
    return str(code) if isinstance(code, int) else None


def classify(exc: BaseException) -> tuple[str, str | None, bool]:
    """``(reason, what to check or None, transient)`` for an error raised by a storage backend."""
    names = [type(e).__name__ for e in _chain(exc)]
    for e in _chain(exc):
        name = type(e).__name__
        if name in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
                    "DefaultCredentialsError", "RefreshError"):
            return f"no usable credentials ({name})", "credentials", False
        if name in ("EndpointConnectionError", "ConnectTimeoutError", "ProxyConnectionError",
                    "ClientConnectorError", "ClientConnectorDNSError", "ServerDisconnectedError",
                    "ConnectionClosedError", "ClientOSError") \
                or isinstance(e, ConnectionError):
            return f"cannot connect to the store ({name}: {_first_line(e)})", "endpoint", True
        if name in ("ReadTimeoutError", "FSTimeoutError", "ServerTimeoutError") \
                or isinstance(e, TimeoutError):
            return f"the store timed out ({name})", "endpoint", True
        if name in ("ClientPayloadError", "IncompleteRead", "ResponseParserError",
                    "HTTPClientError"):
            return f"the connection broke off ({name})", "endpoint", True
        code = _code(e)
        if code is not None:
            if code in _THROTTLE_CODES:
                return f"the store is throttling requests ({code})", None, True
            if code in _SERVER_CODES or (code.isdigit() and int(code) >= 500):
                return f"the store failed ({code})", None, True
            if code in _CREDENTIAL_CODES:
                return f"access denied ({code})", "credentials", False
            if code in _BUCKET_CODES:
                return f"the bucket does not exist or is not reachable ({code})", "bucket", False
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno is not None:
            if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
                return "no space left on device", "space", False
            if e.errno == errno.EROFS:
                return "read-only file system", "permission", False
            if e.errno in _TRANSIENT_ERRNOS:
                return f"{type(e).__name__}: {_first_line(e)}", "endpoint", True
    if any(isinstance(e, FileNotFoundError) for e in _chain(exc)):
        if "bucket" in str(exc).lower():
            return "the bucket does not exist", "bucket", False
        return "does not exist", "missing", False
    if any(isinstance(e, PermissionError) for e in _chain(exc)):
        return f"permission denied ({_first_line(exc)})", "permission", False
    return f"{names[0]}: {_first_line(exc)}", None, False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def translate(exc: BaseException, uri: str, op: str) -> StorageError:
    """A StorageError for ``exc`` raised while trying to ``op`` (read, write, list, ...) ``uri``.

    The message is one line: ``cannot write s3://b/x: cannot connect to the store (...); check the
    endpoint ...``; a missing file reads ``s3://b/x does not exist``. A StorageError is returned
    as it is.
    """
    if isinstance(exc, StorageError):
        return exc
    reason, what, transient = classify(exc)
    if what == "missing":
        message = f"{uri} does not exist"
    else:
        message = f"cannot {op} {uri}: {reason}"
        if what is not None:
            message += f"; {HINTS[what]}"
    return StorageError(message, uri=uri, op=op, transient=transient)


def is_missing(exc: StorageError) -> bool:
    """Whether a StorageError says the file does not exist (and nothing worse)."""
    cause = exc.__cause__
    return cause is not None and classify(cause)[1] == "missing"


@contextlib.contextmanager
def translated(uri: str, op: str) -> Iterator[None]:
    """Raise any storage backend error inside the block as a :func:`translate` StorageError."""
    try:
        yield
    except StorageError:
        raise
    except OSError as exc:
        raise translate(exc, uri, op) from exc
    except Exception as exc:
        if from_storage_library(exc):
            raise translate(exc, uri, op) from exc
        raise  # a programming error goes through untouched


_STORAGE_MODULES = ("botocore", "aiobotocore", "aiohttp", "s3fs", "gcsfs", "fsspec", "google",
                    "urllib3", "requests", "asyncio")


def from_storage_library(exc: BaseException) -> bool:
    """Whether ``exc`` comes from a storage client (botocore / aiohttp / gcsfs errors do not share
    a base class with OSError)."""
    return isinstance(exc, OSError) or type(exc).__module__.split(".")[0] in _STORAGE_MODULES


def retry(call: Callable[[], T], window_s: float, what: str, *,
          first_delay_s: float = 0.5, max_delay_s: float = 10.0) -> T:
    """``call()``, retried on transient StorageErrors until ``window_s`` seconds have passed.

    Backoff doubles from ``first_delay_s`` up to ``max_delay_s``, each wait jittered to between
    half and all of it (so that many workers hitting the same outage do not retry in lockstep).
    A permanent error, or a transient one after the window, is raised as it is. ``what`` names the
    operation in the log (``"write chunk-000012.parquet"``).
    """
    deadline = time.monotonic() + window_s
    delay = first_delay_s
    tries = 0
    while True:
        try:
            return call()
        except StorageError as exc:
            tries += 1
            left = deadline - time.monotonic()
            if not exc.transient or left <= 0:
                if tries > 1:
                    log.warning("%s: giving up after %d tries: %s", what, tries, exc)
                raise
            wait = min(delay, left) * random.uniform(0.5, 1.0)
            if tries == 1 or tries % 5 == 0:
                log.warning("%s failed (%s); retrying for up to %.0f s more", what, exc, left)
            time.sleep(wait)
            delay = min(delay * 2, max_delay_s)

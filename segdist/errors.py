"""Typed errors that the CLI turns into one clear message (no traceback) and a non-zero exit."""


class SegdistError(Exception):
    """Base class: a problem the user can fix (bad config, unreadable input, refused output)."""


class ConfigError(SegdistError):
    """A run config or CLI override is invalid; the message names the field and allowed values."""


class StorageError(SegdistError):
    """A URI cannot be read or written (missing, no permission, unreachable, unknown protocol).

    Attributes:
        uri: the location, when known.
        op: what was being done (``read``, ``write``, ``list``, ...), when known.
        transient: the store may succeed if asked again (a connection error, throttling, a 5xx,
            a timeout); false for errors that retrying cannot fix (no bucket, access denied, no
            space). See :mod:`segdist.storage_errors`.
    """

    def __init__(self, message: str, *, uri: str | None = None, op: str | None = None,
                 transient: bool = False):
        super().__init__(message)
        self.uri, self.op, self.transient = uri, op, transient

    def __reduce__(self):  # keep the fields across pickling (Ray ships errors between processes)
        return (_storage_error, (str(self), self.uri, self.op, self.transient))


def _storage_error(message: str, uri: str | None, op: str | None, transient: bool) -> StorageError:
    return StorageError(message, uri=uri, op=op, transient=transient)


class DatasetError(SegdistError):
    """A dataset's annotation files are missing or malformed; the message names the file, the
    key or element, and what was expected."""


class ImageDecodeError(SegdistError):
    """An image file is missing, empty, truncated, corrupt, too large or of an unknown format.

    Attributes:
        uri: the file that failed.
        reason: a short human-readable reason.
    """

    def __init__(self, uri: str, reason: str):
        super().__init__(f"cannot decode image {uri}: {reason}")
        self.uri = uri
        self.reason = reason

    def __reduce__(self):  # keep both fields across pickling (Ray ships errors between processes)
        return (type(self), (self.uri, self.reason))

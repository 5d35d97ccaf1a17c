"""Image collections without annotations: every image under a folder, or the lines of a list file.

- Folder (``images``): listed recursively, with one fsspec ``find`` on object stores (a paginated
  listing, no request per file), with ``os.walk`` locally (a subfolder that cannot be opened is
  an error, not skipped); a folder that exists but cannot be read is "not readable", not
  missing. A file is kept when no part of its relative path starts with ``.`` (hidden files and
  folders: ``.DS_Store``, ``._x.jpg``, ``.thumbnails/``), its extension is an image extension
  (``extensions``, case-insensitive; default :data:`IMAGE_EXTENSIONS`) and it matches ``glob``
  when one is given. What is left out is counted by reason in
  ``Dataset.skipped``; nothing is opened on the driver.
- List file (``image_list``): one image per line, a full URI or a path relative to ``images`` (else
  to the list file's folder); blank lines and lines starting with ``#`` are skipped, a line listed
  twice counts once. Every line is kept unless ``extensions`` or ``glob`` is given.

``file_name`` is the path relative to the folder (``/``-separated; for a list line outside the
folder, the line itself), and ``image_id`` the hash of it (:func:`segdist.data.ids.assign_ids`):
ids do not change when files are added. Sizes are not read here: ``height = width = 0`` (unknown)
until a worker decodes the image; zero-byte, corrupt or missing files are kept in the dataset, so
the job records each as a failed image with its reason instead of losing it silently. ``coco_gt``
has the images (``id``, ``file_name``) and no annotations: there is nothing to evaluate against.
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from segdist.data.ids import assign_ids
from segdist.data.records import Dataset, ImageRecord
from segdist.errors import DatasetError, StorageError
from segdist.storage import join, path_link, read_bytes, url_to_fs

# What Pillow decodes without plugins (segdist.imageio), by file extension.
IMAGE_EXTENSIONS: tuple[str, ...] = (
    "jpg", "jpeg", "jpe", "jfif", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm",
    "pbm", "pnm",
)
SKIP_HIDDEN = "hidden"
SKIP_EXTENSION = "not an image extension"
SKIP_GLOB = "outside dataset.glob"
SKIP_DUPLICATE = "listed twice"


def load_images(
    images_uri: str | None = None,
    image_list: str | None = None,
    *,
    extensions: Sequence[str] | None = None,
    glob: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    limit: int | None = None,
    image_ids: Iterable[int] | None = None,
) -> Dataset:
    """The images under ``images_uri`` (recursive), or those of the list file ``image_list``.

    Args:
        images_uri: folder URI (any fsspec URI); with ``image_list``, the base of relative lines.
        image_list: URI of a text file with one image URI or relative path per line.
        extensions: keep only files with these extensions (no dot, any case). Default: the
            image extensions for a folder, every line for a list file.
        glob: keep only relative paths matching this ``fnmatch`` pattern (``*`` also matches
            ``/``: ``"2024/*.jpg"`` matches ``2024/a/b.jpg``).
        image_ids: keep only these ids (each must be in the collection); then ``limit`` keeps the
            first ``limit`` by ascending id.

    Returns a Dataset with ``height = width = 0`` records (sizes are read by the workers),
    ``coco_gt`` without annotations and ``skipped`` = {reason: count}. Raises StorageError when
    the folder or list cannot be read, DatasetError for a malformed list or unknown ``image_ids``.
    """
    if not images_uri and not image_list:
        raise DatasetError("an image collection needs a folder (dataset.images) or a list file "
                           "(dataset.image_list)")
    if limit is not None and limit < 1:
        raise DatasetError(f"limit must be >= 1, got {limit}")
    wanted_ext = _normalised_extensions(extensions)
    skipped: Counter[str] = Counter()
    if image_list:
        base = images_uri or _parent(image_list)
        entries = _list_file_entries(image_list, base, storage_options, skipped)
        name = _stem(image_list)
    else:
        base = images_uri
        entries = _folder_entries(images_uri, storage_options, skipped)
        if wanted_ext is None:  # a list names its images; a folder holds other files too
            wanted_ext = frozenset(IMAGE_EXTENSIONS)
        name = posixpath.basename(_path_of(images_uri).rstrip("/")) or "images"

    kept: dict[str, str] = {}  # file_name -> uri
    for file_name, uri in entries:
        if wanted_ext is not None and _extension(file_name) not in wanted_ext:
            skipped[SKIP_EXTENSION] += 1
        elif glob and not fnmatch.fnmatchcase(file_name, glob):
            skipped[SKIP_GLOB] += 1
        elif file_name in kept:
            skipped[SKIP_DUPLICATE] += 1
        else:
            kept[file_name] = uri

    ids = assign_ids(kept)
    records = sorted((ImageRecord(ids[f], f, u, 0, 0) for f, u in kept.items()),
                     key=lambda r: r.image_id)
    if image_ids is not None:
        wanted = {int(i) for i in image_ids}
        unknown = sorted(wanted - set(ids.values()))
        if unknown:
            raise DatasetError(f"{image_list or images_uri}: image_ids not in the collection: "
                               f"{unknown[:10]}" + (f" and {len(unknown) - 10} more"
                                                    if len(unknown) > 10 else ""))
        records = [r for r in records if r.image_id in wanted]
    if limit is not None:
        records = records[:limit]
    coco_gt = {"images": [{"id": r.image_id, "file_name": r.file_name} for r in records],
               "annotations": [], "categories": []}
    return Dataset(name=name, images=records, coco_gt=coco_gt,
                   storage_options=dict(storage_options or {}), skipped=dict(skipped))


def _folder_entries(images_uri: str, storage_options: Mapping[str, Any] | None,
                    skipped: Counter[str]) -> list[tuple[str, str]]:
    """``(relative path, uri)`` of every visible file under the folder."""
    fs, root = url_to_fs(images_uri, storage_options)
    root = root.rstrip("/")
    try:
        # info, not isdir: isdir says False for a folder it may not look at, as for a missing one.
        info = fs.info(root)
    except FileNotFoundError:
        raise StorageError(f"the image folder {images_uri} does not exist; check dataset.images"
                           ) from None
    except PermissionError as exc:
        raise StorageError(f"the image folder {images_uri} is not readable ({_reason(exc)}); check "
                           "its permissions or the storage credentials") from None
    except OSError as exc:
        raise StorageError(f"cannot read the image folder {images_uri}: {exc}") from None
    if info.get("type") != "directory":
        raise StorageError(f"{images_uri} is not a folder; dataset.images names the folder that "
                           "holds the images (or use dataset.image_list for a list file)")
    try:
        found = _local_files(root) if isinstance(fs, LocalFileSystem) else fs.find(
            root, withdirs=False)
    except PermissionError as exc:
        where = getattr(exc, "filename", None)
        if not where or str(where).rstrip("/") == root:
            raise StorageError(f"the image folder {images_uri} is not readable ({_reason(exc)}); "
                               "check its permissions or the storage credentials") from None
        raise StorageError(f"{where} (under the image folder {images_uri}) is not readable "
                           f"({_reason(exc)}); check its permissions or the storage credentials"
                           ) from None
    except OSError as exc:
        raise StorageError(f"cannot list the image folder {images_uri}: {exc}") from None
    out = []
    prefix = root + "/"
    for path in sorted(found):
        if not path.startswith(prefix):
            continue  # the folder itself (some stores list a placeholder object for it)
        rel = path[len(prefix):]
        if not rel or rel.endswith("/"):
            continue
        if any(part.startswith(".") for part in rel.split("/")):
            skipped[SKIP_HIDDEN] += 1
            continue
        out.append((rel, join(images_uri, rel)))
    return out


def _local_files(root: str) -> list[str]:
    """Every file under the local folder ``root`` (symlinked folders followed, as fsspec does).

    Not ``fs.find``: a local listing walks folder by folder and skips, silently, a folder it
    cannot open; here that raises (PermissionError naming it), it is not a folder of no images.
    """
    def fail(exc: OSError) -> None:
        raise exc

    return [posixpath.join(folder, name)
            for folder, _, names in os.walk(root, onerror=fail, followlinks=True) for name in names]


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or "permission denied"


def _list_file_entries(image_list: str, base: str, storage_options: Mapping[str, Any] | None,
                       skipped: Counter[str]) -> list[tuple[str, str]]:
    """``(file_name, uri)`` of every line of the list file (relative lines resolved on ``base``)."""
    try:
        text = read_bytes(image_list, storage_options).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{image_list} is not a UTF-8 text file ({exc}); expected one image "
                           "URI or relative path per line") from None
    except StorageError as exc:
        raise StorageError(f"cannot read the image list: {exc}") from None
    base_path = _path_of(base).rstrip("/")
    base_proto = _protocol(base)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "://" in line or "::" in line or line.startswith("/"):
            # A full URI: named relative to the folder when it lies inside it.
            path = _path_of(line)
            if _protocol(line) == base_proto and path.startswith(base_path + "/"):
                rel = path[len(base_path) + 1:]
                out.append((rel, join(base, rel)))
            else:
                out.append((line, line))
            continue
        rel = posixpath.normpath(line)
        if rel.startswith("../") or rel == "..":
            raise DatasetError(f"{image_list}: line {line!r} points outside {base}; give a full "
                               "URI instead")
        if any(part.startswith(".") for part in rel.split("/")):
            skipped[SKIP_HIDDEN] += 1
            continue
        out.append((rel, join(base, rel)))
    return out


def _normalised_extensions(extensions: Sequence[str] | None) -> frozenset[str] | None:
    if extensions is None:
        return None
    return frozenset(e.lower().lstrip(".") for e in extensions)


def _extension(file_name: str) -> str:
    base = posixpath.basename(file_name)
    return base.rsplit(".", 1)[1].lower() if "." in base else ""


def _protocol(uri: str) -> str:
    link = path_link(uri)
    return link.split("://", 1)[0] if "://" in link else "file"


def _path_of(uri: str) -> str:
    """The path part of a URI (``s3://b/x`` -> ``b/x``; a local path as is)."""
    link = path_link(uri)
    return link.split("://", 1)[1] if "://" in link else link


def _parent(uri: str) -> str:
    if "://" in uri:
        proto, rest = uri.split("://", 1)
        return proto + "://" + posixpath.dirname(rest)
    return posixpath.dirname(uri) or "."


def _stem(uri: str) -> str:
    name = posixpath.basename(_path_of(uri).rstrip("/"))
    return name.rsplit(".", 1)[0] if "." in name else (name or "images")

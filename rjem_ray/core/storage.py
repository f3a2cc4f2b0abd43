"""Where Ray keeps a run's checkpoints: a local directory or a URI (``s3://bucket/prefix``, ``gs://…``).

``trainer.storage_path`` names it; unset, it is ``OUT/ray`` as always. A URI is opened with pyarrow's
``FileSystem.from_uri`` — the filesystems Ray Train itself resolves from ``RunConfig(storage_path=...)``,
so credentials come from the usual places (for S3: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
``AWS_DEFAULT_REGION`` / ``AWS_ENDPOINT_URL``, ``~/.aws``, an instance profile) — and, for a scheme
pyarrow lacks, with an fsspec implementation wrapped as a pyarrow filesystem (passed to Ray as
``storage_filesystem``). Every caller that looks at a run's storage goes through this module, so a local
path and a URI take the same code; a local path is never turned into a URI, and a URI never into a
``Path`` (which would fold its ``//``).
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

from .errors import first_line

# pyarrow and fsspec are imported inside the functions that use them (marked `# lazy: ... see top`): the config
# imports this module (method/scaling.py checks trainer.storage_path with the string helpers below), and the
# Ray-free layers run where pyarrow and fsspec, which come with Ray, need not be installed.

# Schemes pyarrow.fs.FileSystem.from_uri opens (Ray Train's own resolution); fsspec's registry adds more.
PYARROW_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs", "viewfs", "file")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")


def scheme(path: str | os.PathLike | None) -> str | None:
    """The URI scheme of ``path`` (lower case), or None for a local path."""
    m = _SCHEME.match(str(path)) if path is not None else None
    return m.group(1).lower() if m else None


def is_uri(path: str | os.PathLike | None) -> bool:
    """Whether ``path`` names remote storage; ``file://`` counts as local (see :func:`local_path`)."""
    return scheme(path) not in (None, "file")


def local_path(path: str | os.PathLike) -> Path:
    """A local path (``file://`` stripped), made absolute: Ray's workers run in another directory."""
    text = str(path)
    if scheme(text) == "file":
        text = text[len("file://"):]
    return Path(text).expanduser().resolve()


def check_storage_path(key: str, value: str | None) -> str | None:
    """The one-line complaint about ``value`` as a storage path, or None when it is usable."""
    s = scheme(value)
    if s is None or s in PYARROW_SCHEMES:
        return None
    from fsspec.registry import known_implementations  # lazy: fsspec, see top

    if s in known_implementations:
        return None
    return (f"{key}: {value!r} is not allowed; give a local directory or a URI whose scheme is one of "
            f"{', '.join(PYARROW_SCHEMES)} (pyarrow) or an fsspec protocol, e.g. s3://bucket/prefix")


def normalize(path: str | os.PathLike) -> str | Path:
    """``path`` as callers keep it: an absolute ``Path`` when local, the URI string (no trailing /) otherwise."""
    return str(path).rstrip("/") if is_uri(path) else local_path(path)


def join(base: str | os.PathLike, *parts: str) -> str | Path:
    """``base/parts…``: a ``Path`` for a local base, a URI string for a URI."""
    if not is_uri(base):
        return Path(base).joinpath(*parts)
    return "/".join([str(base).rstrip("/"), *parts])


def name(path: str | os.PathLike) -> str:
    """The last component of a path or URI."""
    return posixpath.basename(str(path).rstrip("/"))


def filesystem(path: str | os.PathLike):
    """``(pyarrow filesystem, path on it)`` for a local path or a URI (fsspec when pyarrow lacks the scheme)."""
    import pyarrow  # lazy: pyarrow, see top
    import pyarrow.fs as pafs  # lazy: pyarrow, see top

    if not is_uri(path):
        return pafs.LocalFileSystem(), str(local_path(path))
    text = str(path).rstrip("/")
    try:
        return pafs.FileSystem.from_uri(text)
    except pyarrow.ArrowInvalid as exc:
        if "Unrecognized filesystem type" not in str(exc):
            raise
    import fsspec  # lazy: fsspec, see top

    fs, fs_path = fsspec.core.url_to_fs(text)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), fs_path


def ray_storage(path: str | os.PathLike) -> dict:
    """The ``RunConfig`` keywords that put a Ray Train/Tune run's storage at ``path``.

    pyarrow's own schemes go as the URI (Ray resolves it in every process, credentials included); an
    fsspec-only scheme goes as ``storage_filesystem`` with the scheme-stripped path, as Ray asks.
    """
    if not is_uri(path) or scheme(path) in PYARROW_SCHEMES:
        return {"storage_path": str(normalize(path))}
    fs, fs_path = filesystem(path)
    return {"storage_path": fs_path, "storage_filesystem": fs}


def _info(path):
    fs, fs_path = filesystem(path)
    return fs.get_file_info(fs_path)


def is_dir(path: str | os.PathLike) -> bool:
    import pyarrow.fs as pafs  # lazy: pyarrow, see top

    return _info(path).type == pafs.FileType.Directory


def is_file(path: str | os.PathLike) -> bool:
    import pyarrow.fs as pafs  # lazy: pyarrow, see top

    return _info(path).type == pafs.FileType.File


def read_text(path: str | os.PathLike) -> str:
    """A small file's text (a config, a JSON state), local or remote."""
    fs, fs_path = filesystem(path)
    with fs.open_input_stream(fs_path) as fh:
        return fh.read().decode("utf-8")


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a small file; remote objects appear whole (S3 and GCS uploads are atomic per object)."""
    if not is_uri(path):
        p = local_path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, p)
        return
    fs, fs_path = filesystem(path)
    with fs.open_output_stream(fs_path) as fh:
        fh.write(text.encode("utf-8"))


def subdirs(path: str | os.PathLike, prefix: str = "") -> list[str]:
    """Names of the directories directly under ``path`` that start with ``prefix`` (none if it is absent)."""
    import pyarrow.fs as pafs  # lazy: pyarrow, see top

    fs, fs_path = filesystem(path)
    if fs.get_file_info(fs_path).type != pafs.FileType.Directory:
        return []
    found = fs.get_file_info(pafs.FileSelector(fs_path, allow_not_found=True))
    return sorted(name(i.path) for i in found
                  if i.type == pafs.FileType.Directory and name(i.path).startswith(prefix))


def move(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Move directory ``src`` to ``dst`` on the same storage: ``os.replace`` locally (atomic), copy then delete
    on object stores, which have no directory rename."""
    if not is_uri(src):
        os.replace(local_path(src), local_path(dst))
        return
    import pyarrow.fs as pafs  # lazy: pyarrow, see top

    fs, src_path = filesystem(src)
    _, dst_path = filesystem(dst)
    pafs.copy_files(src_path, dst_path, source_filesystem=fs, destination_filesystem=fs)
    fs.delete_dir(src_path)


def check_writable(uri: str, key: str) -> None:
    """Fail before any work when storage ``uri`` cannot be written (no bucket, no credentials, read-only).

    A probe object is written under ``uri`` and deleted; the error is one line naming ``key`` and ``uri``.
    (Local directories: ``cli.check_writable``.)
    """
    probe = join(uri, f".rjem-write-probe-{uuid.uuid4().hex}")
    try:
        fs, fs_path = filesystem(probe)
        with fs.open_output_stream(fs_path) as fh:
            fh.write(b"")
        fs.delete_file(fs_path)
    except Exception as exc:  # pyarrow raises OSError for S3 errors, ImportError for a missing fsspec backend
        raise ValueError(f"{key} {uri!r} cannot be written ({first_line(exc, type(exc).__name__)}); check that the bucket exists and the "
                         "credentials in the environment (for S3: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
                         "AWS_ENDPOINT_URL; or an instance profile)") from None


@contextlib.contextmanager
def local_copy(path: str | os.PathLike) -> Iterator[Path]:
    """The directory at ``path`` as a local directory: itself when local, a temporary download otherwise."""
    if not is_uri(path):
        yield local_path(path)
        return
    import pyarrow.fs as pafs  # lazy: pyarrow, see top

    fs, fs_path = filesystem(path)
    if fs.get_file_info(fs_path).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{str(path)!r} holds nothing (no such directory in the storage)")
    with tempfile.TemporaryDirectory(prefix="rjem-download-") as tmp:
        pafs.copy_files(fs_path, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        yield Path(tmp)

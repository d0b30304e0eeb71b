"""Atomic output: write to a temporary file in the target folder, then rename over the target.

A reader therefore sees either the previous complete file or the new complete file, never a
half-written one, and a failure (exception, full disk, kill) leaves no partial output behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from cryoves.errors import OutputError, OutputExistsError


def _as_output_error(exc: OSError, path: Path) -> OutputError:
    if exc.errno == errno.ENOSPC:
        return OutputError(f"disk full while writing {path}; free space or choose another --output")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"cannot write {path}: permission denied; choose a writable --output")
    if exc.errno in (errno.EEXIST, errno.ENOTDIR):
        return OutputError(f"cannot write {path}: a file is in the way where a folder is needed; choose another --output")
    return OutputError(f"cannot write {path}: {exc.strerror or exc}; choose another --output")


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success rename it to ``target``.

    The temporary name keeps the target's suffix (writers such as tifffile or mrcfile look at it).
    On any exception the temporary file is removed, ``target`` is left untouched, and folders
    created for it are removed again.
    """
    target = Path(target)
    with removing_new_dirs(target.parent), _atomic_file(target, suffix) as tmp:
        yield tmp


@contextlib.contextmanager
def _atomic_file(target: Path, suffix: str | None) -> Iterator[Path]:
    suffix = target.suffix if suffix is None else suffix
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=f".tmp{suffix}", dir=target.parent)
        os.close(fd)
    except OSError as exc:
        raise _as_output_error(exc, target) from exc
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _fsync(tmp_path)
        if tmp_path.is_file():
            os.chmod(tmp_path, _FILE_MODE)  # mkstemp makes 0600; outputs get the usual umask mode
        os.replace(tmp_path, target)
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        raise _as_output_error(exc, target) from exc
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder next to ``target``; on success it replaces ``target``.

    For folder-shaped outputs (OME-Zarr). An existing ``target`` is moved aside first and removed
    only after the new folder is in place; on any exception the temporary folder is removed.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    except OSError as exc:
        raise _as_output_error(exc, target) from exc
    try:
        yield tmp_path
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, old / "x")
        os.replace(tmp_path, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp_path, ignore_errors=True)
        raise _as_output_error(exc, target) from exc
    except BaseException:
        shutil.rmtree(tmp_path, ignore_errors=True)
        raise


def _umask_file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _umask_file_mode()


def _fsync(path: Path) -> None:
    if path.is_dir():
        return
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def write_bytes_atomic(target: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``target`` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def write_text_atomic(target: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``target`` atomically."""
    return write_bytes_atomic(target, text.encode("utf-8"))


def write_json_atomic(target: str | os.PathLike, obj: object) -> Path:
    """Write ``obj`` as indented JSON to ``target`` atomically."""
    return write_text_atomic(target, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def make_dir(path: str | os.PathLike) -> Path:
    """Create folder ``path`` (and its parents) and check that it is writable.

    An OSError becomes an :class:`OutputError` naming the fix, before any work starts.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.NamedTemporaryFile(dir=path, prefix=".write-test.", delete=True).close()
    except OSError as exc:
        raise _as_output_error(exc, path) from exc
    return path


@contextlib.contextmanager
def removing_new_dirs(path: str | os.PathLike) -> Iterator[Path]:
    """On an exception, remove ``path`` and the parents of it that the block created, if they are empty.

    So a command that fails on a bad input leaves no empty output folders behind.
    """
    path = Path(path)
    missing = []
    p = path
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    try:
        yield path
    except BaseException:
        for d in missing:  # deepest first; rmdir only succeeds on empty folders
            with contextlib.suppress(OSError):
                d.rmdir()
        raise


def check_file_output(target: str | os.PathLike, *, force: bool = False) -> Path:
    """Refuse to overwrite an existing single-file output unless ``force``."""
    target = Path(target)
    if target.exists() and not force:
        raise OutputExistsError(f"{target} exists; pass --force to overwrite it or choose another output path")
    return target

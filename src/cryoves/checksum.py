"""SHA-256 of files, and the checksum of a command's input started before its heavy imports.

Light on purpose (only the standard library): the CLI starts hashing the tomogram while Python
still imports pandas, torch and the pipeline on one core (hashlib releases the GIL), so the
pipeline's ``checksum`` step finds it done (1.2 s of the 300x1024x1024 benchmark).
"""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import Future
from pathlib import Path

_started: dict[tuple, Future] = {}
_lock = threading.Lock()


def _key(path: str | os.PathLike) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return os.path.realpath(path), st.st_size, st.st_mtime_ns


def _hash(path: str | os.PathLike, chunk: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of the file; the result of :func:`hash_in_background` for it when one was
    started and the file has not changed since (same size and modification time)."""
    key = _key(path)
    with _lock:
        started = _started.pop(key, None) if key is not None else None
    if started is not None:
        try:
            return started.result()
        except OSError:
            pass  # hashed again below: the error, if any, comes from here
    return _hash(path, chunk)


def hash_in_background(path: str | os.PathLike) -> None:
    """Start hashing ``path`` on a daemon thread (nothing when it is not a regular file); a later
    :func:`file_sha256` of the same unchanged file waits for it instead of reading it again."""
    key = _key(path)
    if key is None or not Path(path).is_file():
        return
    fut: Future = Future()

    def run() -> None:
        try:
            fut.set_result(_hash(path, 1 << 22))
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller
            fut.set_exception(exc)

    with _lock:
        _started[key] = fut
    threading.Thread(target=run, daemon=True, name="cryoves-checksum").start()

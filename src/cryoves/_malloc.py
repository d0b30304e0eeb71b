"""Keep freed heap memory mapped while a loop allocates and frees the same large blocks (glibc).

glibc maps every block above its mmap threshold (128 KiB rising to at most 32 MiB) afresh and
unmaps it when it is freed, so a loop that allocates the same few hundred MiB on every pass (the
network's activations, tile after tile) has the kernel fault in and zero them again each time:
2.1 million page faults and ~3 s of system time for the 12 tiles of a 200 × 400 × 400 tomogram.
:func:`keep_freed_memory` serves such blocks from the heap and keeps them there while the loop
runs, and gives the memory back after it. Without glibc it does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections.abc import Iterator

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
# glibc's documented defaults for the top pad, and the values its dynamic thresholds reach at most
_DEFAULT_TOP_PAD = 128 * 1024
_MMAP_THRESHOLD_MAX = 32 * 2**20
_TRIM_THRESHOLD_MAX = 64 * 2**20


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except (OSError, AttributeError, TypeError):  # TypeError: no CDLL(None) on Windows
        return None


_LIBC = _glibc()


_lock = threading.Lock()
_held: list[int] = []  # the sizes asked for by the blocks open now (threads: napari, Dask)
_local = threading.local()


@contextlib.contextmanager
def not_in_this_thread() -> Iterator[None]:
    """:func:`keep_freed_memory` does nothing in this thread within the block: for work that runs
    beside another thread's, whose frees the process-wide settings would keep as well."""
    before = getattr(_local, "off", False)
    _local.off = True
    try:
        yield
    finally:
        _local.off = before


def _set(nbytes: int) -> None:
    size = ctypes.c_int(min(int(nbytes), 2**31 - 1))
    # blocks up to nbytes come from the heap (not a fresh mapping each); its top keeps nbytes free
    _LIBC.mallopt(_M_MMAP_THRESHOLD, size)
    _LIBC.mallopt(_M_TOP_PAD, size)


@contextlib.contextmanager
def keep_freed_memory(nbytes: int) -> Iterator[None]:
    """Within the block, up to ``nbytes`` freed at the top of the heap stay mapped for the next
    allocation; after it, freed memory is returned to the system (``malloc_trim``). Blocks open in
    several threads at once keep the largest size asked for until the last one ends."""
    if _LIBC is None or nbytes <= 0 or getattr(_local, "off", False):
        yield
        return
    with _lock:
        _held.append(int(nbytes))
        _set(max(_held))
    try:
        yield
    finally:
        with _lock:
            _held.remove(int(nbytes))
            if _held:
                _set(max(_held))
            else:
                # setting a parameter ends glibc's dynamic thresholds: restore the values they settle at
                _LIBC.mallopt(_M_TOP_PAD, _DEFAULT_TOP_PAD)
                _LIBC.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
                _LIBC.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_MAX)
                _LIBC.malloc_trim(0)

"""Post-processing on every core: one process pool for the per-object work of a segmentation.

The sphere fits and the splitting of merged objects are independent per object but hold the
GIL (numpy on small boxes: threads measured 0.9× on 2 cores), so they run in worker processes.
Large arrays are not pickled: :class:`SharedArray` puts an array in shared memory once and the
workers map it by name. Workers are forked from a clean server process (``forkserver``), never
from the caller, which may hold torch's thread pools; results do not depend on the number of
workers (each object is computed the same way wherever it runs, and results come back in order).

The number of workers is the number of CPUs this process may use, ``CRYOVES_WORKERS`` or
:func:`set_workers`; 1 runs everything in the calling process, as does a daemonic process (a
Dask worker, whose cluster already spreads tomograms over the cores).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import mmap
import multiprocessing
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Any

import numpy as np

from cryoves.errors import ParameterError

log = logging.getLogger(__name__)

_workers: int | None = None
_pool: ProcessPoolExecutor | None = None
_pool_size = 0
#: what the server imports once, so that each forked worker starts ready: the post-processing
#: modules, whose compiled kernels it also runs once (numba's start-up in the server, not in every worker)
PRELOAD = ["cryoves.postprocess._warm"]


def cpu_count() -> int:
    """CPUs this process may use (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def set_workers(n: int | None) -> None:
    """Worker processes for post-processing (None: back to the default)."""
    global _workers
    if n is not None and n < 1:
        raise ParameterError(f"post-processing workers must be at least 1, got {n}")
    _workers = n


def workers() -> int:
    """Worker processes post-processing may use now (1 = in this process)."""
    if multiprocessing.current_process().daemon:
        return 1  # daemonic processes may not have children
    if _workers is not None:
        return _workers
    env = os.environ.get("CRYOVES_WORKERS", "").strip()
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise ParameterError(f"CRYOVES_WORKERS must be a whole number, got {env!r}") from None
    return cpu_count()


_hide_lock = threading.RLock()


@contextlib.contextmanager
def _main_hidden() -> Iterator[None]:
    """Start workers without the caller's ``__main__``: a new worker would otherwise run the
    caller's script again (a script without an ``if __name__ == "__main__"`` guard would start a
    segmentation in every worker). The workers only run cryoves functions. One thread at a time
    (the background warm-up and a map may start workers together)."""
    with _hide_lock:
        main = sys.modules.get("__main__")
        saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if main is not None and k in main.__dict__}
        try:
            if main is not None:
                main.__dict__.pop("__file__", None)
                if "__spec__" in saved:
                    main.__spec__ = None
            yield
        finally:
            if main is not None:
                main.__dict__.update(saved)


_pool_lock = threading.Lock()


def _executor(n: int) -> ProcessPoolExecutor:
    with _pool_lock:  # segmentations may run in several threads (napari)
        return _executor_locked(n)


def _executor_locked(n: int) -> ProcessPoolExecutor:
    global _pool, _pool_size
    if _pool is None or _pool_size != n:
        shutdown()
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
        if ctx.get_start_method() == "forkserver":
            ctx.set_forkserver_preload(PRELOAD)
        _pool = ProcessPoolExecutor(max_workers=n, mp_context=ctx, initializer=_init_worker, initargs=(os.getpid(),))
        _pool_size = n
    return _pool


def _init_worker(parent: int) -> None:
    """Workers end with the process that started them, even when it is killed: they would
    otherwise wait for work forever, holding its output pipes open."""
    if os.name == "nt":  # no /proc, and os.kill(pid, 0) would terminate the parent there
        return
    threading.Thread(target=_exit_with, args=(parent,), daemon=True, name="cryoves-parent-watch").start()


def _exit_with(parent: int) -> None:
    while _alive(parent):
        time.sleep(0.5)
    os._exit(0)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")  # a zombie is gone
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: signal 0 only tells that the pid exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def shutdown() -> None:
    """Stop the worker processes (they are started again when needed)."""
    global _pool, _pool_size
    pool, _pool, _pool_size = _pool, None, 0
    if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True)


atexit.register(shutdown)


def warm_up() -> None:
    """Start the workers in the background of the caller's next step when there are several
    (starting them takes ~1.3 s here: the server process imports the post-processing modules);
    nothing when they run already (the CLI starts them before the pipeline asks again)."""
    n = workers()
    if n > 1 and not (_pool is not None and _pool_size == n):
        threading.Thread(target=_start, args=(n,), daemon=True, name="cryoves-warm-up").start()


def _start(n: int) -> None:
    with contextlib.suppress(OSError, RuntimeError), _main_hidden():
        for _ in range(n):
            _executor(n).submit(int)


def pmap(fn: Callable[[Any], Any], tasks: Sequence[Any], *, min_tasks: int = 2, progress: str | None = None) -> list[Any]:
    """``[fn(t) for t in tasks]``, spread over the worker processes when there are at least
    ``min_tasks`` tasks and more than one worker. ``fn`` must be a module-level function; a
    worker that dies makes the work run here (with a warning), never a lost result.
    ``progress``: the description of a progress bar over the tasks."""
    from tqdm import tqdm

    n = workers()
    with tqdm(total=len(tasks), desc=progress, disable=progress is None, leave=False) as bar:
        if n > 1 and len(tasks) >= max(2, min_tasks):
            try:
                out = []
                with _main_hidden():  # map submits every task (and starts the workers) right away
                    results = _executor(n).map(fn, tasks)
                for res in results:
                    out.append(res)
                    bar.update()
                return out
            except (BrokenProcessPool, OSError) as exc:
                log.warning("post-processing workers failed (%s); continuing in this process", exc)
                shutdown()
                bar.reset()
        out = []
        for t in tasks:
            out.append(fn(t))
            bar.update()
        return out


def submit(fn: Callable[..., Any], *args: Any) -> Callable[[], Any]:
    """Start ``fn(*args)`` in a worker process when there are several workers and return a function
    that waits for its result, so that this process can do other work meanwhile. ``fn`` must be a
    module-level function; without workers, or when the worker fails, the waiting function computes
    the result here."""
    future = None
    if workers() > 1:
        try:
            with _main_hidden():
                future = _executor(workers()).submit(fn, *args)
        except (BrokenProcessPool, OSError, RuntimeError) as exc:
            log.warning("post-processing workers failed (%s); continuing in this process", exc)

    def result() -> Any:
        if future is not None:
            try:
                return future.result()
            except (BrokenProcessPool, OSError) as exc:
                log.warning("post-processing workers failed (%s); continuing in this process", exc)
                shutdown()
        return fn(*args)

    return result


#: Niceness added to the background thread of :func:`in_background`: it gets mostly the idle core's
#: time (measured on the 200 × 400 × 400 speed tomogram: 15.0-15.5 s against 15.8-15.9 s at equal
#: priority), yet is not starved by other programs on a busy machine.
BACKGROUND_NICE = 10


def in_background(calls: Sequence[Callable[[], Any]], stack: contextlib.ExitStack) -> list[Callable[[], Any]]:
    """Run ``calls`` in turn in one background thread at a lower priority, starting now, and return
    a function per call that waits for its result. When ``stack`` closes, the calls not started are
    cancelled and the running one is waited for (it may read what the stack releases next). The
    thread keeps no freed memory mapped (:func:`cryoves._malloc.not_in_this_thread`). With one
    worker (a Dask task, ``CRYOVES_WORKERS=1``) the calls are returned as they are: each runs when
    its result is asked for."""
    from concurrent.futures import ThreadPoolExecutor

    if not calls or workers() <= 1:
        return list(calls)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cryoves-background", initializer=_yield_to_main)
    futures = [pool.submit(_beside_main, call) for call in calls]

    def stop() -> None:
        for f in futures:
            f.cancel()
        pool.shutdown(wait=True)

    stack.callback(stop)
    return [f.result for f in futures]


def _yield_to_main() -> None:
    """Lower this thread's priority; the threads it starts (torch's) inherit it. Linux only: there a
    thread id names the thread for ``setpriority``; elsewhere it could name another process."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + BACKGROUND_NICE))


def _beside_main(call: Callable[[], Any]) -> Any:
    from cryoves._malloc import not_in_this_thread

    with not_in_this_thread():
        return call()


def thread_map(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    """``[fn(i) for i in items]`` on one thread per worker, order kept: for numpy/scipy work on
    large blocks, which releases the GIL (measured: Gaussian filters and interpolation of 6 Mvoxel
    blocks 1.7-2.5x faster on 2 threads); results are those of the loop."""
    from concurrent.futures import ThreadPoolExecutor

    items = list(items)
    n = min(workers(), len(items))
    if n <= 1:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(n, thread_name_prefix="cryoves-block") as ex:
        return list(ex.map(fn, items))


#: Tasks per worker: enough to balance objects of very different cost, few enough that the
#: per-task overhead (~1 ms) does not count.
TASKS_PER_WORKER = 8


def chunks(items: Sequence[Any], n_chunks: int | None = None) -> list[list[Any]]:
    """``items`` cut into ``n_chunks`` (default: :data:`TASKS_PER_WORKER` per worker) runs of
    neighbouring items, order kept; one item per run when there are fewer."""
    if n_chunks is None:
        n_chunks = TASKS_PER_WORKER * workers()
    n_chunks = max(1, min(n_chunks, len(items)))
    bounds = np.linspace(0, len(items), n_chunks + 1).round().astype(int)
    return [list(items[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


@dataclass(frozen=True)
class ArrayRef:
    """What a worker needs to map a :class:`SharedArray` or a file: a shared-memory block, or a
    file (its array starting ``offset`` bytes in)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    path: str | None = None
    offset: int = 0


class SharedArray:
    """An array the workers can map (a copy of ``source``, or zeros): ``.array`` here, ``.ref``
    for the workers (:func:`attached`). ``close()`` (or the ``with`` block's end) frees it.

    It lives in shared memory (``/dev/shm``) when that has room for it, else in a temporary
    file (containers often give ``/dev/shm`` only 64 MiB, and writing past it kills the process).
    """

    def __init__(self, source: np.ndarray | None = None, *, shape: Sequence[int] | None = None, dtype: Any = np.float32):
        shape = tuple(source.shape if source is not None else shape)  # type: ignore[arg-type]
        dtype = np.dtype(source.dtype if source is not None else dtype)
        nbytes = max(1, int(np.prod(shape)) * dtype.itemsize)
        self._shm: shared_memory.SharedMemory | None = None
        self._path: str | None = None
        if _shm_room() > nbytes + 64 * 2**20:
            self._shm = shared_memory.SharedMemory(create=True, size=nbytes)
            self.array: np.ndarray = np.ndarray(shape, dtype, buffer=self._shm.buf)
            self.ref = ArrayRef(self._shm.name, shape, dtype.str)
        else:
            fd, self._path = tempfile.mkstemp(prefix=".cryoves-shared.", suffix=".bin")
            os.close(fd)
            self.array = np.memmap(self._path, dtype=dtype, mode="w+", shape=shape)
            self.ref = ArrayRef(os.path.basename(self._path), shape, dtype.str, self._path)
        if source is not None:
            self.array[...] = source
        _live[id(self.array)] = self

    def close(self) -> None:
        if self._shm is None and self._path is None:
            return
        _live.pop(id(self.array), None)
        del self.array
        if self._shm is not None:
            with contextlib.suppress(BufferError):  # views still held (e.g. by a traceback): freed with them
                self._shm.close()
            with contextlib.suppress(FileNotFoundError):
                self._shm.unlink()
        if self._path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._path)
        self._shm = self._path = None

    def __enter__(self) -> SharedArray:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _shm_room() -> int:
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


_live: dict[int, SharedArray] = {}


@contextlib.contextmanager
def attached(ref: ArrayRef | np.ndarray) -> Iterator[np.ndarray]:
    """The array behind ``ref`` (read it only); an ndarray is passed through."""
    if isinstance(ref, np.ndarray):
        yield ref
        return
    if ref.path is not None:
        yield np.memmap(ref.path, dtype=np.dtype(ref.dtype), mode="r", shape=ref.shape, offset=ref.offset)
        return
    shm = shared_memory.SharedMemory(name=ref.name)
    try:
        arr = np.ndarray(ref.shape, np.dtype(ref.dtype), buffer=shm.buf)
        yield arr
        del arr
    finally:
        shm.close()


def file_ref(arr: Any) -> ArrayRef | None:
    """A reference the workers can map when ``arr`` is a C-ordered view of a read-only memory-mapped
    file (e.g. the float32 data of an MRC file, also through ``np.asarray``); None otherwise."""
    owner = arr
    while owner is not None and not isinstance(owner, np.memmap):
        owner = getattr(owner, "base", None)
    if not isinstance(arr, np.ndarray) or owner is None or getattr(owner, "_mmap", None) is None:
        return None
    if owner.mode != "r" or owner.filename is None or not arr.flags.c_contiguous or not arr.dtype.isnative:
        return None
    base = np.frombuffer(owner._mmap, np.uint8)  # the mapping starts at the allocation-aligned offset
    start = arr.__array_interface__["data"][0] - base.__array_interface__["data"][0]
    if start < 0 or start + arr.nbytes > len(base):
        return None
    offset = start + owner.offset - owner.offset % mmap.ALLOCATIONGRANULARITY
    return ArrayRef(os.path.basename(owner.filename), tuple(arr.shape), arr.dtype.str, str(owner.filename), int(offset))


@contextlib.contextmanager
def shared(arr: np.ndarray, needed: bool) -> Iterator[ArrayRef | np.ndarray]:
    """``arr`` as the workers can see it (``needed``): its reference when it is the array of a
    :class:`SharedArray` or a view of a read-only memory-mapped file (:func:`file_ref`), else a shared
    copy for the block's duration; ``arr`` itself otherwise."""
    if not needed:
        yield arr
        return
    if id(arr) in _live:
        yield _live[id(arr)].ref
        return
    ref = file_ref(arr)
    if ref is not None:
        yield ref
        return
    with SharedArray(np.ascontiguousarray(arr)) as sa:
        yield sa.ref

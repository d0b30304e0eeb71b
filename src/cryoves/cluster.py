"""Dask client set-up, in one place for ``cryoves batch`` (many tomograms) and ``--workers`` /
``--scheduler`` (one tomogram split into blocks, :mod:`cryoves.blockwise`).

Three kinds of cluster: a running scheduler (``scheduler="tcp://host:8786"``), SLURM via
dask-jobqueue (``slurm=`` a YAML file of ``SLURMCluster`` options plus ``jobs``), or a local
cluster sized to this machine (:func:`local_cluster_size`). Local workers run one task at a time
and give torch the cores left to them (:func:`torch_threads_plugin`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cryoves.errors import InputError, ParameterError

log = logging.getLogger(__name__)

#: Memory one worker needs for a typical 1k×1k×300 tomogram (GiB); caps local workers.
WORKER_MEMORY_GIB = 6


def local_cluster_size(n_items: int, cores: int | None = None, memory_gib: float | None = None) -> tuple[int, int]:
    """(workers, torch threads per worker) for a local cluster on this machine.

    Each worker runs one task at a time (Dask threads = 1) and gives torch the cores left to it,
    so workers × torch threads = cores: no oversubscription. A worker needs ~``WORKER_MEMORY_GIB``
    for a typical tomogram, which caps the worker count on small-memory machines.
    """
    cores = cores or os.cpu_count() or 1
    if memory_gib is None:
        try:
            memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        except (ValueError, OSError, AttributeError):
            memory_gib = 8.0
    workers = max(1, min(n_items, cores // 2 or 1, int(memory_gib // WORKER_MEMORY_GIB) or 1))
    return workers, max(1, cores // workers)


def torch_threads_plugin(n: int) -> Any:
    """A worker plugin giving torch ``n`` threads, also in workers restarted after a crash."""
    from distributed import WorkerPlugin

    class TorchThreads(WorkerPlugin):
        name = "cryoves-torch-threads"

        def setup(self, worker: Any) -> None:
            import torch

            torch.set_num_threads(n)

    return TorchThreads()


def make_client(
    n_items: int,
    *,
    scheduler: str | None = None,
    slurm: str | os.PathLike | None = None,
    n_workers: int | None = None,
    threads: int | None = None,
) -> Any:
    """A Dask client for ``n_items`` tasks: an existing scheduler, a SLURM cluster, or a local cluster.

    ``n_workers``/``threads`` override the local sizing. The caller closes the client and its
    ``client.cluster`` (None for a scheduler address); :func:`managed_client` does both.
    """
    from distributed import Client, LocalCluster

    if scheduler and slurm:
        raise ParameterError("give either --scheduler or --slurm, not both")
    if n_workers is not None and n_workers < 1:
        raise ParameterError(f"--workers must be at least 1, got {n_workers}")
    if scheduler:
        return Client(scheduler)
    if slurm:
        return _slurm_client(Path(slurm), n_items)
    workers, torch_threads = local_cluster_size(n_items)
    workers = n_workers or workers
    torch_threads = threads or max(1, (os.cpu_count() or 1) // workers)
    cluster = LocalCluster(
        n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None, memory_limit=0
    )
    client = Client(cluster)
    client.register_plugin(torch_threads_plugin(torch_threads))
    log.info("local Dask cluster: %d workers x %d torch threads", workers, torch_threads)
    return client


def _slurm_client(path: Path, n_items: int) -> Any:
    try:
        import yaml
        from dask_jobqueue import SLURMCluster
        from distributed import Client
    except ImportError as exc:
        raise ParameterError("SLURM needs dask-jobqueue: pip install 'cryoves[slurm]'") from exc
    try:
        opts = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(f"cannot read SLURM configuration {path}: {exc}") from exc
    jobs = int(opts.pop("jobs", min(n_items, 10)))
    cluster = SLURMCluster(**opts)
    cluster.scale(jobs=jobs)
    return Client(cluster)


@contextlib.contextmanager
def managed_client(
    n_items: int,
    *,
    client: Any = None,
    scheduler: str | None = None,
    slurm: str | os.PathLike | None = None,
    n_workers: int | None = None,
    threads: int | None = None,
) -> Iterator[Any]:
    """Yield ``client`` when given (left open), else a :func:`make_client` one, closed with its cluster after."""
    if client is not None:
        yield client
        return
    own = make_client(n_items, scheduler=scheduler, slurm=slurm, n_workers=n_workers, threads=threads)
    cluster = getattr(own, "cluster", None)
    try:
        yield own
    finally:
        own.close()
        if cluster is not None:
            cluster.close()

"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def client():
    """A real dask.distributed LocalCluster: 2 worker processes, 1 torch thread each."""
    pytest.importorskip("distributed")
    from distributed import Client, LocalCluster

    from cryoves.cluster import torch_threads_plugin

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, memory_limit=0)
    c = Client(cluster)
    c.register_plugin(torch_threads_plugin(1))
    yield c
    c.close()
    cluster.close()

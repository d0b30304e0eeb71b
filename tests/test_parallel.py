"""cryoves.parallel: post-processing on worker processes gives the single-process result, exactly."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from _post_utils import random_scene
from cryoves import parallel
from cryoves.errors import ParameterError
from cryoves.postprocess import adaptive, spheres


@pytest.fixture
def two_workers():
    parallel.set_workers(2)
    yield
    parallel.set_workers(None)


def _pid(_: int) -> int:
    return os.getpid()


def _ready_kernels(_: int) -> dict[str, int]:
    """Compiled versions each kernel holds in this worker before it has run anything."""
    from cryoves.postprocess import _fit_kernels, _label_kernels

    kernels = {"big_pieces_per_level": _label_kernels.big_pieces_per_level,
               "reconstruct_by_dilation": _label_kernels.reconstruct_by_dilation,
               "geometry": _fit_kernels.geometry, "mask_neighbours": _fit_kernels.mask_neighbours}
    return {name: len(k.overloads) for name, k in kernels.items()}


def _total(ref) -> float:
    with parallel.attached(ref) as arr:
        return float(arr.sum())


def test_pmap_runs_on_other_processes_in_order(two_workers):
    assert parallel.pmap(abs, list(range(-20, 0))) == list(range(20, 0, -1))
    assert os.getpid() not in set(parallel.pmap(_pid, list(range(8))))


def _pid_plus(a: int, b: int) -> tuple[int, int]:
    return os.getpid(), a + b


def _die(_: int) -> int:
    if parallel.workers() > 1 and os.getpid() != int(os.environ.get("CRYOVES_TEST_PARENT", "0")):
        os._exit(3)  # a worker killed mid-task
    return 7


def test_submit_runs_aside_and_falls_back_here(two_workers, monkeypatch):
    wait = parallel.submit(_pid_plus, 2, 3)
    pid, total = wait()
    assert total == 5 and pid != os.getpid()  # a worker computed it while this process went on
    parallel.set_workers(1)
    assert parallel.submit(_pid_plus, 2, 3)() == (os.getpid(), 5)  # no workers: computed here
    parallel.set_workers(2)
    monkeypatch.setenv("CRYOVES_TEST_PARENT", str(os.getpid()))
    assert parallel.submit(_die, 0)() == 7  # the worker died: the result is still computed, here


def test_workers_start_with_the_kernels_compiled(two_workers):
    """The server that forks the workers ran every kernel once (numba's start-up cost ~0.4 s per
    process): a fresh worker holds their machine code before its first task."""
    parallel.shutdown()  # fresh workers
    for ready in parallel.pmap(_ready_kernels, [0, 1]):
        assert all(n >= 1 for n in ready.values()), ready


@pytest.mark.parametrize("room", [True, False], ids=["shm", "file"])
def test_shared_array_is_seen_by_the_workers(two_workers, monkeypatch, room):
    if not room:  # a container's small /dev/shm: a temporary file instead
        monkeypatch.setattr(parallel, "_shm_room", lambda: 0)
    data = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    with parallel.SharedArray(data) as sa:
        assert (sa.ref.path is None) == room
        with parallel.shared(sa.array, True) as ref:
            assert ref is sa.ref  # no second copy of an array that is already shared
        assert parallel.pmap(_total, [sa.ref] * 4) == [float(data.sum())] * 4
    with parallel.shared(data, False) as same:
        assert same is data


def test_fits_and_splits_match_one_process(monkeypatch):
    """Tasks of one object each: the vesicle table and the label volume (ids included) are the
    single-process ones, bit for bit."""
    sc = random_scene(n=24, shape=(48, 96, 96), r_range=(6.0, 9.0), gap=0.5, seed=3, prob_blur=2.5)
    monkeypatch.setattr(parallel, "TASKS_PER_WORKER", 50)  # one object per task
    out = {}
    for n in (1, 2):
        parallel.set_workers(n)
        try:
            labels, _ = adaptive.label_vesicles(sc.prob, 0.5, sc.voxel_size, min_radius_nm=3.0, split_volume_factor=1.2)
            table, rejected = spheres.fit_spheres(sc.intensity, labels, sc.voxel_size)
        finally:
            parallel.set_workers(None)
        out[n] = labels, table.df, rejected
    (l1, t1, r1), (l2, t2, r2) = out[1], out[2]
    assert len(t1) >= 15
    assert np.array_equal(l1, l2)
    assert t1.equals(t2) and r1.equals(r2)


def _counted_fits(monkeypatch):
    """A small labelled scene, and the list that records every sphere fit (run in this process)."""
    sc = random_scene(n=6, shape=(48, 64, 64), seed=1)
    labels, _ = adaptive.label_vesicles(sc.prob, 0.5, sc.voxel_size, min_radius_nm=3.0)
    calls: list = []
    real = spheres._fit
    monkeypatch.setattr(spheres, "_fit", lambda *a, **k: calls.append(1) or real(*a, **k))
    parallel.set_workers(1)
    return sc, labels, calls


def test_fit_cache_skips_unchanged_objects(monkeypatch):
    sc, labels, calls = _counted_fits(monkeypatch)
    try:
        cache: dict = {}
        first, _ = spheres.fit_spheres(sc.intensity, labels, sc.voxel_size, cache=cache)
        n_first = len(calls)
        again, _ = spheres.fit_spheres(sc.intensity, labels, sc.voxel_size, cache=cache)
        assert len(calls) == n_first and first.df.equals(again.df)  # nothing fitted twice
        one = labels.copy()
        one[one == one.max()] = 0  # one object gone: only the objects it reached start differently
        before = len(calls)
        reused, _ = spheres.fit_spheres(sc.intensity, one, sc.voxel_size, cache=cache)
        fresh, _ = spheres.fit_spheres(sc.intensity, one, sc.voxel_size)
        assert reused.df.equals(fresh.df)  # reuse is exact: the same table as fitting everything
        assert len(calls) - before - len(fresh) < len(fresh)
    finally:
        parallel.set_workers(None)


def test_fit_is_reused_only_while_the_same_neighbours_reach_into_its_boxes(monkeypatch):
    """A cached fit is reused when a neighbour far from every box it looked at changes, and fitted
    again when one that reaches into them does (its voxels would be masked differently)."""
    sc, labels, calls = _counted_fits(monkeypatch)
    i, cen, r0, _ = spheres.initial_spheres(labels)[0]
    opts = spheres._with_voxel_size(spheres.FitOptions(), sc.voxel_size)
    far = (np.array([[cen[0], cen[1], cen[2] + 200.0]]), np.array([5.0]))
    farther = (np.array([[cen[0], cen[1], cen[2] + 300.0]]), np.array([5.0]))
    touching = (np.array([[cen[0], cen[1], cen[2] + 2 * r0]]), np.array([r0]))
    try:
        cache: dict = {}
        for others, fitted in ((far, 1), (farther, 0), (touching, 1), (touching, 0), (far, 1)):
            before = len(calls)
            spheres._fit_items(sc.intensity, [(i, cen, r0, others)], sc.voxel_size, opts, False, cache)
            assert len(calls) - before == fitted
            reaching = cache[spheres._item_key((i, cen, r0, others))][2]
            assert bool(reaching) == (others is touching)
    finally:
        parallel.set_workers(None)


def test_a_script_without_main_guard_is_not_run_again_by_the_workers(tmp_path):
    marker = tmp_path / "runs.txt"
    script = tmp_path / "user_script.py"
    script.write_text(textwrap.dedent(f"""
        from cryoves import parallel
        with open({str(marker)!r}, "a") as fh:
            fh.write("run\\n")
        parallel.set_workers(2)
        print(parallel.pmap(abs, [-1, -2, -3, -4]))
    """))
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().endswith("[1, 2, 3, 4]")
    assert marker.read_text().splitlines() == ["run"]


def test_worker_count_rules(monkeypatch):
    monkeypatch.setenv("CRYOVES_WORKERS", "3")
    assert parallel.workers() == 3
    monkeypatch.setenv("CRYOVES_WORKERS", "many")
    with pytest.raises(ParameterError, match="CRYOVES_WORKERS"):
        parallel.workers()
    monkeypatch.delenv("CRYOVES_WORKERS")
    with pytest.raises(ParameterError):
        parallel.set_workers(0)
    monkeypatch.setattr(parallel.multiprocessing.current_process(), "daemon", True, raising=False)
    assert parallel.workers() == 1  # a Dask worker: no children


def test_workers_end_when_their_process_is_killed(tmp_path):
    """A killed segmentation leaves no worker behind (it would hold the caller's pipes open)."""
    import psutil

    script = tmp_path / "killed.py"
    script.write_text(textwrap.dedent("""
        import os, signal, sys
        from cryoves import parallel
        if __name__ == "__main__":
            parallel.set_workers(2)
            print(parallel.pmap(abs, [-1, -2]), flush=True)
            kids = [p.pid for p in __import__("psutil").Process().children(recursive=True)]
            print(" ".join(map(str, kids)), flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    """))
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert res.returncode == -9
    kids = [int(p) for p in res.stdout.splitlines()[1].split()]
    assert kids  # the forkserver and its workers
    procs = []
    for p in kids:
        try:
            procs.append(psutil.Process(p))
        except psutil.NoSuchProcess:
            pass  # already gone
    _, alive = psutil.wait_procs(procs, timeout=10)
    assert not alive, alive


def test_block_threads_give_the_numbers_of_one_thread(monkeypatch):
    """resample, the specimen-slab search, the value statistics, normalisation and the polarity
    filters run their blocks on threads:
    the results must be those of one thread, to the bit."""
    from cryoves import preprocess
    from cryoves.io import tomogram
    from cryoves.io.tomogram import value_stats
    from cryoves.preprocess import detect_polarity, normalise, resample, specimen_slab

    assert parallel.thread_map(lambda i: i * i, range(40)) == [i * i for i in range(40)]
    monkeypatch.setattr(preprocess, "_CHUNK_VOXELS", 1 << 15)  # many chunks of a few slices
    monkeypatch.setattr(tomogram, "_slab_depth", lambda shape, itemsize: 7)
    rng = np.random.default_rng(3)
    vol = rng.normal(size=(90, 96, 96)).astype(np.float32)
    vol[20:70] += 3 * rng.normal(size=(50, 96, 96)).astype(np.float32)  # a slab with more texture
    runs = {}
    for n in (1, 2):
        parallel.set_workers(n)
        try:
            runs[n] = (resample(vol, (0.45, 0.5, 0.7)), specimen_slab(vol, 4), value_stats(vol),
                       normalise(vol), detect_polarity(vol))
        finally:
            parallel.set_workers(None)
    assert np.array_equal(runs[1][0], runs[2][0])
    assert runs[1][1] == runs[2][1] != slice(0, 90)
    assert runs[1][2] == runs[2][2]
    assert np.array_equal(runs[1][3], runs[2][3]) and runs[1][4] == runs[2][4]


def test_warm_up_starts_the_workers_in_the_background(two_workers):
    import threading

    parallel.shutdown()
    parallel.warm_up()  # returns at once; the thread starts the pool
    starters = [t for t in threading.enumerate() if t.name == "cryoves-warm-up"]
    for t in starters:
        t.join(60)
    assert parallel._pool is not None
    assert os.getpid() not in parallel.pmap(_pid, list(range(4)))


def test_outlier_refits_on_the_workers_match_one_process():
    """Outliers are re-fitted on the workers against the table as it is; after one passes (and moves),
    the later ones are re-fitted against the changed table, as in one process."""
    from cryoves.postprocess import fit_spheres, label_vesicles, repair

    s = random_scene(n=9, shape=(56, 96, 96), seed=21, r_range=(9.0, 11.0))
    labels, _ = label_vesicles(s.prob, 0.5, s.voxel_size, min_radius_nm=4)
    table, _ = fit_spheres(s.intensity, labels, s.voxel_size)
    df = table.df.copy()
    for k in (0, 1, 2):  # three bad fits: features far off, each repaired by a re-fit
        df.loc[k, "radius"] *= 1.35
        df.loc[k, "membrane_thickness_nm"] *= 2.5
    bad = table.with_df(df)
    runs = {}
    for n in (1, 2):
        parallel.set_workers(n)
        try:
            runs[n] = repair(bad, s.intensity, min_radius_nm=4)
        finally:
            parallel.set_workers(None)
    assert not set(df.loc[:2, "id"]) & set(runs[1][1]["id"])  # all three passed
    assert runs[1][0].df.equals(runs[2][0].df) and runs[1][1].equals(runs[2][1])


def test_a_read_only_file_map_is_shared_without_a_copy(tmp_path, two_workers):
    """A float32 MRC file's memory map (also through np.asarray, also a z-slab of it) reaches the
    workers as the file itself: no copy in shared memory."""
    from cryoves.io import read_tomogram, write_mrc

    data = np.random.default_rng(2).normal(size=(12, 20, 30)).astype(np.float32)
    data_map = read_tomogram(write_mrc(tmp_path / "t.mrc", data, 10.0)).data
    for view, expected in ((data_map, data), (np.asarray(data_map)[4:], data[4:])):
        with parallel.shared(view, True) as ref:
            assert isinstance(ref, parallel.ArrayRef) and ref.path == str(tmp_path / "t.mrc")
            assert parallel.pmap(_total, [ref, ref]) == [float(expected.sum())] * 2
    assert parallel.file_ref(np.asarray(data_map)[:, 1:]) is None  # not contiguous: copied instead
    assert parallel.file_ref(data.copy()) is None


def test_label_statistics_equal_cc3d_on_any_number_of_threads(monkeypatch):
    import cc3d

    from cryoves.postprocess import _common
    from cryoves.postprocess._common import label_statistics

    monkeypatch.setattr(_common, "STATS_SLAB_VOXELS", 3 * 50 * 61)  # slabs of 3 planes

    rng = np.random.default_rng(4)
    lab = (rng.random((41, 50, 61)) < 0.4).astype(np.uint32) * rng.integers(1, 40, (41, 50, 61)).astype(np.uint32)
    lab[lab == 7] = 0  # an absent label: no box
    edges = lab.copy()  # the background (label 0, counted only per plane) does not reach every face
    edges[:4], edges[:, -3:], edges[..., :2], edges[..., -1] = 3, 5, 9, 11
    full = np.full((7, 8, 9), 2, np.uint32)  # no background at all
    for vol in (lab, edges, full, np.zeros((5, 6, 7), np.uint32)):
        want = cc3d.statistics(vol)
        for n in (1, 2):
            parallel.set_workers(n)
            try:
                got = label_statistics(vol)
            finally:
                parallel.set_workers(None)
            assert np.array_equal(got["voxel_counts"], want["voxel_counts"])
            assert np.array_equal(got["centroids"], want["centroids"], equal_nan=True)  # to the bit
            present = want["voxel_counts"] > 0
            assert [b for b, p in zip(got["bounding_boxes"], present) if p] == [
                b for b, p in zip(want["bounding_boxes"], present) if p]
            assert got["bounding_boxes"][0] == (want["bounding_boxes"][0] if present[0] else None)
    assert label_statistics(lab)["bounding_boxes"][7] is None
    with pytest.raises(ParameterError):
        label_statistics(-lab.astype(np.int32))


@pytest.mark.parametrize("dtype", [np.uint32, np.int32, np.int64])
def test_relabel_is_the_lookup_on_threads_in_place_or_not(dtype):
    """``relabel`` gives ``lut[labels]``: compiled on threads (slabs of 3 planes) in place and into a
    new array, numpy's gather for another output type, and an IndexError for a label beyond the table."""
    from cryoves.postprocess._common import relabel

    rng = np.random.default_rng(5)
    lab = rng.integers(0, 50, (23, 17, 19)).astype(dtype)
    lut = rng.integers(0, 80, 50).astype(np.uint32)
    want = lut[lab]
    for n in (1, 2):
        parallel.set_workers(n)
        try:
            got = relabel(lab, lut, slab=3)
            inplace = lab.copy()
            back = relabel(inplace, lut.astype(dtype), out=inplace, slab=3)
        finally:
            parallel.set_workers(None)
        assert got.dtype == np.uint32 and np.array_equal(got, want)
        assert back is inplace and np.array_equal(inplace, want.astype(dtype))
    assert np.array_equal(relabel(lab, lut.astype(np.int64), out=np.empty(lab.shape, np.uint32)), want)
    with pytest.raises(IndexError):
        relabel(lab, lut[:10])


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="thread priorities: Linux only")
def test_the_background_thread_yields_to_the_main_thread():
    import os
    import threading

    from cryoves.parallel import BACKGROUND_NICE, _yield_to_main

    def nice() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    seen = {}

    def run():
        seen["base"] = nice()
        _yield_to_main()
        seen["after"] = nice()

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert seen["after"] == min(19, seen["base"] + BACKGROUND_NICE)
    assert nice() == seen["base"]  # only that thread

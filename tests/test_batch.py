"""`cryoves batch` on a real dask.distributed LocalCluster: failures isolated, resumable, worker death."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from _sim_utils import small_sim
from cryoves.batch import collect_inputs, run_batch
from cryoves.cluster import local_cluster_size
from cryoves.io import write_mrc
from cryoves.pipeline import SegmentConfig
from cryoves.results import is_complete_result

distributed = pytest.importorskip("distributed")

REFERENCE_WEIGHTS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "weights.h5"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """The CryoVesNet weights when available (realistic maps), else a random network (mechanics only)."""
    if REFERENCE_WEIGHTS.exists():
        return str(REFERENCE_WEIGHTS)
    import torch

    from cryoves.model import ModelInfo, UNet3D, save_checkpoint

    torch.manual_seed(0)
    p = tmp_path_factory.mktemp("model") / "random.safetensors"
    save_checkpoint(p, UNet3D().eval(), ModelInfo(name="random"))
    return str(p)


@pytest.fixture(scope="module")
def tomo_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tomos")
    for seed in range(3):
        sim = small_sim(seed)
        write_mrc(d / f"tomo{seed}.mrc", sim.tomogram.asarray(), sim.tomogram.voxel_size)
    (d / "tomo3.mrc").write_bytes(b"this is not an MRC file" * 10)
    return d


def _cfg(model_path):
    return SegmentConfig(model=model_path, report=False, device="cpu")


def test_collect_inputs_folder_glob_manifest(tomo_dir, tmp_path):
    assert [i.output for i in collect_inputs([tomo_dir])] == ["tomo0", "tomo1", "tomo2", "tomo3"]
    assert len(collect_inputs([str(tomo_dir / "tomo[01].mrc")])) == 2
    man = tmp_path / "m.csv"
    pd.DataFrame({"tomogram": [str(tomo_dir / "tomo0.mrc")], "voxel_size": [22.0]}).to_csv(man, index=False)
    (item,) = collect_inputs([man])
    assert item.overrides == {"voxel_size": 22.0}


def test_local_cluster_size_never_oversubscribes():
    for cores in (1, 2, 8, 32):
        w, t = local_cluster_size(100, cores=cores, memory_gib=64)
        assert w * t <= cores and w >= 1


def test_batch_isolates_failure_and_resumes(tomo_dir, tmp_path, client, model_path):
    out = tmp_path / "out"
    s1 = run_batch([tomo_dir], out, _cfg(model_path), client=client, progress=False)
    status = dict(zip(s1["output"].map(lambda p: Path(p).name), s1["status"]))
    assert status == {"tomo0": "ok", "tomo1": "ok", "tomo2": "ok", "tomo3": "failed"}
    assert "MRC" in s1.loc[s1["status"] == "failed", "error"].iloc[0]
    assert (out / "batch_summary.csv").is_file()
    assert not (out / "tomo3" / "manifest.json").exists()
    # Fix the broken file, rerun: the three good ones are skipped, the failed one is retried.
    sim = small_sim(0)
    write_mrc(tomo_dir / "tomo3.mrc", sim.tomogram.asarray(), sim.tomogram.voxel_size)
    s2 = run_batch([tomo_dir], out, _cfg(model_path), client=client, progress=False)
    status2 = dict(zip(s2["output"].map(lambda p: Path(p).name), s2["status"]))
    assert status2 == {"tomo0": "skipped", "tomo1": "skipped", "tomo2": "skipped", "tomo3": "ok"}
    assert all(is_complete_result(out / n) for n in status2)


def test_worker_killed_mid_run_batch_completes_with_correct_outputs(tomo_dir, tmp_path, client, model_path):
    sim = small_sim(0)
    write_mrc(tomo_dir / "tomo3.mrc", sim.tomogram.asarray(), sim.tomogram.voxel_size)
    out = tmp_path / "out"
    result = {}
    t = threading.Thread(
        target=lambda: result.setdefault("s", run_batch([tomo_dir], out, _cfg(model_path), client=client, progress=False))
    )
    t.start()
    pids = client.run(os.getpid)
    victim = None
    deadline = time.time() + 120
    while victim is None and time.time() < deadline:
        busy = [w for w, tasks in client.processing().items() if tasks]
        if busy:
            victim = busy[0]
        else:
            time.sleep(0.05)
    assert victim is not None, "no task started"
    os.kill(pids[victim], signal.SIGKILL)
    t.join(timeout=300)
    s = result["s"]
    assert (s["status"] == "ok").all(), s
    # Outputs equal an undisturbed run in the same worker environment (a fresh worker process with
    # the same thread settings: oneDNN's rounding depends on them, ~1e-7 in p, which may flip a
    # vesicle whose decision sits on a threshold).
    ref_out = tmp_path / "ref"
    ref = run_batch([tomo_dir], ref_out, _cfg(model_path), client=client, progress=False)
    assert (ref["status"] == "ok").all()
    for name in ("tomo0", "tomo1", "tomo2", "tomo3"):
        want = pd.read_csv(ref_out / name / "vesicles.csv")
        got = pd.read_csv(out / name / "vesicles.csv")
        assert len(got) == len(want), name
        np.testing.assert_allclose(
            got[["z", "y", "x", "radius"]].to_numpy(float), want[["z", "y", "x", "radius"]].to_numpy(float), atol=1e-3
        )
        assert is_complete_result(out / name)

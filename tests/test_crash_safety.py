"""Crash safety (issue 10): a ``segment``/``batch`` run killed with SIGKILL leaves either the previous
complete result or an incomplete folder (no valid manifest), never a folder that looks complete but
is not; rerunning the same command completes it.

Kills land (a) at exact points of the write phase: a wrapper process SIGKILLs itself at the N-th
atomic flush, i.e. with N output files written and the next one half-written; (b) at wall-clock
delays spread over a whole run (startup, compute, write, report).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from cryoves.io import write_mrc
from cryoves.results import MANIFEST_NAME, OUTPUT_FILES, is_complete_result
from cryoves.vesicles import VesicleTable

SHAPE = (48, 80, 80)
VS = 22.0

# Runs the CLI in this process; SIGKILLs itself at the KILL_AT_FSYNC-th atomic flush (if set).
_WRAPPER = textwrap.dedent(
    """
    import os, signal, sys
    n = int(os.environ.get("KILL_AT_FSYNC", "0"))
    if n:
        import cryoves.atomic as atomic
        real, calls = atomic._fsync, [0]
        def fsync(path):
            calls[0] += 1
            if calls[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(path)
        atomic._fsync = fsync
    from cryoves.cli import app
    app(sys.argv[1:], prog_name="cryoves")
    """
)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tomogram with dark vesicle shells and a matching probability map (tomogram grid)."""
    d = tmp_path_factory.mktemp("crash_in")
    rng = np.random.default_rng(0)
    centres = np.array([[14, 18, 18], [24, 50, 24], [32, 22, 56], [16, 58, 58], [34, 56, 44]], float)
    table = VesicleTable.from_spheres(centres, np.full(len(centres), 9.0), VS)
    balls = table.to_labels(SHAPE) > 0
    shell = balls & ~ndimage.binary_erosion(balls, iterations=3)
    tomo = ndimage.gaussian_filter(-shell.astype(np.float32), 1.0) + rng.normal(0, 0.2, SHAPE).astype(np.float32)
    prob = np.clip(ndimage.gaussian_filter(balls.astype(np.float32), 1.0), 0, 1).astype(np.float32)
    return write_mrc(d / "tomo.mrc", tomo, VS), write_mrc(d / "prob.mrc", prob, VS)


def _segment_args(inputs, out: Path, force: bool = False) -> list[str]:
    tomo, prob = inputs
    return ["-q", "segment", str(tomo), "-o", str(out), "--from-probability", str(prob), *(["--force"] if force else [])]


def _run(args: list[str], kill_at_fsync: int = 0, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, KILL_AT_FSYNC=str(kill_at_fsync))
    return subprocess.run([sys.executable, "-c", _WRAPPER, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _spheres(out: Path) -> np.ndarray:
    return pd.read_csv(out / OUTPUT_FILES["vesicles"])[["z", "y", "x", "radius"]].to_numpy()


def _state(out: Path, reference: np.ndarray) -> str:
    """'complete' (and equal to the reference result), 'incomplete' (no manifest), or fail."""
    if (out / MANIFEST_NAME).exists():
        assert is_complete_result(out), f"{out} has a manifest but is not a complete result"
        np.testing.assert_allclose(_spheres(out), reference, atol=1e-3)
        return "complete"
    assert not is_complete_result(out)
    return "incomplete"


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("crash_ref") / "seg"
    t0 = time.perf_counter()
    proc = _run(_segment_args(inputs, out))
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert is_complete_result(out)
    n_atomic = len(json.loads((out / MANIFEST_NAME).read_text())["outputs"]) + 1  # + the manifest
    spheres = _spheres(out)
    assert len(spheres) == 5
    return spheres, seconds, n_atomic, out


def _no_temporaries(out: Path) -> None:
    assert not [p.name for p in out.glob(".*tmp*")], "temporary files left in a completed result"


@pytest.mark.parametrize("kill_at", [2, 5, "manifest"])
def test_segment_killed_while_writing_then_rerun(inputs, reference, tmp_path, kill_at):
    ref_text, _, n_atomic, _ = reference
    out = tmp_path / "seg"
    n = n_atomic if kill_at == "manifest" else kill_at
    proc = _run(_segment_args(inputs, out), kill_at_fsync=n)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert _state(out, ref_text) == "incomplete"
    proc = _run(_segment_args(inputs, out))  # the same command, no --force
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _state(out, ref_text) == "complete"
    _no_temporaries(out)


def test_forced_rerun_killed_while_writing_never_keeps_a_stale_manifest(inputs, reference, tmp_path):
    ref_text, _, _, ref_dir = reference
    out = tmp_path / "seg"
    shutil.copytree(ref_dir, out)  # a previous complete result
    proc = _run(_segment_args(inputs, out, force=True), kill_at_fsync=2)
    assert proc.returncode == -signal.SIGKILL
    # the old manifest went first: files that are half old, half new are never vouched for
    assert _state(out, ref_text) == "incomplete"
    assert _run(_segment_args(inputs, out)).returncode == 0
    assert _state(out, ref_text) == "complete"


@pytest.mark.parametrize("fraction", [0.5, 0.9])
def test_segment_killed_at_a_delay_then_rerun(inputs, reference, tmp_path, fraction):
    """SIGKILL after a fraction of a normal run's wall time, on top of a previous complete result."""
    ref_text, seconds, _, ref_dir = reference
    out = tmp_path / "seg"
    shutil.copytree(ref_dir, out)  # a previous complete result
    env = dict(os.environ, KILL_AT_FSYNC="0")
    proc = subprocess.Popen([sys.executable, "-c", _WRAPPER, *_segment_args(inputs, out, force=True)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=seconds * fraction)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    state = _state(out, ref_text)  # previous result intact, or incomplete; never half-valid
    if state == "incomplete":
        assert _run(_segment_args(inputs, out)).returncode == 0
    assert _state(out, ref_text) == "complete"


@pytest.mark.slow
def test_batch_killed_then_rerun_completes(inputs, tmp_path):
    """``cryoves batch`` (local Dask cluster, worker processes) killed as a process group mid-run."""
    import torch

    from cryoves.model import ModelInfo, UNet3D, save_checkpoint

    torch.manual_seed(0)
    model = save_checkpoint(tmp_path / "random.safetensors", UNet3D(), ModelInfo(name="random"))
    src = tmp_path / "tomos"
    src.mkdir()
    for k in range(3):
        (src / f"t{k}.mrc").write_bytes(inputs[0].read_bytes())
    out = tmp_path / "batch"
    args = [sys.executable, "-m", "cryoves", "-q", "batch", str(src), "-o", str(out), "--model", str(model),
            "--workers", "1", "--device", "cpu"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not any(is_complete_result(p) for p in out.glob("t*")):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its Dask workers
    proc.wait(timeout=30)
    folders = sorted(out.glob("t*"))
    assert any(is_complete_result(p) for p in folders), "the kill came before any tomogram finished"
    for p in folders:
        assert is_complete_result(p) or not (p / MANIFEST_NAME).exists()
    before = {p.name: (p / MANIFEST_NAME).read_bytes() for p in folders if is_complete_result(p)}
    rerun = subprocess.run(args, capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert all(is_complete_result(out / f"t{k}") for k in range(3))
    summary = pd.read_csv(out / "batch_summary.csv")
    assert set(summary.loc[summary["status"] == "skipped", "output"].map(lambda s: Path(s).name)) == set(before)
    for name, manifest in before.items():  # finished tomograms were skipped, not redone
        assert (out / name / MANIFEST_NAME).read_bytes() == manifest

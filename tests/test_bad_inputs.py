"""The bad-input catalogue (issue 10): every case through the CLI and the Python API.

Contract for a failure: exit code 2, one line ``error: <problem>; <fix>``, no traceback, no
partial files, inputs (and an existing result) byte-identical. Cases marked with exit code 0 are
inputs the pipeline must handle (tiny volumes, inverted contrast, no vesicles, ...).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from _hardening_utils import CASES, all_runs, matches, outputs, run_api, run_cli, snapshot
from cryoves.errors import CryovesError

BATCH_ALLOWED = {"out", "out/batch", "out/batch/batch_summary.csv"}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    import torch

    from cryoves.model import ModelInfo, UNet3D, save_checkpoint

    torch.manual_seed(0)
    return save_checkpoint(tmp_path_factory.mktemp("model") / "random.safetensors", UNet3D(),
                           ModelInfo(name="random"))


def _build(case, root):
    d = root / "in"
    d.mkdir(parents=True)
    return case.build(d)


def test_catalogue_is_large_enough():
    assert len(CASES) >= 25
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize(("case", "command"), all_runs(), ids=[f"{c.name}-{cmd}" for c, cmd in all_runs()])
def test_cli(case, command, tmp_path, model_path):
    setup = _build(case, tmp_path)
    before = snapshot(tmp_path)
    res = run_cli(command, setup, tmp_path, model_path)
    after = snapshot(tmp_path)
    want = case.exit_code(command)
    assert res.code == want, (res.code, res.stdout[-1500:], res.stderr[-1500:])
    assert "Traceback" not in res.stdout + res.stderr
    assert "internal error" not in res.stderr
    assert matches(case.pattern(command), res.message), res.message
    # inputs are never modified
    assert {k: v for k, v in after.items() if k.startswith("in")} == {
        k: v for k, v in before.items() if k.startswith("in")}
    if want == 2:
        error_lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
        assert len(error_lines) == 1, res.stderr
        assert "; " in error_lines[0] and "; " in res.message, "the message names the problem; then the fix"
        allowed = BATCH_ALLOWED if command == "batch" else set()
        assert {k: v for k, v in after.items() if k not in allowed} == {
            k: v for k, v in before.items() if k not in allowed}, "partial files left behind"


@pytest.mark.parametrize(("case", "command"), [r for r in all_runs() if r[1] != "batch"],
                         ids=[f"{c.name}-{cmd}" for c, cmd in all_runs() if cmd != "batch"])
def test_api(case, command, tmp_path, model_path):
    setup = _build(case, tmp_path)
    before = snapshot(tmp_path)
    want = case.exit_code(command)
    if want == 2:
        with pytest.raises(CryovesError) as exc:
            run_api(command, setup, tmp_path, model_path)
        assert matches(case.pattern(command), str(exc.value)), str(exc.value)
        assert "\n" not in str(exc.value).strip()
        assert snapshot(tmp_path) == before
    else:
        run_api(command, setup, tmp_path, model_path)
        assert {k: v for k, v in snapshot(tmp_path).items() if k.startswith("in")} == {
            k: v for k, v in before.items() if k.startswith("in")}


def test_batch_api_records_failures_without_raising(tmp_path, model_path):
    case = next(c for c in CASES if c.name == "voxel_size_unset_1A")
    setup = _build(case, tmp_path)
    summary = run_api("batch", setup, tmp_path, model_path)
    assert list(summary["status"]) == ["failed"]
    assert matches(case.expect, summary["error"].iloc[0])
    assert not list((outputs(setup.files, tmp_path)["batch"]).glob("*/*"))


def test_no_vesicles_gives_an_empty_table(tmp_path, model_path):
    import pandas as pd

    from cryoves.results import is_complete_result

    setup = _build(next(c for c in CASES if c.name == "no_vesicles"), tmp_path)
    res = run_cli("segment", setup, tmp_path, model_path)
    assert res.code == 0
    out = outputs(setup.files, tmp_path)["segment"]
    table = pd.read_csv(out / "vesicles.csv")
    assert len(table) == 0 and {"z", "y", "x", "radius"} <= set(table.columns)
    assert is_complete_result(out)


def test_inverted_contrast_is_detected_both_ways(tmp_path, model_path):
    from _hardening_utils import good_tomogram, shells
    from cryoves.predict import predict_file

    d = tmp_path / "in"
    d.mkdir()
    infos = [predict_file(good_tomogram(d, f"{dark}.mrc", shells(dark=dark)), tmp_path / f"{dark}.npy",
                          model=str(model_path), progress=False).info for dark in (True, False)]
    assert [i["inverted"] for i in infos] == [False, True]


def test_int8_narrow_range_gives_finite_probabilities(tmp_path, model_path):
    import numpy as np

    case = next(c for c in CASES if c.name == "int8_narrow_range")
    setup = _build(case, tmp_path)
    res = run_api("predict", setup, tmp_path, model_path)
    assert np.isfinite(np.asarray(res.prob)).all()


def test_debug_shows_the_traceback(tmp_path, model_path):
    from typer.testing import CliRunner

    from cryoves.cli import app
    from cryoves.errors import FormatError

    setup = _build(next(c for c in CASES if c.name == "truncated_mrc"), tmp_path)
    res = CliRunner().invoke(app, ["--debug", "info", str(setup.files["tomogram"])])
    assert isinstance(res.exception, FormatError)


def test_real_process_exit_code_and_stderr(tmp_path):
    """Outside CliRunner: the installed entry point exits 2 with one line and no traceback."""
    setup = _build(next(c for c in CASES if c.name == "garbage_bytes"), tmp_path)
    proc = subprocess.run([sys.executable, "-m", "cryoves", "info", str(setup.files["tomogram"])],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("args", [["segment", "x.mrc", "--bogus"], ["info"], ["predict", "x.mrc"]])
def test_usage_errors_exit_2_not_internal_error(args):
    """typer vendors click (typer._click): its usage errors must not be reported as internal errors."""
    from typer.testing import CliRunner

    from cryoves.cli import app

    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    assert "internal error" not in res.output and "Traceback" not in res.output



def test_help_into_a_closed_pipe_is_not_an_internal_error():
    """`cryoves train --help | head -40`: the reader leaves while the help is being written; that
    ends quietly, as click does for its own output (it was reported as an internal error)."""
    import shutil
    import subprocess
    import sys

    if shutil.which("sh") is None or shutil.which("head") is None:
        pytest.skip("needs a POSIX shell")
    for _ in range(3):  # the reader may leave before or after the last write; both must be quiet
        proc = subprocess.run(["sh", "-c", f'"{sys.executable}" -m cryoves train --help | head -40 > /dev/null'],
                              capture_output=True, text=True, timeout=120)
        assert proc.stderr == "", proc.stderr


def test_broken_pipe_elsewhere_is_still_an_internal_error(monkeypatch):
    """A broken pipe that is not stdout's (e.g. to a worker process) is a bug to report."""
    from typer.testing import CliRunner

    import cryoves.cli as cli

    def broken(*args, **kwargs):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr("cryoves.io.tomogram_info", broken)
    res = CliRunner().invoke(cli.app, ["info", "x.mrc"])
    assert res.exit_code == 1 and "internal error: BrokenPipeError" in res.output, res.output


# ------------------------------------------------------------------------------------ resources
def test_tile_too_big_for_memory_fails_before_any_work_and_the_suggestion_works(tmp_path, model_path, monkeypatch):
    import re

    from typer.testing import CliRunner

    import cryoves.predict as pr
    import cryoves.preprocess as pre
    from _hardening_utils import good_tomogram
    from cryoves.cli import app

    monkeypatch.setattr(pr, "available_memory", lambda device: 64 * 2**20)
    real_grid = pre.to_model_grid
    monkeypatch.setattr(pre, "to_model_grid", lambda *a, **k: pytest.fail("resampled before the memory check"))
    (tmp_path / "in").mkdir()
    tomo = good_tomogram(tmp_path / "in")
    before = snapshot(tmp_path)
    out = tmp_path / "out" / "prob.mrc"
    res = CliRunner().invoke(app, ["predict", str(tomo), "-o", str(out), "--model", str(model_path), "--tile", "256"])
    assert res.exit_code == 2, res.output
    m = re.search(r"error: tile 256³ .* GiB is available; use --tile (\d+)", res.stderr)
    assert m, res.stderr
    assert snapshot(tmp_path) == before
    monkeypatch.setattr(pre, "to_model_grid", real_grid)
    res = CliRunner().invoke(app, ["predict", str(tomo), "-o", str(out), "--model", str(model_path),
                                   "--tile", m.group(1)])
    assert res.exit_code == 0, res.output
    assert out.exists()


def test_cuda_out_of_memory_falls_back_to_smaller_tiles(monkeypatch, caplog):
    import numpy as np
    import torch

    import cryoves.predict as pr
    from _predict_utils import random_net, vesicle_volume

    net, x = random_net(0), vesicle_volume((40, 48, 48), seed=1)
    real, tiles_tried = pr._run_tiles, []

    def run_tiles(fused, volume, out, dev, precision, tile, *args):
        tiles_tried.append(tile)
        if tile > 64:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(fused, volume, out, dev, precision, tile, *args)

    monkeypatch.setattr(pr, "_run_tiles", run_tiles)
    stats: dict = {}
    with caplog.at_level("WARNING", logger="cryoves.predict"):
        got = pr.predict_array(net, x, tile=128, progress=False, stats=stats)
    assert tiles_tried == [128, 64] and stats["tile"] == 64 and stats["batch_size"] == 1
    assert "retrying with tile 64" in caplog.text
    monkeypatch.setattr(pr, "_run_tiles", real)
    want = pr.predict_array(net, x, tile=64, batch_size=1, progress=False)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_cuda_out_of_memory_at_the_smallest_tile_is_a_resource_error(monkeypatch):
    import numpy as np
    import torch

    import cryoves.predict as pr
    from _predict_utils import random_net
    from cryoves.errors import ResourceError

    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(pr, "_run_tiles", oom)
    with pytest.raises(ResourceError, match="CUDA out of memory even with tile .*; use --device cpu"):
        pr.predict_array(random_net(0), np.zeros((16, 16, 16), np.float32), tile=96, progress=False)

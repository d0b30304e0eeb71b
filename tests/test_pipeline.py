"""End-to-end `segment` pipeline: outputs, manifest, caching, masks, cancellation, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from _sim_utils import probability_from_gt, small_sim, write_sim_inputs
from cryoves.cli import app
from cryoves.errors import Cancelled, InputError, OutputExistsError, ParameterError
from cryoves.io import read_mrc, write_mrc
from cryoves.pipeline import SegmentConfig, segment
from cryoves.results import OUTPUT_FILES, is_complete_result


@pytest.fixture(scope="module")
def sim_files(tmp_path_factory):
    sim = small_sim(0)
    return sim, write_sim_inputs(sim, tmp_path_factory.mktemp("sim"))


def _cfg(d, **kw):
    return SegmentConfig(from_probability=str(d / "prob.mrc"), report=False, **kw)


def test_segment_writes_complete_result(sim_files, tmp_path):
    from cryoves.evaluate import evaluate

    sim, d = sim_files
    out = tmp_path / "seg"
    res = segment(d / "tomo.mrc", out, _cfg(d))
    for key in ("vesicles", "star", "labels", "probability", "mod", "rejected"):
        assert (out / OUTPUT_FILES[key]).is_file(), key
    man = json.loads((out / "manifest.json").read_text())
    assert man["n_vesicles"] == len(res.vesicles)
    assert set(man["timings_s"]) >= {"predict", "global_threshold", "adaptive", "spheres", "outliers"}
    assert man["inputs"]["voxel_size_a"] == [22.0, 22.0, 22.0]
    assert is_complete_result(out)
    m = evaluate(res.vesicles, sim.vesicles, shape=sim.tomogram.shape).metrics
    assert m["f1_centre"] >= 0.8, m
    # labels are a rendering of the table
    assert set(np.unique(res.labels)) - {0} == set(res.vesicles.ids)
    # the written volumes come back as read-only maps of the files (nothing held twice in memory)
    for arr, key in ((res.probability, "probability"), (res.labels, "labels")):
        assert isinstance(arr, np.memmap) and not arr.flags.writeable
        np.testing.assert_array_equal(arr, read_mrc(out / OUTPUT_FILES[key]).data)


def test_threshold_search_range_comes_from_the_model_unless_given(sim_files):
    _, d = sim_files
    for kw, searched in [
        ({}, [0.3, 0.99]),  # cryoves-default's maps cross 0.5 at the vesicle edge
        ({"model": "cryovesnet"}, [0.8, 0.99]),  # metadata only: nothing is downloaded
        ({"threshold_range": (0.5, 0.6, 0.05)}, [0.5, 0.6]),
    ]:
        man = segment(d / "tomo.mrc", None, _cfg(d, **kw)).manifest
        assert man["threshold_searched"] == searched, kw
        assert searched[0] <= man["threshold"] <= searched[1]
    assert segment(d / "tomo.mrc", None, _cfg(d, threshold=0.7)).manifest["threshold_searched"] is None
    with pytest.raises(ParameterError, match="threshold range"):
        segment(d / "tomo.mrc", None, _cfg(d, threshold_range=(0.9, 0.5, 0.01)))


def test_segment_refuses_existing_result_and_force_overwrites(sim_files, tmp_path):
    _, d = sim_files
    out = tmp_path / "seg"
    segment(d / "tomo.mrc", out, _cfg(d))
    with pytest.raises(OutputExistsError, match="--force"):
        segment(d / "tomo.mrc", out, _cfg(d))
    segment(d / "tomo.mrc", out, _cfg(d), force=True)
    assert is_complete_result(out)


def test_incomplete_result_is_detected(sim_files, tmp_path):
    _, d = sim_files
    out = tmp_path / "seg"
    segment(d / "tomo.mrc", out, _cfg(d))
    (out / "labels.mrc").write_bytes(b"truncated")
    assert not is_complete_result(out)


def test_region_mask_really_removes_outside_vesicles(sim_files, tmp_path):
    sim, d = sim_files
    half = np.zeros(sim.tomogram.shape, np.uint8)
    half[:, :, : sim.tomogram.shape[2] // 2] = 1
    write_mrc(tmp_path / "half.mrc", half, sim.tomogram.voxel_size)
    full = segment(d / "tomo.mrc", None, _cfg(d))
    cut = segment(d / "tomo.mrc", tmp_path / "seg", _cfg(d, mask=str(tmp_path / "half.mrc")))
    assert len(cut.vesicles) < len(full.vesicles)
    assert (cut.vesicles.df["x"] < sim.tomogram.shape[2] / 2 + 1).all()
    assert (tmp_path / "seg" / "pyto_labels.mrc").is_file()


def test_mask_of_wrong_shape_is_refused(sim_files, tmp_path):
    _, d = sim_files
    write_mrc(tmp_path / "bad.mrc", np.ones((4, 5, 6), np.uint8), 22.0)
    with pytest.raises(InputError, match="shape"):
        segment(d / "tomo.mrc", None, _cfg(d, mask=str(tmp_path / "bad.mrc")))


def test_cancel_raises_and_writes_nothing_complete(sim_files, tmp_path):
    _, d = sim_files
    calls = []

    def stop():
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(Cancelled):
        segment(d / "tomo.mrc", tmp_path / "seg", _cfg(d), should_stop=stop)
    assert not (tmp_path / "seg" / "manifest.json").exists()


def test_probability_cache_skips_network_on_late_parameter_change(sim_files, tmp_path, monkeypatch):
    import cryoves.predict as predict_mod
    from cryoves.model import ModelInfo, UNet3D

    sim, d = sim_files
    calls = []

    class _Res:
        def __init__(self, prob, image=None):
            self.prob = prob
            self.image = image
            self.info = {"inverted": False}

    def fake_predict(tomo, model, **kw):
        if kw.get("on_model_grid"):  # a coarse level of the size search (not cached): nothing there
            return _Res(np.zeros((8, 8, 8), np.float32), np.zeros((8, 8, 8), np.float32))
        calls.append(kw)
        return _Res(probability_from_gt(sim.labels))

    monkeypatch.setattr(predict_mod, "predict_tomogram", fake_predict)
    net = UNet3D()
    model = type("M", (), {"net": net, "info": ModelInfo(name="fake", sha256="abc")})()
    out = tmp_path / "seg"
    cfg = SegmentConfig(report=False)
    segment(d / "tomo.mrc", out, cfg, model=model)
    segment(d / "tomo.mrc", out, SegmentConfig(report=False, radius_range_nm=(14.0, 90.0)), model=model, force=True)
    assert len(calls) == 1
    segment(d / "tomo.mrc", out, SegmentConfig(report=False, tta=2), model=model, force=True)
    assert len(calls) == 2  # a network parameter changed: predicted again


def test_cli_segment_and_errors(sim_files, tmp_path):
    _, d = sim_files
    runner = CliRunner()
    out = tmp_path / "seg"
    r = runner.invoke(app, ["segment", str(d / "tomo.mrc"), "-o", str(out), "--from-probability", str(d / "prob.mrc")])
    assert r.exit_code == 0, r.output
    assert "vesicles" in r.output
    r = runner.invoke(app, ["segment", str(d / "tomo.mrc"), "-o", str(out), "--from-probability", str(d / "prob.mrc")])
    assert r.exit_code == 2
    assert "--force" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["segment", str(tmp_path / "missing.mrc"), "-o", str(tmp_path / "x")])
    assert r.exit_code == 2 and "not found" in r.output


def test_labels_are_rendered_in_the_type_the_file_stores(sim_files):
    """The final labels are uint16 while the ids fit, the type labels.mrc holds (no conversion of a
    full-size volume on writing), with the same values as a uint32 rendering."""
    _, d = sim_files
    res = segment(d / "tomo.mrc", None, _cfg(d))
    assert len(res.vesicles) > 0 and res.labels.dtype == np.uint16
    assert np.array_equal(res.labels, res.vesicles.to_labels(res.labels.shape, dtype=np.uint32))


def test_cli_starts_the_workers_and_the_input_checksum_before_the_pipeline(sim_files, tmp_path, monkeypatch):
    """`cryoves segment` starts the post-processing workers' server and hashes its input in the
    background first (they use the core that idles while the pipeline imports)."""
    from types import SimpleNamespace

    import cryoves.pipeline as pl
    from cryoves import checksum, parallel

    _, d = sim_files
    events = []
    monkeypatch.setattr(parallel, "warm_up", lambda: events.append("workers"))
    monkeypatch.setattr(checksum, "hash_in_background", lambda path: events.append(("hash", str(path))))

    def fake_segment(*_a, **_k):
        events.append("segment")
        return SimpleNamespace(vesicles=[], rejected=[], manifest={"timings_s": {}})

    monkeypatch.setattr(pl, "segment", fake_segment)
    r = CliRunner().invoke(app, ["segment", str(d / "tomo.mrc"), "-o", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert events == [("hash", str(d / "tomo.mrc")), "workers", "segment"]


def test_console_process_exempts_its_objects_from_the_cycle_collector(sim_files, tmp_path, monkeypatch):
    """`cryoves segment` as its own process freezes the objects alive between steps and at the end
    (no full collection walks the modules' objects again); invoked inside a host process it does not."""
    import gc
    import sys

    from cryoves import cli

    _, d = sim_files
    args = ["segment", str(d / "tomo.mrc"), "-o", str(tmp_path / "a"), "--from-probability", str(d / "prob.mrc")]
    gc.unfreeze()
    assert CliRunner().invoke(app, args).exit_code == 0
    assert gc.get_freeze_count() == 0
    frozen = []
    monkeypatch.setattr(gc, "freeze", lambda: frozen.append(1))
    monkeypatch.setattr(cli, "_OWN_PROCESS", False)
    monkeypatch.setattr(sys, "argv", ["cryoves", *args[:3], str(tmp_path / "b"), *args[4:]])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 0
    assert len(frozen) >= 10  # every step of the pipeline and the exit


def test_network_runs_only_on_the_box_of_the_mask(sim_files, tmp_path, monkeypatch):
    import cryoves.predict as pr

    sim, d = sim_files
    half = np.zeros(sim.tomogram.shape, np.uint8)
    half[:, :, : sim.tomogram.shape[2] // 2] = 1
    write_mrc(tmp_path / "half.mrc", half, sim.tomogram.voxel_size)
    regions = []
    real = pr.predict_tomogram
    monkeypatch.setattr(pr, "predict_tomogram", lambda *a, **k: regions.append(k.get("region")) or real(*a, **k))
    cfg = SegmentConfig(mask=str(tmp_path / "half.mrc"), report=False, vesicle_radius_nm=19.0)
    man = segment(d / "tomo.mrc", None, cfg).manifest
    nz, ny, nx = sim.tomogram.shape
    assert regions == [(slice(0, nz), slice(0, ny), slice(0, nx // 2))]
    (_, x1) = man["prediction"]["network_box"][2]
    assert x1 < man["prediction"]["model_grid_shape"][2]  # the other half never went through the network

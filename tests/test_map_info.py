"""`cryoves predict` works offline with the packaged model and describes its map in MAP.json,
which `segment --from-probability` reads (model, threshold range, inversion)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from _predict_utils import vesicle_volume
from _sim_utils import small_sim, write_sim_inputs
from cryoves import DEFAULT_MODEL
from cryoves.cli import app
from cryoves.io import write_mrc
from cryoves.model import model_info
from cryoves.pipeline import SegmentConfig, segment
from cryoves.predict import map_info_path, read_map_info


def test_predict_defaults_to_the_packaged_model_offline(tmp_path, monkeypatch):
    import cryoves.model.registry as registry

    monkeypatch.setenv("CRYOVES_OFFLINE", "1")
    monkeypatch.setenv("CRYOVES_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("CRYOVES_CRYOVESNET_WEIGHTS", raising=False)
    monkeypatch.setattr(registry, "fetch_cryovesnet_weights", lambda: pytest.fail("predict tried to download"))
    src = write_mrc(tmp_path / "t.mrc", vesicle_volume((40, 48, 56), seed=5, dark=True), 22.0)
    out = tmp_path / "prob.mrc"
    r = CliRunner().invoke(app, ["predict", str(src), "-o", str(out), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert f"{DEFAULT_MODEL} on cpu" in r.output
    info = read_map_info(out)
    default = model_info(DEFAULT_MODEL)
    assert map_info_path(out) == tmp_path / "prob.mrc.json"
    assert info["model"] == DEFAULT_MODEL and info["model_sha256"] == default.sha256
    assert info["threshold_range"] == pytest.approx(list(default.threshold_range))
    assert info["inverted"] is False and info["voxel_size_a"] == [22.0, 22.0, 22.0]
    # segment --from-probability knows which model made the map
    res = segment(src, None, SegmentConfig(from_probability=str(out), report=False))
    assert res.manifest["prediction"]["model"] == DEFAULT_MODEL
    assert res.manifest["threshold_searched"] == pytest.approx(list(default.threshold_range[:2]))


@pytest.fixture(scope="module")
def sim_files(tmp_path_factory):
    return write_sim_inputs(small_sim(0), tmp_path_factory.mktemp("sim"))


def test_from_probability_takes_threshold_range_and_inversion_from_the_map_json(sim_files):
    d = sim_files
    cfg = SegmentConfig(from_probability=str(d / "prob.mrc"), report=False)
    plain = segment(d / "tomo.mrc", None, cfg).manifest
    assert plain["threshold_searched"] == [0.3, 0.99] and "model" not in plain["prediction"]
    assert plain["prediction"]["inverted"] is False
    described = {"model": "cryovesnet", "model_sha256": "0" * 64, "threshold_range": [0.8, 0.99, 0.01],
                 "inverted": True, "polarity": "dense_bright"}
    map_info_path(d / "prob.mrc").write_text(json.dumps(described))
    try:
        man = segment(d / "tomo.mrc", None, cfg).manifest
        assert man["threshold_searched"] == [0.8, 0.99]
        assert man["prediction"]["model"] == "cryovesnet" and man["prediction"]["inverted"] is True
        # options still win
        forced = SegmentConfig(from_probability=str(d / "prob.mrc"), report=False, invert=False,
                               threshold_range=(0.5, 0.6, 0.05))
        man = segment(d / "tomo.mrc", None, forced).manifest
        assert man["threshold_searched"] == [0.5, 0.6] and man["prediction"]["inverted"] is False
    finally:
        map_info_path(d / "prob.mrc").unlink()

"""Plugin plumbing that needs no display: reader dispatch, layer data, manifest, `cryoves review` errors."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from _napari_utils import TRUTH, VOXEL_SIZE_A, fake_segment_output, phantom, truth_table
from cryoves.cli import app
from cryoves.errors import CryovesError, InputError
from cryoves.napari import _reader

MANIFEST = Path(__file__).parents[1] / "src" / "cryoves" / "napari.yaml"


def test_reader_dispatch(tmp_path):
    out = fake_segment_output(tmp_path / "auto", truth_table(), phantom())
    tomo = tmp_path / "auto_tomo.mrc"
    assert _reader.get_reader(str(tomo)) is _reader.read_tomogram_file
    assert _reader.get_reader([str(out)]) is _reader.read_result_folder
    assert _reader.get_reader(str(tmp_path)) is None  # a folder without vesicles.csv
    assert _reader.get_reader([str(tomo), str(tomo)]) is None
    (tmp_path / "notes.txt").write_text("x")
    assert _reader.get_reader(str(tmp_path / "notes.txt")) is None


def test_tomogram_layer_has_nm_scale_and_robust_contrast(tmp_path):
    fake_segment_output(tmp_path / "auto", truth_table(), phantom())
    [(data, kwargs, kind)] = _reader.read_tomogram_file(str(tmp_path / "auto_tomo.mrc"))
    assert kind == "image" and data.shape == phantom().shape
    assert kwargs["scale"] == pytest.approx((VOXEL_SIZE_A / 10,) * 3)
    lo, hi = kwargs["contrast_limits"]
    assert np.min(data) < lo < hi < np.max(data)


def test_result_folder_layers_render_the_table(tmp_path):
    import pandas as pd

    rej = pd.DataFrame(
        {
            "id": [9, 10],
            "z": [5.0, np.nan],
            "y": [5.0, np.nan],
            "x": [5.0, np.nan],
            "radius": [3.0, np.nan],
            "step": ["a", "b"],
            "reason": ["c", "d"],
        }
    )
    out = fake_segment_output(tmp_path / "auto", truth_table(), phantom(), rejected=rej)
    layers = _reader.read_result_folder(str(out))
    assert [k for _, _, k in layers] == ["image", "labels", "points", "points"]
    labels = layers[1][0]
    np.testing.assert_array_equal(labels, truth_table().to_labels(phantom().shape))
    np.testing.assert_allclose(layers[2][0], TRUTH[:, :3])
    np.testing.assert_allclose(layers[2][1]["size"], 2 * TRUTH[:, 3])
    assert len(layers[3][0]) == 1  # only the rejected candidate with a sphere is shown
    assert all(kw["metadata"]["cryoves_result"] == str(out) for _, kw, _ in layers[1:])


def test_manifest_is_valid_and_points_at_real_callables():
    npe2 = pytest.importorskip("npe2", reason="npe2 comes with napari: pip install 'cryoves[napari]'")
    import importlib

    manifest = npe2.PluginManifest.from_file(MANIFEST)
    assert manifest.name == "cryoves"
    assert manifest.contributions.readers[0].accepts_directories
    for cmd in manifest.contributions.commands:
        module, name = cmd.python_name.split(":")
        if module.endswith("_widgets"):
            pytest.importorskip("qtpy")
        assert callable(getattr(importlib.import_module(module), name))
    widgets = {w.display_name for w in manifest.contributions.widgets}
    assert widgets == {"Segment vesicles", "Vesicle editor"}


def test_manifest_is_shipped_in_the_wheel_and_registered():
    text = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert '[project.entry-points."napari.manifest"]' in text and 'cryoves = "cryoves:napari.yaml"' in text
    assert MANIFEST.exists()  # hatchling ships every file inside src/cryoves


def test_review_refuses_a_folder_without_a_result(tmp_path):
    from cryoves.napari import review

    with pytest.raises(InputError, match="no vesicles.csv"):
        review(tmp_path)
    res = CliRunner().invoke(app, ["review", str(tmp_path)])
    assert res.exit_code == 2 and "no vesicles.csv" in res.output


def test_review_without_napari_names_the_extra(monkeypatch, tmp_path):
    import builtins

    from cryoves.napari import review

    (tmp_path / "vesicles.csv").write_text("id,z,y,x,radius\n")
    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name == "napari" or name.startswith(("napari.", "qtpy", "cryoves.napari._widgets")):
            raise ImportError("No module named 'napari'")
        return real_import(name, *a, **k)

    monkeypatch.delitem(sys.modules, "cryoves.napari._widgets", raising=False)
    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(CryovesError, match=r"pip install 'cryoves\[napari\]'"):
        review(tmp_path)


def test_review_command_passes_its_options(monkeypatch, tmp_path):
    import cryoves.napari

    calls = []
    monkeypatch.setattr(cryoves.napari, "review", lambda outdir, recover=None: calls.append((Path(outdir), recover)))
    assert CliRunner().invoke(app, ["review", str(tmp_path), "--no-recover"]).exit_code == 0
    assert calls == [(tmp_path, False)]

"""STAR, format dispatch, pyto label files and convert_vesicles."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import starfile

from cryoves.errors import FormatError, OutputExistsError, ParameterError, VoxelSizeError
from cryoves.io import read_label_volume, read_mrc, write_mrc
from cryoves.io.pyto import ids_path, make_pyto_labels, read_pyto_labels, write_pyto_labels
from cryoves.io.tables import convert_vesicles, read_star, read_vesicles, write_star, write_vesicles
from cryoves.vesicles import VesicleTable

RNG = np.random.default_rng(5)
SHAPE = (30, 40, 50)


def _table(n=4, vs=14.69):
    # well separated and inside the grid, so label round trips are exact up to discretisation
    centres = np.array([[8 + 14 * (k % 2), 9 + 7 * k, 10 + 9 * k] for k in range(n)], float) + 0.3
    return VesicleTable.from_spheres(centres, RNG.uniform(3, 4.5, n), vs, ids=[5, 2, 9, 11][:n],
                                     mahalanobis=RNG.uniform(0, 3, n), source=["auto", "manual", "auto", "auto"][:n])


def test_star_roundtrip(tmp_path):
    t = _table()
    p = write_star(tmp_path / "v.star", t)
    raw = starfile.read(p)
    assert {"rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ", "cryovesRadius"} <= set(raw.columns)
    np.testing.assert_allclose(raw["rlnCoordinateX"], t.df["x"], atol=1e-5)  # pixels, x column = table x
    back = read_star(p)
    assert back.voxel_size == pytest.approx(t.voxel_size)
    np.testing.assert_array_equal(back.ids, t.ids)
    np.testing.assert_allclose(back.centres, t.centres, atol=1e-5)
    np.testing.assert_allclose(back.radii, t.radii, atol=1e-5)
    np.testing.assert_allclose(back.df["mahalanobis"], t.df["mahalanobis"], atol=1e-5)
    assert list(back.df["source"]) == list(t.df["source"])


def test_star_from_other_tools(tmp_path):
    p = tmp_path / "relion.star"
    parts = pd.DataFrame({"rlnCoordinateX": [10.0], "rlnCoordinateY": [20.0], "rlnCoordinateZ": [5.0],
                          "cryovesRadius": [6.0]})
    starfile.write({"optics": pd.DataFrame({"rlnImagePixelSize": [13.5]}), "particles": parts}, p)
    t = read_star(p)
    assert t.voxel_size == 13.5 and t.centres.tolist() == [[5.0, 20.0, 10.0]] and t.ids.tolist() == [1]
    starfile.write({"particles": parts}, p, overwrite=True)
    with pytest.raises(VoxelSizeError, match="--voxel-size"):
        read_star(p)
    assert read_star(p, voxel_size=20.0).voxel_size == 20.0
    starfile.write({"particles": parts.drop(columns=["cryovesRadius"])}, p, overwrite=True)
    with pytest.raises(FormatError, match="radius"):
        read_star(p, voxel_size=20.0)


@pytest.mark.parametrize("suffix", [".csv", ".star"])
def test_dispatch_roundtrip(tmp_path, suffix):
    t = _table()
    p = write_vesicles(tmp_path / f"v{suffix}", t)
    back = read_vesicles(p)
    np.testing.assert_allclose(back.centres, t.centres, atol=1e-4)
    np.testing.assert_array_equal(back.ids, t.ids)
    with pytest.raises(FormatError, match="unknown vesicle table format"):
        write_vesicles(tmp_path / "v.xlsx", t)
    with pytest.raises(VoxelSizeError, match="unset"):
        read_vesicles(p, voxel_size=1.0)


def test_mod_dispatch_roundtrip(tmp_path):
    pytest.importorskip("cryoves.io.imod")
    t = _table()
    p = write_vesicles(tmp_path / "v.mod", t, shape=SHAPE)
    back = read_vesicles(p)
    np.testing.assert_allclose(back.centres, t.centres, atol=1e-4)
    np.testing.assert_allclose(back.radii, t.radii, atol=1e-4)
    assert back.voxel_size == pytest.approx(t.voxel_size, rel=1e-5)


def test_pyto_labels_layout_and_roundtrip(tmp_path):
    t = _table()
    cyto = np.zeros(SHAPE, bool)
    cyto[:, :, :40] = True
    az = np.zeros(SHAPE, bool)
    az[:, :2, :] = True
    lpath, side = write_pyto_labels(tmp_path / "labels.mrc", t, SHAPE, cyto, az, origin=(0, 0, 7.0))
    assert side == ids_path(lpath) == tmp_path / "labels.ids.json"
    m = read_mrc(lpath)
    assert m.dtype == np.uint16 and m.origin == (0.0, 0.0, 7.0)
    arr = np.asarray(m.data)
    assert set(np.unique(arr).tolist()) == {0, 1, 2, 10, 11, 12, 13}
    assert arr[0, 0, 45] == 2 and arr[0, 20, 0] == 1 and arr[0, 20, 45] == 0  # AZ over cytoplasm
    ids = json.loads(side.read_text())
    assert ids["vesicle_ids"] == [10, 11, 12, 13] and ids["all_ids"] == [1, 2, 10, 11, 12, 13]
    assert ids["boundary_ids"] == [2, 10, 11, 12, 13] and ids["table_ids"] == t.ids.tolist()
    back = read_pyto_labels(lpath)
    assert sorted(back.table.ids.tolist()) == sorted(t.ids.tolist())
    order = np.argsort(back.table.ids)
    np.testing.assert_allclose(back.table.centres[order], t.centres[np.argsort(t.ids)], atol=0.3)
    assert back.cytoplasm.sum() == (arr == 1).sum() and back.active_zone.any()
    side.unlink()  # without the sidecar: ids from the labels
    assert sorted(read_pyto_labels(lpath).table.ids.tolist()) == [1, 2, 3, 4]


def test_pyto_overflow():
    t = VesicleTable.from_spheres(np.ones((3, 3)) * 2, [1.0] * 3, 10.0)
    with pytest.raises(FormatError, match="uint16"):
        make_pyto_labels(t, (5, 5, 5), first_id=65534)


def test_convert_table_labels_table(tmp_path):
    t = _table()
    t.write_csv(tmp_path / "v.csv")
    tomo = write_mrc(tmp_path / "tomo.mrc", np.zeros(SHAPE, np.float32), t.voxel_size, origin=(1.0, 2.0, 3.0))
    out = convert_vesicles(tmp_path / "v.csv", tmp_path / "l.mrc", like=tomo)
    lab, vs = read_label_volume(out)
    assert lab.shape == SHAPE and vs == pytest.approx(t.voxel_size, rel=1e-5)
    assert read_mrc(out).origin == (1.0, 2.0, 3.0)
    np.testing.assert_array_equal(lab, t.to_labels(SHAPE))
    back = read_vesicles(convert_vesicles(out, tmp_path / "back.csv"))
    order, ref = np.argsort(back.ids), np.argsort(t.ids)
    np.testing.assert_allclose(back.centres[order], t.centres[ref], atol=0.3)
    np.testing.assert_allclose(back.radii[order], t.radii[ref], atol=0.3)


def test_convert_to_pyto_and_back_keeps_ids(tmp_path):
    t = _table()
    t.write_csv(tmp_path / "v.csv")
    convert_vesicles(tmp_path / "v.csv", tmp_path / "p.mrc", to="pyto", shape=SHAPE)
    assert (tmp_path / "p.ids.json").exists()
    back = read_vesicles(convert_vesicles(tmp_path / "p.mrc", tmp_path / "p.csv"))  # sidecar → pyto
    assert sorted(back.ids.tolist()) == sorted(t.ids.tolist())


def test_convert_tiff_and_zarr_labels(tmp_path):
    t = _table()
    t.write_csv(tmp_path / "v.csv")
    for name in ("l.tif", "l.zarr"):
        out = convert_vesicles(tmp_path / "v.csv", tmp_path / name, shape=SHAPE)
        lab, _ = read_label_volume(out)
        np.testing.assert_array_equal(lab, t.to_labels(SHAPE))


def test_convert_refusals_leave_no_output(tmp_path):
    t = _table()
    src = t.write_csv(tmp_path / "v.csv")
    before = src.read_bytes()
    with pytest.raises(ParameterError, match="--shape"):
        convert_vesicles(src, tmp_path / "l.mrc")
    with pytest.raises(ParameterError, match="either"):
        convert_vesicles(src, tmp_path / "l.mrc", shape=SHAPE, like=src)
    with pytest.raises(ParameterError, match="same file"):
        convert_vesicles(src, src, force=True)
    with pytest.raises(VoxelSizeError, match="0.0018"):
        convert_vesicles(src, tmp_path / "x.star", voxel_size=0.0018)
    with pytest.raises(FormatError, match="suffix"):
        convert_vesicles(src, tmp_path / "x.xyz")
    with pytest.raises(FormatError, match="must be a volume"):
        convert_vesicles(src, tmp_path / "x.csv", to="labels", shape=SHAPE)
    with pytest.raises(FormatError, match="pyto label files are MRC"):
        convert_vesicles(src, tmp_path / "x.tif", to="pyto", shape=SHAPE)
    with pytest.raises(ParameterError, match="--to must be one of"):
        convert_vesicles(src, tmp_path / "x.mrc", to="png", shape=SHAPE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.csv"]
    assert src.read_bytes() == before
    convert_vesicles(src, tmp_path / "x.star")
    with pytest.raises(OutputExistsError, match="--force"):
        convert_vesicles(src, tmp_path / "x.star")
    convert_vesicles(src, tmp_path / "x.star", force=True)

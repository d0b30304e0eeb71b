"""Synapse analysis against a hand-made geometry: spheres at known distances from a planar AZ."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from cryoves.analysis import analyze, nearest_neighbours, write_analysis
from cryoves.cli import app
from cryoves.errors import InputError
from cryoves.io import write_mrc
from cryoves.vesicles import VesicleTable

VS = 10.0  # Å: 1 voxel = 1 nm
SHAPE = (300, 60, 60)
# (z, y, x), radius; the AZ is the plane z = 0, so the centre-to-AZ distance is z (nm)
CENTRES = np.array([[30, 30, 30], [54, 12, 12], [56, 45, 45], [200, 30, 30], [270.5, 30, 30]], float)
RADII = np.array([10, 10, 10, 10, 15], float)
# membrane-to-AZ distances: 20, 44, 46, 190, 255.5 -> 2 within 45 nm, 4 within 250 nm


def planar_az(shape=SHAPE):
    az = np.zeros(shape, bool)
    az[0] = True
    return az


@pytest.fixture
def scene():
    return VesicleTable.from_spheres(CENTRES, RADII, VS)


def test_distances_and_pools_match_the_geometry(scene):
    r = analyze(scene, az_mask=planar_az())
    np.testing.assert_allclose(r.vesicles["az_distance_centre_nm"], CENTRES[:, 0], atol=1e-4)
    np.testing.assert_allclose(r.vesicles["az_distance_nm"], CENTRES[:, 0] - RADII, atol=1e-4)
    assert r.summary["n_within_45nm"] == 2
    assert r.summary["n_within_250nm"] == 4
    assert r.summary["radius_nm_mean"] == pytest.approx(RADII.mean())


def test_voxel_size_scales_distances(scene):
    t = VesicleTable.from_spheres(CENTRES, RADII, 20.0)  # 2 nm voxels
    r = analyze(t, az_mask=planar_az())
    np.testing.assert_allclose(r.vesicles["az_distance_nm"], 2 * (CENTRES[:, 0] - RADII), atol=1e-4)
    assert r.summary["n_within_45nm"] == 1  # 40 nm; 88, 92 nm are beyond


def test_nearest_neighbours_membrane_can_differ_from_centre_nearest():
    centres = np.array([[0, 0, 0], [0, 0, 20], [0, 0, -22]], float)
    radii = np.array([5, 5, 15], float)
    nn_c, nn_m = nearest_neighbours(centres, radii)
    assert nn_c[0] == pytest.approx(20.0)  # B is the nearest centre...
    assert nn_m[0] == pytest.approx(2.0)  # ...but C's membrane is closest (22 - 5 - 15)
    # brute force for all
    d = np.linalg.norm(centres[:, None] - centres[None], axis=2)
    gap = d - radii[:, None] - radii[None]
    np.fill_diagonal(d, np.inf)
    np.fill_diagonal(gap, np.inf)
    np.testing.assert_allclose(nn_c, d.min(1))
    np.testing.assert_allclose(nn_m, gap.min(1))
    assert np.isnan(nearest_neighbours(centres[:1], radii[:1])[0]).all()


def test_density_profile_shell_volumes_and_counts(scene):
    r = analyze(scene, az_mask=planar_az(), bin_width_nm=10.0, max_distance_nm=250.0)
    p = r.profile
    assert len(p) == 25
    # shell [a, a+10) holds 10 planes of 60 x 60 voxels of 1 nm³
    np.testing.assert_allclose(p["shell_volume_nm3"], 10 * 60 * 60)
    counts = dict(zip(p["shell_start_nm"], p["n_vesicles"]))
    assert counts[30.0] == 1 and counts[50.0] == 2 and counts[200.0] == 1
    assert p["n_vesicles"].sum() == 4  # the 5th centre is 270.5 nm away, beyond the profile
    np.testing.assert_allclose(p["vesicles_per_um3"], p["n_vesicles"] / (p["shell_volume_nm3"] * 1e-9))
    # volume fraction x shell voxels = voxels of the balls inside the profile range
    balls = scene.to_labels(SHAPE) > 0
    z = np.arange(SHAPE[0])[:, None, None] * np.ones(SHAPE, bool)
    inside = balls & (z < 250)
    assert (p["volume_fraction"] * 10 * 60 * 60).sum() == pytest.approx(np.count_nonzero(inside))


def test_cytoplasm_mask_restricts_the_profile(scene):
    cyto = np.zeros(SHAPE, bool)
    cyto[:, :, :30] = True  # x < 30: keeps the centre of vesicle 2 only among the near ones
    p = analyze(scene, az_mask=planar_az(), cytoplasm_mask=cyto).profile
    np.testing.assert_allclose(p["shell_volume_nm3"], 10 * 60 * 30)
    assert p["n_vesicles"].sum() == 1


def test_without_az_only_radii_and_neighbours(scene):
    r = analyze(scene)
    assert "az_distance_nm" not in r.vesicles and len(r.profile) == 0
    assert r.summary["n_vesicles"] == 5
    with pytest.raises(InputError):
        analyze(scene, az_mask=np.zeros(SHAPE, bool))


def test_write_analysis_refuses_overwrite(scene, tmp_path):
    r = analyze(scene, az_mask=planar_az())
    write_analysis(r, tmp_path / "a")
    for name in ("vesicle_analysis.csv", "density_profile.csv", "analysis.json", "density_profile.png",
                 "az_distance_histogram.png", "radius_histogram.png"):
        assert (tmp_path / "a" / name).exists(), name
    assert (tmp_path / "a" / "density_profile.png").read_bytes()[:4] == b"\x89PNG"
    from cryoves.errors import OutputExistsError

    with pytest.raises(OutputExistsError):
        write_analysis(r, tmp_path / "a")
    write_analysis(r, tmp_path / "a", force=True)


def test_cli_analyze_folder_with_az_mask_and_pyto_labels(scene, tmp_path):
    seg = tmp_path / "seg"
    seg.mkdir()
    scene.write_csv(seg / "vesicles.csv")
    write_mrc(seg / "active_zone_mask.mrc", planar_az().astype(np.uint8), VS)
    runner = CliRunner()
    res = runner.invoke(app, ["analyze", str(seg)])
    assert res.exit_code == 0, res.output
    summary = json.loads((seg / "analysis" / "analysis.json").read_text())
    assert (summary["n_within_45nm"], summary["n_within_250nm"]) == (2, 4)
    assert runner.invoke(app, ["analyze", str(seg)]).exit_code == 2
    # Pyto labels: 1 cytoplasm, 2 AZ, >= 10 vesicles
    seg2 = tmp_path / "seg2"
    seg2.mkdir()
    scene.write_csv(seg2 / "vesicles.csv")
    labels = np.ones(SHAPE, np.uint16)
    labels[0] = 2
    labels[scene.to_labels(SHAPE) > 0] = 10
    write_mrc(seg2 / "pyto_labels.mrc", labels, VS)
    res = runner.invoke(app, ["analyze", str(seg2), "-o", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    summary2 = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert summary2["n_within_45nm"] == 2
    prof = np.genfromtxt(tmp_path / "out" / "density_profile.csv", delimiter=",", names=True)
    # vesicles count as cytoplasm, the AZ plane (label 2) does not
    np.testing.assert_allclose(prof["shell_volume_nm3"], [9 * 60 * 60] + [10 * 60 * 60] * 24)


def test_cli_analyze_with_an_imod_az_model(tmp_path):
    from cryoves.io.imod import ImodContour, ImodModel, ImodObject, write_mod

    nz, ny, nx = 20, 60, 40
    # one line along x at y = 0 in every section: 3-pixel tubes paint y = 0 and 1 -> the plane y = 1
    obj = ImodObject.of_kind("open", name="active zone")
    obj.contours = [ImodContour([[0, 0, z], [nx - 1, 0, z]]) for z in range(nz)]
    write_mod(tmp_path / "az.mod", ImodModel(objects=[obj], xmax=nx, ymax=ny, zmax=nz))
    seg = tmp_path / "seg"
    seg.mkdir()
    VesicleTable.from_spheres([[10, 30, 20], [10, 50, 20]], [5, 5], VS).write_csv(seg / "vesicles.csv")
    res = CliRunner().invoke(app, ["analyze", str(seg), "--az-model", str(tmp_path / "az.mod")])
    assert res.exit_code == 0, res.output
    rows = np.genfromtxt(seg / "analysis" / "vesicle_analysis.csv", delimiter=",", names=True)
    np.testing.assert_allclose(rows["az_distance_centre_nm"], [29, 49], atol=1e-3)
    np.testing.assert_allclose(rows["az_distance_nm"], [24, 44], atol=1e-3)

"""Tests of the tomogram simulator (cryoves.simulate) and `cryoves simulate`."""

from __future__ import annotations

import json

import mrcfile
import numpy as np
import pytest
from typer.testing import CliRunner

from cryoves.cli import app
from cryoves.errors import OutputExistsError, ParameterError
from cryoves.simulate import SimulationConfig, randomize_config, simulate, write_simulation
from cryoves.simulate.geometry import layout_scene
from cryoves.simulate.imaging import back_project, electron_wavelength_a, project, tilt_series
from cryoves.simulate.scene import HEADGROUP_V, LEAFLET_SIGMA_NM, TAIL_V, render_scene
from cryoves.vesicles import VesicleTable


@pytest.fixture(scope="module")
def small():
    return simulate(SimulationConfig.preset("small"), seed=0)


def _inside(table: VesicleTable, shape) -> np.ndarray:
    c, r = table.centres, table.radii
    return np.all((c - r[:, None] >= 0) & (c + r[:, None] <= np.asarray(shape) - 1), axis=1)


# ----------------------------------------------------------------------------- ground truth
def test_small_outputs_have_declared_types_and_geometry(small):
    cfg = small.config
    assert small.tomogram.data.shape == cfg.shape == small.scene.shape == small.labels.shape
    assert small.tomogram.data.dtype == np.float32 and small.scene.dtype == np.float32
    assert small.labels.dtype == np.uint32
    assert small.tomogram.voxel_size == (22.0, 22.0, 22.0)
    assert small.cytoplasm_mask.dtype == bool and small.active_zone_mask.dtype == bool
    assert small.active_zone_mask.any() and small.cytoplasm_mask.any()
    assert len(small.vesicles) >= 5
    assert (small.vesicles.df["source"] == "ground_truth").all()
    assert abs(float(small.tomogram.data.mean())) < 1e-3 and abs(float(small.tomogram.data.std()) - 1) < 1e-3


def test_labels_match_table(small):
    t = small.vesicles
    ids_in_volume = set(np.unique(small.labels)) - {0}
    assert ids_in_volume == set(t.ids)
    full = _inside(t, small.labels.shape)
    assert full.sum() >= 2
    for vid, c, r in zip(t.ids[full], t.centres[full], t.radii[full]):
        vox = np.argwhere(small.labels == vid)
        assert abs(len(vox) / (4 / 3 * np.pi * r**3) - 1) < 0.15
        assert np.abs(vox.mean(axis=0) - c).max() < 0.3


def test_vesicles_do_not_overlap_and_sit_in_presynaptic_ice(small):
    t, cfg = small.vesicles, small.config
    c, r = t.df[["z_nm", "y_nm", "x_nm"]].to_numpy(), t.df["radius_nm"].to_numpy()
    gaps = np.linalg.norm(c[:, None] - c[None], axis=2) - r[:, None] - r[None]
    np.fill_diagonal(gaps, np.inf)
    assert gaps.min() >= cfg.gap_min_nm - 1e-6
    assert (t.df["distance_to_pm_nm"] > 0).all()
    # every centre is inside the presynaptic cytoplasm mask
    idx = np.rint(t.centres).astype(int)
    assert small.cytoplasm_mask[idx[:, 0], idx[:, 1], idx[:, 2]].all()


def test_scene_membrane_lies_just_inside_the_table_radius(small):
    """The densest shell of each vesicle in the noise-free scene is within the outer radius."""
    t, v = small.vesicles, small.config.voxel_size_nm
    zz, yy, xx = np.indices(small.scene.shape)
    ok = _inside(t, small.scene.shape)
    assert ok.sum() >= 2
    for c, r_nm, thick in zip(t.centres[ok], t.df["radius_nm"][ok], t.df["membrane_thickness_nm"][ok]):
        d = np.sqrt((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) * v
        shell = (d > r_nm - thick) & (d < r_nm)
        outside = (d > r_nm + 1.5 * v) & (d < r_nm + 3 * v)
        lumen = d < r_nm - thick - v
        # dense = dark in the scene: the membrane is more negative than lumen and surroundings
        assert small.scene[shell].mean() < small.scene[lumen].mean() - 0.3
        assert small.scene[shell].mean() < np.median(small.scene[outside]) - 0.3


def test_vesicle_membranes_are_dark_in_the_tomogram(small):
    """Dense = dark in the reconstruction, at the ground-truth positions (averaged over vesicles)."""
    t, vol = small.vesicles, small.tomogram.data
    zz, yy, xx = np.indices(vol.shape)
    shell_vals, ring_vals = [], []
    for c, r in zip(t.centres, t.radii):
        d = np.sqrt((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2)
        shell_vals.append(vol[(d > r - 1.5) & (d <= r)].mean())
        ring_vals.append(vol[(d > r - 4) & (d < r - 2)].mean())  # lumen just inside the membrane
    assert np.mean(shell_vals) < np.mean(ring_vals) - 0.1


@pytest.mark.parametrize("voxel_a", [8.0, 25.0])
def test_membrane_position_and_mass_in_nm_at_any_voxel_size(voxel_a):
    """A bilayer of 4.5 nm at outer radius R: excess centred at R - t/2, same mass per area."""
    cfg = SimulationConfig.preset(
        "small", voxel_size_a=voxel_a, shape=(72, 40, 40) if voxel_a < 10 else (24, 20, 20), n_vesicles=1,
        plasma_membrane=False, distractors=False, crowding=0.0, connectors=False, tethers=False,
        radius_mean_nm=12.0, radius_sd_nm=0.0, large_tail_fraction=0.0, lumen_excess_v=0.0,
    )
    rng = np.random.default_rng(0)
    lay = layout_scene(cfg, rng)
    vol = render_scene(cfg, lay, rng)
    c, r = lay.centres_nm[0], lay.radii_nm[0]
    v = cfg.voxel_size_nm
    zz, yy, xx = np.indices(cfg.shape)
    d = np.sqrt((zz * v - c[0]) ** 2 + (yy * v - c[1]) ** 2 + (xx * v - c[2]) ** 2)
    shell = (d > r - 7) & (d < r + 2.5)
    excess = vol.potential[shell] - np.median(vol.potential[d < r - 8])
    centre_nm = float((excess * d[shell]).sum() / excess.sum())
    assert abs(centre_nm - (r - cfg.membrane_thickness_nm / 2)) < 0.6
    mass_per_area = float(excess.sum() * v**3 / (4 * np.pi * (r - cfg.membrane_thickness_nm / 2) ** 2))
    # V·nm: two head-group layers minus the light tails, independent of the voxel size
    t = cfg.membrane_thickness_nm
    tail_sigma = max(t / 2 - min(0.9, t / 4), 0.3) / 1.5
    expected = np.sqrt(2 * np.pi) * (2 * HEADGROUP_V * LEAFLET_SIGMA_NM + TAIL_V * tail_sigma)
    assert abs(mass_per_area / expected - 1) < 0.1
    if voxel_a < 10:  # fine grid resolves both leaflets ~2.7 nm apart
        prof_r = np.arange(r - 6.5, r + 2, 0.2)
        prof = np.array([vol.potential[shell][np.abs(d[shell] - q) < 0.3].mean() for q in prof_r])
        peaks = [i for i in range(1, len(prof) - 1) if prof[i] >= prof[i - 1] and prof[i] >= prof[i + 1]]
        top = sorted(peaks, key=lambda i: -prof[i])[:2]
        assert len(top) == 2 and 2.0 < abs(prof_r[top[0]] - prof_r[top[1]]) < 3.6


# ----------------------------------------------------------------------------- determinism
def test_same_seed_gives_identical_results_and_other_seed_differs(small):
    again = simulate(SimulationConfig.preset("small"), seed=0)
    assert np.array_equal(again.tomogram.data, small.tomogram.data)
    assert np.array_equal(again.scene, small.scene)
    assert np.array_equal(again.labels, small.labels)
    other = simulate(SimulationConfig.preset("small"), seed=1)
    assert not np.array_equal(other.tomogram.data, small.tomogram.data)


def test_randomize_config_is_seeded_and_broad():
    assert randomize_config(3) == randomize_config(3)
    cfgs = [randomize_config(s, shape=(32, 48, 48)) for s in range(12)]
    vs = [c.voxel_size_a for c in cfgs]
    assert all(8 <= x <= 40 for x in vs) and max(vs) / min(vs) > 1.8
    assert len({c.defocus_um for c in cfgs}) == 12
    assert all(c.shape == (32, 48, 48) for c in cfgs)


# ----------------------------------------------------------------------------- imaging physics
def test_projector_is_adjoint_and_mass_preserving():
    rng = np.random.default_rng(0)
    vol = np.zeros((20, 3, 30), np.float32)
    vol[5:15, :, 10:20] = rng.random((10, 3, 10))
    angles = np.array([-50.0, -10.0, 0.0, 33.0])
    p = project(vol, angles)
    assert p.shape == (4, 3, 30)
    np.testing.assert_allclose(p.sum(axis=(1, 2)), vol.sum(), rtol=1e-4)
    y = rng.random(p.shape).astype(np.float32)
    lhs = float((p.astype(np.float64) * y).sum())
    rhs = float((vol.astype(np.float64) * back_project(y, angles, 20)).sum())
    assert abs(lhs - rhs) < 1e-4 * abs(lhs)


def test_dense_object_is_dark_in_underfocus_images():
    cfg = SimulationConfig.preset("small", tilt_min_deg=-3, tilt_max_deg=3, tilt_step_deg=3)
    pot = np.full((32, 48, 48), 4.0, np.float32)
    zz, yy, xx = np.indices(pot.shape)
    pot[(zz - 16) ** 2 + (yy - 24) ** 2 + (xx - 24) ** 2 < 25] += 2.5
    img = tilt_series(pot, cfg, None, ice_nm=32 * 2.2)
    assert img[1, 22:27, 22:27].mean() < img[1].mean() - 0.01


def test_missing_wedge_is_empty_in_fourier_space(small):
    """No power beyond the tilt range: |kz| > |kx|·tan(60°) (+5° margin) holds < 2 % of measured power."""
    vol = small.tomogram.data - small.tomogram.data.mean()
    pw = np.abs(np.fft.fftn(vol)) ** 2
    kz = np.fft.fftfreq(vol.shape[0])[:, None, None]
    kx = np.fft.fftfreq(vol.shape[2])[None, None, :]
    ang = np.degrees(np.arctan2(np.abs(kz), np.abs(kx)))  # angle of (kx, kz) from the kx axis
    k = np.sqrt(kz**2 + kx**2)
    band = (k > 0.05) & (k < 0.4)
    band = np.broadcast_to(band, pw.shape)
    ang = np.broadcast_to(ang, pw.shape)
    wedge = pw[band & (ang > 60 + 5)].mean()
    measured = pw[band & (ang < 60 - 5)].mean()
    assert wedge < 0.02 * measured


# ----------------------------------------------------------------------------- options and files
def test_shape_and_voxel_size_options_and_written_files(tmp_path):
    cfg = SimulationConfig.preset("small", shape=(40, 56, 72), voxel_size_a=25.0, n_vesicles=4)
    sim = simulate(cfg, seed=2)
    assert sim.tomogram.shape == (40, 56, 72) and sim.tomogram.voxel_size_a == 25.0
    assert len(sim.vesicles) > 0
    out = write_simulation(sim, tmp_path / "sim")
    for name in ("tomogram.mrc", "scene.mrc", "labels.mrc", "cytoplasm_mask.mrc", "active_zone_mask.mrc"):
        with mrcfile.open(out / name) as m:
            assert m.data.shape == (40, 56, 72)
            assert abs(float(m.voxel_size.x) - 25.0) < 1e-4 and abs(float(m.voxel_size.z) - 25.0) < 1e-4
    table = VesicleTable.read_csv(out / "vesicles.csv")
    np.testing.assert_allclose(table.centres, sim.vesicles.centres, atol=1e-3)
    assert abs(table.voxel_size - 25.0) < 1e-2
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seed"] == 2 and SimulationConfig.from_dict(manifest["config"]) == cfg
    with pytest.raises(OutputExistsError):
        write_simulation(sim, out)
    write_simulation(sim, out, force=True)


def test_invalid_settings_raise_parameter_error():
    with pytest.raises(ParameterError, match="voxel size"):
        SimulationConfig.preset("small", voxel_size_a=2.0)
    with pytest.raises(ParameterError, match="preset"):
        SimulationConfig.preset("nonsense")
    with pytest.raises(ParameterError, match="tilt"):
        SimulationConfig.preset("small", tilt_min_deg=30, tilt_max_deg=-30)


def test_populations_presets_add_labelled_vesicles():
    cfg = SimulationConfig.preset("dense-core", shape=(64, 128, 128), n_vesicles=3)
    lay = layout_scene(cfg, np.random.default_rng(0))
    assert "dense_core" in set(lay.population) and lay.dense_core.any()


def test_cli_simulate_writes_outputs_and_refuses_overwrite(tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli"
    args = ["simulate", "-o", str(out), "--preset", "small", "--seed", "4", "--shape", "32", "48", "48",
            "--voxel-size", "20"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert (out / "manifest.json").exists() and (out / "tomogram.mrc").exists()
    with mrcfile.open(out / "tomogram.mrc") as m:
        assert m.data.shape == (32, 48, 48) and abs(float(m.voxel_size.x) - 20) < 1e-4
    res = runner.invoke(app, args)
    assert res.exit_code == 2
    res = runner.invoke(app, ["simulate", "-o", str(tmp_path / "r"), "--randomize", "--seed", "1",
                              "--shape", "32", "48", "48"])
    assert res.exit_code == 0, res.output
    written = json.loads((tmp_path / "r" / "manifest.json").read_text())["config"]
    assert SimulationConfig.from_dict(written) == randomize_config(1, shape=(32, 48, 48))


def _high_freq_share(vol: np.ndarray) -> float:
    p = np.abs(np.fft.rfftn(vol - vol.mean())) ** 2
    kx = np.fft.rfftfreq(vol.shape[2])[None, None, :]
    ky = np.fft.fftfreq(vol.shape[1])[None, :, None]
    return float(p[np.broadcast_to(np.sqrt(kx**2 + ky**2) > 0.25, p.shape)].sum() / p.sum())


def test_sirt_like_reconstruction_and_post_filters_damp_high_frequencies():
    base = dict(shape=(32, 48, 48), n_vesicles=3, distractors=False)
    ref = _high_freq_share(simulate(SimulationConfig.preset("small", **base), seed=5).tomogram.data)
    for extra in ({"reconstruction": "sirt-like"}, {"post_filter": "gaussian"}, {"post_filter": "diffusion"}):
        vol = simulate(SimulationConfig.preset("small", **base, **extra), seed=5).tomogram.data
        assert np.isfinite(vol).all()
        assert _high_freq_share(vol) < 0.8 * ref, extra


def test_ice_thicker_than_box_lets_vesicles_cross_z_faces_and_randomized_volumes_are_valid():
    cfg = SimulationConfig.preset("small", ice_thickness_nm=400.0, n_vesicles=25)
    sim = simulate(cfg, seed=0)
    t = sim.vesicles
    assert len(t) > 5
    assert np.all((t.centres >= 0) & (t.centres <= np.asarray(cfg.shape) - 1))
    cut_in_z = (t.centres[:, 0] - t.radii < 0) | (t.centres[:, 0] + t.radii > cfg.shape[0] - 1)
    assert cut_in_z.any()
    assert sim.cytoplasm_mask[0].any() and sim.cytoplasm_mask[-1].any()  # ice fills the box
    for s in range(3):
        r = simulate(randomize_config(s, shape=(32, 48, 48)), seed=s)
        assert np.isfinite(r.tomogram.data).all() and r.tomogram.shape == (32, 48, 48)
        assert set(np.unique(r.labels)) - {0} == set(r.vesicles.ids)


def test_synapse_layout_has_clustered_nearly_touching_vesicles_and_border_cuts():
    cfg = SimulationConfig.preset("synapse")
    lay = layout_scene(cfg, np.random.default_rng(0))
    c, r = lay.centres_nm, lay.radii_nm
    assert 100 <= len(r) <= 500
    gaps = np.linalg.norm(c[:, None] - c[None], axis=2) - r[:, None] - r[None]
    np.fill_diagonal(gaps, np.inf)
    nearest = gaps.min(axis=1)
    assert nearest.min() >= cfg.gap_min_nm - 1e-9
    assert np.mean(nearest <= cfg.gap_max_nm) > 0.6
    assert abs(np.median(r) - cfg.radius_mean_nm) < 1.5 and r.max() > cfg.radius_mean_nm + 2 * cfg.radius_sd_nm
    cut = ((c - r[:, None] < 0) | (c + r[:, None] > lay.box_nm)).any(axis=1)
    assert cut.any()
    kinds = {o.kind for o in lay.obstacles}
    assert {"mitochondrion", "endosome", "microtubule", "actin", "dense_clump"} <= kinds


def test_active_zone_points_lie_on_the_active_zone_mask_and_plasma_membrane(small):
    from scipy.spatial import cKDTree

    assert len(small.az_points) > 10 and len(small.membrane_points) > len(small.az_points)
    mask_vox = np.argwhere(small.active_zone_mask)
    d, _ = cKDTree(mask_vox).query(small.az_points)
    assert np.percentile(d, 95) < 1.0
    # the scene is densest (most negative) on the membrane surface, not 10 nm to either side
    v = small.config.voxel_size_nm
    p = np.rint(small.membrane_points).astype(int)
    p = p[np.all((p >= 0) & (p < np.asarray(small.scene.shape)), axis=1)]
    on = small.scene[p[:, 0], p[:, 1], p[:, 2]].mean()
    ny, nx = np.sin(np.radians(small.config.pm_angle_deg)), np.cos(np.radians(small.config.pm_angle_deg))
    for side in (-1, 1):
        q = np.rint(small.membrane_points + side * 10 / v * np.array([0, ny, nx])).astype(int)
        q = q[np.all((q >= 0) & (q < np.asarray(small.scene.shape)), axis=1)]
        assert on < small.scene[q[:, 0], q[:, 1], q[:, 2]].mean() - 0.1


def test_gold_fiducials_sit_on_ice_surfaces_are_dark_and_not_ground_truth():
    cfg = SimulationConfig.preset("small", ice_thickness_nm=100.0, n_gold=3, n_vesicles=4)
    sim = simulate(cfg, seed=1)
    gold = sim.distractors[sim.distractors["kind"] == "gold"]
    assert len(gold) >= 1
    ice_top = (cfg.shape[0] - 1) * cfg.voxel_size_nm / 2 - 50.0
    v = cfg.voxel_size_nm
    for row in gold.itertuples():
        assert min(abs(row.z * v - (ice_top + 5)), abs(row.z * v - (ice_top + 95))) < 1e-6
        z, y, x = (int(round(c)) for c in (row.z, row.y, row.x))
        assert sim.scene[z, y, x] < -20  # far denser than anything biological
        assert sim.labels[z, y, x] == 0
    assert set(sim.vesicles.df["population"]) == {"sv"}
    assert simulate(cfg.replace(ice_thickness_nm=200.0), seed=1).distractors["kind"].ne("gold").all()


# ----------------------------------------------------------------------------- hard cases
def _digest(a: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]


def test_new_features_off_by_default_keep_small_preset_bit_identical(small):
    # hashes computed on the simulator before coats, CTF correction and dense placement existed
    cfg = small.config
    assert cfg.coat_fraction == 0 and cfg.ctf_correction == "none"
    assert _digest(small.tomogram.data) == "2e1d5951e15dc284"
    assert _digest(small.scene) == "1c392472e3867926"
    assert _digest(small.vesicles.df[["z", "y", "x", "radius"]].to_numpy()) == "7a664b5de4e1d4c0"


def _shell_profile(pot: np.ndarray, centres_nm, radii_nm, v: float, edges) -> np.ndarray:
    """Mean of ``pot`` in shells of distance (nm) from each sphere surface: (n_spheres, n_bins)."""
    z, y, x = np.meshgrid(*[np.arange(n) * v for n in pot.shape], indexing="ij", sparse=True)
    out = []
    for c, r in zip(centres_nm, radii_nm):
        d = np.sqrt((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2) - r
        sel = (d > edges[0]) & (d < edges[-1])
        s, _ = np.histogram(d[sel], edges, weights=pot[sel])
        n, _ = np.histogram(d[sel], edges)
        out.append(s / np.maximum(n, 1))
    return np.array(out)


def test_coat_density_lies_outside_the_ground_truth_radius():
    cfg = SimulationConfig.preset("small", voxel_size_a=10.0, shape=(64, 96, 96), n_vesicles=6, distractors=False,
                                  connectors=False, tethers=False, coat_transmembrane_fraction=0.0)
    out = {}
    for frac in (0.0, 0.5):
        rng = np.random.default_rng(4)
        lay = layout_scene(cfg.replace(coat_fraction=frac), rng)
        out[frac] = (lay, render_scene(cfg.replace(coat_fraction=frac), lay, rng).potential)
    (lay0, pot0), (lay1, pot1) = out[0.0], out[0.5]
    assert np.array_equal(lay0.centres_nm, lay1.centres_nm) and np.array_equal(lay0.radii_nm, lay1.radii_nm)
    edges = np.array([-12.0, -6.0, -1.0, 0.5, 4.5, 9.0])
    excess = _shell_profile(pot1 - pot0, lay0.centres_nm, lay0.radii_nm, cfg.voxel_size_nm, edges)
    coated = excess[:, 3] > 0.2  # shell 0.5–4.5 nm beyond the outer bilayer edge
    assert coated.any() and (~coated).any()
    assert excess[coated, 3].mean() > 0.4  # V: the coat reaches beyond the GT radius
    assert np.abs(excess[:, 0]).max() < 0.01  # nothing in the lumen
    assert excess[coated, 1].max() < 0.25 * excess[coated, 3].min()  # only blob tails inside the edge
    assert excess[~coated, 3].max() < 0.1  # uncoated vesicles: at most a neighbour's blob tail
    assert excess[coated, 4].mean() < 0.5 * excess[coated, 3].mean()  # thins out beyond ~5 nm


def test_phase_flip_restores_contrast_beyond_the_first_ctf_zero():
    cfg = SimulationConfig.preset("small", voxel_size_a=14.0, defocus_um=7.0, noise=False, radial_cutoff=0.5,
                                  n_vesicles=8)
    k = np.sqrt(sum(g**2 for g in np.meshgrid(*[np.fft.fftfreq(n) for n in cfg.shape[:2]],
                                               np.fft.rfftfreq(cfg.shape[2]), indexing="ij")))
    first_zero = cfg.voxel_size_a / np.sqrt(electron_wavelength_a(300.0) * 7e4)  # cycles/voxel (Cs negligible)
    corr, prof = {}, {}
    for cc in ("none", "phase-flip"):
        sim = simulate(cfg.replace(ctf_correction=cc), seed=1)
        a, b = np.fft.rfftn(sim.tomogram.data), np.fft.rfftn(sim.scene)
        band = []
        for lo, hi in ((0.05, 0.25), (first_zero + 0.02, 0.5)):
            m = (k >= lo) & (k < hi)
            cross = np.real((a[m] * np.conj(b[m])).sum())
            band.append(cross / np.sqrt((abs(a[m]) ** 2).sum() * (abs(b[m]) ** 2).sum()))
        corr[cc] = band
        t = sim.vesicles.df
        prof[cc] = _shell_profile(sim.tomogram.data, t[["z_nm", "y_nm", "x_nm"]].to_numpy(), t["radius_nm"].to_numpy(),
                                  cfg.voxel_size_nm, np.array([-4.5, 0.0])).mean()
    assert abs(corr["none"][0] - corr["phase-flip"][0]) < 0.03  # below the first zero: unchanged
    assert corr["none"][1] < -0.2 < 0.3 < corr["phase-flip"][1]  # beyond it: reversed, then restored
    assert prof["none"] < -0.3 and prof["phase-flip"] < -0.3  # membranes stay dark


def test_dense_pool_preset_packs_vesicles_with_small_gaps():
    sim = simulate(SimulationConfig.preset("dense-pool", shape=(64, 128, 128), tilt_step_deg=4.0), seed=2)
    cfg, t = sim.config, sim.vesicles.df
    c, r = t[["z_nm", "y_nm", "x_nm"]].to_numpy(), t["radius_nm"].to_numpy()
    gaps = np.linalg.norm(c[:, None] - c[None], axis=2) - r[:, None] - r[None]
    np.fill_diagonal(gaps, np.inf)
    nearest = gaps.min(axis=1)
    fraction = ((sim.labels > 0) & sim.cytoplasm_mask).sum() / sim.cytoplasm_mask.sum()
    assert len(t) >= 40 and fraction > 0.18
    assert nearest.min() >= cfg.gap_min_nm - 1e-6 and np.median(nearest) < 3.0
    assert cfg.coat_fraction > 0 and cfg.reconstruction == "sirt-like" and cfg.tilt_max_deg == 50


def test_hard_presets_and_randomized_new_fields():
    unc, pf = SimulationConfig.preset("uncorrected"), SimulationConfig.preset("phase-flipped")
    assert unc.ctf_correction == "none" and pf == unc.replace(ctf_correction="phase-flip")
    assert 12 <= unc.voxel_size_a <= 16 and 6 <= unc.defocus_um <= 8 and unc.dose_e_per_a2 <= 60
    cfgs = [randomize_config(s, shape=(32, 48, 48)) for s in range(40)]
    coat = [c.coat_fraction for c in cfgs]
    assert min(coat) == 0 and 0.4 < max(coat) <= 0.8
    assert {c.ctf_correction for c in cfgs} == {"none", "phase-flip"}
    assert max(c.vesicle_volume_fraction for c in cfgs) > 0.2 and min(c.gap_min_nm for c in cfgs) < 1.2
    assert all(c.dose_e_per_a2 >= 40 for c in cfgs) and min(c.dose_e_per_a2 for c in cfgs) < 60
    # earlier fields keep their values for a seed (drawn before the new ones): seed 0 as before
    c0 = cfgs[0]
    before = (22.3, 9.472348127649997, 128.58357968757133, 0.1889623120439206, 2.459310892859888)
    now = (c0.voxel_size_a, c0.defocus_um, c0.dose_e_per_a2, c0.vesicle_volume_fraction, c0.gap_min_nm)
    assert now == pytest.approx(before, rel=1e-12)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("coat_fraction", 1.5, "coat_fraction"), ("coat_transmembrane_fraction", -0.1, "coat_transmembrane_fraction"),
     ("coat_density_per_100nm2", -1.0, "coat density"), ("coat_thickness_nm", 0.5, "coat thickness"),
     ("ctf_correction", "wiener", "ctf correction"), ("vesicle_volume_fraction", 0.9, "volume fraction"),
     ("max_vesicles", 0, "max_vesicles"), ("placement_tries", 0, "placement_tries")],
)
def test_new_fields_are_validated(field, value, message):
    with pytest.raises(ParameterError, match=message):
        SimulationConfig.preset("small", **{field: value})

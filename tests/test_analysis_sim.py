"""Synapse analysis against the simulator's exact geometry (issue: distances within 1 voxel, counts exact)."""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from _sim_utils import synapse_sim
from cryoves.analysis import analyze


def test_az_distances_and_pools_match_simulated_geometry():
    sim = synapse_sim()
    vs_nm = sim.tomogram.voxel_size_nm
    table = sim.vesicles
    # Ground truth: outer vesicle surface to the cytoplasmic face of the active-zone membrane =
    # distance to the AZ mid-surface points minus the radius minus half the AZ mask thickness
    # (mask voxels per unit area: the simulator gives one AZ point per voxel² of area).
    d_mid, _ = cKDTree(sim.az_points).query(table.centres)
    half_thickness = sim.active_zone_mask.sum() / len(sim.az_points) / 2
    gt_nm = (d_mid - half_thickness - table.radii) * vs_nm

    res = analyze(table, az_mask=sim.active_zone_mask, cytoplasm_mask=sim.cytoplasm_mask)
    got_nm = res.vesicles["az_distance_nm"].to_numpy()
    err_vox = np.abs(got_nm - gt_nm) / vs_nm
    # The mask is a voxelisation of the surface: its face is off by up to ~half a voxel diagonal.
    assert np.median(err_vox) <= 0.5
    assert np.mean(err_vox <= 1.0) >= 0.95 and err_vox.max() <= 1.5, err_vox.max()
    assert res.summary["n_within_45nm"] == int((gt_nm <= 45).sum())
    assert res.summary["n_within_250nm"] == int((gt_nm <= 250).sum())
    assert res.summary["n_vesicles"] == len(table)


def test_nearest_neighbour_gaps_match_simulated_spacing():
    sim = synapse_sim()
    res = analyze(sim.vesicles)
    c, r = sim.vesicles.centres, sim.vesicles.radii
    d = np.linalg.norm(c[:, None] - c[None], axis=2) - r[:, None] - r[None]
    np.fill_diagonal(d, np.inf)
    np.testing.assert_allclose(res.vesicles["nn_membrane_nm"], d.min(1) * sim.tomogram.voxel_size_nm, atol=1e-6)

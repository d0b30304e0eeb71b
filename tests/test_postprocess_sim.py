"""Post-processing on the simulator's tomograms (GT labels blurred as a stand-in probability map)."""

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter
from scipy.spatial import cKDTree

from cryoves.postprocess import fit_spheres, global_threshold, label_vesicles, repair

simulate_mod = pytest.importorskip("cryoves.simulate")


@pytest.fixture(scope="module")
def sim():
    return simulate_mod.simulate(simulate_mod.SimulationConfig.preset("small"), seed=1)


def test_pipeline_on_simulated_tomogram(sim):
    vol = sim.tomogram.asarray()
    gt = sim.vesicles
    vs = gt.voxel_size
    prob = np.clip(gaussian_filter((sim.labels > 0).astype(np.float32), 1.5) * 1.02, 0, 1)
    th = global_threshold(prob, vol)
    labels, _ = label_vesicles(prob, th.threshold, vs)
    table, _ = fit_spheres(vol, labels, vs)
    final, rejected = repair(table, vol)
    assert len(final) + len(rejected) == len(table)  # every removal is recorded
    d, j = cKDTree(gt.centres).query(final.centres)
    nm = vs / 10.0
    matched = d * nm <= 2.0
    assert matched.sum() >= 0.9 * len(gt)
    assert len(np.unique(j[matched])) == matched.sum()  # one-to-one
    dc = d[matched].mean() * nm
    dd = np.mean(np.abs(final.radii[matched] - gt.radii[j[matched]]) / gt.radii[j[matched]])
    assert dc <= 1.0, dc  # target: centre error <= 1 nm
    assert dd <= 0.04, dd  # target: relative diameter error <= 0.04

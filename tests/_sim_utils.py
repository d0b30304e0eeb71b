"""Simulated test data shared by the pipeline, batch and report tests (cached per session)."""

from __future__ import annotations

import functools

import numpy as np
from scipy import ndimage


@functools.lru_cache(maxsize=4)
def small_sim(seed: int = 0, preset: str = "small"):
    from cryoves.simulate import SimulationConfig, simulate

    return simulate(SimulationConfig.preset(preset), seed=seed)


def probability_from_gt(labels: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """A stand-in network output: blurred filled ground-truth balls, in [0, 1]."""
    return np.clip(ndimage.gaussian_filter((labels > 0).astype(np.float32), sigma), 0, 1).astype(np.float32)


@functools.lru_cache(maxsize=1)
def synapse_sim(seed: int = 1):
    """The demo's synapse (96×192×192 at 22 Å, ~70 vesicles, plasma membrane with an active zone)."""
    from cryoves.demo import DEMO_SHAPE, DEMO_VOXEL_SIZE_A
    from cryoves.simulate import SimulationConfig, simulate

    return simulate(SimulationConfig.preset("synapse", shape=DEMO_SHAPE, voxel_size_a=DEMO_VOXEL_SIZE_A), seed=seed)


def write_sim_inputs(sim, folder):
    """Write a simulation's tomogram, stand-in probability map and masks as MRCs into ``folder``."""
    from cryoves.io import write_mrc

    vs = sim.tomogram.voxel_size
    write_mrc(folder / "tomo.mrc", sim.tomogram.asarray(), vs)
    write_mrc(folder / "prob.mrc", probability_from_gt(sim.labels), vs)
    write_mrc(folder / "cyto.mrc", sim.cytoplasm_mask.astype(np.uint8), vs)
    write_mrc(folder / "az.mrc", sim.active_zone_mask.astype(np.uint8), vs)
    return folder


@functools.lru_cache(maxsize=4)
def slab_sim(seed: int = 11, ice_nm: float = 120.0, shape=(96, 96, 96), voxel_size_a: float = 30.0):
    """A synapse in a thin ice slab with vacuum above and below (about 40 % of the slices)."""
    from cryoves.simulate import SimulationConfig, simulate

    return simulate(SimulationConfig.preset("synapse", shape=shape, voxel_size_a=voxel_size_a, ice_thickness_nm=ice_nm),
                    seed=seed)

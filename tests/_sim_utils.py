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

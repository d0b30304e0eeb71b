"""Imported once by the server that forks the post-processing workers (:data:`cryoves.parallel.PRELOAD`).

Runs the labelling and fitting code the workers run on a tiny scene, so that numba's start-up and
the loading of each compiled kernel happen in the server, before it forks: every worker inherits
ready machine code. Without it each worker paid ~0.4 s on its first split (numba's start-up, even
with the kernels in the disk cache), on the critical path of the adaptive step.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from cryoves.postprocess import adaptive, spheres


def _scene() -> tuple[np.ndarray, np.ndarray]:
    """Two touching balls (probability map, float32) and a dark 2-voxel shell around the first
    (intensity, float32, dense = dark)."""
    z, y, x = np.indices((24, 24, 36), dtype=np.float64)
    d1 = np.sqrt((z - 12) ** 2 + (y - 12) ** 2 + (x - 11) ** 2)
    d2 = np.sqrt((z - 12) ** 2 + (y - 12) ** 2 + (x - 25) ** 2)
    prob = np.clip(np.maximum(1 - d1 / 8, 1 - d2 / 8) * 2, 0, 1).astype(np.float32)
    intensity = np.where(np.abs(d1 - 6) < 1, -2.0, 0.0).astype(np.float32)
    return prob, intensity


def warm() -> None:
    prob, intensity = _scene()
    obj = prob > 0.2
    adaptive._try_split(prob, obj, 0.2, 8)
    adaptive._split_by_shape(obj, 1.0, 2.0, 1.5)
    opts = spheres._with_voxel_size(spheres.FitOptions(), 20.0)
    others = (np.array([[12.0, 12.0, 25.0]]), np.array([6.0]))
    for o in (opts, replace(opts, refine="gauss_newton")):
        try:
            spheres._fit(intensity, np.array([12.0, 12.0, 11.0]), 6.0, o, others)
        except spheres.FitFailure:
            pass


warm()

"""Compiled separable resampling (:func:`cryoves.preprocess.resample`).

Along one axis, the anti-aliasing Gaussian followed by linear interpolation is one linear map from
n input voxels to m output voxels in which each output voxel reads a short window of inputs: the
weights are built once per axis (:func:`cryoves.preprocess._axis_weights`) and applied here, only
at the output positions, without the GIL (chunks run on several threads). scipy's Gaussian filters
every input voxel first, and along y it is slow: 26 s of the 300×1024×1024 benchmark's four
resamplings.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def _rows(src, starts, weights, out, acc):  # pragma: no cover - compiled
    """``out[o] = Σ_t weights[o, t] · src[starts[o] + t]`` for the rows of a 2-D plane (contiguous
    along the row: the inner loop runs along it)."""
    m, w = weights.shape
    nx = src.shape[1]
    for o in range(m):
        acc[:] = 0.0
        b = starts[o]
        for t in range(w):
            wt = weights[o, t]
            if wt != 0.0:
                for k in range(nx):
                    acc[k] += wt * src[b + t, k]
        for k in range(nx):
            out[o, k] = acc[k]


@njit(cache=True, nogil=True)
def apply_axis(block, axis, starts, weights):  # pragma: no cover - compiled
    """``out[..., o, ...] = Σ_t weights[o, t] · block[..., starts[o] + t, ...]`` along ``axis`` of a 3-D
    float32 ``block`` (sums in float64, result float32)."""
    nz, ny, nx = block.shape
    m, w = weights.shape
    if axis == 2:
        out = np.empty((nz, ny, m), np.float32)
        for i in range(nz):
            for j in range(ny):
                for o in range(m):
                    s = 0.0
                    b = starts[o]
                    for t in range(w):
                        s += weights[o, t] * block[i, j, b + t]
                    out[i, j, o] = s
        return out
    acc = np.empty(nx, np.float64)
    if axis == 1:
        out = np.empty((nz, m, nx), np.float32)
        for i in range(nz):
            _rows(block[i], starts, weights, out[i], acc)
        return out
    out = np.empty((m, ny, nx), np.float32)
    for j in range(ny):
        _rows(block[:, j, :], starts, weights, out[:, j, :], acc)
    return out

"""Compiled per-label statistics of a label volume (:func:`cryoves.postprocess._common.label_statistics`).

One pass per z-slab, without the GIL, so slabs run on several threads; the merged result equals
``cc3d.statistics`` (counts, bounding boxes, centroids as integer coordinate sums over counts),
which holds the GIL and is single-threaded: four such passes over a 315 M-voxel label volume took
7 s of the full-size benchmark's labelling.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def slab_statistics(labels, z0, n_labels):  # pragma: no cover - compiled
    """Counts, coordinate sums (z, y, x) and per-axis min / max of every label in ``labels`` (a
    z-slab starting at plane ``z0``); labels >= ``n_labels`` are not expected."""
    count = np.zeros(n_labels, np.int64)
    sums = np.zeros((n_labels, 3), np.int64)
    lo = np.full((n_labels, 3), np.iinfo(np.int64).max, np.int64)
    hi = np.full((n_labels, 3), -1, np.int64)
    nz, ny, nx = labels.shape
    for i in range(nz):
        z = z0 + i
        for j in range(ny):
            for k in range(nx):
                lab = labels[i, j, k]
                count[lab] += 1
                sums[lab, 0] += z
                sums[lab, 1] += j
                sums[lab, 2] += k
                if z < lo[lab, 0]:
                    lo[lab, 0] = z
                if z > hi[lab, 0]:
                    hi[lab, 0] = z
                if j < lo[lab, 1]:
                    lo[lab, 1] = j
                if j > hi[lab, 1]:
                    hi[lab, 1] = j
                if k < lo[lab, 2]:
                    lo[lab, 2] = k
                if k > hi[lab, 2]:
                    hi[lab, 2] = k
    return count, sums, lo, hi

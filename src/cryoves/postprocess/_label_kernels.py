"""Compiled loops over label volumes and objects (numba, cached on disk), each checked against the
library code it replaces (tests):

- :func:`slab_statistics`: per-label counts, boxes and centroids of one z-slab, without the GIL, so
  :func:`cryoves.postprocess._common.label_statistics` runs slabs on threads (cc3d.statistics' numbers;
  it holds the GIL: four passes over a 315 M-voxel volume took 7 s of the full-size benchmark);
- :func:`apply_lut`: ``lut[labels]`` per slab for ``relabel``, on threads;
- :func:`big_pieces_per_level`: the split threshold sweep of the adaptive labelling in one union-find pass;
- :func:`reconstruct_by_dilation`: the grey reconstruction behind its h-maxima (scikit-image's result).
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def slab_statistics(labels, z0, n_labels):  # pragma: no cover - compiled
    """Counts, coordinate sums (z, y, x) and per-axis min / max of every label in ``labels`` (a
    z-slab starting at plane ``z0``); labels >= ``n_labels`` are not expected. Background voxels
    (label 0, most of a tomogram) are only counted per plane; their numbers are the slab's minus
    the labelled voxels' (the same integers)."""
    count = np.zeros(n_labels, np.int64)
    sums = np.zeros((n_labels, 3), np.int64)
    lo = np.full((n_labels, 3), np.iinfo(np.int64).max, np.int64)
    hi = np.full((n_labels, 3), -1, np.int64)
    nz, ny, nx = labels.shape
    per_z = np.zeros(nz, np.int64)  # labelled voxels per plane of each axis
    per_y = np.zeros(ny, np.int64)
    per_x = np.zeros(nx, np.int64)
    for i in range(nz):
        z = z0 + i
        for j in range(ny):
            for k in range(nx):
                lab = labels[i, j, k]
                if lab == 0:
                    continue
                count[lab] += 1
                sums[lab, 0] += z
                sums[lab, 1] += j
                sums[lab, 2] += k
                per_z[i] += 1
                per_y[j] += 1
                per_x[k] += 1
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
    if n_labels > 0:
        count[0] = nz * ny * nx - count.sum()
        if count[0] > 0:
            sums[0, 0] = ny * nx * (nz * z0 + nz * (nz - 1) // 2) - sums[:, 0].sum()
            sums[0, 1] = nz * nx * (ny * (ny - 1) // 2) - sums[:, 1].sum()
            sums[0, 2] = nz * ny * (nx * (nx - 1) // 2) - sums[:, 2].sum()
            for axis, per, full, off in ((0, per_z, ny * nx, z0), (1, per_y, nz * nx, 0), (2, per_x, nz * ny, 0)):
                for a in range(per.shape[0]):
                    if per[a] < full:
                        lo[0, axis] = min(lo[0, axis], a + off)
                        hi[0, axis] = max(hi[0, axis], a + off)
    return count, sums, lo, hi


@njit(cache=True, nogil=True)
def _root(parent, i):  # pragma: no cover - compiled
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


@njit(cache=True, nogil=True)
def big_pieces_per_level(prob, mask, levels, min_piece):  # pragma: no cover - compiled
    """For each threshold of ``levels`` (float64, ascending): how many 6-connected components of
    ``(prob > t) & mask`` hold at least ``min_piece`` voxels (``prob`` compared in float64).

    One pass from the highest threshold down: voxels join in order of decreasing value and merge
    with their neighbours already in (union-find), instead of one labelling per threshold."""
    nz, ny, nx = prob.shape
    n = nz * ny * nx
    flat_p = prob.ravel()
    flat_m = mask.ravel()
    m = 0
    for i in range(n):
        if flat_m[i]:
            m += 1
    idx = np.empty(m, np.int64)
    vals = np.empty(m, np.float64)
    m = 0
    for i in range(n):
        if flat_m[i]:
            idx[m] = i
            vals[m] = np.float64(flat_p[i])
            m += 1
    order = np.argsort(-vals, kind="mergesort")
    parent = np.full(n, -1, np.int64)  # -1: not in the set yet
    size = np.zeros(n, np.int64)
    counts = np.zeros(len(levels), np.int64)
    big = 0
    k = 0
    for li in range(len(levels) - 1, -1, -1):
        t = levels[li]
        while k < m and vals[order[k]] > t:
            v = idx[order[k]]
            k += 1
            parent[v] = v
            size[v] = 1
            if min_piece <= 1:
                big += 1
            z = v // (ny * nx)
            y = (v // nx) % ny
            x = v % nx
            for d in range(6):
                if d == 0:
                    if z == 0:
                        continue
                    w = v - ny * nx
                elif d == 1:
                    if z == nz - 1:
                        continue
                    w = v + ny * nx
                elif d == 2:
                    if y == 0:
                        continue
                    w = v - nx
                elif d == 3:
                    if y == ny - 1:
                        continue
                    w = v + nx
                elif d == 4:
                    if x == 0:
                        continue
                    w = v - 1
                else:
                    if x == nx - 1:
                        continue
                    w = v + 1
                if parent[w] < 0:
                    continue
                a = _root(parent, v)
                b = _root(parent, w)
                if a == b:
                    continue
                if size[a] >= min_piece:
                    big -= 1
                if size[b] >= min_piece:
                    big -= 1
                if size[a] < size[b]:
                    a, b = b, a
                parent[b] = a
                size[a] += size[b]
                if size[a] >= min_piece:
                    big += 1
        counts[li] = big
    return counts


@njit(cache=True, nogil=True)
def reconstruct_by_dilation(seed, mask):  # pragma: no cover - compiled
    """Grey-scale reconstruction by dilation of ``seed`` under ``mask`` (float64, seed <= mask,
    26-connected): each voxel gets the highest value, over paths from any voxel, of the seed
    there capped by the lowest mask value on the way. Vincent's hybrid algorithm (a forward and a
    backward raster pass, then a queue for what they miss); every result is a seed or mask value,
    so it equals any exact implementation bit for bit."""
    nz, ny, nx = seed.shape
    rec = seed.copy()
    # the 13 neighbours before a voxel in raster order (the other 13 are their mirror images)
    offs = np.empty((13, 3), np.int64)
    k = 0
    for dz in range(-1, 2):
        for dy in range(-1, 2):
            for dx in range(-1, 2):
                if (dz, dy, dx) < (0, 0, 0):
                    offs[k, 0], offs[k, 1], offs[k, 2] = dz, dy, dx
                    k += 1
    for z in range(nz):
        for y in range(ny):
            for x in range(nx):
                v = rec[z, y, x]
                for j in range(13):
                    zz, yy, xx = z + offs[j, 0], y + offs[j, 1], x + offs[j, 2]
                    if 0 <= zz < nz and 0 <= yy < ny and 0 <= xx < nx and rec[zz, yy, xx] > v:
                        v = rec[zz, yy, xx]
                rec[z, y, x] = v if v < mask[z, y, x] else mask[z, y, x]
    queue = np.empty(nz * ny * nx, np.int64)  # a voxel is queued at most once at a time
    queued = np.zeros((nz, ny, nx), np.bool_)
    head = tail = 0
    n = nz * ny * nx
    for z in range(nz - 1, -1, -1):
        for y in range(ny - 1, -1, -1):
            for x in range(nx - 1, -1, -1):
                v = rec[z, y, x]
                for j in range(13):
                    zz, yy, xx = z - offs[j, 0], y - offs[j, 1], x - offs[j, 2]
                    if 0 <= zz < nz and 0 <= yy < ny and 0 <= xx < nx and rec[zz, yy, xx] > v:
                        v = rec[zz, yy, xx]
                v = v if v < mask[z, y, x] else mask[z, y, x]
                rec[z, y, x] = v
                for j in range(13):
                    zz, yy, xx = z - offs[j, 0], y - offs[j, 1], x - offs[j, 2]
                    if (0 <= zz < nz and 0 <= yy < ny and 0 <= xx < nx and rec[zz, yy, xx] < v
                            and rec[zz, yy, xx] < mask[zz, yy, xx]):
                        if not queued[z, y, x]:
                            queued[z, y, x] = True
                            queue[tail % n] = (z * ny + y) * nx + x
                            tail += 1
                        break
    while head < tail:
        p = queue[head % n]
        head += 1
        z = p // (ny * nx)
        y = (p // nx) % ny
        x = p % nx
        queued[z, y, x] = False
        v = rec[z, y, x]
        for dz in range(-1, 2):
            for dy in range(-1, 2):
                for dx in range(-1, 2):
                    zz, yy, xx = z + dz, y + dy, x + dx
                    if not (0 <= zz < nz and 0 <= yy < ny and 0 <= xx < nx):
                        continue
                    r = rec[zz, yy, xx]
                    mq = mask[zz, yy, xx]
                    if r < v and r != mq:
                        rec[zz, yy, xx] = v if v < mq else mq
                        if not queued[zz, yy, xx]:
                            queued[zz, yy, xx] = True
                            queue[tail % n] = (zz * ny + yy) * nx + xx
                            tail += 1
    return rec


@njit(cache=True, nogil=True)
def apply_lut(labels, lut, out):  # pragma: no cover - compiled
    """``out[...] = lut[labels]`` for a 3-D block; False (and ``out`` partly written) when a label
    lies outside ``lut``."""
    n = lut.shape[0]
    nz, ny, nx = labels.shape
    for i in range(nz):
        for j in range(ny):
            for k in range(nx):
                v = labels[i, j, k]
                if v < 0 or v >= n:
                    return False
                out[i, j, k] = lut[v]
    return True

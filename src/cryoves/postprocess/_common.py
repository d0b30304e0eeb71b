"""Helpers shared by the post-processing steps: the rejected-vesicles table and unit checks."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd

from cryoves import parallel
from cryoves.errors import InputError, ParameterError, VoxelSizeError
from cryoves.vesicles import REJECTED_COLUMNS  # the columns of cryoves.vesicles.RejectedTable


def rejected_frame(
    ids: Iterable[int] = (),
    centres: np.ndarray | None = None,
    radii: Iterable[float] | None = None,
    step: str = "",
    reasons: str | Iterable[str] = "",
) -> pd.DataFrame:
    """Build a rejected-vesicles table; ``centres`` (N, 3) in voxels (z, y, x), ``radii`` in voxels."""
    ids = np.asarray(list(ids), dtype=np.int64)
    n = len(ids)
    c = np.full((n, 3), np.nan) if centres is None else np.asarray(centres, dtype=float).reshape(n, 3)
    r = np.full(n, np.nan) if radii is None else np.asarray(list(radii), dtype=float).reshape(n)
    reasons = [reasons] * n if isinstance(reasons, str) else list(reasons)
    return pd.DataFrame(
        {
            "id": ids,
            "z": c[:, 0],
            "y": c[:, 1],
            "x": c[:, 2],
            "radius": r,
            "step": pd.Series([step] * n, dtype="str"),
            "reason": pd.Series(reasons, dtype="str"),
        },
        columns=REJECTED_COLUMNS,
    )


def rejected_rows(rows: Iterable[tuple[int, np.ndarray, float, str]], step: str) -> pd.DataFrame:
    """A rejected-vesicles table from (id, centre (z, y, x), radius, reason) rows, voxels: one
    frame for many rows (a frame per row costs ~2 ms each)."""
    rows = list(rows)
    if not rows:
        return rejected_frame()
    ids, centres, radii, reasons = zip(*rows)
    return rejected_frame(ids, np.array(centres, dtype=float), radii, step, reasons)


def concat_rejected(frames: Iterable[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate rejected tables, keeping the column order (an empty list gives an empty table)."""
    frames = [f for f in frames if len(f)]
    if not frames:
        return rejected_frame()
    out = pd.concat(frames, ignore_index=True)
    return out[REJECTED_COLUMNS]


def check_voxel_size(voxel_size_a: float) -> float:
    """Validate a voxel size in Å and return it as float."""
    try:
        v = float(voxel_size_a)
    except (TypeError, ValueError) as exc:
        raise VoxelSizeError(f"voxel size must be a number in Å, got {voxel_size_a!r}") from exc
    if not np.isfinite(v) or v <= 0:
        raise VoxelSizeError(f"voxel size must be a positive number of Å, got {voxel_size_a!r}; pass --voxel-size")
    return v


def check_volume(arr: np.ndarray, name: str) -> np.ndarray:
    """Return ``arr`` as an ndarray after checking it is a 3D (z, y, x) volume."""
    arr = np.asarray(arr)
    if arr.ndim != 3:
        raise InputError(f"{name} must be a 3D (z, y, x) volume, got shape {arr.shape}")
    if arr.size == 0:
        raise InputError(f"{name} is empty (shape {arr.shape})")
    return arr


#: Voxels per slab of :func:`label_statistics` (one slab per thread at a time).
STATS_SLAB_VOXELS = 4 << 20


def label_statistics(labels: np.ndarray) -> dict[str, Any]:
    """``cc3d.statistics(labels)`` (voxel counts, bounding boxes, centroids, label 0 included; None /
    NaN for absent labels), computed slab by slab on several threads by a compiled kernel: the
    same numbers (counts and boxes exact, centroids = integer coordinate sums / counts)."""
    from cryoves.postprocess import _label_kernels

    labels = np.ascontiguousarray(labels)
    if labels.ndim != 3 or labels.dtype.kind not in "iu" or (labels.dtype.kind == "i" and labels.size and labels.min() < 0):
        raise ParameterError(f"label statistics need a 3-D volume of labels >= 0, got {labels.dtype} {labels.shape}")
    step = max(1, STATS_SLAB_VOXELS // max(1, labels[:1].size))
    starts = range(0, labels.shape[0], step)
    n = int(max(parallel.thread_map(lambda z: int(labels[z : z + step].max()), starts), default=0)) + 1
    parts = parallel.thread_map(lambda z: _label_kernels.slab_statistics(labels[z : z + step], z, n), starts)
    count = np.sum([p[0] for p in parts], axis=0) if parts else np.zeros(n, np.int64)
    sums = np.sum([p[1] for p in parts], axis=0) if parts else np.zeros((n, 3), np.int64)
    lo = np.min([p[2] for p in parts], axis=0) if parts else np.zeros((n, 3), np.int64)
    hi = np.max([p[3] for p in parts], axis=0) if parts else np.zeros((n, 3), np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        centroids = sums / count[:, None]
    boxes = [tuple(slice(int(a), int(b) + 1) for a, b in zip(lo[i], hi[i], strict=True)) if count[i] else None
             for i in range(n)]
    return {"voxel_counts": count.astype(np.uint64), "bounding_boxes": boxes, "centroids": centroids}


def relabel(labels: np.ndarray, lut: np.ndarray, out: np.ndarray | None = None, slab: int = 16) -> np.ndarray:
    """``lut[labels]`` computed slab by slab into ``out`` (default: a new array of ``lut``'s dtype;
    ``out=labels`` works in place): no full-volume temporaries (the index array alone would be
    8 bytes per voxel)."""
    from cryoves.postprocess import _label_kernels

    if out is None:
        out = np.empty(labels.shape, lut.dtype)
    if labels.ndim != 3 or labels.dtype.kind not in "iu" or out.dtype != lut.dtype:
        for z in range(0, labels.shape[0], slab):
            out[z : z + slab] = lut[labels[z : z + slab]]
        return out
    # compiled, on threads: numpy's gather first widens every index to 8 bytes, on one core
    # (2.9 s for the 315 M-voxel labels of the full-size benchmark)
    ok = parallel.thread_map(lambda z: _label_kernels.apply_lut(labels[z : z + slab], lut, out[z : z + slab]),
                             range(0, labels.shape[0], slab))
    if not all(ok):
        raise IndexError(f"a label lies outside the lookup table of {len(lut)} entries")
    return out


def bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """The smallest box holding every True voxel of ``mask`` (empty slices for an empty mask)."""
    out = []
    for ax in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != ax)))
        out.append(slice(int(hit[0]), int(hit[-1]) + 1) if hit.size else slice(0, 0))
    return tuple(out)


def check_same_shape(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise InputError(f"{name_a} shape {a.shape} differs from {name_b} shape {b.shape}; resample one to the other")


def sphere_pairs(centres: np.ndarray, radii: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Intersecting sphere pairs (i < j, distance < r_i + r_j): (i, j, distance, duplicate).

    ``duplicate`` marks pairs where one centre lies inside the other sphere (distance < max radius),
    i.e. two fits that claim the same vesicle. Lengths in voxels.
    """
    from scipy.spatial import cKDTree

    centres = np.asarray(centres, float).reshape(-1, 3)
    radii = np.asarray(radii, float).reshape(-1)
    empty = np.zeros(0, int)
    if len(radii) < 2:
        return empty, empty, np.zeros(0), np.zeros(0, bool)
    pairs = cKDTree(centres).query_pairs(2.0 * float(radii.max()), output_type="ndarray")
    if len(pairs) == 0:
        return empty, empty, np.zeros(0), np.zeros(0, bool)
    i, j = pairs[:, 0], pairs[:, 1]
    d = np.linalg.norm(centres[i] - centres[j], axis=1)
    hit = d < radii[i] + radii[j]
    i, j, d = i[hit], j[hit], d[hit]
    return i, j, d, d < np.maximum(radii[i], radii[j])

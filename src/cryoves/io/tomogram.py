"""The ``Tomogram`` value and voxel-size validation.

Axis order is (z, y, x) everywhere, as ``mrcfile`` returns MRC data. Voxel sizes and origins are
stored per axis in the same order, in Ångström.
"""

from __future__ import annotations

import contextlib
import logging
import math
import mmap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cryoves import parallel
from cryoves.errors import InputError, VoxelSizeError

log = logging.getLogger(__name__)

#: Plausible voxel sizes for cryo-ET tomograms (Å). Outside this range a header is almost
#: certainly wrong (e.g. nm written as Å, or the 1.0 Å "unset" default).
MIN_VOXEL_SIZE_A = 0.5
MAX_VOXEL_SIZE_A = 100.0
#: Relative difference between axes above which a voxel size counts as anisotropic.
ANISOTROPY_TOLERANCE = 0.01


def _fmt(v: float) -> str:
    return f"{v:g}"


def validate_voxel_size(voxel_size: Any, source: str = "header") -> tuple[float, float, float]:
    """Return ``(vz, vy, vx)`` in Å, or raise :class:`VoxelSizeError` naming the value and the fix.

    ``voxel_size`` is a scalar (isotropic) or a 3-sequence in (z, y, x) order. Refused: missing,
    0, negative, NaN/Inf, exactly 1.0 Å (the MRC "unset" default), and values outside
    [0.5, 100] Å. Anisotropic sizes are accepted here and reported with a warning; callers that
    need an isotropic grid check :attr:`Tomogram.is_isotropic`.
    """
    hint = "give the true size with --voxel-size ANGSTROM"
    if voxel_size is None:
        raise VoxelSizeError(f"no voxel size in the {source}; {hint}")
    values = np.atleast_1d(np.asarray(voxel_size, dtype=float)).ravel()
    if values.size == 1:
        values = np.repeat(values, 3)
    if values.size != 3:
        raise VoxelSizeError(f"voxel size must be one value or three (z, y, x), got {voxel_size!r}")
    for v in values:
        if not math.isfinite(v):
            raise VoxelSizeError(f"voxel size {_fmt(v)} Å in the {source} is not a number; {hint}")
        if v <= 0:
            raise VoxelSizeError(f"voxel size {_fmt(v)} Å in the {source} must be positive; {hint}")
        if v == 1.0:
            raise VoxelSizeError(
                f"voxel size 1 Å in the {source} looks like the unset MRC default; {hint}"
            )
        if v < MIN_VOXEL_SIZE_A:
            raise VoxelSizeError(
                f"voxel size {_fmt(v)} Å in the {source} is below {MIN_VOXEL_SIZE_A} Å "
                f"(nm written as Å?); {hint}"
            )
        if v > MAX_VOXEL_SIZE_A:
            raise VoxelSizeError(
                f"voxel size {_fmt(v)} Å in the {source} is above {MAX_VOXEL_SIZE_A} Å "
                f"(wrong units?); {hint}"
            )
    vz, vy, vx = (float(v) for v in values)
    if max(values) / min(values) - 1 > ANISOTROPY_TOLERANCE:
        log.warning(
            "anisotropic voxel size (z, y, x) = (%s, %s, %s) Å from the %s",
            _fmt(vz), _fmt(vy), _fmt(vx), source,
        )
    return vz, vy, vx


def resolve_voxel_size(
    override: Any,
    stored: tuple[float, float, float] | None,
    *,
    where: str,
    validate: bool,
    notes: list[str],
) -> tuple[float, float, float]:
    """The voxel size a reader uses: the ``--voxel-size`` override, else the stored one (validated).

    ``where`` names the stored value ("header of tomo.mrc"); a missing stored value is an error
    when validating and NaN otherwise (report-only reads such as ``cryoves info``).
    """
    if override is not None:
        vs = validate_voxel_size(override, source="--voxel-size option")
        if stored is not None:
            notes.append(f"{where.split(' of ')[0]} voxel size (z, y, x) {stored} Å overridden by {vs} Å")
        return vs
    if stored is None:
        if validate:
            raise VoxelSizeError(f"no voxel size in the {where}; pass --voxel-size ANGSTROM")
        notes.append(f"no voxel size in the {where}")
        return (float("nan"),) * 3
    return validate_voxel_size(stored, source=where) if validate else stored


def validate_volume(data: Any, source: str = "volume", check_finite: bool = True) -> None:
    """Raise :class:`InputError` for arrays that cannot be a tomogram (not 3-D, empty, NaN/Inf)."""
    shape = tuple(getattr(data, "shape", ()))
    if len(shape) != 3:
        kind = {0: "a scalar", 1: "1-D", 2: "a 2-D image"}.get(len(shape), f"{len(shape)}-D")
        raise InputError(
            f"{source} is {kind} with shape {shape}; a tomogram must be 3-D (z, y, x): give the reconstructed "
            "volume, one tomogram per file"
        )
    if 0 in shape:
        raise InputError(f"{source} is empty (shape {shape})")
    if 1 in shape:
        raise InputError(
            f"{source} has shape {shape}, a single section or line, i.e. a 2-D image; "
            "a tomogram must be 3-D (z, y, x) with at least 2 voxels per axis"
        )
    dtype = np.dtype(data.dtype)
    if dtype.kind not in "iuf":
        raise InputError(f"{source} has unsupported data type {dtype}; expected integers or floats")
    if check_finite and dtype.kind == "f":
        bad = _count_nonfinite(data)
        if bad:
            raise InputError(
                f"{source} contains {bad} NaN/Inf voxels; repair or crop the tomogram first"
            )


def _count_nonfinite(data: Any) -> int:
    """Count NaN/Inf voxels slab by slab (memory-mapped data is never loaded whole)."""
    return value_stats(data)["nonfinite"]


def _slab_depth(shape: tuple[int, ...], itemsize: int, budget_bytes: int = 4 * 2**20) -> int:
    plane = int(np.prod(shape[1:])) * max(itemsize, 4)
    return max(1, budget_bytes // max(plane, 1))


def value_stats(data: Any) -> dict[str, Any]:
    """Min, max, mean, std of the finite voxels and the number of NaN/Inf voxels.

    Computed slab by slab along z (≈4 MiB at a time, one slab per thread), so memory-mapped or
    lazy (zarr) volumes are never loaded whole and no full-size temporary is made. Returns a dict
    with keys ``min, max, mean, std, nonfinite`` (``min``/``max``/``mean``/``std`` are NaN when no
    voxel is finite).
    """
    shape = tuple(int(s) for s in data.shape)
    dtype = np.dtype(data.dtype)
    depth = _slab_depth(shape, dtype.itemsize)
    def slab(z0: int) -> tuple[float, float, int, float, float, int]:
        block = np.asarray(data[z0 : z0 + depth])
        bad = 0
        if dtype.kind == "f":
            finite = np.isfinite(block)
            nfin = int(np.count_nonzero(finite))
            bad = int(block.size - nfin)
            if nfin < block.size:
                block = block[finite]
        if block.size == 0:
            return np.inf, -np.inf, 0, 0.0, 0.0, bad
        b64 = block.astype(np.float64, copy=False)
        return float(b64.min()), float(b64.max()), b64.size, float(b64.sum()), float(np.square(b64).sum()), bad

    lo, hi, n, total, total2, bad = np.inf, -np.inf, 0, 0.0, 0.0, 0
    # slabs on several threads, combined in z order: the numbers of a sequential pass
    for s_lo, s_hi, s_n, s_total, s_total2, s_bad in parallel.thread_map(slab, range(0, shape[0] if shape else 0, depth)):
        lo, hi, n, bad = min(lo, s_lo), max(hi, s_hi), n + s_n, bad + s_bad
        total += s_total
        total2 += s_total2
    if n == 0:
        return {"min": float("nan"), "max": float("nan"), "mean": float("nan"), "std": float("nan"),
                "nonfinite": bad}
    mean = total / n
    std = math.sqrt(max(total2 / n - mean * mean, 0.0))
    return {"min": lo, "max": hi, "mean": mean, "std": std, "nonfinite": bad}


@dataclass
class Tomogram:
    """A 3-D volume with its geometry.

    Attributes:
        data: array-like of shape (z, y, x): a numpy array, a read-only memory map, or a lazy
            (zarr/dask) array. Values are in the file's units; no normalisation is applied.
        voxel_size: (vz, vy, vx) in Å.
        origin: (oz, oy, ox) in Å, as stored in the file header (0 if absent).
        path: the source file, if any.
        header_notes: problems found in the header (reported by ``cryoves info``).
    """

    data: Any
    voxel_size: tuple[float, float, float]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    path: Path | None = None
    header_notes: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.data.shape)  # type: ignore[return-value]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.data.dtype)

    @property
    def is_isotropic(self) -> bool:
        v = np.asarray(self.voxel_size)
        return bool(v.max() / v.min() - 1 <= ANISOTROPY_TOLERANCE)

    @property
    def voxel_size_a(self) -> float:
        """Isotropic voxel size in Å (the x size; see :attr:`is_isotropic`)."""
        return float(self.voxel_size[2])

    @property
    def voxel_size_nm(self) -> float:
        return self.voxel_size_a / 10.0

    def asarray(self, dtype: Any = np.float32) -> np.ndarray:
        """Load the whole volume into memory as ``dtype`` (float32 by default)."""
        return np.asarray(self.data, dtype=dtype)

    def release_pages(self) -> None:
        """Drop this process's resident pages of a memory-mapped file (see :func:`release_pages`)."""
        release_pages(self.data)


def release_pages(arr: Any) -> None:
    """Drop this process's resident pages of a memory-mapped array (read again from the file when
    needed), so that a pass over a whole tomogram does not keep it in memory; no-op for arrays in
    memory."""
    mm = getattr(arr, "_mmap", None)
    if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        with contextlib.suppress(OSError, ValueError):
            mm.madvise(mmap.MADV_DONTNEED)

"""Readers and writers: tomograms (MRC/REC, TIFF, OME-Zarr), IMOD models, tables, pyto labels."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from cryoves.errors import FormatError, InputError, VoxelSizeError
from cryoves.io.mrc import read_mrc, write_mrc
from cryoves.io.tomogram import Tomogram, validate_volume, validate_voxel_size, value_stats

log = logging.getLogger(__name__)

MRC_SUFFIXES = {".mrc", ".rec", ".st", ".ali", ".map", ".mrcs", ".nad"}
TIFF_SUFFIXES = {".tif", ".tiff"}
ZARR_SUFFIXES = {".zarr", ".ome.zarr"}


def is_volume_path(path: str | Path) -> bool:
    """True when ``path``'s name says it is a volume (MRC/REC, TIFF or OME-Zarr)."""
    path = Path(path)
    suffix = path.suffix.lower()
    return suffix in MRC_SUFFIXES or suffix in TIFF_SUFFIXES or suffix == ".zarr"


def read_tomogram(path: str | Path, voxel_size: Any = None, **kwargs: Any) -> Tomogram:
    """Read a tomogram from MRC/REC, TIFF or OME-Zarr, choosing the reader from the name.

    ``voxel_size`` (Å) overrides (or, for TIFF without metadata, supplies) the voxel size.
    Keyword arguments (``validate=False``; ``mmap`` for MRC) go to the reader.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"file not found: {path}; check the path")
    suffix = path.suffix.lower()
    if path.is_dir() or suffix == ".zarr":
        from cryoves.io.zarr import read_ome_zarr

        return read_ome_zarr(path, voxel_size=voxel_size, **kwargs)
    if suffix in TIFF_SUFFIXES:
        from cryoves.io.tiff import read_tiff

        kwargs.pop("mmap", None)
        return read_tiff(path, voxel_size=voxel_size, **kwargs)
    if suffix in MRC_SUFFIXES or path.name.lower().endswith(".rec.nad"):
        return read_mrc(path, voxel_size=voxel_size, **kwargs)
    raise FormatError(
        f"unknown tomogram format '{suffix}' for {path}; use .mrc/.rec, .tif/.tiff or an OME-Zarr folder"
    )


def read_label_volume(path: str | Path, voxel_size: Any = None) -> tuple[np.ndarray, float]:
    """Read an instance label volume (MRC/TIFF/OME-Zarr) → (integer array (z, y, x), voxel size Å).

    Float-typed files (labels stored as float32) must hold whole, non-negative numbers. The voxel
    size is the header's x size unless ``voxel_size`` (Å) is given; an anisotropic header is
    reported as a warning. The array is loaded into memory as uint16/uint32 (int64 if needed).
    """
    tomo = read_tomogram(path, voxel_size=voxel_size, validate=False)
    data = tomo.data
    validate_volume(data, source=f"label volume {path}", check_finite=False)
    vs = validate_voxel_size(tomo.voxel_size, source=f"header of {Path(path).name}") if voxel_size is None \
        else tomo.voxel_size
    arr = np.asarray(data)
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all() or (arr != np.round(arr)).any():
            raise FormatError(
                f"{path} is not a label volume: it holds non-integer or NaN values; give an instance-label volume "
                "(whole numbers, 0 = background)"
            )
        arr = arr.astype(np.int64)
    elif arr.dtype.kind not in "iu":
        raise FormatError(f"{path} is not a label volume: data type {arr.dtype}; give an integer instance-label volume")
    if arr.size and arr.min() < 0:
        raise FormatError(
            f"{path} is not a label volume: it holds negative values (min {arr.min()}); give labels >= 0 (0 = background)"
        )
    top = int(arr.max()) if arr.size else 0
    target = np.uint16 if top <= np.iinfo(np.uint16).max else np.uint32 if top <= np.iinfo(np.uint32).max else np.int64
    if not Tomogram(arr, vs).is_isotropic:
        log.warning("%s: anisotropic voxel size %s Å; using the x size %g Å", path, vs, vs[2])
    return arr.astype(target, copy=False), float(vs[2])


def tomogram_info(path: str | Path, voxel_size: Any = None) -> dict[str, Any]:
    """Describe a tomogram without loading it whole: the data behind ``cryoves info``.

    Returns a dict with ``path, format, shape (z, y, x), dtype, voxel_size_A (z, y, x), origin_A,
    value range/mean/std (computed slab-wise), nonfinite, memory (bytes on disk as stored and as
    float32 in memory), problems`` (header and data problems as one-line strings; empty when the
    file is usable). Raises only when the file cannot be opened at all.
    """
    path = Path(path)
    tomo = read_tomogram(path, voxel_size=voxel_size, validate=False)
    problems = list(tomo.header_notes)
    try:
        validate_voxel_size(tomo.voxel_size, source=f"header of {path.name}")
    except VoxelSizeError as exc:
        problems.append(str(exc))
    shape = tomo.shape
    stats: dict[str, Any] = {"min": None, "max": None, "mean": None, "std": None, "nonfinite": 0}
    try:
        validate_volume(tomo.data, source=path.name, check_finite=False)
    except InputError as exc:
        problems.append(str(exc))
    if len(shape) >= 1 and 0 not in shape:
        stats = value_stats(tomo.data)
    if stats["nonfinite"]:
        problems.append(f"{stats['nonfinite']} NaN/Inf voxels")
    v = np.asarray(tomo.voxel_size, dtype=float)
    if np.all(np.isfinite(v)) and np.all(v > 0) and v.max() / v.min() - 1 > 0.01:
        problems.append(f"anisotropic voxel size (z, y, x) = {tuple(float(x) for x in v)} Å")
    n = int(np.prod(shape))
    fmt = "OME-Zarr" if path.is_dir() or path.suffix.lower() == ".zarr" else (
        "TIFF" if path.suffix.lower() in TIFF_SUFFIXES else "MRC")
    return {
        "path": str(path),
        "format": fmt,
        "shape": list(shape),
        "dtype": str(tomo.dtype),
        "voxel_size_A": [float(x) for x in tomo.voxel_size],
        "origin_A": [float(x) for x in tomo.origin],
        "min": stats["min"],
        "max": stats["max"],
        "mean": stats["mean"],
        "std": stats["std"],
        "nonfinite": stats["nonfinite"],
        "bytes_stored": n * tomo.dtype.itemsize,
        "bytes_float32": n * 4,
        "problems": problems,
    }


def format_tomogram_info(info: dict[str, Any]) -> str:
    """Human-readable text for a :func:`tomogram_info` dict (what ``cryoves info`` prints)."""

    def num(v: Any) -> str:
        return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.6g}"

    vs = info["voxel_size_A"]
    lines = [
        f"file:        {info['path']} ({info['format']})",
        f"shape:       {' x '.join(str(s) for s in info['shape'])} (z, y, x)",
        f"dtype:       {info['dtype']}",
        f"voxel size:  {', '.join(num(v) for v in vs)} Å (z, y, x) = {num(vs[2] / 10)} nm",
        f"origin:      {', '.join(num(v) for v in info['origin_A'])} Å (z, y, x)",
        f"values:      min {num(info['min'])}, max {num(info['max'])}, mean {num(info['mean'])}, "
        f"std {num(info['std'])}",
        f"memory:      {info['bytes_stored'] / 2**20:.1f} MiB as stored, "
        f"{info['bytes_float32'] / 2**20:.1f} MiB as float32",
    ]
    if info["problems"]:
        lines.append("problems:")
        lines.extend(f"  - {p}" for p in info["problems"])
    else:
        lines.append("problems:    none")
    return "\n".join(lines)


__all__ = [
    "format_tomogram_info",
    "Tomogram",
    "is_volume_path",
    "read_label_volume",
    "read_mrc",
    "read_tomogram",
    "tomogram_info",
    "validate_volume",
    "validate_voxel_size",
    "value_stats",
    "write_mrc",
]

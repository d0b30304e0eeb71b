"""Readers and writers: tomograms (MRC/REC, TIFF, OME-Zarr), IMOD models, tables, pyto labels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cryoves.errors import FormatError, InputError
from cryoves.io.mrc import read_mrc, write_mrc
from cryoves.io.tomogram import Tomogram, validate_volume, validate_voxel_size

MRC_SUFFIXES = {".mrc", ".rec", ".st", ".ali", ".map", ".mrcs", ".nad"}
TIFF_SUFFIXES = {".tif", ".tiff"}


def read_tomogram(path: str | Path, voxel_size: Any = None, **kwargs: Any) -> Tomogram:
    """Read a tomogram from MRC/REC, TIFF or OME-Zarr, choosing the reader from the name.

    ``voxel_size`` (Å) overrides (or, for TIFF without metadata, supplies) the voxel size.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"file not found: {path}")
    suffix = path.suffix.lower()
    if path.is_dir() or suffix == ".zarr":
        from cryoves.io.zarr import read_ome_zarr

        return read_ome_zarr(path, voxel_size=voxel_size, **kwargs)
    if suffix in TIFF_SUFFIXES:
        from cryoves.io.tiff import read_tiff

        return read_tiff(path, voxel_size=voxel_size, **kwargs)
    if suffix in MRC_SUFFIXES or path.name.lower().endswith(".rec.nad"):
        return read_mrc(path, voxel_size=voxel_size, **kwargs)
    raise FormatError(
        f"unknown tomogram format '{suffix}' for {path}; use .mrc/.rec, .tif/.tiff or an OME-Zarr folder"
    )


__all__ = [
    "Tomogram",
    "read_mrc",
    "read_tomogram",
    "validate_volume",
    "validate_voxel_size",
    "write_mrc",
]

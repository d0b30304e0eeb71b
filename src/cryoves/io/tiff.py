"""TIFF stacks: reading (memory-mapped when the file allows it) and writing with the voxel size.

A 3-D stack is read as (z, y, x) = (pages, rows, columns). The voxel size is taken, in this
order, from cryoves' own JSON description (``voxel_size_angstrom``, written by :func:`write_tiff`),
ImageJ metadata (``spacing`` for z, the X/YResolution tags for y/x, ``unit``), or OME-XML
``PhysicalSizeX/Y/Z``. Files without any need an explicit ``voxel_size``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from cryoves.atomic import atomic_path
from cryoves.errors import FormatError, InputError, VoxelSizeError
from cryoves.io.tomogram import Tomogram, resolve_voxel_size, validate_volume

log = logging.getLogger(__name__)

#: length units → Å
_UNIT_TO_A = {
    "a": 1.0, "å": 1.0, "angstrom": 1.0, "\\u00c5": 1.0,
    "nm": 10.0, "nanometer": 10.0,
    "um": 1e4, "µm": 1e4, "μm": 1e4, "micron": 1e4, "micrometer": 1e4, "\\u00b5m": 1e4,
    "mm": 1e7, "millimeter": 1e7,
}
_IMAGEJ_DTYPES = {np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.float32)}


def unit_to_angstrom(unit: str | None) -> float | None:
    """Factor that converts a length in ``unit`` to Å (None when the unit is unknown)."""
    if not unit:
        return None
    return _UNIT_TO_A.get(str(unit).strip().lower())


def read_tiff(path: str | Path, voxel_size: Any = None, *, validate: bool = True) -> Tomogram:
    """Read a 3-D TIFF stack as a :class:`Tomogram` (z, y, x).

    ``voxel_size`` (Å, scalar or (z, y, x)) overrides the metadata. Uncompressed contiguous files
    are memory-mapped; others are read into memory. ``validate=False`` skips the data and voxel
    size checks and lists problems in ``header_notes``.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"file not found: {path}; check the path")
    notes: list[str] = []
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            shape = tuple(int(s) for s in series.shape)
            header_vs = _voxel_size_from_metadata(tif, notes)
            data: Any = None
            try:
                data = tifffile.memmap(path, mode="r")
            except (ValueError, OSError):
                data = None
            if data is None or tuple(data.shape) != shape:
                data = series.asarray()
    except Exception as exc:  # broad on purpose: tifffile raises many types for damaged files
        if isinstance(exc, (InputError, VoxelSizeError)):
            raise
        raise FormatError(f"{path} is not a readable TIFF file: {exc}") from exc
    if data.ndim > 3:
        squeezed = tuple(s for s in data.shape if s != 1)
        if len(squeezed) == 3:
            data = data.reshape(squeezed)
    if data.ndim != 3:
        msg = f"{path} holds a {data.ndim}-D image with shape {data.shape}; a tomogram must be 3-D (z, y, x): give the reconstructed volume, one tomogram per file"
        if validate:
            raise InputError(msg)
        notes.append(msg)
    vs = resolve_voxel_size(voxel_size, header_vs, where=f"TIFF metadata of {path.name}", validate=validate, notes=notes)
    if validate:
        validate_volume(data, source=str(path))
    return Tomogram(data=data, voxel_size=vs, origin=(0.0, 0.0, 0.0), path=path, header_notes=notes)


def _voxel_size_from_metadata(tif: tifffile.TiffFile, notes: list[str]) -> tuple[float, float, float] | None:
    shaped = tif.shaped_metadata
    if shaped and "voxel_size_angstrom" in shaped[0]:
        v = [float(x) for x in shaped[0]["voxel_size_angstrom"]]
        return (v[0], v[1], v[2])
    ij = tif.imagej_metadata
    if ij:
        return _imagej_voxel_size(tif, ij, notes)
    if tif.is_ome and tif.ome_metadata:
        return _ome_voxel_size(tif.ome_metadata, notes)
    return None


def _imagej_voxel_size(tif: tifffile.TiffFile, ij: dict, notes: list[str]) -> tuple[float, float, float] | None:
    unit = ij.get("unit")
    factor = unit_to_angstrom(unit)
    if factor is None:
        notes.append(f"ImageJ unit {unit!r} is not a length unit; voxel size ignored")
        return None
    tags = tif.pages[0].tags
    sizes = []
    for name in ("YResolution", "XResolution"):
        tag = tags.get(name)
        if tag is None:
            return None
        num, den = tag.value
        if num == 0:
            return None
        sizes.append(den / num * factor)
    vz = float(ij.get("spacing", sizes[1] / factor)) * factor
    return (vz, sizes[0], sizes[1])


def _ome_voxel_size(xml: str, notes: list[str]) -> tuple[float, float, float] | None:
    out = []
    for ax in ("Z", "Y", "X"):
        m = re.search(rf'PhysicalSize{ax}="([^"]+)"', xml)
        if not m:
            return None
        u = re.search(rf'PhysicalSize{ax}Unit="([^"]+)"', xml)
        factor = unit_to_angstrom(u.group(1) if u else "µm")  # OME default unit is µm
        if factor is None:
            notes.append(f"OME unit {u.group(1) if u else None!r} not understood; voxel size ignored")
            return None
        out.append(float(m.group(1)) * factor)
    return (out[0], out[1], out[2])


def write_tiff(path: str | Path, data: Any, voxel_size: Any, *, compression: str | None = None) -> Path:
    """Write a (z, y, x) stack to ``path`` atomically with its voxel size (Å, scalar or (z, y, x)).

    uint8/uint16/float32 stacks are written as ImageJ hyperstacks (voxel size in nm, readable by
    Fiji); other dtypes as plain TIFF with a JSON description. Both carry ``voxel_size_angstrom``
    for :func:`read_tiff`.
    """
    arr = np.asarray(data)
    if arr.ndim != 3:
        raise InputError(f"write_tiff needs a 3-D (z, y, x) array, got shape {arr.shape}")
    vz, vy, vx = (float(v) for v in np.broadcast_to(np.asarray(voxel_size, dtype=float), (3,)))
    with atomic_path(path) as tmp:
        if arr.dtype in _IMAGEJ_DTYPES:
            tifffile.imwrite(
                tmp, arr, imagej=True, resolution=(10.0 / vx, 10.0 / vy),
                metadata={"axes": "ZYX", "spacing": vz / 10.0, "unit": "nm"},
                compression=compression, photometric="minisblack",
            )
        else:
            tifffile.imwrite(
                tmp, arr, resolution=(10.0 / vx, 10.0 / vy), compression=compression, photometric="minisblack",
                metadata={"axes": "ZYX", "voxel_size_angstrom": [vz, vy, vx]},
            )
    return Path(path)

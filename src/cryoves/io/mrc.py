"""MRC/REC reading (memory-mapped) and atomic writing with voxel size and origin."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import mrcfile
import numpy as np

from cryoves.errors import FormatError, InputError
from cryoves.io.atomic import atomic_path
from cryoves.io.tomogram import Tomogram, validate_volume, validate_voxel_size

log = logging.getLogger(__name__)

#: dtypes mrcfile can store natively; others are converted to the nearest one on write.
_WRITE_DTYPES = {np.dtype(t) for t in (np.int8, np.uint8, np.int16, np.uint16, np.float16, np.float32)}


def read_mrc(path: str | Path, voxel_size: Any = None, *, mmap: bool = True, validate: bool = True) -> Tomogram:
    """Read an MRC/REC file as a :class:`Tomogram` (memory-mapped, read-only, (z, y, x)).

    ``voxel_size`` (Å, scalar or (z, y, x)) overrides the header. The header value is validated
    (see :func:`~cryoves.io.tomogram.validate_voxel_size`) unless overridden.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"file not found: {path}")
    notes: list[str] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if mmap:
                mrc = mrcfile.mmap(path, mode="r", permissive=False)
            else:
                mrc = mrcfile.open(path, mode="r", permissive=False)
        notes.extend(str(w.message) for w in caught)
    except (ValueError, OSError, EOFError) as exc:
        raise FormatError(f"{path} is not a valid MRC file: {exc}") from exc
    data = mrc.data
    if data is None:
        raise FormatError(f"{path} is not a valid MRC file: header only, no data")
    if data.ndim == 2:
        raise InputError(f"{path} holds a 2-D image with shape {data.shape}; a tomogram must be 3-D (z, y, x)")
    header_vs = (float(mrc.voxel_size.z), float(mrc.voxel_size.y), float(mrc.voxel_size.x))
    origin = (float(mrc.header.origin.z), float(mrc.header.origin.y), float(mrc.header.origin.x))
    if validate:
        validate_volume(data, source=str(path))
    if voxel_size is not None:
        vs = validate_voxel_size(voxel_size, source="--voxel-size option")
        notes.append(f"header voxel size {header_vs} Å overridden by {vs} Å")
    else:
        vs = validate_voxel_size(header_vs, source=f"header of {path.name}")
    return Tomogram(data=data, voxel_size=vs, origin=origin, path=path, header_notes=notes)


def write_mrc(
    path: str | Path,
    data: Any,
    voxel_size: Any,
    origin: Any = (0.0, 0.0, 0.0),
) -> Path:
    """Write ``data`` (z, y, x) to ``path`` atomically with voxel size and origin (Å, (z, y, x)).

    bool/int32/int64/uint32 data are stored as the smallest MRC integer mode that holds them
    (error if none does); float64 is stored as float32.
    """
    arr = np.asarray(data)
    arr = _to_mrc_dtype(arr, path)
    vz, vy, vx = (float(v) for v in np.broadcast_to(np.asarray(voxel_size, dtype=float), (3,)))
    oz, oy, ox = (float(v) for v in np.broadcast_to(np.asarray(origin, dtype=float), (3,)))
    with atomic_path(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(np.ascontiguousarray(arr))
            mrc.voxel_size = (vx, vy, vz)
            mrc.header.origin.x, mrc.header.origin.y, mrc.header.origin.z = ox, oy, oz
            mrc.update_header_stats()
    return Path(path)


def _to_mrc_dtype(arr: np.ndarray, path: str | Path) -> np.ndarray:
    if arr.dtype in _WRITE_DTYPES:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if arr.dtype.kind == "f":
        return arr.astype(np.float32)
    if arr.dtype.kind in "iu":
        lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        for cand in (np.uint8, np.int16, np.uint16):
            info = np.iinfo(cand)
            if info.min <= lo and hi <= info.max:
                return arr.astype(cand)
        if -(2**24) <= lo and hi <= 2**24:
            log.warning("%s: labels up to %d stored as float32 (exact up to 2^24)", path, hi)
            return arr.astype(np.float32)
        raise FormatError(f"cannot store integer values in [{lo}, {hi}] in an MRC file ({path})")
    raise FormatError(f"cannot store data type {arr.dtype} in an MRC file ({path})")

"""MRC/REC reading (memory-mapped) and atomic writing with voxel size and origin.

Modes read: 0 (int8; uint8 when an IMOD header says the bytes are unsigned), 1 (int16),
2 (float32), 6 (uint16), 12 (float16). ``write_mrc`` stores uint8 as mode 6 (uint16), like
``mrcfile`` does, because mode-0 files are read as signed by most MRC2014 readers.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import mrcfile
import numpy as np

from cryoves.atomic import atomic_path
from cryoves.errors import FormatError, InputError
from cryoves.io.tomogram import Tomogram, release_pages, resolve_voxel_size, validate_volume, value_stats

log = logging.getLogger(__name__)

#: dtypes mrcfile can store natively; others are converted to the nearest one on write.
_WRITE_DTYPES = {np.dtype(t) for t in (np.int8, np.uint8, np.int16, np.uint16, np.float16, np.float32)}
_MODE_DTYPES = {0: np.int8, 1: np.int16, 2: np.float32, 6: np.uint16, 12: np.float16}
#: IMOD writes this stamp in the header; its flag bit 0 then says whether mode-0 bytes are signed.
_IMOD_STAMP = 1146047817
_HEADER_BYTES = 1024


def read_mrc(path: str | Path, voxel_size: Any = None, *, mmap: bool = True, validate: bool = True) -> Tomogram:
    """Read an MRC/REC file as a :class:`Tomogram` (memory-mapped, read-only, (z, y, x)).

    ``voxel_size`` (Å, scalar or (z, y, x)) overrides the header. The header value is validated
    (see :func:`~cryoves.io.tomogram.validate_voxel_size`) unless overridden. With
    ``validate=False`` neither the data (NaN/Inf, 3-D) nor the voxel size is checked; problems are
    listed in ``Tomogram.header_notes`` instead (used by ``cryoves info``).
    Truncated files, wrong header sizes and unknown modes raise :class:`FormatError`.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"file not found: {path}; check the path")
    if path.is_dir():
        raise InputError(f"{path} is a folder, not an MRC file")
    notes: list[str] = []
    _check_size(path)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opener = mrcfile.mmap if mmap else mrcfile.open
            try:
                mrc = opener(path, mode="r", permissive=False)
            except ValueError as exc:
                if "Map ID" not in str(exc):
                    raise
                # pre-MRC2014 writers omit the 'MAP ' id; the rest of the header is usually fine
                mrc = opener(path, mode="r", permissive=True)
                notes.append("header lacks the 'MAP ' id string (old or non-standard writer)")
        notes.extend(str(w.message) for w in caught)
    # mrcfile trips on some corrupt headers with other errors (e.g. ZeroDivisionError for MZ = 0)
    except (ValueError, OSError, EOFError, ArithmeticError, IndexError, TypeError) as exc:
        raise FormatError(f"{path} is not a valid MRC file: {exc}; check the file or convert it to MRC2014") from exc
    data = mrc.data
    if data is None:
        raise FormatError(f"{path} is not a valid MRC file: no readable data block (mode {int(mrc.header.mode)})")
    header = mrc.header
    if int(header.mode) == 0 and _bytes_unsigned(header):
        data = data.view(np.uint8)
        notes.append("mode 0 with IMOD 'unsigned bytes' flag: read as uint8")
    data = _to_zyx(data, header, notes)
    if data.ndim != 3:
        msg = f"{path} holds a {data.ndim}-D array with shape {data.shape}; a tomogram must be 3-D (z, y, x): give the reconstructed volume, one tomogram per file"
        if validate:
            raise InputError(msg)
        notes.append(msg)
    header_vs = (float(mrc.voxel_size.z), float(mrc.voxel_size.y), float(mrc.voxel_size.x))
    origin = (float(header.origin.z), float(header.origin.y), float(header.origin.x))
    vs = resolve_voxel_size(voxel_size, header_vs, where=f"header of {path.name}", validate=validate, notes=notes)
    if validate:
        validate_volume(data, source=str(path))
    return Tomogram(data=data, voxel_size=vs, origin=origin, path=path, header_notes=notes)


def _check_size(path: Path) -> None:
    """Compare the file size with the header (clearer message than mrcfile's mmap error)."""
    size = path.stat().st_size
    if size < _HEADER_BYTES:
        raise FormatError(
            f"{path} is not a valid MRC file: {size} bytes, shorter than the 1024-byte header; copy or export it again"
        )
    raw = np.fromfile(path, dtype=np.uint8, count=_HEADER_BYTES)
    for order in ("<", ">"):
        ints = raw[:96].view(f"{order}i4")
        nx, ny, nz, mode = (int(v) for v in ints[:4])
        nsymbt = int(ints[23])
        if mode in _MODE_DTYPES and min(nx, ny, nz) >= 0 and nsymbt >= 0:
            break
    else:
        mode = int(raw[12:16].view("<i4")[0])
        if 0 <= mode <= 16:
            raise FormatError(
                f"{path} is not a valid MRC file: unknown data mode {mode}; convert it to a float32 or int16 MRC "
                "(e.g. IMOD 'newstack -mode 2')"
            )
        raise FormatError(
            f"{path} is not a valid MRC file: its header makes no sense (data mode {mode}); check that the file "
            "really is an MRC/REC tomogram"
        )
    expected = _HEADER_BYTES + nsymbt + nx * ny * nz * np.dtype(_MODE_DTYPES[mode]).itemsize
    if size < expected:
        raise FormatError(
            f"{path} is truncated or its header is wrong: header says {nz}x{ny}x{nx} voxels of mode {mode} "
            f"after a {nsymbt}-byte extended header ({expected} bytes), but the file has {size} bytes; copy the file "
            "again or re-export it"
        )


def _bytes_unsigned(header: Any) -> bool:
    extra2 = bytes(np.asarray(header.extra2).tobytes())
    order = "<" if header.mode.dtype.byteorder in "<=|" else ">"
    stamp = int(np.frombuffer(extra2[40:44], dtype=f"{order}i4")[0])
    flags = int(np.frombuffer(extra2[44:48], dtype=f"{order}i4")[0])
    return stamp == _IMOD_STAMP and not (flags & 1)


def _to_zyx(data: np.ndarray, header: Any, notes: list[str]) -> np.ndarray:
    """Apply the MAPC/MAPR/MAPS axis mapping so that the array axes are (z, y, x)."""
    axes = (int(header.maps), int(header.mapr), int(header.mapc))
    if data.ndim != 3 or axes == (3, 2, 1) or sorted(axes) != [1, 2, 3]:
        if data.ndim == 3 and sorted(axes) != [1, 2, 3] and axes != (0, 0, 0):
            notes.append(f"invalid axis mapping MAPC/MAPR/MAPS = {axes[::-1]}; assumed 1/2/3")
        return data
    # axis i of the array holds the file axis axes[i] (1 = x, 2 = y, 3 = z)
    order = tuple(axes.index(a) for a in (3, 2, 1))
    notes.append(f"axis mapping MAPC/MAPR/MAPS = {axes[::-1]}; transposed to (z, y, x)")
    return data.transpose(order)


def write_mrc(
    path: str | Path,
    data: Any,
    voxel_size: Any,
    origin: Any = (0.0, 0.0, 0.0),
) -> Path:
    """Write ``data`` (z, y, x) to ``path`` atomically with voxel size and origin (Å, (z, y, x)).

    bool/int32/int64/uint32 data are stored as the smallest MRC integer mode that holds them
    (error if none does); float64 is stored as float32; uint8 becomes mode 6 (uint16).
    """
    arr = np.asarray(data)
    arr = _to_mrc_dtype(arr, path)
    vz, vy, vx = (float(v) for v in np.broadcast_to(np.asarray(voxel_size, dtype=float), (3,)))
    oz, oy, ox = (float(v) for v in np.broadcast_to(np.asarray(origin, dtype=float), (3,)))
    mode = mrcfile.utils.mode_from_dtype(arr.dtype)
    # written slab by slab into a memory map, header statistics computed slab by slab: mrcfile's
    # set_data computed them twice with full-size float temporaries (float32, 1.26 GB for 315 M voxels)
    with atomic_path(path) as tmp, mrcfile.new_mmap(tmp, shape=arr.shape, mrc_mode=mode, overwrite=True) as mrc:
        reserve_space(tmp)
        step = max(1, (64 << 20) // max(1, arr[:1].nbytes))
        for z in range(0, arr.shape[0], step):
            mrc.data[z : z + step] = arr[z : z + step]
            release_pages(mrc.data)  # written pages stay in the page cache, not in this process's memory
        mrc.voxel_size = (vx, vy, vz)
        mrc.header.origin.x, mrc.header.origin.y, mrc.header.origin.z = ox, oy, oz
        set_header_stats(mrc, arr)
    return Path(path)


def reserve_space(path: str | Path) -> None:
    """Allocate the disk blocks of a new (sparse) file now: a full disk is then an ``OSError`` here,
    not a crash (SIGBUS) while writing through a memory map of it."""
    if hasattr(os, "posix_fallocate"):
        with open(path, "r+b") as fh:
            os.posix_fallocate(fh.fileno(), 0, os.fstat(fh.fileno()).st_size)


def set_header_stats(mrc: Any, data: Any) -> None:
    """The header's dmin, dmax, dmean and rms from ``data`` (the voxels written), slab by slab (no
    full-size temporaries); NaN when a voxel is NaN or infinite (data written as given: tests, masks)."""
    if data.size == 0:
        mrc.reset_header_stats()
        return
    st = value_stats(data)
    if st["nonfinite"]:
        st = dict.fromkeys(st, float("nan"))
    mrc.header.dmin, mrc.header.dmax, mrc.header.dmean, mrc.header.rms = st["min"], st["max"], st["mean"], st["std"]


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

"""Vesicle-table files (CSV, RELION-style STAR, IMOD .mod) and conversion between the table,
label volumes and pyto label files (``cryoves convert``).

STAR: one data block ``data_vesicles`` with a row per vesicle: ``rlnCoordinateX/Y/Z`` (pixels of
the tomogram grid, voxel centres at integer coordinates, i.e. the table's x, y, z), ``cryovesRadius``
(pixels), ``cryovesId``, ``rlnImagePixelSize`` (Å), and QC columns as ``cryoves_<name>``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cryoves.atomic import atomic_path, check_file_output
from cryoves.errors import FormatError, InputError, ParameterError, VoxelSizeError
from cryoves.io.tomogram import validate_voxel_size
from cryoves.vesicles import CORE_COLUMNS, VesicleTable, labels_to_table

log = logging.getLogger(__name__)

TABLE_SUFFIXES = {".csv", ".star", ".mod"}
_STAR_COORDS = ("rlnCoordinateZ", "rlnCoordinateY", "rlnCoordinateX")
_STAR_RADIUS = ("cryovesRadius", "rlnVesicleRadius", "radius")
_QC_PREFIX = "cryoves_"


# ----------------------------------------------------------------------------------- STAR
def write_star(path: str | Path, table: VesicleTable) -> Path:
    """Write ``table`` as a RELION-style STAR file (see module docstring), atomically."""
    import starfile

    df = table.df
    out = pd.DataFrame(
        {
            "rlnCoordinateX": df["x"].to_numpy(float),
            "rlnCoordinateY": df["y"].to_numpy(float),
            "rlnCoordinateZ": df["z"].to_numpy(float),
            "cryovesRadius": df["radius"].to_numpy(float),
            "cryovesId": df["id"].to_numpy(np.int64),
            "rlnImagePixelSize": np.full(len(df), table.voxel_size),
        }
    )
    for c in df.columns:
        if c not in CORE_COLUMNS:
            out[_QC_PREFIX + c] = df[c].to_numpy()
    with atomic_path(path) as tmp:
        starfile.write({"vesicles": out}, tmp, overwrite=True)
    return Path(path)


def read_star(path: str | Path, voxel_size: float | None = None) -> VesicleTable:
    """Read vesicles from a STAR file: the first block with ``rlnCoordinateX/Y/Z`` (pixels) and a
    radius column (``cryovesRadius``, pixels). The voxel size (Å) is ``voxel_size`` or the
    ``rlnImagePixelSize`` column / an optics block; otherwise :class:`VoxelSizeError`.
    """
    import starfile

    path = Path(path)
    if not path.exists():
        raise InputError(f"file not found: {path}; check the path")
    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception as exc:  # starfile raises assorted parser errors
        raise FormatError(f"{path} is not a readable STAR file: {exc}") from exc
    frames = [b for b in blocks.values() if isinstance(b, pd.DataFrame)]
    particles = next((b for b in frames if all(c in b.columns for c in _STAR_COORDS)), None)
    if particles is None:
        raise FormatError(f"{path} has no data block with rlnCoordinateX/Y/Z columns; export the vesicles with coordinates and radii")
    dup = particles.columns[particles.columns.duplicated()]
    if len(dup):
        raise FormatError(f"{path} lists the column {dup[0]} twice; remove the duplicate from the STAR header")
    rcol = next((c for c in _STAR_RADIUS if c in particles.columns), None)
    if rcol is None:
        raise FormatError(f"{path} has no radius column ({' or '.join(_STAR_RADIUS)}); cannot make spheres")
    if voxel_size is None:
        voxel_size = _star_pixel_size(particles, frames, blocks, path)
    vs = validate_voxel_size(voxel_size, source=f"pixel size of {path.name}")[2]
    df = pd.DataFrame(
        {
            "z": particles["rlnCoordinateZ"],
            "y": particles["rlnCoordinateY"],
            "x": particles["rlnCoordinateX"],
            "radius": particles[rcol],
        }
    )
    if "cryovesId" in particles.columns:
        df.insert(0, "id", particles["cryovesId"])
    for c in particles.columns:
        if c.startswith(_QC_PREFIX) and c[len(_QC_PREFIX):] not in df.columns:
            df[c[len(_QC_PREFIX):]] = particles[c].to_numpy()
    return VesicleTable(df, vs)


def _star_pixel_size(particles: pd.DataFrame, frames: list, blocks: Any, path: Path) -> float:
    for frame in [particles] + frames:
        for col in ("rlnImagePixelSize", "rlnTomoTiltSeriesPixelSize", "rlnPixelSize"):
            if col in frame.columns and len(frame):
                values = pd.to_numeric(frame[col], errors="coerce").dropna().unique()
                if len(values) > 1:
                    raise VoxelSizeError(f"{path} lists several pixel sizes {values}; pass --voxel-size ANGSTROM")
                if len(values) == 1:
                    return float(values[0])
    for block in blocks.values():
        if isinstance(block, dict) and "rlnImagePixelSize" in block:
            try:
                return float(block["rlnImagePixelSize"])
            except (TypeError, ValueError):
                raise VoxelSizeError(
                    f"{path}: rlnImagePixelSize {block['rlnImagePixelSize']!r} is not a number; pass --voxel-size ANGSTROM"
                ) from None
    raise VoxelSizeError(f"{path} has no pixel size (rlnImagePixelSize); pass --voxel-size ANGSTROM")


# ----------------------------------------------------------------------------------- dispatch
def read_vesicles(path: str | Path, voxel_size: float | None = None) -> VesicleTable:
    """Read a vesicle table from ``.csv``, ``.star`` or ``.mod`` (by suffix).

    ``voxel_size`` (Å) overrides what the file says (CSV nm columns, STAR pixel size, IMOD header).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"file not found: {path}; check the path")
    suffix = path.suffix.lower()
    if voxel_size is not None:
        voxel_size = validate_voxel_size(voxel_size, source="--voxel-size option")[2]
    if suffix == ".csv":
        return VesicleTable.read_csv(path, voxel_size=voxel_size)
    if suffix == ".star":
        return read_star(path, voxel_size=voxel_size)
    if suffix == ".mod":
        from cryoves.io.imod import read_vesicles_mod

        return read_vesicles_mod(path, voxel_size=voxel_size)
    raise FormatError(f"unknown vesicle table format '{suffix}' for {path}; use .csv, .star or .mod")


def write_vesicles(path: str | Path, table: VesicleTable, *, shape: Any = None) -> Path:
    """Write ``table`` as ``.csv``, ``.star`` or ``.mod`` (by suffix), atomically.

    ``shape`` (z, y, x) is the tomogram grid recorded in an IMOD model; default: the smallest grid
    that holds every sphere.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return table.write_csv(path)
    if suffix == ".star":
        return write_star(path, table)
    if suffix == ".mod":
        from cryoves.io.imod import write_vesicles_mod

        if shape is None:
            shape = extent_shape(table)
            log.info("IMOD model image size taken from the vesicle extent: %s (z, y, x)", shape)
        return write_vesicles_mod(path, table, shape)
    raise FormatError(f"unknown vesicle table format '{suffix}' for {path}; use .csv, .star or .mod")


def extent_shape(table: VesicleTable) -> tuple[int, int, int]:
    """Smallest (z, y, x) grid from 0 that holds every sphere of ``table``."""
    if not len(table):
        return (1, 1, 1)
    top = np.ceil((table.centres + table.radii[:, None]).max(axis=0)).astype(int) + 1
    return tuple(int(max(v, 1)) for v in top)  # type: ignore[return-value]


# ----------------------------------------------------------------------------------- convert
_KINDS = ("table", "labels", "pyto")


def _kind_of(path: Path, given: str | None, role: str) -> str:
    if given is not None:
        if given not in _KINDS:
            raise ParameterError(f"--{role} must be one of {', '.join(_KINDS)}, got {given!r}")
        return given
    from cryoves.io import is_volume_path
    from cryoves.io.pyto import ids_path

    if path.suffix.lower() in TABLE_SUFFIXES:
        return "table"
    if is_volume_path(path) or path.is_dir():
        return "pyto" if role == "from" and ids_path(path).exists() else "labels"
    raise FormatError(
        f"cannot tell the format of {path} from its suffix; use .csv, .star, .mod, or a volume (.mrc, .tif, .zarr)"
    )


def convert_vesicles(
    src: str | Path,
    dst: str | Path,
    *,
    to: str | None = None,
    from_: str | None = None,
    shape: Any = None,
    like: str | Path | None = None,
    voxel_size: float | None = None,
    cytoplasm: str | Path | None = None,
    active_zone: str | Path | None = None,
    force: bool = False,
) -> Path:
    """Convert vesicles between a table (.csv/.star/.mod), an instance label volume and a pyto
    label file. Formats come from the suffixes; ``to``/``from_`` ("table", "labels", "pyto")
    override them (a volume input is read as pyto when it has an ``.ids.json`` sidecar).

    Label volume → table fits spheres by centroid and equal-volume radius (an approximation; see
    :func:`~cryoves.vesicles.labels_to_table`). Table → volume needs the grid: ``shape`` (z, y, x)
    or ``like`` (a tomogram whose shape, voxel size and origin are used). ``voxel_size`` (Å) is
    needed when the input has none. ``cytoplasm``/``active_zone``: mask volumes (non-zero =
    inside) painted 1 and 2 in a pyto output. ``dst`` is never overwritten unless ``force``;
    the input is never modified. Returns ``dst``.
    """
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise InputError(f"file not found: {src}; check the path")
    src_kind, dst_kind = _kind_of(src, from_, "from"), _kind_of(dst, to, "to")
    from cryoves.io import is_volume_path

    if dst_kind != "table" and not is_volume_path(dst):
        raise FormatError(f"a {dst_kind} output must be a volume (.mrc, .tif, .zarr), not {dst.name}")
    if dst_kind == "pyto" and dst.suffix.lower() not in (".mrc", ".rec"):
        raise FormatError(f"pyto label files are MRC; name the output .mrc, not {dst.name}")
    if dst.resolve() == src.resolve():
        raise ParameterError(f"input and output are the same file {src}; choose another output")
    check_file_output(dst, force=force)
    if voxel_size is not None:
        voxel_size = validate_voxel_size(voxel_size, source="--voxel-size option")[2]

    grid, origin, like_vs = _grid(shape, like)
    # ---- read
    regions: tuple[Any, Any] = (None, None)
    if src_kind == "table":
        table = read_vesicles(src, voxel_size=voxel_size)
    elif src_kind == "pyto":
        from cryoves.io.pyto import read_pyto_labels

        pyto = read_pyto_labels(src, voxel_size=voxel_size)
        table, regions = pyto.table, (pyto.cytoplasm, pyto.active_zone)
        grid = grid or tuple(int(s) for s in pyto.labels.shape)
    else:
        from cryoves.io import read_label_volume

        labels, vs = read_label_volume(src, voxel_size=voxel_size)
        table = labels_to_table(labels, vs)
        grid = grid or tuple(int(s) for s in labels.shape)
    if like_vs is not None and abs(like_vs / table.voxel_size - 1) > 0.01:
        log.warning(
            "voxel size of %s (%g Å) differs from the vesicles' (%g Å); coordinates are kept in voxels",
            like, like_vs, table.voxel_size,
        )
    # ---- write
    if dst_kind == "table":
        write_vesicles(dst, table, shape=grid)
        return dst
    if grid is None:
        raise ParameterError(
            f"writing the label volume {dst.name} needs the grid: pass --shape Z Y X or --like TOMOGRAM"
        )
    _check_inside(table, grid, src)
    if dst_kind == "labels":
        return _write_volume(dst, table.to_labels(grid, dtype=_label_dtype(table)), table.voxel_size, origin)
    from cryoves.io.pyto import write_pyto_labels

    cyto = _mask(cytoplasm, grid) if cytoplasm is not None else regions[0]
    az = _mask(active_zone, grid) if active_zone is not None else regions[1]
    write_pyto_labels(dst, table, grid, cyto, az, origin=origin)
    return dst


def _grid(shape: Any, like: str | Path | None) -> tuple[Any, tuple[float, float, float], float | None]:
    if shape is not None and like is not None:
        raise ParameterError("give either --shape or --like, not both")
    if shape is not None:
        grid = tuple(int(s) for s in shape)
        if len(grid) != 3 or min(grid) < 1:
            raise ParameterError(f"--shape needs three positive sizes Z Y X, got {tuple(shape)}")
        return grid, (0.0, 0.0, 0.0), None
    if like is not None:
        from cryoves.io import read_tomogram

        ref = read_tomogram(like, validate=False)
        if len(ref.shape) != 3:
            raise InputError(f"--like {like} is not a 3-D volume (shape {ref.shape})")
        v = float(ref.voxel_size[2])
        return ref.shape, ref.origin, v if np.isfinite(v) and v > 0 else None
    return None, (0.0, 0.0, 0.0), None


def _check_inside(table: VesicleTable, grid: tuple[int, ...], src: Path) -> None:
    """Refuse a table none of whose centres lie on ``grid`` (z, y, x): it belongs to another volume."""
    if not len(table):
        return
    c = table.centres
    inside = np.all((c >= -0.5) & (c < np.asarray(grid, dtype=float) - 0.5), axis=1)
    if not inside.any():
        raise InputError(
            f"all {len(table)} vesicles of {src} lie outside the grid (z, y, x) = {tuple(grid)}; "
            "the table belongs to another (e.g. binned) tomogram - give the matching --like or --shape"
        )
    if not inside.all():
        log.warning("%s: %d of %d vesicle centres lie outside the grid %s", src, int((~inside).sum()), len(table), grid)


def _label_dtype(table: VesicleTable) -> Any:
    top = int(table.ids.max()) if len(table) else 0
    return np.uint16 if top <= np.iinfo(np.uint16).max else np.uint32


def _write_volume(dst: Path, labels: np.ndarray, voxel_size: float, origin: Any) -> Path:
    suffix = dst.suffix.lower()
    if suffix in (".tif", ".tiff"):
        from cryoves.io.tiff import write_tiff

        return write_tiff(dst, labels, voxel_size)
    if suffix == ".zarr":
        from cryoves.io.zarr import write_ome_zarr

        return write_ome_zarr(dst, labels, voxel_size, origin)
    from cryoves.io.mrc import write_mrc

    if int(labels.max(initial=0)) > np.iinfo(np.uint16).max:
        raise FormatError(f"vesicle ids above 65535 do not fit in an MRC label file ({dst}); renumber the table")
    return write_mrc(dst, labels, voxel_size, origin)


def _mask(path: str | Path, grid: tuple[int, ...]) -> np.ndarray:
    from cryoves.io import read_tomogram

    m = read_tomogram(path, validate=False)
    if tuple(m.shape) != tuple(grid):
        raise InputError(f"mask {path} has shape {m.shape}, the label grid is {tuple(grid)}; give a mask on that grid")
    return np.asarray(m.data) != 0

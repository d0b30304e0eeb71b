"""The vesicle table: the one data model every stage reads and writes.

One row per vesicle. Coordinates are in voxels of the *input tomogram grid* (z, y, x), with voxel
centres at integer coordinates, and the same in nm (``z_nm = z * voxel_size_nm``, relative to the
centre of voxel (0, 0, 0); the file origin is not added). ``radius`` is the outer membrane radius.
Label volumes, IMOD models, STAR files and napari layers are renderings of this table.

A table also knows the grid it lives on when that is known: ``shape`` (z, y, x voxels) and
``origin`` (Å, z, y, x, as :attr:`cryoves.io.Tomogram.origin`). Its frame is read-only from
outside: :attr:`VesicleTable.df` hands out a copy (cheap under pandas copy-on-write), and
:meth:`VesicleTable.with_df` makes the changed table. :class:`RejectedTable` holds the candidates
the pipeline removed (``rejected.csv``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cryoves.atomic import atomic_path
from cryoves.errors import FormatError, InputError, VoxelSizeError

log = logging.getLogger(__name__)

CORE_COLUMNS = ["id", "z", "y", "x", "radius", "z_nm", "y_nm", "x_nm", "radius_nm"]
#: Columns of every rejected-candidates table (centre and radius in voxels, NaN when unknown).
REJECTED_COLUMNS = ["id", "z", "y", "x", "radius", "step", "reason"]

#: pandas >= 3 always copies on write, so a shallow copy of a frame is a safe read-only hand-out;
#: older pandas shares the data of a shallow copy, so :attr:`VesicleTable.df` copies it deeply.
_COPY_ON_WRITE = int(pd.__version__.split(".")[0]) >= 3


def _handout(df: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``df`` whose changes never reach ``df`` (shallow under copy-on-write: ~20 µs)."""
    return df.copy(deep=not _COPY_ON_WRITE)


def _triple(value: Any, cast: type, what: str) -> tuple | None:
    """``value`` as three finite numbers (z, y, x) of type ``cast``, None kept; InputError otherwise."""
    if value is None:
        return None
    try:
        out = tuple(cast(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise InputError(f"grid {what} must be three numbers (z, y, x), got {value!r}") from exc
    if len(out) != 3 or not np.isfinite(out).all() or (cast is int and min(out) < 1):
        raise InputError(f"grid {what} must be three {'positive integers' if cast is int else 'finite numbers'} "
                         f"(z, y, x), got {value!r}")
    return out


def _check_shape(shape: Any) -> tuple[int, int, int] | None:
    return _triple(shape, int, "shape")


def _check_origin(origin: Any) -> tuple[float, float, float] | None:
    return _triple(origin, float, "origin (Å)")


#: Optional per-vesicle columns, filled by later steps (NaN / empty when unknown).
QC_COLUMNS = {
    "membrane_thickness_nm": float,
    "membrane_density": float,
    "lumen_density": float,
    "profile_correlation": float,
    "fit_residual": float,
    "mahalanobis": float,
    "p_value": float,
    "map_confidence": float,  # mean network probability inside 0.7 x radius
    "detection_voxel_nm": float,  # voxel of the network grid (size-search level) that found it
    "source": str,  # "auto" | "manual" | "ground_truth" | ...
    "flags": str,  # QC doubts, ";"-separated (empty: none); flagged vesicles are reviewed first
}

#: Scales of the QC score: a Mahalanobis distance of 4 or a profile correlation of 0.3 scores 1.
MAHALANOBIS_LIMIT = 4.0
CORRELATION_LIMIT = 0.3
#: Added per QC flag, so that flagged vesicles rank before every unflagged one.
FLAG_WEIGHT = 100.0


def qc_score(df: pd.DataFrame) -> np.ndarray:
    """How doubtful each vesicle is (higher = review first; 0 when no QC is known).

    The larger of ``mahalanobis / 4`` and ``(1 - profile_correlation) / 0.7`` (1 = at the limits the
    pipeline once used for removal), plus ``FLAG_WEIGHT`` per entry of the ``flags`` column. The one
    ranking used by the QC report's worst-vesicle gallery and the napari review queue.
    """
    n = len(df)
    parts = []
    if "mahalanobis" in df.columns:
        parts.append(pd.to_numeric(df["mahalanobis"], errors="coerce").to_numpy(float) / MAHALANOBIS_LIMIT)
    if "profile_correlation" in df.columns:
        corr = pd.to_numeric(df["profile_correlation"], errors="coerce").to_numpy(float)
        parts.append((1.0 - corr) / (1.0 - CORRELATION_LIMIT))
    score = np.zeros(n)
    if parts and n:
        stacked = np.vstack(parts)
        finite = np.isfinite(stacked)
        score = np.where(finite.any(axis=0), np.max(np.where(finite, stacked, -np.inf), axis=0), 0.0)
        score = np.maximum(score, 0.0)
    if "flags" in df.columns:
        score = score + FLAG_WEIGHT * np.array([len(flag_list(f)) for f in df["flags"]], dtype=float)
    return score


def flag_list(flags: Any) -> list[str]:
    """The entries of one ``flags`` cell (empty list for "", NaN or None)."""
    if not isinstance(flags, str):
        return []
    return [f for f in (part.strip() for part in flags.split(";")) if f]


class VesicleTable:
    """Spheres with provenance and QC features, plus the voxel size (Å) that links voxels to nm.

    ``shape`` (z, y, x voxels) and ``origin`` (Å, z, y, x) describe the tomogram grid the table
    lives on, None when unknown; :meth:`with_df` and :meth:`copy` keep them. The rows are read
    through :attr:`df`, a copy: change a table with ``table.with_df(new_df)``.
    """

    def __init__(
        self,
        df: pd.DataFrame,
        voxel_size: float,
        *,
        shape: Iterable[int] | None = None,
        origin: Iterable[float] | None = None,
    ):
        if voxel_size is None or not np.isfinite(voxel_size) or voxel_size <= 0:
            raise VoxelSizeError(f"vesicle table needs a positive voxel size in Å, got {voxel_size!r}")
        self.voxel_size = float(voxel_size)
        self.shape = _check_shape(shape)
        self.origin = _check_origin(origin)
        self._df = self._normalise(df)

    @property
    def df(self) -> pd.DataFrame:
        """The rows, as a copy: changing it never changes the table (use :meth:`with_df`)."""
        return _handout(self._df)

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_spheres(
        cls,
        centres: Any,
        radii: Any,
        voxel_size: float,
        ids: Iterable[int] | None = None,
        *,
        shape: Iterable[int] | None = None,
        origin: Iterable[float] | None = None,
        **columns: Any,
    ) -> VesicleTable:
        """Build a table from centres (N, 3) (z, y, x) and radii (N,) in voxels."""
        centres = np.asarray(centres, dtype=float).reshape(-1, 3)
        radii = np.asarray(radii, dtype=float).reshape(-1)
        if len(radii) != len(centres):
            raise InputError(f"{len(centres)} centres but {len(radii)} radii")
        ids_arr = np.arange(1, len(radii) + 1) if ids is None else np.asarray(list(ids), dtype=np.int64)
        df = pd.DataFrame(
            {"id": ids_arr, "z": centres[:, 0], "y": centres[:, 1], "x": centres[:, 2], "radius": radii}
        )
        for name, values in columns.items():
            df[name] = values
        return cls(df, voxel_size, shape=shape, origin=origin)

    @classmethod
    def empty(
        cls, voxel_size: float, *, shape: Iterable[int] | None = None, origin: Iterable[float] | None = None
    ) -> VesicleTable:
        return cls.from_spheres(np.zeros((0, 3)), np.zeros(0), voxel_size, shape=shape, origin=origin)

    def _normalise(self, df: pd.DataFrame) -> pd.DataFrame:
        df = df.copy()
        missing = [c for c in ("z", "y", "x", "radius") if c not in df.columns]
        if missing:
            raise FormatError(f"vesicle table lacks column(s) {', '.join(missing)}; add them (see docs/formats.md)")
        if "id" not in df.columns:
            df.insert(0, "id", np.arange(1, len(df) + 1))
        for c in ("z", "y", "x", "radius"):
            df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
        try:
            df["id"] = df["id"].astype(np.int64)
        except (ValueError, TypeError, OverflowError) as exc:
            raise FormatError(f"vesicle ids must be integers below 2**63: {exc}; fix the id column or drop it") from exc
        for c, kind in QC_COLUMNS.items():
            if c in df.columns and kind is float:
                num = pd.to_numeric(df[c], errors="coerce")
                if (num.isna() & df[c].notna()).any():
                    bad = df.loc[num.isna() & df[c].notna(), c].iloc[0]
                    raise FormatError(f"vesicle table column {c} holds a non-numeric value {bad!r}; fix or drop that column")
                df[c] = num.astype(float)
            elif c in df.columns:  # an all-empty text column reads back from CSV as float NaN
                df[c] = df[c].astype(object).where(df[c].notna(), "").astype(str)
        vals = df[["z", "y", "x", "radius"]].to_numpy()
        if len(df) and not np.isfinite(vals).all():
            raise FormatError("vesicle table has missing or non-numeric centre/radius values; fix or drop those rows")
        if len(df) and (df["radius"] <= 0).any():
            raise FormatError("vesicle table has radius <= 0; fix or drop those rows")
        if df["id"].duplicated().any():
            dup = df.loc[df["id"].duplicated(), "id"].iloc[0]
            raise FormatError(f"vesicle table has duplicate id {dup}; give every vesicle its own id")
        if len(df) and (df["id"] <= 0).any():
            raise FormatError("vesicle ids must be positive (0 is background); renumber from 1")
        nm = self.voxel_size / 10.0
        for c in ("z", "y", "x", "radius"):
            df[f"{c}_nm"] = df[c] * nm
        rest = [c for c in df.columns if c not in CORE_COLUMNS]
        return df[CORE_COLUMNS + rest].reset_index(drop=True)

    # ----------------------------------------------------------------- access
    def __len__(self) -> int:
        return len(self._df)

    def __repr__(self) -> str:
        grid = f", grid {self.shape}" if self.shape is not None else ""
        return f"VesicleTable({len(self)} vesicles, voxel size {self.voxel_size:g} Å{grid})"

    @property
    def ids(self) -> np.ndarray:
        return self._df["id"].to_numpy(copy=True)

    @property
    def centres(self) -> np.ndarray:
        """(N, 3) centres in voxels, (z, y, x)."""
        return self._df[["z", "y", "x"]].to_numpy(dtype=float, copy=True)

    @property
    def radii(self) -> np.ndarray:
        """(N,) outer radii in voxels."""
        return self._df["radius"].to_numpy(dtype=float, copy=True)

    def copy(self) -> VesicleTable:
        return self.with_df(self._df)

    def with_df(self, df: pd.DataFrame) -> VesicleTable:
        """A new table with ``df`` as rows and this table's voxel size, shape and origin (nm
        columns recomputed, rows validated). The one way to change a table."""
        return VesicleTable(df, self.voxel_size, shape=self.shape, origin=self.origin)

    def with_grid(
        self, shape: Iterable[int] | None = None, origin: Iterable[float] | None = None
    ) -> VesicleTable:
        """The same rows on the grid ``shape`` (z, y, x voxels) / ``origin`` (Å); None keeps this table's."""
        return VesicleTable(
            self._df,
            self.voxel_size,
            shape=self.shape if shape is None else shape,
            origin=self.origin if origin is None else origin,
        )

    def next_id(self) -> int:
        return int(self._df["id"].max()) + 1 if len(self) else 1

    # ----------------------------------------------------------------- rendering
    def to_labels(self, shape: Iterable[int] | None = None, dtype: Any = np.uint32) -> np.ndarray:
        """Render filled balls into an instance label volume of ``shape`` (z, y, x; default the
        table's own :attr:`shape`, :class:`InputError` when neither is known).

        A voxel belongs to a vesicle when its centre lies within ``radius`` of the (sub-voxel)
        vesicle centre. Overlap rule: where spheres overlap, the voxel goes to the vesicle whose
        surface it lies deepest inside (largest ``radius - distance``); ties keep the earlier row.
        Only each sphere's bounding box is touched.
        """
        grid = _check_shape(shape) or self.shape
        if grid is None:
            raise InputError("rendering labels needs the grid shape (z, y, x): the vesicle table does not know it; give a shape")
        return render_labels(self.centres, self.radii, self.ids, grid, dtype=dtype)

    # ----------------------------------------------------------------- CSV
    def write_csv(self, path: str | Path) -> Path:
        """Write the table as CSV atomically (columns: see ``docs/formats.md``)."""
        with atomic_path(path) as tmp:
            self._df.to_csv(tmp, index=False, float_format="%.4f")
        return Path(path)

    @classmethod
    def read_csv(
        cls,
        path: str | Path,
        voxel_size: float | None = None,
        *,
        shape: Iterable[int] | None = None,
        origin: Iterable[float] | None = None,
    ) -> VesicleTable:
        """Read a vesicle CSV. The voxel size comes from ``voxel_size`` or the nm columns; the
        CSV does not hold the grid, give ``shape`` / ``origin`` when known."""
        path = Path(path)
        if not path.exists():
            raise InputError(f"file not found: {path}; check the path")
        try:
            df = pd.read_csv(path)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as exc:
            raise FormatError(f"{path} is not a readable vesicle CSV: {exc}") from exc
        if voxel_size is None:
            voxel_size = _voxel_size_from_nm_columns(df, path)
        try:
            return cls(df, voxel_size, shape=shape, origin=origin)
        except FormatError as exc:
            raise FormatError(f"{path}: {exc}") from exc


class RejectedTable:
    """Candidates removed by the pipeline (``rejected.csv``), or rejected in a review.

    Columns :data:`REJECTED_COLUMNS`: ``id`` (positive integer, unique), ``z, y, x, radius``
    (voxels of the tomogram grid; NaN when unknown), ``step`` and ``reason`` (text); other columns
    (a step's features, the editor's ``review``) are kept. In a ``segment`` result the ids continue
    those of ``vesicles.csv`` (see docs/formats.md). Read-only like :class:`VesicleTable`:
    :attr:`df` is a copy, :meth:`with_df` makes a changed table.
    """

    def __init__(self, df: pd.DataFrame | None = None):
        self._df = self._normalise(df)

    @classmethod
    def empty(cls) -> RejectedTable:
        return cls(None)

    @staticmethod
    def _normalise(df: pd.DataFrame | None) -> pd.DataFrame:
        df = pd.DataFrame(columns=REJECTED_COLUMNS) if df is None else df.copy()
        if "id" not in df.columns:
            df.insert(0, "id", np.arange(1, len(df) + 1))
        for c in ("z", "y", "x", "radius"):
            if c not in df.columns:
                df[c] = np.nan
            num = pd.to_numeric(df[c], errors="coerce")
            if (num.isna() & df[c].notna()).any():
                bad = df.loc[num.isna() & df[c].notna(), c].iloc[0]
                raise FormatError(f"rejected table column {c} holds a non-numeric value {bad!r}; fix or drop that row")
            df[c] = num.astype(float)
        for c in ("step", "reason"):
            if c not in df.columns:
                df[c] = ""
            df[c] = df[c].astype(object).where(df[c].notna(), "").astype(str)
        ids = pd.to_numeric(df["id"], errors="coerce")
        if ids.isna().any() or (ids != np.round(ids)).any():
            raise FormatError("rejected candidate ids must be integers; fix the id column or drop it")
        df["id"] = ids.astype(np.int64)
        if len(df) and (df["id"] <= 0).any():
            raise FormatError("rejected candidate ids must be positive; renumber them")
        if df["id"].duplicated().any():
            dup = df.loc[df["id"].duplicated(), "id"].iloc[0]
            raise FormatError(f"rejected table has duplicate id {dup}; give every candidate its own id")
        if len(df) and (df["radius"] < 0).any():
            raise FormatError("rejected table has radius < 0; fix or drop those rows")
        rest = [c for c in df.columns if c not in REJECTED_COLUMNS]
        return df[REJECTED_COLUMNS + rest].reset_index(drop=True)

    def __len__(self) -> int:
        return len(self._df)

    def __repr__(self) -> str:
        return f"RejectedTable({len(self)} candidates)"

    @property
    def df(self) -> pd.DataFrame:
        """The rows, as a copy: changing it never changes the table (use :meth:`with_df`)."""
        return _handout(self._df)

    @property
    def ids(self) -> np.ndarray:
        return self._df["id"].to_numpy(copy=True)

    def with_df(self, df: pd.DataFrame) -> RejectedTable:
        return RejectedTable(df)

    def renumbered(self, first_id: int) -> RejectedTable:
        """Ids ``first_id, first_id + 1, …`` in the order of the vesicle ids: sorted by (z, y, x),
        candidates without a centre last, ties (and those) in their current order."""
        df = self._df.sort_values(["z", "y", "x"], na_position="last", kind="stable").reset_index(drop=True)
        df["id"] = np.arange(int(first_id), int(first_id) + len(df), dtype=np.int64)
        return RejectedTable(df)

    def write_csv(self, path: str | Path) -> Path:
        """Write the table as CSV atomically."""
        with atomic_path(path) as tmp:
            self._df.to_csv(tmp, index=False, float_format="%.4f")
        return Path(path)

    @classmethod
    def read_csv(cls, path: str | Path) -> RejectedTable:
        path = Path(path)
        if not path.exists():
            raise InputError(f"file not found: {path}; check the path")
        try:
            df = pd.read_csv(path)
        except pd.errors.EmptyDataError:
            return cls.empty()
        except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
            raise FormatError(f"{path} is not a readable rejected-candidates CSV: {exc}") from exc
        try:
            return cls(df)
        except FormatError as exc:
            raise FormatError(f"{path}: {exc}") from exc


def _voxel_size_from_nm_columns(df: pd.DataFrame, path: Path) -> float:
    """Voxel size (Å) from the ratio of the nm to the voxel columns; refuses inconsistent rows."""
    pairs = []
    for c in ("z", "y", "x", "radius"):
        if c in df.columns and f"{c}_nm" in df.columns and len(df):
            v = pd.to_numeric(df[c], errors="coerce").to_numpy(float)
            vn = pd.to_numeric(df[f"{c}_nm"], errors="coerce").to_numpy(float)
            ok = np.isfinite(v) & np.isfinite(vn) & (np.abs(v) > 1e-3)
            pairs.append((v[ok], vn[ok]))
    v = np.concatenate([p[0] for p in pairs]) if pairs else np.zeros(0)
    vn = np.concatenate([p[1] for p in pairs]) if pairs else np.zeros(0)
    if v.size == 0:
        raise VoxelSizeError(f"{path}: cannot tell the voxel size (no *_nm columns); pass --voxel-size ANGSTROM")
    vs_nm = float(np.median(vn / v))
    # the CSV holds 4 decimals: allow that rounding (in nm), nothing more
    if np.any(np.abs(vn - vs_nm * v) > 1e-3 + 1e-4 * vs_nm):
        raise FormatError(
            f"{path}: the nm columns disagree with the voxel columns (no single voxel size); "
            "fix the file or pass --voxel-size ANGSTROM"
        )
    return vs_nm * 10.0


def render_labels(
    centres: np.ndarray,
    radii: np.ndarray,
    ids: np.ndarray,
    shape: tuple[int, int, int],
    dtype: Any = np.uint32,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Paint balls into a label volume, touching only each ball's bounding box (see ``to_labels``)."""
    shape = tuple(int(s) for s in shape)
    labels = np.zeros(shape, dtype=dtype) if out is None else out
    centres = np.asarray(centres, dtype=float).reshape(-1, 3)
    radii = np.asarray(radii, dtype=float).reshape(-1)
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if len(ids) == 0:
        return labels
    if ids.max() > np.iinfo(labels.dtype).max:
        raise FormatError(f"vesicle id {ids.max()} does not fit in {labels.dtype}")
    # id -> row lookup table, used to resolve overlaps against already painted vesicles
    row_of = np.full(int(ids.max()) + 1, -1, dtype=np.int64)
    row_of[ids] = np.arange(len(ids))
    for k in range(len(ids)):
        c, r = centres[k], radii[k]
        lo = np.maximum(np.ceil(c - r).astype(int), 0)
        hi = np.minimum(np.floor(c + r).astype(int) + 1, shape)
        if np.any(hi <= lo):
            continue
        gz = (np.arange(lo[0], hi[0]) - c[0]) ** 2
        gy = (np.arange(lo[1], hi[1]) - c[1]) ** 2
        gx = (np.arange(lo[2], hi[2]) - c[2]) ** 2
        d2 = gz[:, None, None] + gy[None, :, None] + gx[None, None, :]
        inside = d2 <= r * r
        box = labels[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        taken = inside & (box != 0)
        if taken.any():
            zz, yy, xx = np.nonzero(taken)
            other = box[zz, yy, xx].astype(np.int64)
            rows = np.where(other < len(row_of), row_of[np.minimum(other, len(row_of) - 1)], -1)
            pts = np.stack([zz + lo[0], yy + lo[1], xx + lo[2]], axis=1).astype(float)
            depth_new = r - np.sqrt(d2[zz, yy, xx])
            oc = centres[np.maximum(rows, 0)]
            depth_old = np.where(
                rows >= 0, radii[np.maximum(rows, 0)] - np.linalg.norm(pts - oc, axis=1), -np.inf
            )
            keep_old = depth_old >= depth_new
            inside[zz[keep_old], yy[keep_old], xx[keep_old]] = False
        box[inside] = ids[k]
    return labels


def labels_to_table(labels: np.ndarray, voxel_size: float, *, min_id: int = 1) -> VesicleTable:
    """Fit one sphere per label of an instance label volume (z, y, x) → :class:`VesicleTable`.

    Approximation: the centre is the centroid of the label's voxels (voxel centres at integer
    coordinates) and the radius the equal-volume radius ``(3 n / 4π)^(1/3)`` of its ``n`` voxels.
    Exact for filled balls up to discretisation; non-spherical objects, hollow (membrane-only)
    labels and balls cut by the volume border get a smaller or shifted sphere. Labels below
    ``min_id`` (background 0; e.g. 10 for pyto files, whose 1 and 2 are regions) are ignored;
    ids are kept. One pass over the volume (``cc3d.statistics``), no per-label passes.
    """
    import cc3d

    arr = np.asarray(labels)
    if arr.ndim != 3:
        raise InputError(f"label volume must be 3-D (z, y, x), got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise FormatError(f"label volume must hold integers, got {arr.dtype}")
    if arr.size == 0 or int(arr.max()) < min_id:
        return VesicleTable.empty(voxel_size, shape=arr.shape if arr.size else None)
    if arr.dtype.kind == "i":
        if int(arr.min()) < 0:
            raise FormatError("label volume holds negative values")
        arr = arr.astype(np.uint32 if int(arr.max()) <= np.iinfo(np.uint32).max else np.uint64)
    top = int(arr.max())
    if top > 50_000_000:  # sparse huge ids: compact first so the statistics arrays stay small
        uniq, inverse = np.unique(arr, return_inverse=True)
        stats = cc3d.statistics(inverse.reshape(arr.shape).astype(np.uint32))
        ids = uniq
    else:
        stats = cc3d.statistics(arr)
        ids = np.arange(top + 1)
    counts = np.asarray(stats["voxel_counts"], dtype=np.int64)
    keep = (counts > 0) & (ids >= min_id)
    centres = np.asarray(stats["centroids"], dtype=float)[keep]
    radii = np.cbrt(3.0 * counts[keep] / (4.0 * np.pi))
    return VesicleTable.from_spheres(centres, radii, voxel_size, ids=ids[keep].astype(np.int64), shape=arr.shape)

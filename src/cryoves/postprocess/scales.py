"""Vesicles of every size in one run: a pyramid of network grids, candidates per level, one merge.

The network finds vesicles whose radius, on its grid, is near the training radius (within
``NETWORK_BAND`` of it). Level k of the pyramid shows the tomogram so that vesicles of radius
``R_k = (k + 1) R_0`` look like the training vesicles (grid voxel ``model voxel x R_k / training
radius``): ~1 + 1/8 + 1/27 of one network pass for three levels. ``R_0`` is the training radius,
or larger when the tomogram's voxels are coarser than the model's (the finest level never
upsamples the input unless the radius range asks for it: on the 40 Å HIV-1 VLP tomogram
upsampling made noise look like 12-22 nm vesicles).

The finest level runs the full post-processing on the tomogram grid; a coarser level labels and
fits its map on its own grid (the same steps), keeps the spheres of its radius band that no finer
level found and fits them again on the tomogram at its native voxel size
(:func:`coarse_candidates`, then ``spheres.fit_spheres_at``). Every level's
vesicles form their own population for the outlier statistics, and :func:`merge_levels` keeps one
sphere where levels found the same vesicle: the one whose radius is nearest its level's ``R_k``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cryoves.errors import ParameterError
from cryoves.postprocess._common import REJECTED_COLUMNS, label_statistics, rejected_frame, relabel, sphere_pairs
from cryoves.vesicles import VesicleTable

#: Radii the network finds reliably, relative to its training radius (measured on the simulator:
#: 12-30 nm at the 19 nm training radius).
NETWORK_BAND = (12.0 / 19.0, 30.0 / 19.0)
#: Default radius range (nm) searched without a size hint.
DEFAULT_RADIUS_RANGE_NM = (12.0, 90.0)
#: The column of the vesicle table naming the level a vesicle was found on.
LEVEL_COLUMN = "detection_voxel_nm"


@dataclass(frozen=True)
class Level:
    """One level of the pyramid: vesicles of ``vesicle_radius_nm`` look like the training vesicles."""

    vesicle_radius_nm: float
    grid_voxel_a: float
    min_radius_nm: float
    max_radius_nm: float

    def to_dict(self) -> dict[str, float]:
        return {k: round(float(v), 3) for k, v in self.__dict__.items()}


def check_radius_range(
    radius_range_nm: tuple[float, float] | None, voxel_size_a: float | None = None
) -> tuple[float, float]:
    """The radius range (nm) to search, validated (against the voxel size in Å when given)."""
    if radius_range_nm is None:
        return DEFAULT_RADIUS_RANGE_NM
    try:
        lo, hi = (float(v) for v in radius_range_nm)
    except (TypeError, ValueError) as exc:
        raise ParameterError(f"--radius-range {radius_range_nm!r} is not two numbers; give MIN MAX in nm") from exc
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo < hi):
        raise ParameterError(
            f"--radius-range {lo:g} {hi:g} is not a range of radii; give 0 < MIN < MAX in nm, e.g. --radius-range 12 90"
        )
    vox_nm = (voxel_size_a or 0.0) / 10.0
    if lo < 2 * vox_nm:
        raise ParameterError(
            f"--radius-range minimum {lo:g} nm is under 2 voxels ({2 * vox_nm:g} nm at {voxel_size_a:g} Å); "
            "vesicles that small cannot be fitted at this voxel size"
        )
    if hi > 5000:
        raise ParameterError(f"--radius-range maximum {hi:g} nm is not a vesicle radius; give at most 5000 nm")
    return lo, hi


def plan_levels(
    voxel_size_a: float,
    model_voxel_size_a: float,
    training_radius_nm: float,
    radius_range_nm: tuple[float, float] | None = None,
    hint_nm: float | None = None,
) -> list[Level]:
    """The pyramid levels for a tomogram of ``voxel_size_a`` (Å).

    With ``hint_nm`` (``--vesicle-radius``): one level that shows vesicles of that radius at the
    training size, keeping radii in the range (default: 12 nm to max(90, 2.5 x hint)). Without:
    levels ``R = k R_0`` (k = 1, 2, ...; levels whose band lies below the range skipped) until the
    band of the last covers the range's maximum.
    """
    explicit = radius_range_nm is not None
    lo, hi = check_radius_range(radius_range_nm, voxel_size_a)
    band_lo, band_hi = NETWORK_BAND

    def level(r: float, keep_lo: float) -> Level:
        return Level(r, model_voxel_size_a * r / training_radius_nm, keep_lo, hi)

    if hint_nm is not None:
        if not (math.isfinite(hint_nm) and hint_nm > 0):
            raise ParameterError(f"--vesicle-radius must be a positive number of nm, got {hint_nm}")
        if not explicit:
            hi = max(hi, 2.5 * hint_nm)
        return [level(float(hint_nm), lo)]
    r0 = training_radius_nm * max(1.0, voxel_size_a / model_voxel_size_a)
    if explicit and lo < band_lo * r0:
        r0 = lo / band_lo  # the user asked for radii that only an upsampled grid resolves
    k = 1
    while k * r0 * band_hi < lo:  # levels that only see vesicles below the range are skipped
        k += 1
    levels = [level(k * r0, lo)]
    while levels[-1].vesicle_radius_nm * band_hi < hi:
        k += 1
        levels.append(level(k * r0, max(lo, band_lo * k * r0)))
    return levels


def _to_tomogram_grid(centres: np.ndarray, level_shape, tomogram_shape) -> np.ndarray:
    f = np.asarray(tomogram_shape, float) / np.asarray(level_shape, float)  # tomogram voxels per level voxel
    return (np.asarray(centres, float) + 0.5) * f - 0.5


def membrane_quality(df: pd.DataFrame) -> np.ndarray:
    """How clearly a fit sits on a membrane: membrane contrast x coverage (missing coverage, e.g. at
    the volume border, counts 0.75; missing contrast 0.5). Unlike ``outliers.membrane_evidence``
    not weighted by area, so a large sphere around a cluster of small vesicles does not outrank them."""
    n = len(df)
    con = df["membrane_contrast"].to_numpy(float) if "membrane_contrast" in df.columns else np.full(n, np.nan)
    cov = df["membrane_coverage"].to_numpy(float) if "membrane_coverage" in df.columns else np.full(n, np.nan)
    return np.clip(np.nan_to_num(con, nan=0.5), 0, None) * np.nan_to_num(cov, nan=0.75)


#: A sphere smaller than this fraction of a rival's radius, centred inside it, is a piece of it.
PIECE_RATIO = 0.7
#: Known vesicles with a membrane quality below this do not stop a coarser level from fitting the
#: same place (a finer level's fit to a piece of a large vesicle).
MIN_KNOWN_QUALITY = 0.3


def _known(centres: np.ndarray, radii: np.ndarray, known: VesicleTable | None) -> np.ndarray:
    """Spheres (tomogram grid) that a finer level already found well: centre within half the radius
    of a known vesicle of similar size (0.6-1.6x) and clear membrane (``MIN_KNOWN_QUALITY``)."""
    if known is None or not len(known) or not len(radii):
        return np.zeros(len(radii), bool)
    from scipy.spatial import cKDTree

    good = membrane_quality(known.df) >= MIN_KNOWN_QUALITY
    if not good.any():
        return np.zeros(len(radii), bool)
    kc, kr = known.centres[good], known.radii[good]
    dist, j = cKDTree(kc).query(centres)
    ratio = radii / kr[j]
    return (dist < 0.5 * kr[j]) & (ratio > 0.6) & (ratio < 1.6)


def coarse_objects(
    labels: np.ndarray, lvl: Level, tomogram_shape: tuple[int, int, int], voxel_size_a: float,
    known: VesicleTable | None = None,
) -> np.ndarray:
    """The objects of a coarse level's labels (its own grid) worth fitting: equivalent radius at
    least 0.6x the level's minimum and not already found by a finer level. Others are set to 0."""
    st = label_statistics(labels)
    counts = np.asarray(st["voxel_counts"], float)
    r_eq_nm = (3.0 * counts / (4.0 * np.pi)) ** (1.0 / 3.0) * lvl.grid_voxel_a / 10.0
    centres = _to_tomogram_grid(np.nan_to_num(np.asarray(st["centroids"], float)), labels.shape, tomogram_shape)
    drop = (r_eq_nm < 0.6 * lvl.min_radius_nm) | _known(centres, r_eq_nm * 10.0 / voxel_size_a, known)
    drop[0] = False
    if not drop.any():
        return labels
    lut = np.arange(len(counts), dtype=labels.dtype)
    lut[drop] = 0
    return relabel(labels, lut)


def coarse_candidates(
    fitted: VesicleTable,
    lvl: Level,
    level_shape: tuple[int, int, int],
    tomogram_shape: tuple[int, int, int],
    voxel_size_a: float,
    known: VesicleTable | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which spheres fitted on a coarse level's grid (``level_shape``) to fit again on the tomogram.

    Kept: radii within 0.75-1.3x the level's band, and not already found by a finer level (centre
    within half the radius of a ``known`` vesicle of similar size, 0.6-1.6x). Returns the ids kept
    and their centres (N, 3) and radii, in voxels of the tomogram grid (``voxel_size_a``).
    """
    r_nm = fitted.df["radius_nm"].to_numpy(float)
    centres = _to_tomogram_grid(fitted.centres, level_shape, tomogram_shape)
    radii = r_nm * 10.0 / voxel_size_a
    keep = (r_nm >= 0.75 * lvl.min_radius_nm) & (r_nm <= 1.3 * lvl.max_radius_nm) & ~_known(centres, radii, known)
    return fitted.ids[keep], centres[keep], radii[keep]


def in_band(table: VesicleTable, lvl: Level) -> tuple[VesicleTable, pd.DataFrame]:
    """Keep the vesicles whose fitted radius lies in the level's band; the others as rejected rows."""
    r = table.df["radius_nm"].to_numpy(float)
    out = (r < lvl.min_radius_nm - 1e-9) | (r > lvl.max_radius_nm + 1e-9)
    if not out.any():
        return table, pd.DataFrame(columns=REJECTED_COLUMNS)
    df = table.df
    rej = rejected_frame(
        df["id"][out], df[["z", "y", "x"]].to_numpy()[out], df["radius"][out], "radius_range",
        [f"radius {v:.1f} nm outside {lvl.min_radius_nm:.1f}-{lvl.max_radius_nm:.1f} nm searched on this level"
         for v in r[out]],
    )
    return table.with_df(df[~out]), rej


def merge_levels(tables: list[VesicleTable], levels: list[Level]) -> tuple[VesicleTable, pd.DataFrame]:
    """One table from the levels' tables (tagged with ``LEVEL_COLUMN``), one sphere per vesicle.

    Two spheres claim the same vesicle when one centre lies inside the other sphere or they overlap
    by more than half the smaller radius. Spheres are visited best first (clearest membrane,
    :func:`membrane_quality`; then radius nearest its level's ``R_k``) and one that conflicts with a
    kept sphere is rejected, except that a sphere less than ``PIECE_RATIO`` the radius of a rival
    whose centre it lies in is a piece of that vesicle and loses to it when the rival has at least
    half its membrane quality (a cap of a large vesicle cut by the volume border shows a membrane as
    clear as a small vesicle's). Measured on the mixed-size development tomograms: ranking by flags
    and scale alone kept such pieces of 45-70 nm vesicles instead of the whole vesicle found on a
    coarser level. So an intraluminal vesicle well inside a large one is lost. Ids are renumbered
    1..N in the order of the levels.
    """
    parts = []
    for t, lvl in zip(tables, levels):
        df = t.df.copy()
        df[LEVEL_COLUMN] = lvl.grid_voxel_a / 10.0
        df["_fit"] = np.abs(np.log(df["radius_nm"].to_numpy(float) / lvl.vesicle_radius_nm))
        parts.append(df)
    vs = tables[0].voxel_size
    df = pd.concat(parts, ignore_index=True)
    if len(df) == 0:
        return tables[0].with_df(tables[0].df.assign(**{LEVEL_COLUMN: np.zeros(0)})), pd.DataFrame(columns=REJECTED_COLUMNS)
    df["id"] = np.arange(1, len(df) + 1)
    centres = df[["z", "y", "x"]].to_numpy(float)
    radii = df["radius"].to_numpy(float)
    quality = membrane_quality(df)
    i, j, d, dup = sphere_pairs(centres, radii)
    clash = dup | (d < radii[i] + radii[j] - 0.5 * np.minimum(radii[i], radii[j]))
    i, j = i[clash], j[clash]
    rivals: dict[int, list[int]] = {}
    for a, b in zip(i, j):
        rivals.setdefault(int(a), []).append(int(b))
        rivals.setdefault(int(b), []).append(int(a))

    def inside(big: int, small: int) -> bool:
        """``small`` is a piece of ``big``: its centre inside, much smaller, ``big`` has a membrane."""
        return (radii[small] < PIECE_RATIO * radii[big]
                and np.linalg.norm(centres[small] - centres[big]) < radii[big]
                and quality[big] >= 0.5 * quality[small])

    keep = np.ones(len(df), bool)
    winner = np.full(len(df), -1)
    for k in np.lexsort((df["_fit"].to_numpy(), -quality)):
        if not keep[k]:
            continue
        kept_rivals = [o for o in rivals.get(int(k), ()) if keep[o]]
        whole = next((o for o in kept_rivals if inside(o, k)), None)
        if whole is not None:  # k is a piece of the (less clear) whole vesicle: it goes, nothing else
            keep[k], winner[k] = False, whole
            continue
        for o in kept_rivals:
            keep[o], winner[o] = False, k
    lost = np.flatnonzero(~keep)
    level = df[LEVEL_COLUMN].to_numpy(float)
    rej = rejected_frame(
        df["id"].to_numpy()[lost], centres[lost], radii[lost], "scale_merge",
        [f"the same vesicle as the one (radius {radii[winner[o]] * vs / 10:.1f} nm) found on the "
         f"{level[winner[o]]:.1f} nm level" for o in lost],
    ) if len(lost) else pd.DataFrame(columns=REJECTED_COLUMNS)
    out = df[keep].drop(columns="_fit").reset_index(drop=True)
    out["id"] = np.arange(1, len(out) + 1)
    return tables[0].with_df(out), rej

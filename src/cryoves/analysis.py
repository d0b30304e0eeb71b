"""Synapse analysis of a vesicle table: distances to the active zone, neighbours, pools, density profile.

Distances are in nm. Definitions:

* ``az_distance_centre_nm``: Euclidean distance from the vesicle centre to the centre of the nearest
  active-zone (AZ) voxel (exact Euclidean distance transform of the AZ mask, linearly interpolated
  at the sub-voxel centre).
* ``az_distance_nm``: membrane-to-AZ distance = ``az_distance_centre_nm - radius_nm`` (outer membrane
  surface to the nearest AZ voxel centre; <= 0 means the vesicle touches or crosses the AZ mask).
* Pools: ``n_within_45nm`` / ``n_within_250nm`` count vesicles with ``az_distance_nm <= 45`` / ``<= 250``.
* ``nn_centre_nm``: centre-to-centre distance to the nearest other vesicle; ``nn_membrane_nm``: the
  smallest ``d_ij - r_i - r_j`` over all other vesicles (exact, not the centre-nearest one).
* Density profile: shells of AZ distance (voxel centre to nearest AZ voxel, ``bin_width_nm`` wide)
  inside the cytoplasm mask (whole volume if none). Per shell: the shell volume, the number of
  vesicle *centres* in it (and that number per µm³), and the volume fraction occupied by vesicles
  (rendered balls, voxel counts) — the classic presynaptic profile.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.spatial import cKDTree

from cryoves.atomic import atomic_path, write_json_atomic
from cryoves.errors import InputError, OutputExistsError
from cryoves.vesicles import VesicleTable, render_labels

log = logging.getLogger(__name__)

PROXIMAL_NM = 45.0
DISTAL_NM = 250.0


@dataclass
class AnalysisResult:
    """``vesicles``: per-vesicle table (id, centre, radius, distances in nm); ``profile``: density by AZ
    distance shell (NaN-free, empty without an AZ mask); ``summary``: numbers for the JSON report."""

    vesicles: pd.DataFrame
    profile: pd.DataFrame
    summary: dict = field(default_factory=dict)


def nearest_neighbours(centres_nm: np.ndarray, radii_nm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre-to-centre and membrane-to-membrane nearest-neighbour distances (nm); NaN if alone."""
    centres_nm = np.asarray(centres_nm, dtype=float).reshape(-1, 3)
    radii_nm = np.asarray(radii_nm, dtype=float)
    n = len(radii_nm)
    if n < 2:
        return np.full(n, np.nan), np.full(n, np.nan)
    tree = cKDTree(centres_nm)
    d, j = tree.query(centres_nm, k=2)
    nn_c = d[:, 1]
    # any j with a smaller membrane gap than the centre-nearest one lies within this reach
    reach = nn_c - radii_nm[j[:, 1]] + radii_nm.max()
    hits = tree.query_ball_point(centres_nm, r=reach * (1 + 1e-9) + 1e-9)
    counts = np.fromiter((len(h) for h in hits), dtype=np.int64, count=n)
    ii = np.repeat(np.arange(n), counts)
    jj = np.fromiter((k for h in hits for k in h), dtype=np.int64, count=int(counts.sum()))
    other = ii != jj
    ii, jj = ii[other], jj[other]
    gap = np.linalg.norm(centres_nm[ii] - centres_nm[jj], axis=1) - radii_nm[ii] - radii_nm[jj]
    nn_m = np.full(n, np.inf)
    np.minimum.at(nn_m, ii, gap)
    return nn_c, nn_m


def _crop_box(shape, *masks_and_points) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = np.array(shape), np.zeros(3, dtype=np.int64)
    for item in masks_and_points:
        if item is None or len(item) == 0:
            continue
        lo = np.minimum(lo, np.floor(item.min(axis=0)).astype(np.int64))
        hi = np.maximum(hi, np.ceil(item.max(axis=0)).astype(np.int64) + 1)
    return np.maximum(lo, 0), np.minimum(hi, np.array(shape))


def _bbox_points(mask: np.ndarray | None) -> np.ndarray | None:
    if mask is None:
        return None
    sl = ndimage.find_objects(mask.astype(np.uint8))[0] if mask.any() else None
    if sl is None:
        return np.zeros((0, 3))
    return np.array([[s.start for s in sl], [s.stop - 1 for s in sl]], dtype=float)


def analyze(
    table: VesicleTable,
    az_mask: Any = None,
    cytoplasm_mask: Any = None,
    voxel_size: float | None = None,
    bin_width_nm: float = 10.0,
    max_distance_nm: float = DISTAL_NM,
) -> AnalysisResult:
    """Analyse ``table`` against an AZ mask and a cytoplasm mask (both (z, y, x), non-zero = inside).

    ``voxel_size`` (Å) defaults to the table's. Without an AZ mask only radii and neighbour
    distances are computed. See the module docstring for every definition.
    """
    vs = float(voxel_size if voxel_size is not None else table.voxel_size)
    nm = vs / 10.0
    centres = table.centres
    radii_nm = table.radii * nm
    centres_nm = centres * nm
    nn_c, nn_m = nearest_neighbours(centres_nm, radii_nm)
    ves = pd.DataFrame({
        "id": table.ids, "z": centres[:, 0], "y": centres[:, 1], "x": centres[:, 2],
        "radius_nm": radii_nm, "diameter_nm": 2 * radii_nm, "nn_centre_nm": nn_c, "nn_membrane_nm": nn_m,
    })
    summary: dict[str, Any] = {
        "n_vesicles": len(table), "voxel_size_a": vs,
        "radius_nm_mean": _stat(np.mean, radii_nm), "radius_nm_sd": _stat(np.std, radii_nm),
        "radius_nm_median": _stat(np.median, radii_nm), "radius_nm_min": _stat(np.min, radii_nm),
        "radius_nm_max": _stat(np.max, radii_nm),
        "nn_centre_nm_mean": _stat(np.mean, nn_c), "nn_membrane_nm_mean": _stat(np.mean, nn_m),
    }
    profile = pd.DataFrame(columns=["shell_start_nm", "shell_end_nm", "shell_volume_nm3", "n_vesicles",
                                    "vesicles_per_um3", "volume_fraction"])
    if az_mask is None:
        return AnalysisResult(ves, profile, summary)

    az = np.asarray(getattr(az_mask, "data", az_mask)) != 0
    if az.ndim != 3:
        raise InputError(f"the active-zone mask must be 3-D (z, y, x), got shape {az.shape}")
    if not az.any():
        raise InputError("the active-zone mask is empty; draw the AZ or leave the mask out")
    cyto = None
    if cytoplasm_mask is not None:
        cyto = np.asarray(getattr(cytoplasm_mask, "data", cytoplasm_mask)) != 0
        if cyto.shape != az.shape:
            raise InputError(f"cytoplasm mask shape {cyto.shape} differs from the AZ mask shape {az.shape}")
    # the EDT only needs a box that holds every AZ voxel, the cytoplasm and the vesicle centres
    lo, hi = _crop_box(az.shape, _bbox_points(az), _bbox_points(cyto), centres)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    import edt

    dist = edt.edt(~az[box], anisotropy=(nm, nm, nm), black_border=False, parallel=1).astype(np.float32)
    local = (centres - lo).T
    d_centre = ndimage.map_coordinates(dist, local, order=1, mode="nearest") if len(table) else np.zeros(0)
    d_mem = d_centre - radii_nm
    ves["az_distance_centre_nm"] = d_centre
    ves["az_distance_nm"] = d_mem
    summary.update({
        "n_within_45nm": int(np.count_nonzero(d_mem <= PROXIMAL_NM)),
        "n_within_250nm": int(np.count_nonzero(d_mem <= DISTAL_NM)),
        "az_distance_nm_mean": _stat(np.mean, d_mem), "az_distance_nm_median": _stat(np.median, d_mem),
    })
    profile = _density_profile(table, dist, lo, hi, cyto, d_centre, nm, bin_width_nm, max_distance_nm)
    return AnalysisResult(ves, profile, summary)


def _density_profile(table, dist, lo, hi, cyto, d_centre, nm, bin_width_nm, max_distance_nm) -> pd.DataFrame:
    edges = np.arange(0.0, max_distance_nm + bin_width_nm, bin_width_nm)
    region = np.ones(dist.shape, dtype=bool) if cyto is None else cyto[tuple(slice(a, b) for a, b in zip(lo, hi))]
    # every ball painted with value 1 into uint8: only the union matters here
    balls = render_labels(table.centres - lo, table.radii, np.ones(len(table), np.int64), dist.shape,
                          dtype=np.uint8) != 0
    d_in = dist[region]
    shell = np.digitize(d_in, edges) - 1
    ok = (shell >= 0) & (shell < len(edges) - 1)
    n_bins = len(edges) - 1
    shell_vox = np.bincount(shell[ok], minlength=n_bins)[:n_bins]
    ves_vox = np.bincount(shell[ok], weights=balls[region][ok], minlength=n_bins)[:n_bins]
    vshell = np.digitize(d_centre, edges) - 1
    vok = (vshell >= 0) & (vshell < n_bins)
    if cyto is not None and len(table):
        vox = np.clip(np.rint(table.centres).astype(np.int64), 0, np.array(cyto.shape) - 1)
        vok &= cyto[tuple(vox.T)]
    n_ves = np.bincount(vshell[vok], minlength=n_bins)[:n_bins]
    vol_nm3 = shell_vox * nm**3
    with np.errstate(divide="ignore", invalid="ignore"):
        per_um3 = np.where(vol_nm3 > 0, n_ves / (vol_nm3 * 1e-9), 0.0)
        frac = np.where(shell_vox > 0, ves_vox / np.maximum(shell_vox, 1), 0.0)
    return pd.DataFrame({
        "shell_start_nm": edges[:-1], "shell_end_nm": edges[1:], "shell_volume_nm3": vol_nm3,
        "n_vesicles": n_ves, "vesicles_per_um3": per_um3, "volume_fraction": frac,
    })


def _stat(fn, values: np.ndarray) -> float | None:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return float(fn(v)) if len(v) else None


# --------------------------------------------------------------------------- files
def write_analysis(result: AnalysisResult, outdir: str | Path, force: bool = False) -> Path:
    """Write vesicle_analysis.csv, density_profile.csv, analysis.json and PNG plots into ``outdir``."""
    outdir = Path(outdir)
    summary_path = outdir / "analysis.json"
    if summary_path.exists() and not force:
        raise OutputExistsError(f"{outdir} already holds an analysis; pass --force to overwrite it")
    outdir.mkdir(parents=True, exist_ok=True)
    with atomic_path(outdir / "vesicle_analysis.csv") as tmp:
        result.vesicles.to_csv(tmp, index=False, float_format="%.4f")
    with atomic_path(outdir / "density_profile.csv") as tmp:
        result.profile.to_csv(tmp, index=False, float_format="%.6g")
    _plots(result, outdir)
    write_json_atomic(summary_path, result.summary)  # last: marks a complete analysis
    return outdir


def _plots(result: AnalysisResult, outdir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    v = result.vesicles
    panels = [("radius_histogram.png", v["radius_nm"], "radius (nm)")]
    if "az_distance_nm" in v:
        panels.append(("az_distance_histogram.png", v["az_distance_nm"], "membrane-to-AZ distance (nm)"))
    panels.append(("nn_distance_histogram.png", v["nn_membrane_nm"], "membrane-to-membrane NN distance (nm)"))
    for name, values, label in panels:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        vals = np.asarray(values, dtype=float)
        ax.hist(vals[np.isfinite(vals)], bins=30)
        ax.set_xlabel(label)
        ax.set_ylabel("vesicles")
        _save(fig, outdir / name)
        plt.close(fig)
    if len(result.profile):
        p = result.profile
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot((p["shell_start_nm"] + p["shell_end_nm"]) / 2, p["volume_fraction"], marker="o")
        ax.set_xlabel("distance to active zone (nm)")
        ax.set_ylabel("vesicle volume fraction")
        _save(fig, outdir / "density_profile.png")
        plt.close(fig)


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png", bbox_inches="tight")


def analyze_folder(
    folder: str | Path,
    output: str | Path | None = None,
    voxel_size: float | None = None,
    az_model: str | Path | None = None,
    force: bool = False,
) -> AnalysisResult:
    """Analyse a segmentation output folder and write the results to ``output`` (default FOLDER/analysis).

    Reads ``vesicles.csv`` and the AZ from, in this order: ``az_model`` (an IMOD model whose open
    contours are drawn as 3-pixel tubes), ``active_zone_mask.mrc``, ``pyto_labels.mrc``
    (1 = cytoplasm, 2 = AZ, vesicles above; the Pyto convention), or ``az.mod`` in the folder. The
    cytoplasm comes from ``cytoplasm_mask.mrc`` or the pyto labels. Without an AZ only radii and
    neighbour distances are reported.
    """
    from cryoves.io import read_tomogram
    from cryoves.io.pyto import ACTIVE_ZONE_ID, CYTOPLASM_ID
    from cryoves.results import open_result

    result = open_result(folder, voxel_size=voxel_size)
    folder, table, vs, paths = result.path, result.vesicles, result.voxel_size_a, result.paths
    az = cyto = None
    if "cytoplasm_mask" in paths:
        cyto = np.asarray(read_tomogram(paths["cytoplasm_mask"], voxel_size=vs, validate=False).data) != 0
    if "active_zone_mask" in paths:
        az = np.asarray(read_tomogram(paths["active_zone_mask"], voxel_size=vs, validate=False).data) != 0
    elif "pyto" in paths:
        labels = np.asarray(read_tomogram(paths["pyto"], voxel_size=vs, validate=False).data)
        az = labels == ACTIVE_ZONE_ID
        if cyto is None:
            cyto = (labels == CYTOPLASM_ID) | (labels > ACTIVE_ZONE_ID)  # vesicles lie in the cytoplasm
    if az_model is None and az is None and (folder / "az.mod").exists():
        az_model = folder / "az.mod"
    if az_model is not None:
        az = _az_from_model(az_model, None if cyto is None else cyto.shape)
    if az is None:
        log.warning("no AZ mask, pyto labels or AZ model in %s: AZ distances skipped", folder)
    result = analyze(table, az_mask=az, cytoplasm_mask=cyto, voxel_size=vs)
    write_analysis(result, folder / "analysis" if output is None else output, force=force)
    return result


def _az_from_model(path: str | Path, shape: tuple[int, ...] | None) -> np.ndarray:
    """Rasterise an IMOD AZ model (open contours, 3-pixel tubes) on ``shape`` or the model's image size."""
    from cryoves.io.imod import mask_from_mod, read_mod

    if shape is None:
        shape = read_mod(path).shape
        if 0 in shape:
            raise InputError(f"{path} does not say its image size; add cytoplasm_mask.mrc to the folder")
    return mask_from_mod(path, shape, kind="open", diameter=3.0)

"""``segment()``: tomogram → vesicle table and every output file. Composition only, no algorithms.

Steps: read + validate → region masks → probability map (network, cached by content) → global
threshold (range stored with the model) → labelling with adaptive local thresholds → sphere fitting
(touching pieces whose spheres fit one vesicle are rejoined and refitted) → outlier repair → the
same on each coarser level of the size search, fitted on the tomogram (``postprocess.scales``) →
merge across levels → region filter → outputs. Every removal is recorded in the rejected table;
``manifest.json`` is written last so a folder without it is never mistaken for a complete result.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from cryoves import DEFAULT_MODEL, __version__
from cryoves.errors import Cancelled, CryovesError, InputError, VoxelSizeError
from cryoves.io import Tomogram, read_mrc, read_tomogram, write_mrc
from cryoves.io.tomogram import release_pages
from cryoves.results import (
    MANIFEST_NAME,
    OUTPUT_FILES,
    file_sha256,
    prepare_output_dir,
    read_manifest,
    segment_manifest,
    write_result,
)
from cryoves.vesicles import RejectedTable, VesicleTable

if TYPE_CHECKING:
    from cryoves.postprocess.scales import Level

log = logging.getLogger(__name__)


Progress = Callable[[str, float], None]


@dataclass
class SegmentConfig:
    """Every parameter of a ``segment`` run (recorded in the manifest)."""

    model: str = DEFAULT_MODEL
    voxel_size: float | None = None
    """Voxel size in Å overriding the file header."""
    invert: bool | None = None
    """Force (True) or forbid (False) contrast inversion; None detects it."""
    vesicle_radius_nm: float | None = None
    """Size hint (nm): one network pass on a grid where vesicles of this radius look like the
    training vesicles, instead of the size search."""
    radius_range_nm: tuple[float, float] | None = None
    """Vesicle radii (min, max) in nm searched and kept; None = 12-90 nm (with a size hint: 12 nm to
    max(90, 2.5 x hint)). The pyramid of network grids is chosen to cover it
    (:mod:`cryoves.postprocess.scales`)."""
    threshold: float | None = None
    """Fixed global threshold; None searches ``threshold_range``."""
    threshold_range: tuple[float, float, float] | None = None
    """(low, high, step) of the threshold search; None = the model's (see ModelInfo.threshold_range)."""
    mask_model: str | None = None
    """IMOD model whose closed contours outline the cytoplasm (segmentation region)."""
    mask: str | None = None
    """Mask volume (MRC/TIFF, non-zero = region) instead of ``mask_model``."""
    az_model: str | None = None
    az_mask: str | None = None
    from_probability: str | None = None
    """Start after the network with this probability map (same grid as the tomogram)."""
    tta: int = 1
    device: str = "auto"
    precision: str = "auto"
    whole_volume: bool = False
    """Run the network on every slice (default: only on the specimen slab, not the vacuum)."""
    tile: int | None = None
    """Prediction tile side in model voxels; None chooses it from the memory."""
    max_mahalanobis_p: float = 1e-4
    """Outliers: vesicles with χ² p-value below this (after re-refinement) are removed."""
    min_profile_correlation: float = 0.3
    report: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


@dataclass
class SegmentResult:
    vesicles: VesicleTable
    rejected: RejectedTable
    """Removed candidates; ids N+1 … N+M after the N vesicles' (see :func:`_final_ids`)."""
    probability: np.ndarray
    """The map; a read-only memory map of the written file when an output folder was given."""
    labels: np.ndarray
    """The final labels (uint16, uint32 beyond 65,535 vesicles); a read-only memory map of
    ``labels.mrc`` (its integer type) when an output folder was given."""
    manifest: dict[str, Any]
    outdir: Path | None = None
    stage_labels: dict[str, np.ndarray] = field(default_factory=dict)
    """Intermediate label volumes (global threshold, adaptive), kept only when asked for."""
    stage_tables: dict[str, VesicleTable] = field(default_factory=dict)
    """Intermediate vesicle tables (sphere fit, outlier QC), kept only when asked for."""


class Backend:
    """Where :func:`segment` runs its two expensive steps; this default runs them in this process.

    :class:`cryoves.blockwise.DaskBackend` splits them into blocks on a Dask cluster instead
    (same results). ``predict`` takes the arguments of :func:`cryoves.predict.predict_tomogram`
    and ``fit_spheres`` those of :func:`cryoves.postprocess.spheres.fit_spheres`.
    """

    def predict(self, tomo: Tomogram, model: Any, **kwargs: Any) -> Any:
        from cryoves.predict import predict_tomogram

        return predict_tomogram(tomo, model, **kwargs)

    def fit_spheres(
        self, intensity: np.ndarray, labels: np.ndarray, voxel_size_a: float, cache: dict | None = None
    ) -> tuple[Any, pd.DataFrame]:
        from cryoves.postprocess.spheres import fit_spheres

        return fit_spheres(intensity, labels, voxel_size_a, cache=cache)


class _Steps:
    """Timing, progress and cancellation around each step."""

    def __init__(self, progress: Progress | None, should_stop: Callable[[], bool] | None):
        self.progress = progress
        self.should_stop = should_stop
        self.timings: dict[str, float] = {}

    def run(self, name: str, fraction: float, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self.should_stop is not None and self.should_stop():
            raise Cancelled(f"segmentation cancelled before step '{name}'")
        if self.progress is not None:
            self.progress(name, fraction)
        log.info("step: %s", name)
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        self.timings[name] = round(time.perf_counter() - t0, 3)
        return out


def _array_sha256(arr: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(str((arr.shape, str(arr.dtype))).encode())
    for z in range(0, arr.shape[0], 16):
        h.update(np.ascontiguousarray(arr[z : z + 16]).tobytes())
    return h.hexdigest()


def _load_tomogram(tomo: Tomogram | str | os.PathLike, voxel_size: float | None) -> Tomogram:
    if isinstance(tomo, Tomogram):
        if voxel_size is not None:
            from cryoves.io import validate_voxel_size

            tomo = Tomogram(tomo.data, validate_voxel_size(voxel_size, "--voxel-size option"), tomo.origin, tomo.path)
        return tomo
    return read_tomogram(tomo, voxel_size=voxel_size)


def _region_masks(cfg: SegmentConfig, shape: tuple[int, int, int]) -> tuple[np.ndarray | None, np.ndarray | None]:
    from cryoves.io.imod import mask_from_mod

    def volume_mask(path: str, what: str) -> np.ndarray:
        m = _read_mask(path)
        if m.shape != shape:
            raise InputError(
                f"{what} {path} has shape {m.shape} but the tomogram has {shape}; give a mask on the tomogram grid"
            )
        return m

    cyto = az = None
    if cfg.mask_model and cfg.mask:
        raise InputError("give either --mask-model or --mask, not both")
    if cfg.mask_model:
        cyto = mask_from_mod(cfg.mask_model, shape, kind="closed")
    elif cfg.mask:
        cyto = volume_mask(cfg.mask, "mask")
    if cfg.az_model:
        az = mask_from_mod(cfg.az_model, shape, kind="open")
    elif cfg.az_mask:
        az = volume_mask(cfg.az_mask, "active-zone mask")
    return cyto, az


def _read_mask(path: str) -> np.ndarray:
    import mrcfile

    p = Path(path)
    if not p.exists():
        raise InputError(f"file not found: {p}; check the path")
    if p.suffix.lower() in {".tif", ".tiff"}:
        import tifffile

        arr = tifffile.imread(p)
    else:
        try:
            with mrcfile.open(p, permissive=False) as mrc:
                arr = np.asarray(mrc.data)
        except (ValueError, OSError, EOFError) as exc:
            raise InputError(f"{p} is not a readable mask volume: {exc}; give an MRC or TIFF mask on the tomogram grid") from exc
    return np.asarray(arr) != 0


def _probability(
    tomo: Tomogram, cfg: SegmentConfig, outdir: Path | None, input_sha: str, model: Any, backend: Backend,
    radius_nm: float | None, region: tuple[slice, ...] | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Network probability on the tomogram grid (the finest pyramid level, where vesicles of
    ``radius_nm`` look like the training vesicles; None = the model's own scale), reused from
    ``outdir`` when the cache key matches."""
    if cfg.from_probability:
        p = read_tomogram(cfg.from_probability, voxel_size=tomo.voxel_size_a, validate=True)
        if p.shape != tomo.shape:
            raise InputError(
                f"probability map {cfg.from_probability} has shape {p.shape}, tomogram {tomo.shape}; "
                "give the map on the tomogram grid"
            )
        prob = p.asarray()
        if prob.min() < -1e-3 or prob.max() > 1 + 1e-3:
            raise InputError(
                f"{cfg.from_probability} is not a probability map (values outside [0, 1]); give the map written by "
                "'cryoves predict' or by an earlier segment run"
            )
        return np.clip(prob, 0, 1), _map_info(cfg)
    from cryoves.model import load_model

    model = model if model is not None else load_model(cfg.model)
    key_src = json.dumps(
        {
            "input": input_sha,
            "model": getattr(model.info, "sha256", None) or cfg.model,
            "voxel_size": tomo.voxel_size,
            "invert": cfg.invert,
            "radius": radius_nm,
            "tta": cfg.tta,
            "precision": cfg.precision,
            **({"tile": cfg.tile} if cfg.tile is not None else {}),  # keys of earlier runs stay valid
            **({"whole_volume": True} if cfg.whole_volume else {}),
            **({"region": [[r.start, r.stop] for r in region]} if region is not None else {}),
        },
        sort_keys=True,
    )
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    if outdir is not None:
        cached = _cached_probability(outdir, key, tomo.shape)
        if cached is not None:
            log.info("probability map reused from %s (cache key %s)", outdir, key)
            return cached
    res = backend.predict(
        tomo,
        model,
        device=cfg.device,
        tta=cfg.tta,
        invert=cfg.invert,
        vesicle_radius_nm=radius_nm,
        precision=cfg.precision,
        tile=cfg.tile,
        skip_vacuum=not cfg.whole_volume,
        region=region,
    )
    info = dict(res.info)
    info["cache_key"] = key
    return np.asarray(res.prob, dtype=np.float32), info


def _map_info(cfg: SegmentConfig) -> dict[str, Any]:
    """What is known about a ``--from-probability`` map: from the JSON ``cryoves predict`` writes
    beside it (model, its threshold range, inversion), else only what the options say."""
    from cryoves.predict import read_map_info

    described = read_map_info(cfg.from_probability) or {}
    info: dict[str, Any] = {"source": str(cfg.from_probability)}
    for key in ("model", "model_sha256", "threshold_range", "polarity", "cryoves_version"):
        if key in described:
            info[key] = described[key]
    if cfg.model != DEFAULT_MODEL and "model" in described and cfg.model != described["model"]:
        log.warning("--model %s ignored: %s was made by %s", cfg.model, cfg.from_probability, described["model"])
    info["inverted"] = bool(cfg.invert) if cfg.invert is not None else bool(described.get("inverted", False))
    return info


def _cached_probability(outdir: Path, key: str, shape: tuple[int, ...]) -> tuple[np.ndarray, dict] | None:
    man_path = outdir / MANIFEST_NAME
    prob_path = outdir / OUTPUT_FILES["probability"]
    if not (man_path.exists() and prob_path.exists()):
        return None
    try:
        info = (read_manifest(outdir) or {}).get("prediction", {})
        if info.get("cache_key") != key:
            return None
        import mrcfile

        with mrcfile.open(prob_path, permissive=False) as mrc:
            prob = np.array(mrc.data, dtype=np.float32)
        if prob.shape != tuple(shape):
            return None
        return prob, info
    except (OSError, ValueError, AttributeError, CryovesError):
        return None  # an unreadable earlier result is simply not reused


def _rejected_frame(*frames: pd.DataFrame | None) -> pd.DataFrame:
    """The steps' rejected tables as one, in the columns of postprocess (extra feature columns kept).

    Ids are still those of the steps' intermediate objects (they may repeat); :func:`_final_ids`
    replaces them."""
    from cryoves.postprocess import REJECTED_COLUMNS

    parts = [f for f in frames if f is not None and len(f)]
    if not parts:
        return pd.DataFrame(columns=REJECTED_COLUMNS)
    df = pd.concat(parts, ignore_index=True)
    for c in REJECTED_COLUMNS:
        if c not in df.columns:
            df[c] = np.nan
    return df[REJECTED_COLUMNS + [c for c in df.columns if c not in REJECTED_COLUMNS]]


def segment(
    tomo: Tomogram | str | os.PathLike,
    outdir: str | os.PathLike | None = None,
    config: SegmentConfig | None = None,
    *,
    force: bool = False,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
    keep_stages: bool = False,
    model: Any = None,
    backend: Backend | None = None,
) -> SegmentResult:
    """Segment the vesicles of ``tomo`` and, when ``outdir`` is given, write every output there.

    Returns the vesicle table (voxels of the input grid + nm), the rejected table, the
    probability map and the final instance labels. ``progress(step, fraction)`` is called before
    each step; ``should_stop()`` returning True raises :class:`~cryoves.errors.Cancelled`.
    ``model`` is an already loaded model (``cryoves.model.load_model``) to use instead of
    ``config.model`` (batch workers load it once); ``keep_stages`` keeps intermediate labels.
    ``backend`` runs prediction and sphere fitting (default :class:`Backend`, this process;
    ``cryoves.blockwise.DaskBackend(client)`` splits them into blocks on a Dask cluster, with the
    single-process result).
    On an error the output folder is left without partial files (and removed if this call
    created it).
    """
    from cryoves.atomic import removing_new_dirs

    with removing_new_dirs(outdir) if outdir is not None else contextlib.nullcontext(), contextlib.ExitStack() as stack:
        return _segment(tomo, outdir, config, force=force, progress=progress, should_stop=should_stop,
                        keep_stages=keep_stages, model=model, backend=backend or Backend(), stack=stack)


def _segment(
    tomo: Tomogram | str | os.PathLike,
    outdir: str | os.PathLike | None,
    config: SegmentConfig | None,
    *,
    force: bool,
    progress: Progress | None,
    should_stop: Callable[[], bool] | None,
    keep_stages: bool,
    model: Any,
    backend: Backend,
    stack: contextlib.ExitStack,
) -> SegmentResult:
    from cryoves import parallel
    from cryoves.model import model_info
    from cryoves.postprocess.masks import restrict_probability, vesicles_in_region
    from cryoves.postprocess.scales import in_band, merge_levels, plan_levels
    from cryoves.postprocess.threshold import global_threshold

    cfg = config or SegmentConfig()
    steps = _Steps(progress, should_stop)
    out = prepare_output_dir(outdir, force=force) if outdir is not None else None

    tomo = steps.run("read", 0.0, _load_tomogram, tomo, cfg.voxel_size)
    tomo.release_pages()  # validation read every voxel
    if not tomo.is_isotropic:
        raise VoxelSizeError(
            f"anisotropic voxel size {tomo.voxel_size} Å (z, y, x) is not supported; resample the tomogram "
            "to isotropic voxels or give the true isotropic size with --voxel-size"
        )
    vs = tomo.voxel_size_a
    input_sha = (
        steps.run("checksum", 0.02, file_sha256, tomo.path)
        if tomo.path is not None and Path(tomo.path).is_file()
        else steps.run("checksum", 0.02, _array_sha256, np.asarray(tomo.data))
    )
    cyto, az = steps.run("masks", 0.04, _region_masks, cfg, tomo.shape)
    minfo = model_info(model if model is not None else cfg.model)
    levels = plan_levels(vs, minfo.voxel_size_a, minfo.vesicle_radius_nm, cfg.radius_range_nm, cfg.vesicle_radius_nm)
    if cfg.from_probability:
        levels = levels[:1]  # only the given map
    finest = levels[0].vesicle_radius_nm
    finest_hint = None if cfg.vesicle_radius_nm is None and abs(finest - minfo.vesicle_radius_nm) < 1e-9 else finest
    parallel.warm_up()  # the post-processing workers start while the network runs
    region = _mask_box(cyto)
    prob, pred_info = steps.run("predict", 0.05, _probability, tomo, cfg, out, input_sha, model, backend, finest_hint,
                                region)
    from cryoves.postprocess.outliers import map_confidence, repair  # scipy.stats: not before the network

    held = stack.enter_context(contextlib.ExitStack())  # the shared tomogram, until the last fit
    intensity = _intensity(tomo, bool(pred_info.get("inverted")), held)
    # the coarse levels' maps need only the tomogram: computed beside the finest level's post-processing
    coarse_maps = _coarse_maps(levels[1:], held, tomo=tomo, model=model, cfg=cfg, intensity=intensity, cyto=cyto,
                               thresholds=_threshold_candidates(cfg, model, pred_info))
    if cyto is not None:
        prob = steps.run("restrict", 0.6, restrict_probability, prob, cyto)

    if cfg.threshold is None:
        grid = _threshold_candidates(cfg, model, pred_info)
        th = steps.run("global_threshold", 0.65, global_threshold, prob, intensity, grid)
        release_pages(intensity)  # a memory-mapped file: its pages were read once, not kept
        threshold = float(th.threshold)
        searched = [float(grid[0]), float(grid[-1])]
    else:
        threshold = float(cfg.threshold)
        searched = None

    stage_labels: dict[str, np.ndarray] = {}
    if keep_stages:
        import cc3d

        stage_labels["global_threshold"] = cc3d.connected_components(prob > threshold, connectivity=6)
    labels, spheres, rej_adaptive, rej_fit = _objects(
        steps.run, prob, threshold, intensity, vs, levels[0].min_radius_nm, backend.fit_spheres,
        stage_labels if keep_stages else None,
    )
    del labels  # not needed after the fits: free it before the coarse levels
    spheres, rej_band = in_band(spheres, levels[0])
    spheres = spheres.with_df(spheres.df.assign(map_confidence=map_confidence(prob, spheres.centres, spheres.radii)))
    stage_tables: dict[str, VesicleTable] = {}
    if keep_stages:
        stage_labels["spheres"] = spheres.to_labels(tomo.shape)
        stage_tables["spheres"] = spheres
    qc = functools.partial(repair, p_threshold=cfg.max_mahalanobis_p, min_correlation=cfg.min_profile_correlation)
    vesicles, rej_repair = steps.run("outliers", 0.9, qc, spheres, intensity, min_radius_nm=levels[0].min_radius_nm)
    if keep_stages:
        stage_tables["outliers"] = vesicles
    per_level, rejected_parts = [vesicles], [rej_adaptive, rej_fit, rej_band, rej_repair]
    if len(levels) > 1:
        coarse = functools.partial(_coarse_level, tomo=tomo, cfg=cfg, intensity=intensity, qc=qc)
        for k, lvl in enumerate(levels[1:], start=1):
            found = pd.concat([t.df for t in per_level], ignore_index=True)
            known = per_level[0].with_df(found.assign(id=np.arange(1, len(found) + 1)))
            table, rej, lvl_info = steps.run(f"level_{k}", 0.9, coarse, lvl, coarse_maps[k - 1], known=known)
            per_level.append(table)
            rejected_parts += rej
            pred_info.setdefault("coarse_levels", []).append(lvl_info)
        del coarse
    del intensity  # the fits are done: free the shared tomogram before rendering and writing
    held.close()
    pred_info["levels"] = [lvl.to_dict() for lvl in levels]
    vesicles, rej_merge = steps.run("merge_levels", 0.92, merge_levels, per_level, levels)
    rejected_parts.append(rej_merge)
    if cyto is not None:
        vesicles, rej_region = steps.run("region", 0.93, vesicles_in_region, vesicles, cyto)
        rejected_parts.append(rej_region)
    vesicles, rejected = _final_ids(vesicles.with_grid(tomo.shape, tomo.origin), _rejected_frame(*rejected_parts))
    # uint16 when the ids fit (what the MRC file stores anyway): half the memory, no conversion on writing
    wide = len(vesicles) and int(vesicles.ids.max()) > np.iinfo(np.uint16).max
    final_labels = steps.run("render", 0.95, vesicles.to_labels, dtype=np.uint32 if wide else np.uint16)

    manifest = segment_manifest(
        version=__version__,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        inputs={
            "tomogram": str(tomo.path) if tomo.path else None,
            "sha256": input_sha,
            "shape": list(tomo.shape),
            "voxel_size_a": list(tomo.voxel_size),
            "origin_a": list(tomo.origin),
        },
        parameters=cfg.to_dict(),
        prediction=_jsonable(pred_info),
        threshold=threshold,
        threshold_searched=searched,
        n_vesicles=len(vesicles),
        n_rejected=int(len(rejected)),
        timings_s=steps.timings,
    )
    if out is not None:
        write_result(
            out,
            functools.partial(_write_result_files, tomo=tomo, vesicles=vesicles, rejected=rejected, prob=prob,
                              labels=final_labels, cyto=cyto, az=az, manifest=manifest, steps=steps),
            manifest,
        )
        # the written map and labels are returned as read-only memory maps of the files: the
        # arrays in memory (2 × 4 bytes per voxel) are freed before the report
        prob = read_mrc(out / OUTPUT_FILES["probability"], validate=False).data
        final_labels = read_mrc(out / OUTPUT_FILES["labels"], validate=False).data
        if cfg.report and tomo.path is not None:
            steps.run("report", 0.99, _write_report, out, tomo.data)
    return SegmentResult(vesicles, rejected, prob, final_labels, manifest, out, stage_labels, stage_tables)


def _mask_box(mask: np.ndarray | None) -> tuple[slice, ...] | None:
    """The bounding box of a region mask (the network runs only there); None without a mask."""
    from cryoves.postprocess._common import bounding_box

    return None if mask is None else bounding_box(mask)


def _intensity(tomo: Tomogram, inverted: bool, stack: contextlib.ExitStack) -> np.ndarray:
    """The tomogram as float32, dense = dark (post-processing expects it); in shared memory when
    post-processing has worker processes (filled slab by slab: no second full copy). A float32 file
    that needs no inversion is used as it is: the workers map the file itself (no copy at all)."""
    from cryoves import parallel

    if parallel.workers() <= 1:
        src = tomo.asarray(np.float32)
        return -src if inverted else src
    if not inverted and tomo.data.dtype == np.float32 and parallel.file_ref(tomo.data) is not None:
        return tomo.data
    out = stack.enter_context(parallel.SharedArray(shape=tomo.shape, dtype=np.float32)).array
    for z in range(0, tomo.shape[0], 16):
        slab = np.asarray(tomo.data[z : z + 16], dtype=np.float32)
        out[z : z + 16] = -slab if inverted else slab
    tomo.release_pages()
    return out


def _objects(
    run: Callable[..., Any], prob: np.ndarray, threshold: float, intensity: np.ndarray, vs: float, min_radius_nm: float,
    fit: Callable[..., Any], stage_labels: dict[str, np.ndarray] | None = None,
    select: Callable[[np.ndarray], np.ndarray] | None = None,
    labelled: tuple[np.ndarray, pd.DataFrame] | None = None,
) -> tuple[np.ndarray, VesicleTable, pd.DataFrame, pd.DataFrame]:
    """Map → objects → spheres: adaptive labelling (or the ``labelled`` result of it), sphere fits,
    pieces of one vesicle rejoined and refitted (``select`` may drop objects before fitting).
    Returns (labels, spheres, rejected by labelling, rejected by fitting)."""
    from cryoves.postprocess.adaptive import label_vesicles, rejoin_duplicate_pieces

    if labelled is None:
        labelled = run("adaptive", 0.7, label_vesicles, prob, threshold, vs, min_radius_nm=min_radius_nm)
    labels, rej_adaptive = labelled
    if select is not None:
        labels = select(labels)
    if stage_labels is not None:
        stage_labels["adaptive"] = labels.copy()
    cache: dict = {}
    spheres, rej_fit = run("spheres", 0.8, fit, intensity, labels, vs, cache=cache)
    joined, new_ids = rejoin_duplicate_pieces(labels, spheres.ids, spheres.centres, spheres.radii, inplace=True)
    if new_ids:
        # refit with the whole objects in place of their pieces (measured: better than letting the
        # pieces' fits compete with the whole object's, which loses vesicles cut by the volume border);
        # only objects whose start or neighbours changed are fitted again
        labels = joined
        spheres, rej_fit = run("refit", 0.85, fit, intensity, labels, vs, cache=cache)
    return labels, spheres, rej_adaptive, rej_fit


def _call(_name: str, _fraction: float, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return fn(*args, **kwargs)


#: Activation memory of a coarse level's network tiles on a CPU (bytes): that network runs while the
#: finest level is post-processed, so its tiles are kept smaller than the finest level's
#: (:data:`cryoves.predict.DEFAULT_TILE_BUDGET`).
COARSE_TILE_BUDGET = 256 * 2**20


@dataclass
class _CoarseMap:
    """A coarse level's network map and objects on its own grid, before the known vesicles are
    taken out: probability, network input, global threshold, adaptive labels."""

    prob: np.ndarray
    image: np.ndarray
    threshold: float
    labels: np.ndarray
    seconds: float


def _coarse_map(
    lvl: Level, *, tomo: Tomogram, model: Any, cfg: SegmentConfig, intensity: np.ndarray, cyto: np.ndarray | None,
    thresholds: np.ndarray,
) -> _CoarseMap:
    """What a coarse level needs of the tomogram alone (no finer level's vesicles)."""
    from cryoves.device import choose_device
    from cryoves.model import load_model, model_info
    from cryoves.postprocess.adaptive import label_vesicles
    from cryoves.postprocess.threshold import global_threshold
    from cryoves.predict import predict_tomogram

    t0 = time.perf_counter()
    model = model if model is not None else load_model(cfg.model)
    # the network input comes from the tomogram already in memory (dense = dark), not from the file:
    # the same numbers (resampling commutes with the sign), no second copy of the tomogram's pages
    src = Tomogram(intensity, tomo.voxel_size, tomo.origin)
    inverted = model_info(model).polarity != "dense_dark"
    cpu = choose_device(cfg.device).type == "cpu"
    res = predict_tomogram(src, model, device=cfg.device, tta=cfg.tta, invert=inverted, precision=cfg.precision,
                           vesicle_radius_nm=lvl.vesicle_radius_nm, on_model_grid=True, progress=False,
                           skip_vacuum=not cfg.whole_volume, region=_mask_box(cyto),
                           memory_budget=COARSE_TILE_BUDGET if cpu else None)
    prob = res.prob
    if cyto is not None:
        from cryoves.postprocess.masks import restrict_probability
        from cryoves.preprocess import resample

        prob = restrict_probability(prob, resample(cyto.astype(np.float32), prob.shape, order=1) > 0.5)
    image = res.image
    assert image is not None  # on_model_grid: the network input comes with the map
    th = float(global_threshold(prob, image, thresholds).threshold)
    labels, _ = label_vesicles(prob, th, lvl.grid_voxel_a, min_radius_nm=lvl.min_radius_nm)
    return _CoarseMap(prob, image, th, labels, time.perf_counter() - t0)


def _coarse_maps(
    levels: list[Level], stack: contextlib.ExitStack, **kwargs: Any
) -> list[Callable[[], _CoarseMap]]:
    """The coarse levels' maps, each as a call that returns it, computed in the background from now
    on (:func:`cryoves.parallel.in_background`): the finest level's post-processing leaves a core
    idle part of the time (measured: 20-30 % in its steps). ``stack`` waits for them before it
    releases what they read."""
    from cryoves import parallel

    return parallel.in_background([functools.partial(_coarse_map, lvl, **kwargs) for lvl in levels], stack)


def _coarse_level(
    lvl: Level, coarse_map: Callable[[], _CoarseMap], *, tomo: Tomogram, cfg: SegmentConfig, intensity: np.ndarray,
    qc: Callable[..., Any], known: VesicleTable,
) -> tuple[VesicleTable, list[pd.DataFrame], dict[str, Any]]:
    """The vesicles of one coarse pyramid level, fitted on the tomogram at its own voxel size."""
    from cryoves.postprocess.outliers import map_confidence
    from cryoves.postprocess.scales import coarse_candidates, coarse_objects, in_band
    from cryoves.postprocess.spheres import fit_spheres, fit_spheres_at

    t0 = time.perf_counter()
    cm = coarse_map()
    prob = cm.prob
    vs = tomo.voxel_size_a
    select = functools.partial(coarse_objects, lvl=lvl, tomogram_shape=tomo.shape, voxel_size_a=vs, known=known)
    _, fitted, _, _ = _objects(_call, prob, cm.threshold, cm.image, lvl.grid_voxel_a, lvl.min_radius_nm, fit_spheres,
                               select=select, labelled=(cm.labels, pd.DataFrame()))
    ids, centres, radii = coarse_candidates(fitted, lvl, prob.shape, tomo.shape, vs, known)
    conf = map_confidence(prob, fitted.centres, fitted.radii)[np.isin(fitted.ids, ids)]
    table, rej_fit = fit_spheres_at(intensity, centres, radii, vs)
    table = table.with_df(table.df.assign(map_confidence=conf[table.ids - 1]))
    table, rej_band = in_band(table, lvl)
    # a coarse level's few vesicles are no reference for "a visible membrane": the finest level's are
    con = known.df["membrane_contrast"].to_numpy(float) if "membrane_contrast" in known.df.columns else []
    ref = float(np.nanmedian(con)) if np.isfinite(con).sum() >= 3 else None
    table, rej_qc = qc(table, intensity, min_radius_nm=lvl.min_radius_nm, contrast_reference=ref)
    info = {**lvl.to_dict(), "threshold": cm.threshold, "grid_shape": list(prob.shape), "candidates": len(fitted),
            "new": len(centres), "vesicles": len(table), "map_seconds": round(cm.seconds, 3),
            "seconds": round(cm.seconds + time.perf_counter() - t0, 3)}
    return table, [rej_fit, rej_band, rej_qc], info


def _threshold_candidates(cfg: SegmentConfig, model: Any, pred_info: dict[str, Any]) -> np.ndarray:
    """The global threshold grid: the configured range, else the one of the model that made the
    map (described beside a ``--from-probability`` map), else the one stored with ``cfg.model``."""
    from cryoves.model import model_info
    from cryoves.postprocess.threshold import threshold_grid

    if cfg.threshold_range is not None:
        return threshold_grid(cfg.threshold_range)
    if pred_info.get("threshold_range"):
        return threshold_grid(tuple(pred_info["threshold_range"]))
    return model_info(model if model is not None else cfg.model).threshold_grid()


def _renumber(table: VesicleTable) -> VesicleTable:
    """Vesicle ids 1 … N in (z, y, x) order."""
    df = table.df.sort_values(["z", "y", "x"], kind="stable").reset_index(drop=True)
    df["id"] = np.arange(1, len(df) + 1)
    return table.with_df(df)


def _final_ids(vesicles: VesicleTable, rejected: pd.DataFrame) -> tuple[VesicleTable, RejectedTable]:
    """The ids of the written result: vesicles 1 … N and rejected candidates N+1 … N+M, both in
    (z, y, x) order (candidates without a centre last), so no id is used twice and a candidate
    restored in review keeps its id. The steps' intermediate ids are dropped."""
    vesicles = _renumber(vesicles)
    rej = rejected.assign(id=np.arange(1, len(rejected) + 1))  # intermediate ids may repeat
    return vesicles, RejectedTable(rej).renumbered(len(vesicles) + 1)


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def _write_result_files(
    out: Path,
    *,
    tomo: Tomogram,
    vesicles: VesicleTable,
    rejected: RejectedTable,
    prob: np.ndarray,
    labels: np.ndarray,
    cyto: np.ndarray | None,
    az: np.ndarray | None,
    manifest: dict[str, Any],
    steps: _Steps,
) -> list[str]:
    """Every output file of a segmentation (for :func:`cryoves.results.write_result`); their names."""
    from cryoves.io.imod import write_vesicles_mod
    from cryoves.io.tables import write_vesicles

    t0 = time.perf_counter()
    f = OUTPUT_FILES
    vs, origin = tomo.voxel_size, tomo.origin
    vesicles.write_csv(out / f["vesicles"])
    write_vesicles(out / f["star"], vesicles)
    write_vesicles_mod(out / f["mod"], vesicles, tomo.shape)
    rejected.write_csv(out / f["rejected"])
    from cryoves import parallel

    # the two volumes on two threads (conversion and file writes release the GIL)
    parallel.thread_map(lambda job: write_mrc(out / job[0], job[1], vs, origin),
                        [(f["probability"], prob.astype(np.float32, copy=False)), (f["labels"], labels)])
    written = [f["vesicles"], f["star"], f["mod"], f["rejected"], f["probability"], f["labels"]]
    if cyto is not None or az is not None:
        from cryoves.io.pyto import write_pyto_labels

        _, ids_json = write_pyto_labels(out / f["pyto"], vesicles, tomo.shape, cytoplasm=cyto, active_zone=az, origin=origin)
        written += [f["pyto"], ids_json.name]
    if cyto is not None:
        write_mrc(out / f["cytoplasm_mask"], cyto.astype(np.uint8), vs, origin)
        written.append(f["cytoplasm_mask"])
    if az is not None:
        write_mrc(out / f["active_zone_mask"], az.astype(np.uint8), vs, origin)
        written.append(f["active_zone_mask"])
    steps.timings["write"] = round(time.perf_counter() - t0, 3)
    manifest["timings_s"] = steps.timings
    return written


def _write_report(out: Path, volume: Any = None) -> None:
    """The QC report is a view of a complete result: a failure here is logged, the result stays valid.
    ``volume``: the tomogram's voxels in memory (not read again)."""
    from cryoves.report import make_report

    try:
        make_report(out, volume=volume)
    except Exception as exc:  # noqa: BLE001 - the report must never invalidate a finished segmentation
        log.warning("QC report not written: %s (run 'cryoves report %s' to retry)", exc, out)

"""Preprocessing for the network: resampling to the model grid and back, normalisation, polarity.

Arrays are (z, y, x) float32 throughout (no integer casts). Resampling maps voxel *centres*
so that input and output cover the same physical extent: output voxel j along an axis of
n → m voxels sits at input coordinate (j + ½)·n/m − ½. Going to the model grid and back with
:func:`from_model_grid` is therefore aligned to sub-voxel precision.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from cryoves import parallel
from cryoves.errors import InputError, ParameterError
from cryoves.io.tomogram import Tomogram, release_pages

log = logging.getLogger(__name__)

#: Number of voxels a resampling chunk reads at most (input side), ~16 MiB of float32.
_CHUNK_VOXELS = 1 << 22


def _axis_coords(n: int, m: int) -> np.ndarray:
    """Input coordinates of the m output voxel centres (extent-aligned)."""
    return (np.arange(m, dtype=np.float64) + 0.5) * (n / m) - 0.5


def _axis_weights(n: int, m: int, sigma: float, order: int) -> tuple[np.ndarray, np.ndarray]:
    """The linear map n → m input voxels of one axis as windows: output o is
    ``Σ_t weights[o, t] · input[starts[o] + t]``. Order 1: a Gaussian of ``sigma`` (scipy's
    ``gaussian_filter1d``: truncated at 4σ, edge values repeated), then linear interpolation at
    :func:`_axis_coords` (edge values beyond the ends); order 0: nearest."""
    c = _axis_coords(n, m)
    if order == 0:
        idx = np.clip(np.floor(c + 0.5), 0, n - 1).astype(np.int64)
        return idx, np.ones((m, 1))
    r = int(4.0 * sigma + 0.5) if sigma > 0 else 0
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2) if r else np.ones(1)
    k /= k.sum()
    x = np.clip(c, 0, n - 1)
    i0 = np.clip(np.floor(x), 0, max(n - 2, 0)).astype(np.int64)
    t = (x - i0).astype(np.float32).astype(np.float64)
    w = min(2 * r + 2, n)
    starts = np.clip(i0 - r, 0, n - w)
    weights = np.zeros((m, w))
    rows = np.arange(m)
    for d, kd in zip(range(-r, r + 1), k, strict=True):
        np.add.at(weights, (rows, np.clip(i0 + d, 0, n - 1) - starts), (1.0 - t) * kd)
        if n > 1:
            np.add.at(weights, (rows, np.clip(i0 + 1 + d, 0, n - 1) - starts), t * kd)
    return starts, weights


def _aa_sigma(n: int, m: int) -> float:
    """Anti-aliasing Gaussian σ (input voxels) when shrinking n → m (0 when enlarging)."""
    return max(0.0, (n / m - 1.0) / 2.0)


def _target_shape(shape: Sequence[int], factor_or_shape: Any) -> tuple[int, int, int]:
    arr = np.atleast_1d(np.asarray(factor_or_shape))
    if arr.size == 3 and np.issubdtype(arr.dtype, np.integer):
        out = tuple(int(v) for v in arr)
    else:
        f = np.broadcast_to(arr.astype(float), (3,))
        if not np.all(np.isfinite(f)) or np.any(f <= 0):
            raise ParameterError(f"resampling factor must be positive, got {factor_or_shape!r}")
        out = tuple(max(1, int(round(s * fi))) for s, fi in zip(shape, f, strict=True))
    if any(v < 1 for v in out):
        raise ParameterError(f"target shape {out} must be at least 1 voxel per axis")
    return out  # type: ignore[return-value]


def resample(
    volume: Any,
    factor_or_shape: Any,
    order: int = 1,
    antialias: bool = True,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Resample a (z, y, x) volume by a factor (scalar or per axis) or to a target shape.

    A float factor f gives shape ``round(n·f)``; an integer 3-tuple is the target shape.
    ``order`` 0 (nearest) or 1 (linear, separable = trilinear). With ``antialias`` a Gaussian
    of σ = (n/m − 1)/2 input voxels is applied along each shrunk axis first. Voxel centres are
    aligned (see the module docstring). The input may be a memory map or any array-like: it is
    read in z-chunks, and ``out`` (e.g. a ``np.memmap``) receives the float32 result chunk by
    chunk, so memory stays bounded by ``out`` plus one chunk.
    """
    if order not in (0, 1):
        raise ParameterError(f"resampling order must be 0 or 1, got {order}")
    shape = tuple(int(s) for s in volume.shape)
    if len(shape) != 3:
        raise InputError(f"resample needs a 3-D (z, y, x) volume, got shape {shape}")
    target = _target_shape(shape, factor_or_shape)
    if out is None:
        out = np.empty(target, dtype=np.float32)
    elif tuple(out.shape) != target:
        raise ParameterError(f"out has shape {out.shape}, expected {target}")
    from cryoves import _resample_kernels

    def axis_weights(axis: int) -> tuple[np.ndarray, np.ndarray] | None:
        n, m = shape[axis], target[axis]
        if n == m:
            return None
        sigma = _aa_sigma(n, m) if (antialias and order == 1) else 0.0
        return _axis_weights(n, m, sigma, order)

    wz, wy, wx = (axis_weights(a) for a in range(3))
    passes = sorted((a for a, wts in enumerate((wz, wy, wx)) if wts is not None), key=lambda a: target[a] / shape[a])
    nz, mz = shape[0], target[0]
    plane = max(1, shape[1] * shape[2])
    reach = wz[1].shape[1] if wz is not None else 1  # input planes one output plane reads
    per_out = max(1.0, nz / mz)
    step = max(1, int((_CHUNK_VOXELS / plane - 2 * reach) / per_out))

    def chunk(j0: int) -> None:
        j1 = min(mz, j0 + step)
        if wz is None:
            i_lo, i_hi = j0, j1
        else:
            i_lo = int(wz[0][j0:j1].min())
            i_hi = int(wz[0][j0:j1].max()) + wz[1].shape[1]
        block = np.ascontiguousarray(volume[i_lo:i_hi], dtype=np.float32)
        release_pages(volume)  # a memory-mapped input does not stay resident chunk after chunk
        for axis in passes:  # the most shrinking axis first: each pass reads what the last one left
            if axis == 0:
                block = _resample_kernels.apply_axis(block, 0, wz[0][j0:j1] - i_lo, wz[1][j0:j1])
            else:
                block = _resample_kernels.apply_axis(block, axis, *(wy if axis == 1 else wx))
        out[j0:j1] = block

    parallel.thread_map(chunk, range(0, mz, step))  # chunks on several threads: the same numbers
    return out


def model_grid_scale(
    tomo_voxel_size_a: float | Sequence[float],
    model_voxel_size_a: float,
    vesicle_radius_nm: float | None = None,
    training_radius_nm: float = 19.0,
) -> tuple[float, float, float]:
    """Per-axis factor (z, y, x) from the tomogram grid to the model grid (model voxels per input voxel).

    Without a radius hint: voxel size / model voxel size. With ``vesicle_radius_nm`` the image is
    additionally scaled by training_radius / vesicle_radius, so that vesicles of that radius
    appear as large as the training vesicles.
    """
    vs = np.broadcast_to(np.asarray(tomo_voxel_size_a, dtype=float), (3,))
    s = vs / float(model_voxel_size_a)
    if vesicle_radius_nm is not None:
        if not (vesicle_radius_nm > 0 and math.isfinite(vesicle_radius_nm)):
            raise ParameterError(f"--vesicle-radius must be a positive number of nm, got {vesicle_radius_nm}")
        s = s * (training_radius_nm / float(vesicle_radius_nm))
    return tuple(float(v) for v in s)  # type: ignore[return-value]


def _model_grid_shape(shape: Sequence[int], nominal: Sequence[float]) -> tuple[int, int, int]:
    target = _target_shape(shape, nominal)
    if min(target) < 4:
        raise ParameterError(
            f"the model grid would be only {target} voxels; check --voxel-size / --vesicle-radius"
        )
    return target


def to_model_grid(
    tomo: Tomogram,
    model_voxel_size_a: float,
    vesicle_radius_nm: float | None = None,
    *,
    training_radius_nm: float = 19.0,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Resample a tomogram onto the model grid (anti-aliased, float32, centre-aligned).

    Returns ``(array, scale)`` where ``scale`` is the actual per-axis factor (z, y, x) = model
    shape / input shape; use :func:`from_model_grid` with the input shape to go back.
    """
    nominal = model_grid_scale(tomo.voxel_size, model_voxel_size_a, vesicle_radius_nm, training_radius_nm)
    target = _model_grid_shape(tomo.shape, nominal)
    if all(abs(f - 1.0) < 1e-6 for f in nominal):
        arr = out if out is not None else np.empty(tomo.shape, np.float32)
        for z0 in range(0, tomo.shape[0], 32):
            arr[z0 : z0 + 32] = np.asarray(tomo.data[z0 : z0 + 32], dtype=np.float32)
    else:
        arr = resample(tomo.data, target, order=1, antialias=True, out=out)
    scale = tuple(m / n for m, n in zip(target, tomo.shape, strict=True))
    return arr, scale  # type: ignore[return-value]


def from_model_grid(prob: Any, shape: Sequence[int], out: np.ndarray | None = None) -> np.ndarray:
    """Resample a model-grid map back to the input ``shape`` (z, y, x); trilinear, centre-aligned."""
    shape = tuple(int(s) for s in shape)
    if tuple(prob.shape) == shape:
        if out is None:
            return np.asarray(prob, dtype=np.float32)
        out[...] = prob
        return out
    return resample(prob, shape, order=1, antialias=True, out=out)


def _sample(volume: Any, max_voxels: int = 1 << 21) -> np.ndarray:
    """A deterministic strided subsample (float64) for statistics of big volumes."""
    n = int(np.prod(volume.shape))
    step = max(1, int(round((n / max_voxels) ** (1 / 3))))
    return np.asarray(volume[::step, ::step, ::step], dtype=np.float64).ravel()


NORMALISATIONS = ("zscore", "robust_zscore", "none")


def normalise(
    volume: np.ndarray,
    method: str = "robust_zscore",
    percentiles: tuple[float, float] = (0.5, 99.5),
    inplace: bool = False,
) -> np.ndarray:
    """Normalise intensities (float32 result).

    ``zscore``: (x − mean) / std. ``robust_zscore``: clip to the given percentiles first (gold
    beads, empty slabs), then z-score with the mean/std of the clipped values. ``none``: as is.
    Statistics come from a strided subsample of ≤ 2 M voxels.
    """
    arr = volume if (inplace and volume.dtype == np.float32) else np.array(volume, dtype=np.float32)
    params = _normalisation(_sample(arr), method, percentiles)
    parallel.thread_map(lambda z: _normalise_slab(arr[z : z + 16], *params), range(0, arr.shape[0], 16))
    return arr


def _normalisation(
    sample: np.ndarray, method: str, percentiles: tuple[float, float]
) -> tuple[tuple[float, float] | None, float, float] | tuple[None, None, None]:
    """(clip range or None, mean, std) of :func:`normalise` from a float64 sample; (None,) * 3 for "none"."""
    if method not in NORMALISATIONS:
        raise ParameterError(f"unknown normalisation '{method}'; use one of {', '.join(NORMALISATIONS)}")
    if method == "none":
        return None, None, None
    s = sample
    clip = None
    if method == "robust_zscore":
        lo, hi = np.percentile(s, percentiles)
        if lo < hi:
            s = np.clip(s, lo, hi)
            clip = (lo, hi)
        else:
            # > 99 % of the voxels share one value (e.g. int8 with a narrow range): clipping
            # would make the volume constant, so z-score the unclipped values instead
            log.warning("intensity percentiles %s are equal (%g); normalising without clipping", percentiles, lo)
    mean, std = float(s.mean()), float(s.std())
    if not std > 0:
        raise InputError(
            f"the volume is constant (every voxel is {mean:g}), nothing to segment; check that the file "
            "holds the reconstructed tomogram"
        )
    return clip, mean, std


def _normalise_slab(block: np.ndarray, clip: tuple[float, float] | None, mean: float | None, std: float | None) -> None:
    """Normalise a float32 block in place (elementwise: slabs on several threads give the same numbers)."""
    if mean is None:
        return
    if clip is not None:
        np.clip(block, *clip, out=block)
    block -= np.float32(mean)
    block *= np.float32(1.0 / std)


#: |score| below this is reported as ambiguous (logged) and treated as dense = dark.
POLARITY_MIN_CONFIDENCE = 0.02


def detect_polarity(
    volume: Any, sigma: float = 2.0, max_side: int = 128, background_sigma: float = 8.0
) -> tuple[str, float]:
    """Guess whether dense material (membranes, protein) is dark or bright.

    Method: dense matter is a minority of the voxels in a sea of ice/cytosol, so the intensity
    histogram of the band-passed volume has its long tail on the dense side. The band pass
    (Gaussian ``sigma`` voxels, ~4 nm on the 22 Å model grid, which removes the symmetric noise,
    minus Gaussian ``background_sigma``) removes slow intensity changes: without it, vacuum slabs
    above and below a thin ice layer (a bright minority) flip the sign — measured on simulated
    tomograms with 60–110 nm ice in a 141 nm box. The robust
    (quantile) skewness ``(q99 + q1 − 2·q50) / (q99 − q1)`` is negative for dense = dark. The
    returned score is its negation: > 0 means ``"dense_dark"``, < 0 ``"dense_bright"``; its
    magnitude is the confidence (|score| < 0.02 is logged as ambiguous and read as dense = dark).
    Only a central crop of at most ``max_side`` voxels per axis is analysed.
    """
    shape = tuple(int(s) for s in volume.shape)
    sl = tuple(slice(max(0, (s - max_side) // 2), max(0, (s - max_side) // 2) + min(s, max_side)) for s in shape)
    crop = np.asarray(volume[sl], dtype=np.float32)
    g, background = parallel.thread_map(lambda s: ndimage.gaussian_filter(crop, s, mode="nearest"),
                                        (sigma, background_sigma))
    g -= background
    q1, q50, q99 = np.percentile(g, [1.0, 50.0, 99.0])
    spread = float(q99 - q1)
    if not spread > 0:
        return "dense_dark", 0.0
    score = -float((q99 + q1 - 2.0 * q50) / spread)
    if abs(score) < POLARITY_MIN_CONFIDENCE:
        log.warning("contrast polarity is ambiguous (score %.3f); assuming dense = dark, "
                    "use --invert/--no-invert to decide", score)
        return "dense_dark", score
    return ("dense_dark" if score > 0 else "dense_bright"), score


def prepare_input(
    tomo: Tomogram,
    info: Any,
    *,
    invert: bool | None = None,
    vesicle_radius_nm: float | None = None,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """The network input of ``tomo``: float32 (z, y, x) on the model grid, and how it was made.

    ``info`` describes the network (a :class:`cryoves.model.ModelInfo` or any object with
    ``voxel_size_a``, ``vesicle_radius_nm``, ``polarity``, ``prefilter_sigma``, ``normalisation``).
    Steps: resample to the model voxel size (× training radius / ``vesicle_radius_nm`` if given;
    into ``out`` when given), detect the contrast polarity on the model grid unless ``invert``
    is given (inverted when it differs from ``info.polarity``; a given ``invert`` is not checked
    and the score is then None), Gaussian prefilter, normalisation over the whole volume.
    Prediction (single-process and blockwise) and training all prepare their input here.
    Returns ``(grid, {"scale", "inverted", "polarity", "polarity_score"})``.
    """
    nominal = model_grid_scale(tomo.voxel_size, info.voxel_size_a, vesicle_radius_nm, info.vesicle_radius_nm)
    if all(abs(f - 1.0) < 1e-6 for f in nominal) and not info.prefilter_sigma > 0:
        _model_grid_shape(tomo.shape, nominal)
        return _prepare_on_own_grid(tomo, info, invert, out)
    grid, scale = to_model_grid(tomo, info.voxel_size_a, vesicle_radius_nm,
                                training_radius_nm=info.vesicle_radius_nm, out=out)
    inverted, polarity, score = _polarity(grid, info, invert)
    if inverted:
        np.negative(grid, out=grid)
    if info.prefilter_sigma > 0:
        ndimage.gaussian_filter(grid, info.prefilter_sigma, mode="nearest", output=grid)
    normalise(grid, info.normalisation, inplace=True)
    return grid, {"scale": [float(v) for v in scale], "inverted": bool(inverted), "polarity": polarity,
                  "polarity_score": score}


def _polarity(volume: Any, info: Any, invert: bool | None) -> tuple[bool, str, float | None]:
    """(inverted, the tomogram's polarity, its score): detected unless ``invert`` is given (then
    the polarity follows from it and the model's, and the score is None: not measured)."""
    if invert is not None:
        dark = (info.polarity == "dense_dark") != bool(invert)
        return bool(invert), "dense_dark" if dark else "dense_bright", None
    polarity, score = detect_polarity(volume)
    inverted = (polarity == "dense_dark") != (info.polarity == "dense_dark")
    if inverted:
        log.info("dense material looks bright (polarity score %.3f); inverting the contrast", score)
    return inverted, polarity, float(score)


def _prepare_on_own_grid(
    tomo: Tomogram, info: Any, invert: bool | None, out: np.ndarray | None
) -> tuple[np.ndarray, dict[str, Any]]:
    """:func:`prepare_input` for a tomogram already on the model grid and no prefilter: polarity
    and statistics from the tomogram itself (the values the copy would hold), then one pass that
    copies, inverts and normalises each slab: the same numbers as the three passes."""
    inverted, polarity, score = _polarity(tomo.data, info, invert)
    sample = _sample(tomo.data).astype(np.float32).astype(np.float64)  # the values of the float32 copy
    params = _normalisation(-sample if inverted else sample, info.normalisation, (0.5, 99.5))
    grid = out if out is not None else np.empty(tomo.shape, np.float32)

    def slab(z: int) -> None:
        block = grid[z : z + 16]
        block[...] = tomo.data[z : z + 16]
        if inverted:
            np.negative(block, out=block)
        _normalise_slab(block, *params)

    parallel.thread_map(slab, range(0, tomo.shape[0], 16))
    return grid, {"scale": [1.0, 1.0, 1.0], "inverted": bool(inverted), "polarity": polarity,
                  "polarity_score": score}


#: Blocks per in-plane axis for the slab search: a tilted slab is found block by block.
SLAB_BLOCKS = 3
#: A block's texture profile must rise this much (relative) above its vacuum level to count.
SLAB_MIN_CONTRAST = 0.04


def specimen_slab(volume: Any, margin: int = 12, *, blocks: int = SLAB_BLOCKS) -> slice:
    """The z-range (slices of ``volume``, z, y, x) that holds the specimen, with ``margin`` slices
    more on each side; the whole range when no vacuum is clearly seen.

    Vacuum above and below the ice slab holds only reconstruction noise; the slab adds texture
    (membranes, proteins). Per z slice and per block of a ``blocks`` × ``blocks`` in-plane grid
    (a tilted slab moves between blocks), the texture is the standard deviation of the slice
    minus its Gaussian blur (σ 4 voxels). A block's profile along z counts only when it rises
    at least :data:`SLAB_MIN_CONTRAST` above its lowest level; the slices from either end that
    stay below half-way to its upper level (90th percentile) are vacuum. The specimen range is the
    union over the blocks. Only the ends are ever trimmed, so a slab that fills the volume, a
    uniform volume or a pale lumen inside the slab trims nothing.
    """
    nz, ny, nx = volume.shape
    if nz < 4 * margin or ny < 8 * blocks or nx < 8 * blocks:
        return slice(0, nz)
    yb = np.linspace(0, ny, blocks + 1).astype(int)
    xb = np.linspace(0, nx, blocks + 1).astype(int)
    def texture(z: int) -> list[float]:
        sl = np.asarray(volume[z], dtype=np.float32)
        hp = sl - ndimage.gaussian_filter(sl, 4.0)
        return [hp[yb[i] : yb[i + 1], xb[j] : xb[j + 1]].std() for i in range(blocks) for j in range(blocks)]

    prof = np.array(parallel.thread_map(texture, range(nz)), dtype=np.float64).T
    lo, hi = nz, 0
    for p in ndimage.gaussian_filter1d(prof, 2.0, axis=1, mode="nearest"):
        base, top = float(p.min()), float(np.percentile(p, 90))
        if not (np.isfinite(base) and base > 0) or top - base < SLAB_MIN_CONTRAST * base:
            return slice(0, nz)  # a block without a clear slab: keep everything
        inside = np.flatnonzero(p > 0.5 * (base + top))
        lo, hi = min(lo, int(inside[0])), max(hi, int(inside[-1]) + 1)
    if hi - lo < 2 * margin:
        return slice(0, nz)
    return slice(max(lo - margin, 0), min(hi + margin, nz))

"""Global threshold search: the threshold whose mask boundary lies on the darkest voxels.

For a candidate threshold t the binary mask is B(t) = prob > t and its shell S(t) is B(t) minus its
erosion by the 6-neighbour cross (voxels outside the volume count as foreground, so the volume border
does not erode). score(t) = mean raw intensity over S(t); membranes are dark, so the best threshold
puts the shell on the membrane and minimises the score.

All candidates are scored in one pass: with m(v) the minimum of ``prob`` over v and its in-volume
6-neighbours, v is in S(t) exactly when m(v) <= t < prob(v); so every voxel adds its intensity to a
contiguous run of candidates, accumulated with two weighted histograms and a cumulative sum.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from cryoves import parallel
from cryoves.errors import ParameterError
from cryoves.postprocess._common import check_same_shape, check_volume

log = logging.getLogger(__name__)

#: The original CryoVesNet search (low, high, step): 0.80, 0.81, ..., 0.99.
DEFAULT_THRESHOLD_RANGE = (0.80, 0.99, 0.01)


def threshold_grid(threshold_range) -> np.ndarray:
    """Candidates low, low + step, ..., high (inclusive) from ``(low, high, step)``, validated."""
    try:
        lo, hi, step = (float(v) for v in threshold_range)
    except (TypeError, ValueError) as exc:
        raise ParameterError(f"threshold range must be (low, high, step), got {threshold_range!r}") from exc
    if not (0.0 <= lo <= hi < 1.0 and step > 0):
        raise ParameterError(f"threshold range needs 0 <= low <= high < 1 and step > 0, got {(lo, hi, step)}")
    return np.round(np.arange(lo, hi + step / 2, step), 6)


DEFAULT_THRESHOLDS = threshold_grid(DEFAULT_THRESHOLD_RANGE)


@dataclass(frozen=True)
class ThresholdResult:
    """Chosen threshold and the score of every candidate (+inf where the shell is empty)."""

    threshold: float
    #: mean raw intensity of the mask shell, one per entry of ``thresholds``
    scores: np.ndarray
    thresholds: np.ndarray = field(default_factory=lambda: DEFAULT_THRESHOLDS.copy())
    #: True when every shell was empty and the fallback (lowest candidate) was returned.
    fallback: bool = False


def neighbourhood_min(prob: np.ndarray) -> np.ndarray:
    """Minimum of ``prob`` over each voxel and its 6 face neighbours inside the volume (z, y, x)."""
    m = prob.copy()
    for ax in range(prob.ndim):
        n = prob.shape[ax]
        if n < 2:
            continue
        lo = [slice(None)] * prob.ndim
        hi = [slice(None)] * prob.ndim
        lo[ax], hi[ax] = slice(0, n - 1), slice(1, n)
        np.minimum(m[tuple(lo)], prob[tuple(hi)], out=m[tuple(lo)])
        np.minimum(m[tuple(hi)], prob[tuple(lo)], out=m[tuple(hi)])
    return m


def _slab_sums(p: np.ndarray, m: np.ndarray, inten: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-candidate shell intensity sums and voxel counts for one slab (flattened arrays)."""
    k = len(t)
    sel = (p > t[0]) & (m <= t[-1])
    if not sel.any():
        return np.zeros(k), np.zeros(k)
    p, m, w = p[sel], m[sel], inten[sel].astype(np.float64)
    start = np.searchsorted(t, m, side="left")  # first candidate with t >= m
    stop = np.searchsorted(t, p, side="left")  # candidates with t < p are < stop
    ok = stop > start
    start, stop, w = start[ok], stop[ok], w[ok]
    s = np.bincount(start, weights=w, minlength=k + 1) - np.bincount(stop, weights=w, minlength=k + 1)
    c = np.bincount(start, minlength=k + 1) - np.bincount(stop, minlength=k + 1)
    return np.cumsum(s)[:k], np.cumsum(c)[:k].astype(np.float64)


def global_threshold(
    prob: np.ndarray,
    intensity: np.ndarray,
    thresholds: np.ndarray | None = None,
    slab: int = 32,
) -> ThresholdResult:
    """Choose the global threshold minimising the mean raw intensity of the mask's 1-voxel shell.

    ``prob`` and ``intensity`` are (z, y, x) arrays of equal shape; intensity is the raw tomogram with
    dense = dark. ``thresholds`` defaults to 0.80, 0.81, ..., 0.99. Candidates with an empty shell score
    +inf; if all are empty (e.g. an all-zero map) the lowest candidate is returned with
    ``fallback=True`` and a warning is logged. Processed in z slabs of ``slab`` sections to bound memory.
    """
    prob = check_volume(prob, "probability map")
    intensity = check_volume(intensity, "tomogram")
    check_same_shape(prob, intensity, "probability map", "tomogram")
    if not np.issubdtype(prob.dtype, np.floating):
        prob = prob.astype(np.float32)
    t = DEFAULT_THRESHOLDS if thresholds is None else np.asarray(thresholds, dtype=float).ravel()
    if t.size == 0 or not np.all(np.isfinite(t)):
        raise ParameterError("thresholds must be a non-empty list of finite numbers")
    order = np.argsort(t)
    # compare in prob's dtype, exactly as `prob > t` does for a Python float t
    ts = t[order].astype(prob.dtype)
    nz = prob.shape[0]

    def one_slab(z0: int) -> tuple[np.ndarray, np.ndarray]:
        z1 = min(z0 + slab, nz)
        a, b = max(z0 - 1, 0), min(z1 + 1, nz)
        m = neighbourhood_min(prob[a:b])[z0 - a : z0 - a + (z1 - z0)]
        return _slab_sums(prob[z0:z1].ravel(), m.ravel(), intensity[z0:z1].ravel(), ts)

    sums = np.zeros(len(t))
    counts = np.zeros(len(t))
    for s, c in parallel.thread_map(one_slab, range(0, nz, slab)):  # added in slab order: the loop's sums
        sums += s
        counts += c
    scores_sorted = np.full(len(t), np.inf)
    ok = counts > 0
    scores_sorted[ok] = sums[ok] / counts[ok]
    scores = np.empty(len(t))
    scores[order] = scores_sorted
    if not ok.any():
        log.warning("threshold search: every candidate gives an empty mask shell; using %.3f", float(ts[0]))
        return ThresholdResult(float(t[order[0]]), scores, t, fallback=True)
    best = int(np.argmin(scores))  # first minimum in the caller's order
    log.info("global threshold %.3f (shell mean intensity %.4g)", t[best], scores[best])
    return ThresholdResult(float(t[best]), scores, t)

"""Outlier detection and repair of fitted spheres.

A doubtful fit is *flagged* (kept, with the reason in the ``flags`` column; the review queue shows
flagged vesicles first) instead of removed when it is **supported**: the network is confident
inside it (``map_confidence``, mean probability within 0.7 x radius, >= ``min_map_confidence``) and
its radial profile shows a membrane (contrast above the population's limit; the coverage is not
used: on the simulator true vesicles near the volume border or a neighbour see their membrane in
fewer than half of the directions). Unsupported candidates are removed as before. Order of the steps in :func:`repair`:

1. profile correlation (Spearman correlation with the median profile) at or below
   ``min_correlation`` or below the population's lower fence (median - 4 robust SD): flagged when
   supported, removed otherwise (removal only below both limits), and removed at or below 0 in any
   case;
2. membrane-contrast filter, relative to the median contrast (objects without a visible membrane);
3. Mahalanobis test on (radius_nm, membrane_thickness_nm, membrane_density). The p-value is computed
   on D^2 with df = 3 (three features; the original used D instead of D^2, with df = 2): chi2(3)
   asymptotically, by default its exact finite-sample (Hotelling T^2 / F) form for the leave-one-out
   D^2 so that small tomograms are not over-flagged. Outliers are re-fitted with boxes grown by
   ``regrow_step`` voxels per try (at most ``max_regrow``); those that never pass are flagged when
   supported (a heavy-tailed feature distribution is no reason to lose a well-fitted vesicle) and
   removed otherwise, or when already flagged for their profile (two independent doubts);
4. overlaps: duplicates (a centre inside another sphere with more membrane evidence, see
   :func:`membrane_evidence`) are removed, the remaining intersecting
   spheres shrunk so that no two intersect (pairs from a cKDTree);
5. spheres with radius <= ``min_radius_nm`` are removed.

Every removal is a row of the rejected table with its step and reason. Fewer than 5 vesicles: the
Mahalanobis test is skipped (a 3 x 3 covariance cannot be estimated) and the log says so.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from scipy import special

from cryoves.errors import ParameterError
from cryoves.postprocess._common import check_volume, concat_rejected, rejected_frame, sphere_pairs
from cryoves.postprocess.spheres import FitFailure, FitOptions, _fit, _with_voxel_size
from cryoves.vesicles import VesicleTable

log = logging.getLogger(__name__)


# The distributions' functions from scipy.special, which scipy.stats calls itself (the same numbers, checked
# bit for bit): scipy.stats took 0.3 s to import in each worker that re-fits an outlier.
def _chi2_ppf(q: float, df: float) -> float:
    return float(2.0 * special.gammaincinv(df / 2.0, q))


FEATURES = ["radius_nm", "membrane_thickness_nm", "membrane_density"]
MIN_VESICLES_FOR_MAHALANOBIS = 5


def _mean_cov(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu = x.mean(axis=0)
    cov = np.cov(x, rowvar=False, ddof=1) if len(x) > 1 else np.zeros((x.shape[1], x.shape[1]))
    return mu, np.atleast_2d(cov)


def _regularise(cov: np.ndarray) -> np.ndarray:
    """Add a tiny ridge so nearly constant features do not make the covariance singular."""
    p = cov.shape[0]
    scale = np.trace(cov) / p if np.trace(cov) > 0 else 1.0
    return cov + np.eye(p) * scale * 1e-9


def squared_mahalanobis(x: np.ndarray, mu: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """D^2 of each row of ``x`` (N, p) from ``mu`` under ``cov`` (pseudo-inverse if singular)."""
    inv = np.linalg.pinv(_regularise(cov))
    d = np.atleast_2d(x) - mu
    return np.einsum("ij,jk,ik->i", d, inv, d)


def leave_one_out_d2(x: np.ndarray) -> np.ndarray:
    """D^2 of each row of ``x`` (N, p) from the mean and covariance (ddof 1) of the *other* rows.

    Unlike the plain distance, an outlier cannot hide by inflating the covariance it is judged by
    (with all rows included, D^2 can never exceed (N-1)^2/N, e.g. 13 for N = 15, whatever the outlier).
    """
    x = np.asarray(x, float)
    n, p = x.shape
    total = x.sum(axis=0)
    outer = np.einsum("ni,nj->ij", x, x)
    mu = (total[None] - x) / (n - 1)
    s = (outer[None] - np.einsum("ni,nj->nij", x, x) - (n - 1) * np.einsum("ni,nj->nij", mu, mu)) / (n - 2)
    scale = np.trace(s, axis1=1, axis2=2) / p
    s = s + np.eye(p)[None] * np.where(scale > 0, scale, 1.0)[:, None, None] * 1e-9
    d = x - mu
    return np.einsum("ni,ni->n", d, np.linalg.solve(s, d[..., None])[..., 0])


def loo_p_value(d2: np.ndarray, n: int, k: int = 3) -> np.ndarray:
    """Exact p-value of leave-one-out D^2 for Gaussian features (N = ``n`` vesicles, ``k`` features).

    x_i - mean(others) ~ N(0, (1 + 1/m) S) with m = n - 1, and S has nu = n - 2 degrees of freedom, so
    T^2 = D^2 m / (m + 1) is Hotelling T^2(k, nu) and (nu - k + 1) / (k nu) T^2 ~ F(k, nu - k + 1).
    For large N this tends to the chi2 test with df = k = 3; for small N the chi2 test would flag
    good vesicles. Needs n >= k + 2.
    """
    m = n - 1
    nu = n - 2
    t2 = np.asarray(d2, float) * m / (m + 1)
    return special.fdtrc(k, nu - k + 1, (nu - k + 1) / (k * nu) * t2)


def robust_mean_cov(
    x: np.ndarray, support_fraction: float | None = None, n_starts: int = 20, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Minimum-covariance-determinant style location and covariance of ``x`` (N, p).

    Concentration steps from random (p+1)-subsets keep the h = (N + p + 1) / 2 rows (or
    ``support_fraction`` x N) closest to the current estimate; the subset with the smallest
    determinant wins; it is rescaled for consistency under normality and reweighted (rows with
    D^2 below the 97.5 % chi2 quantile).
    """
    x = np.asarray(x, float)
    n, p = x.shape
    h = (n + p + 1) // 2 if support_fraction is None else int(np.ceil(support_fraction * n))
    h = min(max(h, p + 1), n)
    rng = np.random.default_rng(seed)
    starts = [np.arange(n)] + [rng.choice(n, size=min(p + 1, n), replace=False) for _ in range(n_starts)]
    best = None
    for idx in starts:
        mu, cov = _mean_cov(x[idx])
        prev = None
        for _ in range(50):
            d2 = squared_mahalanobis(x, mu, cov)
            keep = np.sort(np.argsort(d2, kind="stable")[:h])
            if prev is not None and np.array_equal(keep, prev):
                break
            prev = keep
            mu, cov = _mean_cov(x[keep])
        det = np.linalg.slogdet(_regularise(cov))[1]
        if best is None or det < best[0]:
            best = (det, mu, cov)
    _, mu, cov = best
    d2 = squared_mahalanobis(x, mu, cov)
    med = np.median(d2)
    if med > 0:
        cov = cov * med / _chi2_ppf(0.5, p)
    d2 = squared_mahalanobis(x, mu, cov)
    inl = d2 <= _chi2_ppf(0.975, p)
    if inl.sum() > p:
        mu, cov = _mean_cov(x[inl])
    return mu, cov


class _Scorer:
    """p-value of a new feature vector against a fixed reference set of vesicles."""

    def __init__(self, ref: np.ndarray, robust: bool, exact: bool):
        self.k = ref.shape[1]
        self.n_ref = len(ref)
        self.robust, self.exact = robust, exact
        self.mu, self.cov = robust_mean_cov(ref) if robust else _mean_cov(ref)

    def __call__(self, x: np.ndarray) -> tuple[float, float]:
        d2 = float(squared_mahalanobis(np.asarray(x, float)[None], self.mu, self.cov)[0])
        if self.robust or not self.exact:
            return np.sqrt(d2), float(special.chdtrc(self.k, d2))
        return np.sqrt(d2), float(loo_p_value(np.array([d2]), self.n_ref + 1, self.k)[0])


def mahalanobis_test(table: VesicleTable, robust: bool = False, exact: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Mahalanobis distance D (not squared) and p-value (on D^2, df = 3) of every vesicle.

    Features: radius_nm, membrane_thickness_nm, membrane_density. Classical mode judges each vesicle
    against the mean/covariance of all the others (:func:`leave_one_out_d2`) and, with ``exact``,
    takes p from the exact finite-sample law of that statistic (:func:`loo_p_value`, an F law that
    tends to chi2 df = 3); ``exact=False`` uses chi2 df = 3 directly. Robust mode uses an MCD-style
    estimate (:func:`robust_mean_cov`) and chi2 df = 3. NaN where not testable: rows with missing
    features, or all rows when fewer than 5 have features (a 3x3 covariance is not estimable).
    """
    df = table.df
    n = len(df)
    dist = np.full(n, np.nan)
    pval = np.full(n, np.nan)
    if any(c not in df.columns for c in FEATURES):
        log.info("Mahalanobis test skipped: table lacks feature columns %s", FEATURES)
        return dist, pval
    x = df[FEATURES].to_numpy(float)
    ok = np.isfinite(x).all(axis=1)
    if ok.sum() < MIN_VESICLES_FOR_MAHALANOBIS:
        log.info(
            "Mahalanobis test skipped: %d vesicles with features, at least %d needed to estimate a 3x3 covariance",
            int(ok.sum()),
            MIN_VESICLES_FOR_MAHALANOBIS,
        )
        return dist, pval
    k = len(FEATURES)
    if robust:
        mu, cov = robust_mean_cov(x[ok])
        d2 = squared_mahalanobis(x[ok], mu, cov)
        pval[ok] = special.chdtrc(k, d2)
    else:
        d2 = leave_one_out_d2(x[ok])
        pval[ok] = loo_p_value(d2, int(ok.sum()), k) if exact else special.chdtrc(k, d2)
    dist[ok] = np.sqrt(d2)
    return dist, pval


def _features(fit, nm: float) -> np.ndarray:
    return np.array([fit.radius * nm, fit.membrane_thickness * nm, fit.membrane_density])


def _refit_outliers(df, intensity, out_idx, scorer, nm, p_threshold, opts, max_regrow, regrow_step):
    """Re-fit outliers with boxes grown by ``regrow_step`` voxels per try; judge them against the inliers.

    Updates passing rows of ``df`` in place; returns (indices that never passed, their last p-values).
    The outliers are taken in order, each against the table as the earlier ones left it. All are
    first re-fitted at once on the worker processes against the table as it is; those results hold
    up to the first outlier that passes (it changes the table), the rest are then re-fitted one by one.
    """
    from cryoves import parallel

    failed, fail_p = [], []
    out_idx = list(out_idx)
    settings = (scorer, nm, p_threshold, opts, max_regrow, regrow_step)
    with parallel.shared(intensity, parallel.workers() > 1 and len(out_idx) > 1) as volume:
        outcomes = parallel.pmap(_refit_task, [(volume, *_refit_start(df, i), settings) for i in out_idx])
    changed = False
    for k, i in enumerate(out_idx):
        if changed:  # an earlier outlier passed and moved: this one is re-fitted against the table as it is now
            outcomes[k] = _refit_one(intensity, *_refit_start(df, i), *settings)
        passed, f, d, last_p = outcomes[k]
        if passed:
            df.loc[i, ["z", "y", "x"]] = f.centre
            df.loc[i, "radius"] = f.radius
            df.loc[i, "membrane_thickness_nm"] = f.membrane_thickness * nm
            df.loc[i, "membrane_density"] = f.membrane_density
            df.loc[i, "lumen_density"] = f.lumen_density
            df.loc[i, "fit_residual"] = f.fit_residual
            if "membrane_contrast" in df.columns:
                df.loc[i, "membrane_contrast"] = f.membrane_contrast
            df.loc[i, "mahalanobis"] = d
            df.loc[i, "p_value"] = last_p
            changed = True
        else:
            failed.append(i)
            fail_p.append(last_p)
    return failed, fail_p


def _refit_start(df, i) -> tuple[np.ndarray, float, float, tuple[np.ndarray, np.ndarray]]:
    """Start of an outlier's re-fit: its centre, radius and p-value, the other vesicles' spheres."""
    row = df.loc[i]
    rest = df.index != i
    others = (df.loc[rest, ["z", "y", "x"]].to_numpy(float), df.loc[rest, "radius"].to_numpy(float))
    return row[["z", "y", "x"]].to_numpy(float), float(row["radius"]), float(row["p_value"]), others


def _refit_one(volume, centre, radius, p0, others, scorer, nm, p_threshold, opts, max_regrow, regrow_step):
    """One outlier re-fitted in boxes grown by ``regrow_step`` voxels per try: (passed, fit, D, p)."""
    last_p, prev = p0, None
    for k in range(1, max_regrow + 1):
        o = FitOptions(**{**opts.__dict__, "margin": opts.margin + regrow_step * k})
        try:
            f = _fit(volume, centre, radius, o, others)
        except FitFailure:
            continue
        x = _features(f, nm)
        if not np.isfinite(x).all():
            continue
        d, last_p = scorer(x)
        state = np.r_[f.centre, f.radius]
        if last_p < p_threshold and prev is not None and np.abs(state - prev).max() < 0.05:
            break  # larger boxes no longer change the fit: it will not pass
        prev = state
        if last_p >= p_threshold:
            return True, f, d, last_p
    return False, None, float("nan"), last_p


def _refit_task(task) -> tuple:
    """Worker side of :func:`_refit_outliers`."""
    from cryoves.parallel import attached

    volume, centre, radius, p0, others, settings = task
    with attached(volume) as vol:
        return _refit_one(vol, centre, radius, p0, others, *settings)


def resolve_overlaps(
    centres: np.ndarray, radii: np.ndarray, quality: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Make spheres disjoint. Returns (keep mask, new radii), all in voxels.

    A sphere whose centre lies inside a better one (higher ``quality``; default larger radius) is a
    duplicate and dropped. Remaining intersecting pairs (distance < r_i + r_j) are resolved by scaling
    each radius by min(1, min over its pairs of distance / (r_i + r_j)), so every pair ends disjoint.
    """
    centres = np.asarray(centres, float).reshape(-1, 3)
    radii = np.asarray(radii, float).copy()
    n = len(radii)
    keep = np.ones(n, dtype=bool)
    if n < 2:
        return keep, radii
    q = radii if quality is None else np.where(np.isfinite(quality), quality, -np.inf)
    i, j, d, dup = sphere_pairs(centres, radii)
    if len(i) == 0:
        return keep, radii
    # duplicates: visit the best first; drop a worse sphere whose centre is inside a kept one
    if dup.any():
        order = np.lexsort((-radii, -q))
        rank = np.empty(n, int)
        rank[order] = np.arange(n)
        di, dj = i[dup], j[dup]
        better = np.where(rank[di] < rank[dj], di, dj)
        worse = np.where(rank[di] < rank[dj], dj, di)
        sort = np.argsort(rank[better], kind="stable")
        for b, w in zip(better[sort], worse[sort]):
            if keep[b]:
                keep[w] = False
    ok = keep[i] & keep[j]
    i, j, d = i[ok], j[ok], d[ok]
    if len(i):
        ratio = d / (radii[i] + radii[j]) * (1.0 - 1e-6)
        scale = np.ones(n)
        np.minimum.at(scale, i, ratio)
        np.minimum.at(scale, j, ratio)
        radii = radii * scale
    return keep, radii


def membrane_evidence(df: pd.DataFrame) -> np.ndarray:
    """How much visible membrane supports each fit: contrast x coverage x radius^2 (voxels^2).

    Ranks fits that claim the same vesicle (pieces of an over-split object). The profile correlation
    does not: a fit to a small dark feature inside or beside a vesicle can have the cleaner profile,
    and on 4 simulated tomograms it won 4 of 13 such contests, leaving fits off by 3-7 nm. A sphere on
    the real membrane sees it in more directions, with more contrast, over a larger area. Missing
    columns count as 1 (then the larger sphere wins).
    """
    q = df["radius"].to_numpy(float) ** 2
    for c in ("membrane_contrast", "membrane_coverage"):
        if c in df.columns:
            v = df[c].to_numpy(float)
            q = q * np.where(np.isfinite(v), np.clip(v, 0.0, None), 1.0)
    return q


def map_confidence(prob: np.ndarray, centres: np.ndarray, radii: np.ndarray, fraction: float = 0.7) -> np.ndarray:
    """Mean of ``prob`` (z, y, x) over the voxels within ``fraction`` x radius of each centre (voxels).

    How sure the network is that the sphere holds a vesicle (its probability covers the lumen).
    NaN where no voxel of the inner ball lies in the volume.
    """
    centres = np.asarray(centres, float).reshape(-1, 3)
    radii = np.asarray(radii, float).reshape(-1)
    out = np.full(len(radii), np.nan)
    shape = np.asarray(prob.shape)
    for k, (c, r) in enumerate(zip(centres, radii)):
        rr = max(fraction * r, 0.5)
        lo = np.maximum(np.floor(c - rr).astype(int), 0)
        hi = np.minimum(np.ceil(c + rr).astype(int) + 1, shape)
        if np.any(hi <= lo):
            continue
        g = np.ogrid[tuple(slice(a, b) for a, b in zip(lo, hi))]
        ball = sum((gi - ci) ** 2 for gi, ci in zip(g, c)) <= rr * rr
        if ball.any():
            out[k] = float(np.asarray(prob[tuple(slice(a, b) for a, b in zip(lo, hi))], np.float64)[ball].mean())
    return out


def _supported(df: pd.DataFrame, min_map_confidence: float, contrast_limit: float) -> np.ndarray:
    """Rows whose fit has a confident map and a visible membrane (see the module docstring)."""
    n = len(df)
    if "map_confidence" not in df.columns:
        return np.zeros(n, bool)
    conf = df["map_confidence"].to_numpy(float)
    ok = np.isfinite(conf) & (conf >= min_map_confidence)
    if "membrane_contrast" in df.columns and np.isfinite(contrast_limit):
        con = df["membrane_contrast"].to_numpy(float)
        ok &= np.isfinite(con) & (con >= contrast_limit)
    return ok


def _add_flags(df: pd.DataFrame, mask: np.ndarray, reasons) -> None:
    """Append ``reasons`` (one per selected row) to the ``flags`` column in place."""
    idx = np.flatnonzero(mask)
    if not len(idx):
        return
    col = df["flags"].to_numpy(object).copy()
    for i, why in zip(idx, reasons):
        col[i] = f"{col[i]}; {why}" if col[i] else why
    df["flags"] = col


def _population_fence(values: np.ndarray, k: float = 4.0) -> float:
    """Lower fence median - k x robust SD (1.4826 MAD) of the finite ``values`` (-inf if < 5)."""
    v = values[np.isfinite(values)]
    if len(v) < 5:
        return -np.inf
    med = float(np.median(v))
    return med - k * 1.4826 * float(np.median(np.abs(v - med)))


def repair(
    table: VesicleTable,
    intensity: np.ndarray | None = None,
    *,
    p_threshold: float = 1e-4,
    robust: bool = False,
    exact: bool = True,
    min_correlation: float = 0.3,
    min_contrast_fraction: float = 0.35,
    min_map_confidence: float = 0.5,
    min_coverage: float = 0.0,
    regrow: bool = True,
    max_regrow: int = 10,
    regrow_step: float = 2.0,
    resolve_overlap: bool = True,
    min_radius_nm: float = 12.0,
    fit_options: FitOptions | None = None,
    contrast_reference: float | None = None,
) -> tuple[VesicleTable, pd.DataFrame]:
    """Remove or repair outlier spheres; returns (VesicleTable, rejected table).

    ``table`` comes from :func:`cryoves.postprocess.spheres.fit_spheres`; ``intensity`` is the raw
    tomogram (z, y, x; dense = dark), needed only to re-fit outliers (``regrow``). Supported fits
    (``map_confidence`` >= ``min_map_confidence`` and a visible membrane, see the module docstring)
    are flagged instead of removed by the correlation and Mahalanobis tests; without a
    ``map_confidence`` column nothing is supported. Vesicles with profile correlation <=
    ``min_correlation`` (and below the population's fence) are removed, and (with 3 or more vesicles) those whose
    membrane_contrast is below ``min_contrast_fraction`` x the median (objects without a visible
    membrane: the other features of such fits are meaningless; ``contrast_reference`` replaces the
    median, e.g. the median of the tomogram's other vesicles for a small population); with ``min_coverage`` > 0, those whose
    membrane is seen in fewer directions (membrane_coverage; off by default: on the simulator the
    lowest true vesicles overlapped the false positives of a real network); a vesicle is a Mahalanobis outlier when
    p < ``p_threshold`` (default 1e-4, i.e. D^2 > 21 for large N; the original cut D >= 4 is p ~ 0.001,
    the paper's 0.3 would flag 30 % of normal vesicles; on the simulator's synapse preset 0.001 removed 4
    of 239 true vesicles, 1e-4 none). The
    mahalanobis and p_value columns are filled (NaN when fewer than 5 vesicles: test skipped).
    ``robust=True`` uses the MCD-style estimate (:func:`robust_mean_cov`): resistant to many outliers,
    but with few vesicles (< ~50) it underestimates the spread and flags good vesicles, hence off by
    default (classical mean and covariance, as the original).
    """
    if not 0.0 <= p_threshold <= 1.0:
        raise ParameterError(f"p_threshold must be between 0 and 1, got {p_threshold}")
    if max_regrow < 0 or regrow_step <= 0:
        raise ParameterError("max_regrow must be >= 0 and regrow_step > 0")
    nm = table.voxel_size / 10.0
    df = table.df.copy()
    for c in ("mahalanobis", "p_value", "profile_correlation"):
        if c not in df.columns:
            df[c] = np.nan
    rejected: list[pd.DataFrame] = []

    if "flags" not in df.columns:  # the table normalises an existing column to strings
        df["flags"] = ""
    contrast_limit = -np.inf
    if "membrane_contrast" in df.columns and min_contrast_fraction > 0 and (len(df) >= 3 or contrast_reference):
        con = df["membrane_contrast"].to_numpy(float)
        ref = float(np.nanmedian(con)) if np.isfinite(con).any() else np.nan
        ref = contrast_reference if contrast_reference else ref
        if np.isfinite(ref) and ref > 0:
            contrast_limit = min_contrast_fraction * ref

    corr = df["profile_correlation"].to_numpy(float)
    fence = _population_fence(corr)
    low = np.isfinite(corr) & ((corr <= min_correlation) | (corr < fence))
    supported = _supported(df, min_map_confidence, contrast_limit)
    # removal needs both limits: a noisy tomogram (wide spread of correlations) loses fewer candidates;
    # but a profile that does not correlate with its population at all (<= 0) is never a vesicle,
    # supported or not (measured: small noise spots on the HIV-1 VLP tomogram, correlation -0.5)
    remove_at = min(min_correlation, max(fence, 0.0)) if np.isfinite(fence) else min_correlation
    bad = low & ((~supported & (corr <= remove_at)) | (corr <= 0.0))
    _add_flags(df, low & ~bad, [f"profile correlation {c:.2f}" for c in corr[low & ~bad]])
    df = _drop(df, bad, "correlation", [f"profile correlation {c:.2f} <= {min_correlation:g}" for c in corr[bad]], rejected)

    if np.isfinite(contrast_limit):
        con = df["membrane_contrast"].to_numpy(float)
        weak = np.isfinite(con) & (con < contrast_limit)
        reasons = [
            f"membrane contrast {c:.2f} < {min_contrast_fraction:g} x median {ref:.2f} (no clear membrane)"
            for c in con[weak]
        ]
        df = _drop(df, weak, "contrast", reasons, rejected)

    if min_coverage > 0 and "membrane_coverage" in df.columns:
        cov = df["membrane_coverage"].to_numpy(float)
        low = np.isfinite(cov) & (cov < min_coverage)
        reasons = [f"membrane seen in only {c:.0%} of directions (< {min_coverage:.0%})" for c in cov[low]]
        df = _drop(df, low, "coverage", reasons, rejected)

    dist, pval = mahalanobis_test(table.with_df(df), robust=robust, exact=exact)
    df["mahalanobis"], df["p_value"] = dist, pval
    out = np.isfinite(pval) & (pval < p_threshold)
    if out.any():
        idx = list(np.flatnonzero(out))
        inl = np.isfinite(pval) & ~out
        if regrow and intensity is not None and max_regrow > 0 and inl.sum() >= MIN_VESICLES_FOR_MAHALANOBIS - 1:
            intensity = check_volume(intensity, "tomogram")
            scorer = _Scorer(df.loc[inl, FEATURES].to_numpy(float), robust, exact)
            failed, fail_p = _refit_outliers(
                df, intensity, idx, scorer, nm, p_threshold, _with_voxel_size(fit_options or FitOptions(), 10 * nm), max_regrow, regrow_step
            )
            log.info("outliers: %d re-fitted successfully, %d still outliers", len(idx) - len(failed), len(failed))
            suffix = " after re-fits with larger boxes"
        else:
            failed, fail_p, suffix = idx, list(pval[idx]), ""
        mask = np.zeros(len(df), bool)
        mask[failed] = True
        reasons = np.array([f"Mahalanobis outlier (p = {p:.2g} < {p_threshold:g}){suffix}" for p in fail_p], dtype=object)
        # one doubt is flagged for review; a second one (already flagged for its profile) removes it
        unflagged = (df["flags"].to_numpy(str) == "")
        keep = (_supported(df, min_map_confidence, contrast_limit) & unflagged)[failed]
        flag = np.zeros(len(df), bool)
        flag[np.asarray(failed, int)[keep]] = True
        _add_flags(df, flag, [f"Mahalanobis outlier (p = {p:.2g})" for p in np.asarray(fail_p, float)[keep]])
        mask &= ~flag
        df = _drop(df, mask, "outlier", list(reasons[~keep]), rejected)

    if resolve_overlap and len(df) > 1:
        centres, radii = df[["z", "y", "x"]].to_numpy(), df["radius"].to_numpy()
        keep, new_radii = resolve_overlaps(centres, radii, membrane_evidence(df))
        shrunk = int(np.count_nonzero(new_radii[keep] < radii[keep]))
        if shrunk:
            log.info("shrank %d spheres so they no longer intersect", shrunk)
        df = _drop(df, ~keep, "overlap", "duplicate: centre inside a vesicle with more membrane evidence", rejected)
        df["radius"] = new_radii[keep]

    small = (df["radius"] * nm <= min_radius_nm).to_numpy()
    reasons = [f"radius {r * nm:.1f} nm <= {min_radius_nm:g} nm" for r in df["radius"][small]]
    df = _drop(df, small, "min_radius", reasons, rejected)
    return table.with_df(df), concat_rejected(rejected)


def _drop(df: pd.DataFrame, mask: np.ndarray, step: str, reasons, rejected: list) -> pd.DataFrame:
    """Record the rows of ``df`` selected by ``mask`` as rejected and return the others."""
    if not np.any(mask):
        return df
    sub = df[mask]
    rejected.append(rejected_frame(sub["id"], sub[["z", "y", "x"]].to_numpy(), sub["radius"], step, reasons))
    return df[~np.asarray(mask)].reset_index(drop=True)

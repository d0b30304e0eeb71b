"""Sphere fitting with radial-profile refinement, at sub-voxel precision.

Each vesicle is fitted in a cubic box around its current centre (boxes at the volume border are padded
with "missing" voxels that carry no weight, never shrunk). Per iteration:

1. radial profile P(r): mean intensity in distance bins of ``bin_width`` voxels around the (fractional)
   centre, each voxel split linearly between its two nearest bins;
2. rotational average A(u) = P(|u - c|) (linear interpolation), and the centre shift that maximises the
   cross-correlation of the box with A (FFT, parabolic sub-voxel peak);
3. the centre moves by the shift; the radius is re-measured from the profile.

Until the shift is below ``tol`` voxels (these iterations always use the steepest-rise edge).

Radius = the OUTER EDGE OF THE LIPID BILAYER (pyto, CryoVesNet; in the simulator where the signed
distance of ``scene.bilayer`` is 0); ``membrane_radius`` = the membrane centre; thickness = outer -
inner edge, the inner edge mirrored about the centre. Rules (``edge``; profile dense = dark):

- ``"steepest"`` (default): centre = profile minimum (parabolic refinement), outer edge = steepest
  rise between it and the outside maximum within ``max_thickness``;
- ``"half_depth"``: outer edge half-way between the minimum and the outside level;
- ``"curvature"``: the strongest negative curvature there (the paper's rule, no -1 voxel bias);
- ``"bilayer"``: centre = the centre of symmetry of the profile around the membrane (blur, CTF with or
  without phase flipping and the missing wedge keep a bilayer's profile symmetric, fringes and
  resolved leaflets included; coats and the lumen do not, and the window is kept short); radius =
  centre + half the thickness, the thickness = prior ``thickness_prior_nm`` (4.5 nm) moved towards
  the measured one (full width at half depth of the symmetrised profile) by ``thickness_weight``
  (0.3). Needs the voxel size (``fit_sphere``/``fit_spheres`` set ``voxel_size_a``; without it the
  measured thickness is used alone). Not the default yet: callers of the private ``_fit``
  (blockwise fitting, the outlier re-fits) do not pass the voxel size.

Measured (``bench/radius_accuracy.py``, 24 vesicles per condition, voxels 1.2-2.4 nm, radii 15-30 nm,
bilayer 4-5 nm; outer-radius bias / SD, nm; steepest -> bilayer): uniform 4-nm slab (the tests'
model) -0.03/0.01 -> -0.03/0.12; clean bilayer +0.43/0.14 -> +0.16/0.09; phase-flipped CTF
+0.11/0.32 -> +0.18/0.12; uncorrected CTF fringes +0.91/0.75 -> +0.25/0.12 (thickness SD 3.0 -> 0.3
nm); coat +0.36/0.59 -> +0.38/0.25; dense coat +0.41/1.60 -> +1.28/0.82; coat + fringes +0.92/0.65 ->
+0.46/0.37; low SNR +0.21/0.62 -> +0.01/0.65; lumen + neighbour +0.27/0.39 -> +0.09/0.11. The
membrane centre itself: within 0.1 nm (SD <= 0.1) except under coats (+0.25, dense +1.2). The steepest
edge finds the old 4-nm-slab tests' edges exactly but not a bilayer's (it sits +0.4 nm out).

Missing wedge: with ``wedge_cap_deg`` > 0 (default 45), voxels whose direction from the centre is
within that angle of the z axis (the caps, where the membrane is invisible in a tomogram tilted about y)
are ignored for centring; the radius and features use all directions (excluding the caps there too
biased the radius by -0.1 to -0.17 voxel). Measured (mean / max centre error): simulator, small preset,
8 tomograms, 79 vesicles: cap 0: 0.34 / 1.64 nm, cap 45: 0.29 / 0.79 nm, cap 60: 0.32 / 0.84 nm, radius
error unchanged; synthetic vesicles with a +-60 deg Fourier wedge (30 vesicles): 0.090 / 0.26 vs 0.087 /
0.20 voxel; without a wedge 0.032 / 0.054 vs 0.039 / 0.094 voxel (the cap costs a little precision).

Neighbours: the centring template is limited to the membrane and just outside it, and voxels nearer to
another vesicle's sphere than to this one are ignored; where voxels are missing (volume border,
neighbours) the centre is refined by Gauss-Newton on the rotational model, which is unbiased there,
instead of cross-correlation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
from scipy import fft as sfft
from scipy.ndimage import gaussian_filter1d
from scipy.spatial import cKDTree

from cryoves.errors import ParameterError
from cryoves.postprocess._common import (
    check_same_shape,
    check_volume,
    check_voxel_size,
    label_statistics,
    rejected_rows,
)
from cryoves.vesicles import VesicleTable

log = logging.getLogger(__name__)

#: Samples of the normalised profile (radius 0 .. 1.25 x vesicle radius: lumen, membrane, just outside)
#: used for the profile correlation; farther out, neighbours dominate.
PROFILE_SAMPLES = 100
PROFILE_EXTENT = 1.25
EDGES = ("bilayer", "steepest", "half_depth", "curvature")


class FitFailure(Exception):
    """Internal: a vesicle cannot be fitted (the message says why)."""


@dataclass
class SphereFit:
    """One fitted vesicle. Lengths in voxels, centre (z, y, x) in voxels of the input grid."""

    centre: np.ndarray
    radius: float
    membrane_radius: float
    membrane_thickness: float
    membrane_density: float
    lumen_density: float
    fit_residual: float
    #: membrane dip depth (outside level - profile minimum) over the RMS residual of the fit
    membrane_contrast: float
    #: fraction of directions in which the membrane is seen (~1 for a vesicle)
    membrane_coverage: float
    n_iter: int
    converged: bool
    profile_radii: np.ndarray = field(repr=False)
    profile: np.ndarray = field(repr=False)
    voxel_size: float = float("nan")  # Å

    @property
    def radius_nm(self) -> float:
        return self.radius * self.voxel_size / 10.0

    @property
    def membrane_thickness_nm(self) -> float:
        return self.membrane_thickness * self.voxel_size / 10.0

    def normalised_profile(self) -> np.ndarray:
        """Profile sampled at ``PROFILE_SAMPLES`` relative radii in [0, 1.25 x radius] (NaN beyond data)."""
        x = np.linspace(0.0, PROFILE_EXTENT, PROFILE_SAMPLES) * self.radius
        ok = np.isfinite(self.profile)
        out = np.interp(x, self.profile_radii[ok], self.profile[ok], right=np.nan)
        return out


@dataclass(frozen=True)
class FitOptions:
    """Settings of the radial-profile fit (lengths in voxels unless stated)."""

    margin: float = 2.0
    max_iter: int = 10
    tol: float = 0.05
    bin_width: float = 0.5
    wedge_cap_deg: float = 45.0
    edge: str = "bilayer"
    max_thickness: float = 8.0  # voxels searched on each side of the membrane minimum
    max_shift_factor: float = 0.75  # total centre shift limit, x initial radius
    # final centring: "auto" = Gauss-Newton where voxels near the membrane are missing (volume border,
    # masked neighbours; cross-correlation is biased there), cross-correlation elsewhere
    refine: str = "auto"
    missing_fraction_gn: float = 0.02
    # edge="bilayer": prior bilayer thickness (outer to inner edge, nm) and the weight of the measured
    # thickness against it (0 = prior only, 1 = measured only)
    thickness_prior_nm: float = 4.5
    thickness_weight: float = 0.3
    # Å; needed by edge="bilayer" (the prior is in nm). fit_sphere / fit_spheres fill it in; when
    # unknown, the measured thickness is used without the prior
    voxel_size_a: float | None = None

    def __post_init__(self):
        if self.refine not in ("auto", "gauss_newton", "cc"):
            raise ParameterError(f"refine must be 'auto', 'gauss_newton' or 'cc', got {self.refine!r}")
        if self.edge not in EDGES:
            raise ParameterError(f"edge must be one of {', '.join(map(repr, EDGES))}, got {self.edge!r}")
        if not 0.0 <= self.wedge_cap_deg < 90.0:
            raise ParameterError(f"wedge_cap_deg must be in [0, 90), got {self.wedge_cap_deg}")
        if self.bin_width <= 0 or self.max_iter < 1:
            raise ParameterError("bin_width must be > 0 and max_iter >= 1")
        if not (np.isfinite(self.thickness_prior_nm) and self.thickness_prior_nm > 0):
            raise ParameterError(f"thickness_prior_nm must be > 0, got {self.thickness_prior_nm}")
        if not 0.0 <= self.thickness_weight <= 1.0:
            raise ParameterError(f"thickness_weight must be in [0, 1], got {self.thickness_weight}")


# --------------------------------------------------------------------------- box and profile
def _kernels():
    """The compiled inner loops (:mod:`cryoves.postprocess._fit_kernels`); numba is imported on the
    first fit, not when the CLI starts."""
    from cryoves.postprocess import _fit_kernels

    return _fit_kernels


def _extract(volume: np.ndarray, centre: np.ndarray, half: int) -> tuple[np.ndarray, np.ndarray]:
    """Cube of edge 2*half+1 around round(centre); out-of-volume voxels are NaN. Returns (box, origin)."""
    c = np.round(centre).astype(int)
    lo = c - half
    n = 2 * half + 1
    box = np.full((n, n, n), np.nan, dtype=np.float32)
    src_lo = np.maximum(lo, 0)
    src_hi = np.minimum(lo + n, volume.shape)
    if np.any(src_hi <= src_lo):
        raise FitFailure("box lies outside the volume")
    dst = tuple(slice(a - start, b - start) for a, b, start in zip(src_lo, src_hi, lo))
    box[dst] = volume[tuple(slice(a, b) for a, b in zip(src_lo, src_hi))]
    return box, lo


def _near(cs: np.ndarray, rs: np.ndarray, reach_boxes: np.ndarray) -> np.ndarray:
    """Which neighbours (centres ``cs`` (K, 3), radii ``rs``) reach into any of the boxes
    ``reach_boxes`` (rows lo z, y, x, hi z, y, x, reach): their surface comes nearer than ``reach``
    to the box, the only neighbours that can mask a voxel of it."""
    if len(rs) == 0 or len(reach_boxes) == 0:
        return np.zeros(len(rs), bool)
    lo, hi, reach = reach_boxes[:, None, :3], reach_boxes[:, None, 3:6], reach_boxes[:, None, 6]
    gap = np.linalg.norm(np.clip(cs[None], lo, hi) - cs[None], axis=2) - rs[None]
    return (gap < reach).any(axis=0)


def _extract_masked(
    volume: np.ndarray,
    centre: np.ndarray,
    radius: float,
    half: int,
    others: tuple[np.ndarray, np.ndarray] | None,
    boxes: list | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """As :func:`_extract`; voxels nearer to a neighbouring sphere's surface than to this vesicle's
    (``others`` = (centres (K, 3), radii (K,)) in voxels) are set to NaN so neighbours do not pull
    the fit. ``boxes`` (a list) receives the box and reach (see :func:`_near`)."""
    box, origin = _extract(volume, centre, half)
    n = box.shape[0]
    # only voxels within `half` of the centre are used, where own <= half + 1 - radius
    where = np.array([*origin, *(origin + n - 1), half + 1.0 - radius], float)[None]
    if boxes is not None:
        boxes.append(where[0])
    if others is None or len(others[1]) == 0:
        return box, origin
    cs, rs = np.asarray(others[0], float), np.asarray(others[1], float)
    near = _near(cs, rs, where)
    if near.any():
        reach = float(where[0, 6])
        _kernels().mask_neighbours(box, origin, np.asarray(centre, float), float(radius), reach,
                                     np.ascontiguousarray(cs[near]), np.ascontiguousarray(rs[near]))
    return box, origin


class _Geometry:
    """Distances of the box voxels to a fractional centre, the voxels used (finite, within the box's
    inscribed sphere) and those used for centring (caps excluded when asked), with the radial
    profiles of both."""

    def __init__(self, box: np.ndarray, origin: np.ndarray, centre: np.ndarray, opts: FitOptions):
        n = box.shape[0]
        half = (n - 1) / 2.0
        self.origin = np.asarray(origin, np.int64)
        self.centre = np.asarray(centre, np.float64)
        self.offsets = tuple(
            (np.arange(n, dtype=np.float64) + o - c).reshape(shape)
            for o, c, shape in zip(origin, centre, ((n, 1, 1), (1, n, 1), (1, 1, n)))
        )
        cap_cos = np.cos(np.deg2rad(opts.wedge_cap_deg)) if opts.wedge_cap_deg > 0 else 2.0
        self.bin_width = bw = float(opts.bin_width)
        nb = int(np.floor(half / bw)) + 2
        self.d, self.valid, self.valid_cc, s, c, s_cc, c_cc = _kernels().geometry(
            box, self.origin, self.centre, half, cap_cos, bw, nb)
        if opts.wedge_cap_deg <= 0:
            self.valid_cc = self.valid
        self.radii = np.arange(nb) * bw
        with np.errstate(invalid="ignore", divide="ignore"):
            self.profile = np.where(c > 0.5, s / c, np.nan)
            self.profile_cc = np.where(c_cc > 0.5, s_cc / c_cc, np.nan)
        self.rmax = half


def _parabola(y0: float, y1: float, y2: float) -> float:
    den = y0 - 2 * y1 + y2
    if den == 0 or not np.isfinite(den):
        return 0.0
    return float(np.clip(0.5 * (y0 - y2) / den, -0.5, 0.5))


def _crossing(r: np.ndarray, p: np.ndarray, start: int, stop: int, level: float) -> float:
    """First radius between bins start -> stop (either direction) where p rises to ``level`` (linear)."""
    step = 1 if stop > start else -1
    for k in range(start + step, stop + step, step):
        if p[k] >= level:
            a, b = p[k - step], p[k]
            t = (level - a) / (b - a) if b != a else 0.0
            return float(r[k - step] + t * (r[k] - r[k - step]))
    raise FitFailure("membrane edge not found in the radial profile")


@dataclass
class _Membrane:
    r_min: float
    inner: float
    outer: float
    density: float
    lumen: float
    depth: float  # outside level - profile minimum (intensity units)


def _bilayer(
    r: np.ndarray, pf: np.ndarray, ps: np.ndarray, lo: int, hi: int, r_near: float, opts: FitOptions
) -> tuple[float, float]:
    """Membrane centre and thickness (voxels) for ``edge="bilayer"``; ``pf`` = smoothed profile.

    Centre = the centre of symmetry of the profile within half the prior thickness + max(2 nm,
    2 voxels) (any blur, CTF, phase flipping or missing wedge keeps a bilayer's profile symmetric,
    fringes and resolved leaflets included; the lumen step is allowed for as a linear trend), searched
    within a quarter prior thickness + 0.5 voxel of the minimum of the profile smoothed to the
    prior thickness (which merges resolved leaflets into one dip), itself within half the prior
    thickness + 1 voxel of ``r_near`` (the minimum of the lightly smoothed profile). Thickness = the prior moved
    towards the measured one (the full width at half depth of the symmetrised profile, depth from
    its minimum to its maximum within half the prior thickness + max(3 nm, 2 voxels)) by
    ``thickness_weight``.
    """
    bw = r[1] - r[0]
    vs = opts.voxel_size_a
    nm = vs / 10.0 if vs else None
    # without a voxel size: a nominal 1 nm voxel for the windows and no prior
    t0 = opts.thickness_prior_nm / (nm or 1.0)
    merged = gaussian_filter1d(pf, max(t0 / 3.0 / bw, 1.0), mode="nearest")
    # only near the profile's own minimum: a darker lumen feature or neighbour elsewhere in the window
    # must not move the membrane (measured: fits 4-6 nm inside large vesicles without this)
    near = np.abs(r[lo:hi] - r_near) <= 0.5 * t0 + 1.0
    r0 = r[lo + int(np.nanargmin(np.where(np.isfinite(ps[lo:hi]) & near, merged[lo:hi], np.nan)))]
    # centre of symmetry: least squares over the candidates of the odd part minus a linear trend
    w_sym = 0.5 * t0 + max(2.0 / (nm or 1.0), 2.0)
    u = np.arange(1, int(np.ceil(w_sym / bw)) + 1) * bw
    step = 0.05
    reach = 0.25 * t0 + 0.5
    cand = r0 + np.arange(-reach, reach + 0.5 * step, step)
    odd = np.interp(cand[:, None] + u, r, pf) - np.interp(cand[:, None] - u, r, pf)
    odd -= np.outer(odd @ u / (u @ u), u)
    cost = np.einsum("ij,ij->i", odd, odd)
    j = int(np.argmin(cost))
    rc = float(cand[j]) + (step * _parabola(cost[j - 1], cost[j], cost[j + 1]) if 0 < j < len(cand) - 1 else 0.0)
    # measured thickness: full width at half depth of the symmetrised profile
    w_lvl = 0.5 * t0 + max(3.0 / (nm or 1.0), 2.0)
    uu = np.arange(0, int(np.ceil(w_lvl / bw)) + 1) * bw
    sym = 0.5 * (np.interp(rc + uu, r, pf) + np.interp(rc - uu, r, pf))
    i0 = int(np.argmin(sym[: max(2, int(np.ceil(0.25 * t0 / bw)) + 1)]))
    i1 = i0 + int(np.argmax(sym[i0:]))
    level = 0.5 * (sym[i0] + sym[i1])
    measured = t0
    for q in range(i0 + 1, i1 + 1):
        if sym[q] >= level:
            a, b = sym[q - 1], sym[q]
            measured = 2.0 * (uu[q - 1] + ((level - a) / (b - a) if b != a else 0.0) * bw)
            break
    if nm is None:
        return rc, float(measured)
    thick = t0 + opts.thickness_weight * (measured - t0)
    return rc, float(np.clip(thick, 0.5 * t0, 2.0 * t0))


def _membrane(r: np.ndarray, p: np.ndarray, r_guess: float, opts: FitOptions) -> _Membrane:
    """Membrane position, edges and densities from a radial profile (dense = dark)."""
    bw = opts.bin_width
    good = np.isfinite(p)
    if good.sum() < 8:
        raise FitFailure("radial profile too short")
    last = int(np.flatnonzero(good)[-1])
    ps = p.copy()
    ps[~good] = np.interp(r[~good], r[good], p[good])
    ps = gaussian_filter1d(ps, 1.0, mode="nearest")
    pf = ps.copy()  # smoothed, extended beyond the data by the last value
    ps[last + 1 :] = np.nan
    span = int(round(opts.max_thickness / bw))
    lo = max(int(round(0.5 * r_guess / bw)), 2)
    hi = min(int(round((1.5 * r_guess + 3) / bw)), last - 2)
    if hi <= lo:
        raise FitFailure("box too small for the membrane search window")
    km = lo + int(np.nanargmin(ps[lo:hi]))
    r_min = r[km] + bw * _parabola(ps[km - 1], ps[km], ps[km + 1])
    pmin = float(ps[km])
    o_hi = min(km + span, last)
    k_out = km + int(np.nanargmax(ps[km : o_hi + 1]))
    if k_out == km or km == 0 or np.all(ps[:km] <= pmin):
        raise FitFailure("no membrane minimum in the radial profile")
    outer = _crossing(r, ps, km, k_out, 0.5 * (pmin + ps[k_out]))
    if opts.edge == "steepest":
        g = np.gradient(ps[km : k_out + 1])
        j = int(np.argmax(g))
        outer = r[km + j] + (bw * _parabola(g[j - 1], g[j], g[j + 1]) if 0 < j < len(g) - 1 else 0.0)
    if opts.edge == "bilayer":
        r_min, thick = _bilayer(r, pf, ps, lo, hi, r_min, opts)
        outer = r_min + 0.5 * thick
    # the inner edge mirrors the outer one about the membrane centre: the outer side is well defined,
    # the inner one is not when the lumen is nearly as dark as the membrane (dense content)
    inner = max(r_min - (outer - r_min), 0.0)
    if opts.edge == "curvature":
        d2 = np.gradient(np.gradient(ps[km : k_out + 1]))
        j = int(np.argmin(d2))
        if 0 < j < len(d2) - 1:
            outer = r[km + j] + bw * _parabola(d2[j - 1], d2[j], d2[j + 1])
        else:
            outer = r[km + j]
    mem = (r >= inner) & (r <= outer) & good
    density = float(np.mean(p[mem])) if mem.any() else pmin
    lum = (r <= 0.8 * inner) & good if inner > 0 else np.zeros_like(good)
    lumen = float(np.mean(p[lum])) if lum.any() else float("nan")
    return _Membrane(float(r_min), float(inner), float(outer), density, lumen, float(ps[k_out] - pmin))


def _cc_shift(
    box: np.ndarray, geo: _Geometry, r: np.ndarray, p: np.ndarray, max_step: int, window: float
) -> np.ndarray:
    """Sub-voxel shift s such that the box content matches the rotational average moved by s.

    The template (rotational average) is limited to radii <= ``window`` so that structures beyond the
    vesicle's own membrane (neighbours, other membranes) do not pull the centre.
    """
    good = np.isfinite(p)
    if good.sum() < 2:
        raise FitFailure("no radial profile around the centre (box outside the data)")
    filled = np.interp(r, r[good], p[good])
    a, b, count = _kernels().cc_inputs(box, geo.d, geo.valid_cc, float(window), filled, float(r[1] - r[0]))
    if count < 10:
        raise FitFailure("too few voxels around the membrane to centre the vesicle")
    # zero-padded to a fast length: linear (not circular) correlation for the small shifts we need;
    # single precision (the box is float32): 13 % less time per fit, centres within 1e-4 voxel
    n = sfft.next_fast_len(box.shape[0] + max_step, real=True)
    shape = (n, n, n)
    corr = sfft.irfftn(sfft.rfftn(b, s=shape) * np.conj(sfft.rfftn(a.astype(np.float32), s=shape)), s=shape)
    # only small shifts are plausible per iteration
    idx = np.r_[0 : max_step + 1, n - max_step : n]
    sub = corr[np.ix_(idx, idx, idx)]
    pk = np.unravel_index(int(np.argmax(sub)), sub.shape)
    peak = np.array([idx[i] for i in pk])
    shift = np.where(peak > n // 2, peak - n, peak).astype(float)
    for ax in range(3):
        i0 = list(peak)
        im, ip = list(peak), list(peak)
        im[ax] = (peak[ax] - 1) % n
        ip[ax] = (peak[ax] + 1) % n
        shift[ax] += _parabola(corr[tuple(im)], corr[tuple(i0)], corr[tuple(ip)])
    return shift


def _gn_shift(box: np.ndarray, geo: _Geometry, r: np.ndarray, p: np.ndarray, window: float) -> np.ndarray:
    """Gauss-Newton centre update for the model box(u) ~ P(|u - c|), over valid voxels only.

    Exact with missing voxels (volume border, masked neighbours), where the cross-correlation is
    biased towards the side with more data. Local: used once the cross-correlation has converged
    to within half a voxel.
    """
    good = np.isfinite(p)
    if good.sum() < 2:
        raise FitFailure("no radial profile around the centre (box outside the data)")
    ps = gaussian_filter1d(np.interp(r, r[good], p[good]), 1.0, mode="nearest")
    dp = np.gradient(ps, r[1] - r[0])
    jtj, jtr, count = _kernels().gauss_newton_sums(box, geo.d, geo.valid_cc, geo.origin, geo.centre, float(window),
                                                   float(r[1] - r[0]), ps, dp)
    if count < 10:
        raise FitFailure("too few voxels around the membrane to centre the vesicle")
    if not np.all(np.isfinite(jtj)) or np.linalg.cond(jtj) > 1e8:
        return np.zeros(3)
    step = np.linalg.solve(jtj, jtr)
    norm = np.linalg.norm(step)
    return step if norm <= 1.0 else step / norm  # trust region of one voxel


def _coverage(box: np.ndarray, geo: _Geometry, mem: _Membrane) -> float:
    """Fraction of directions (26 sectors, caps and missing voxels excluded) in which the membrane is
    seen: the shell around the membrane centre is darker than just outside by at least half the mean
    depth. About 1 for a vesicle; much lower for a tube or a flat membrane fitted as a sphere."""
    half_t = max(0.5 * (mem.outer - mem.inner), 0.75)
    ok = geo.valid_cc
    shell = ok & (np.abs(geo.d - mem.r_min) <= half_t)
    out = ok & (geo.d >= mem.outer + 1.0) & (geo.d <= mem.outer + 1.0 + max(2.0, 2.0 * half_t))
    sel = shell | out
    if sel.sum() < 50 or not np.isfinite(mem.depth) or mem.depth <= 0:
        return float("nan")
    # sector = direction quantised per axis to -1 / 0 / +1 (|component| > sin 22.5 deg): 26 sectors
    dsel = geo.d[sel]
    sector = np.zeros(dsel.shape, np.int64)
    for o in geo.offsets:
        u = np.broadcast_to(o, geo.d.shape)[sel] / dsel
        sector = sector * 3 + (u > 0.3827) - (u < -0.3827) + 1
    vals = box[sel].astype(np.float64)
    is_shell = shell[sel]
    n = 27
    cs = np.bincount(sector[is_shell], minlength=n)
    co = np.bincount(sector[~is_shell], minlength=n)
    ms = np.bincount(sector[is_shell], vals[is_shell], minlength=n) / np.maximum(cs, 1)
    mo = np.bincount(sector[~is_shell], vals[~is_shell], minlength=n) / np.maximum(co, 1)
    valid = (cs >= 3) & (co >= 3)
    if valid.sum() < 6:
        return float("nan")
    seen = (mo - ms)[valid] > 0.5 * np.mean((mo - ms)[valid])
    return float(np.mean(seen))


#: A fit whose radius grows beyond this factor of its start (+ 10 voxels) has found no membrane.
#: Measured on the 200×400×400 speed tomogram: of 1,010 fits, 3 grew 7.6–12× (to 83–134 voxels,
#: far outside every radius band) and none of the others more than 3.3×.
MAX_RADIUS_GROWTH = 4.0


def _half_size(radius: float, opts: FitOptions) -> int:
    """Half edge of the fitting box: the membrane, the outside level beyond it, and ``margin``."""
    return int(np.ceil(radius + max(5.0, 0.3 * radius) + opts.margin))


def _fit(
    volume: np.ndarray,
    centre: np.ndarray,
    radius: float,
    opts: FitOptions,
    others: tuple[np.ndarray, np.ndarray] | None = None,
    boxes: list | None = None,
) -> SphereFit:
    """Fit one sphere from ``centre``/``radius``; ``boxes`` (a list) receives every box the fit
    looked at (see :func:`_extract_masked`): the fit depends on the neighbours only through those
    that reach into them."""
    c = np.asarray(centre, dtype=float).copy()
    c0 = c.copy()
    # the centring iterations use the steepest-rise edge (a capture range tuned for it, robust from
    # poor centres); the final profile is measured with the requested rule
    final_opts = opts
    if opts.edge == "bilayer":
        opts = replace(opts, edge="steepest")
    r_cur = float(radius)
    max_total = opts.max_shift_factor * max(radius, 2.0) + 1.0
    converged = False
    coarse = True  # cross-correlation steps first (wide capture), then Gauss-Newton (exact)
    it = 0
    for it in range(1, opts.max_iter + 1):  # noqa: B007 - the last value is reported as n_iter
        box, origin = _extract_masked(volume, c, r_cur, _half_size(r_cur, opts), others, boxes)
        geo = _Geometry(box, origin, c, opts)
        r, p = geo.radii, geo.profile
        mem = _membrane(r, p, r_cur, opts)
        r_cur = mem.outer
        if r_cur > MAX_RADIUS_GROWTH * max(radius, 2.0) + 10.0:
            # each step may grow the radius by half (the membrane search window): without a membrane
            # near the object it runs away, and the boxes (and time, memory) grow with its cube
            raise FitFailure(f"the radius ran away from the object ({r_cur:.0f} voxels from a start of {radius:.0f}): "
                             "no membrane near it")
        last = (box, geo, r, p, mem)
        p = geo.profile_cc  # the rotational average used for centring sees no caps either
        window = r_cur + max(3.0, 0.3 * r_cur)
        use_gn = opts.refine == "gauss_newton"
        if opts.refine == "auto":
            near = geo.d <= window
            missing = 1.0 - np.count_nonzero(np.isfinite(box[near])) / max(np.count_nonzero(near), 1)
            use_gn = missing > opts.missing_fraction_gn
        final_step = not use_gn
        if coarse or not use_gn:
            s = _cc_shift(box, geo, r, p, max_step=max(2, int(np.ceil(0.25 * r_cur))), window=window)
            coarse = np.max(np.abs(s)) >= 0.5
        else:
            s = _gn_shift(box, geo, r, p, window)
            final_step = True
        if np.linalg.norm(c + s - c0) > max_total:
            break
        c = c + s
        if final_step and not coarse and np.max(np.abs(s)) < opts.tol:
            converged = True
            break
    if converged:  # the last shift was below tol: reuse that iteration's box and profile
        box, geo, r, p, mem = last
    else:
        box, origin = _extract_masked(volume, c, r_cur, _half_size(r_cur, opts), others, boxes)
        geo = _Geometry(box, origin, c, opts)
        r, p = geo.radii, geo.profile
        mem = _membrane(r, p, r_cur, opts)
    if final_opts is not opts:
        mem = _membrane(r, p, mem.outer, final_opts)
    good = np.isfinite(p)
    a = np.interp(geo.d, r[good], p[good])
    sel = geo.valid & (geo.d <= mem.outer + 2)
    coverage = _coverage(box, geo, mem)
    if sel.any():
        rms = float(np.sqrt(np.mean((box[sel] - a[sel]) ** 2)))
        resid = rms / (float(np.std(box[sel])) + 1e-12)
        contrast = mem.depth / (rms + 1e-12)
    else:
        resid = contrast = float("nan")
    return SphereFit(
        centre=c,
        radius=mem.outer,
        membrane_radius=mem.r_min,
        membrane_thickness=mem.outer - mem.inner,
        membrane_density=mem.density,
        lumen_density=mem.lumen,
        fit_residual=resid,
        membrane_contrast=contrast,
        membrane_coverage=coverage,
        n_iter=it,
        converged=converged,
        profile_radii=r,
        profile=p,
    )


def _with_voxel_size(opts: FitOptions, voxel_size_a: float) -> FitOptions:
    """``opts`` with its voxel size set (kept when already given)."""
    return opts if opts.voxel_size_a else replace(opts, voxel_size_a=float(voxel_size_a))


def fit_sphere(
    volume: np.ndarray,
    centre_guess,
    radius_guess: float,
    voxel_size: float,
    *,
    neighbours: tuple[np.ndarray, np.ndarray] | None = None,
    options: FitOptions | None = None,
    **kwargs,
) -> SphereFit | None:
    """Fit one vesicle in ``volume`` (z, y, x; dense = dark) near ``centre_guess`` (voxels, z, y, x).

    ``radius_guess`` in voxels; ``voxel_size`` in Å (lengths in the result are voxels; ``radius_nm``
    converts). ``neighbours`` = (centres (K, 3), radii (K,)) of other vesicles, in voxels, whose
    surroundings are ignored. Keyword arguments override :class:`FitOptions`. Returns None when no
    membrane can be found.
    """
    volume = check_volume(volume, "tomogram")
    vs = check_voxel_size(voxel_size)
    if kwargs and options is not None:
        raise ParameterError("pass either options= or individual fit settings, not both")
    opts = _with_voxel_size(options or FitOptions(**kwargs), vs)
    if not np.isfinite(radius_guess) or radius_guess <= 1:
        raise ParameterError(f"radius guess must be > 1 voxel, got {radius_guess}")
    if neighbours is not None:
        nc = np.asarray(neighbours[0], float).reshape(-1, 3)
        nr = np.asarray(neighbours[1], float).reshape(-1)
        if len(nc) != len(nr):
            raise ParameterError(f"neighbours: {len(nc)} centres but {len(nr)} radii")
        neighbours = (nc, nr)
    try:
        fit = _fit(volume, np.asarray(centre_guess, float), float(radius_guess), opts, neighbours)
        fit.voxel_size = vs
        return fit
    except FitFailure as exc:
        log.debug("fit at %s failed: %s", centre_guess, exc)
        return None


def rank_rows(a: np.ndarray) -> np.ndarray:
    """Ranks (1-based, ties get their average) along the last axis of ``a`` (no NaN): what
    ``scipy.stats.rankdata`` gives, without its 0.3 s import on the way to the first table."""
    a = np.asarray(a, float)
    order = np.argsort(a, axis=-1, kind="stable")
    srt = np.take_along_axis(a, order, axis=-1)
    n = a.shape[-1]
    # within a run of equal values every rank is the mean of the run's first and last position
    new = np.ones(srt.shape, bool)
    new[..., 1:] = srt[..., 1:] != srt[..., :-1]
    pos = np.broadcast_to(np.arange(n, dtype=float), srt.shape)
    first = np.maximum.accumulate(np.where(new, pos, 0.0), axis=-1)
    end = np.ones(srt.shape, bool)
    end[..., :-1] = new[..., 1:]
    last = np.flip(np.minimum.accumulate(np.flip(np.where(end, pos, float(n)), axis=-1), axis=-1), axis=-1)
    ranks = np.empty_like(srt)
    np.put_along_axis(ranks, order, (first + last) / 2.0 + 1.0, axis=-1)
    return ranks


def profile_correlation(profiles: np.ndarray) -> np.ndarray:
    """Spearman correlation of each row of ``profiles`` (N, S) with the median profile (NaN-safe)."""
    profiles = np.asarray(profiles, float)
    if len(profiles) == 0:
        return np.zeros(0)
    ref = np.nanmedian(profiles, axis=0)
    valid = np.isfinite(ref)[None] & np.isfinite(profiles)
    out = np.full(len(profiles), np.nan)
    # the rows sharing one set of valid radii (profiles end at their box edge: a few sets) are
    # ranked together, the arithmetic of one row at a time
    sets, which = np.unique(valid, axis=0, return_inverse=True)
    for k, m in enumerate(sets):
        rows = np.flatnonzero(which.ravel() == k)
        if m.sum() < 5:
            continue
        a, b = rank_rows(profiles[np.ix_(rows, m)]), rank_rows(ref[m])
        a, b = a - a.mean(axis=1, keepdims=True), b - b.mean()
        den = np.sqrt((a * a).sum(axis=1) * (b * b).sum())
        with np.errstate(invalid="ignore", divide="ignore"):
            out[rows] = np.where(den > 0, (a * b).sum(axis=1) / den, np.nan)
    return out


def initial_spheres(
    labels: np.ndarray, options: FitOptions | None = None, mask_neighbours: bool = True
) -> list[tuple[int, np.ndarray, float, tuple[np.ndarray, np.ndarray] | None]]:
    """Starting point of every labelled object: (id, centroid (z, y, x), radius, neighbours), voxels.

    The radius is half the longest bounding-box edge; ``neighbours`` = (centres, radii) of the other
    objects close enough to matter (None without ``mask_neighbours``). Used by :func:`fit_spheres`;
    public so that block-wise fitting can start from exactly the same values.
    """
    st = label_statistics(labels)
    items = [
        (i, np.asarray(st["centroids"][i], float), max(2.0, 0.5 * max(s.stop - s.start for s in bb)))
        for i, (n, bb) in enumerate(zip(st["voxel_counts"], st["bounding_boxes"]))
        if i > 0 and n > 0 and bb is not None
    ]
    return _with_neighbours(items, options or FitOptions(), mask_neighbours)


def _with_neighbours(items: list[tuple[int, np.ndarray, float]], opts: FitOptions, mask_neighbours: bool):
    if not items:
        return []
    cen_all = np.array([c for _, c, _ in items])
    r_all = np.array([r for _, _, r in items])
    tree = cKDTree(cen_all) if mask_neighbours else None
    out = []
    for k, (i, cen, r0) in enumerate(items):
        others = None
        if tree is not None:
            near = [j for j in tree.query_ball_point(cen, 2.5 * r0 + r_all.max() + opts.margin + 8) if j != k]
            others = (cen_all[near], r_all[near])
        out.append((int(i), cen, float(r0), others))
    return out


def table_from_fits(ids, fits: list[SphereFit], voxel_size_a: float) -> VesicleTable:
    """Vesicle table (source "auto") from fitted spheres, with the QC columns and the profile
    correlation of each fit against the median profile of all of them."""
    nm = voxel_size_a / 10.0
    corr = profile_correlation(np.stack([f.normalised_profile() for f in fits])) if fits else np.zeros(0)
    return VesicleTable.from_spheres(
        np.array([f.centre for f in fits]).reshape(-1, 3),
        np.array([f.radius for f in fits]),
        voxel_size_a,
        ids=list(ids),
        membrane_thickness_nm=np.array([f.membrane_thickness * nm for f in fits]),
        membrane_density=np.array([f.membrane_density for f in fits]),
        lumen_density=np.array([f.lumen_density for f in fits]),
        profile_correlation=corr,
        fit_residual=np.array([f.fit_residual for f in fits]),
        membrane_contrast=np.array([f.membrane_contrast for f in fits]),
        membrane_coverage=np.array([f.membrane_coverage for f in fits]),
        source=["auto"] * len(fits),
    )


def fit_spheres(
    intensity: np.ndarray,
    labels: np.ndarray,
    voxel_size_a: float,
    *,
    options: FitOptions | None = None,
    mask_neighbours: bool = True,
    progress: bool = False,
    cache: dict | None = None,
    **kwargs,
) -> tuple[VesicleTable, pd.DataFrame]:
    """Fit a sphere to every labelled object of ``labels`` (z, y, x) in ``intensity`` (dense = dark).

    The initial centre is the object's centroid and the initial radius half its longest bounding-box
    edge. With ``mask_neighbours``, voxels nearer to another object's sphere (centroid, half its
    longest bounding-box edge) than to this vesicle's are ignored (neighbouring membranes otherwise
    pull centres in crowded clusters). Returns (VesicleTable with ids = label ids and QC columns
    membrane_thickness_nm, membrane_density, lumen_density, profile_correlation, fit_residual,
    source="auto", plus membrane_contrast (dip depth over the RMS fit residual); rejected table with
    step ``"fit"``). ``voxel_size_a`` in Å; keyword arguments set :class:`FitOptions`. Objects
    are fitted on every core (:mod:`cryoves.parallel`); ``cache`` (a dict, from an earlier call on
    the same ``intensity`` with the same options) skips the objects whose start has not changed.
    """
    intensity = check_volume(intensity, "tomogram")
    labels = check_volume(labels, "labels")
    check_same_shape(intensity, labels, "tomogram", "labels")
    vs = check_voxel_size(voxel_size_a)
    opts = _with_voxel_size(options or FitOptions(**kwargs), vs)
    return _fit_items(intensity, initial_spheres(labels, opts, mask_neighbours), vs, opts, progress, cache)


def fit_spheres_at(
    intensity: np.ndarray,
    centres: np.ndarray,
    radii: np.ndarray,
    voxel_size_a: float,
    *,
    ids: np.ndarray | None = None,
    options: FitOptions | None = None,
    mask_neighbours: bool = True,
) -> tuple[VesicleTable, pd.DataFrame]:
    """As :func:`fit_spheres`, starting from given spheres (centres (N, 3) z, y, x and radii, voxels
    of ``intensity``) instead of labelled objects, e.g. objects found on a coarser grid."""
    intensity = check_volume(intensity, "tomogram")
    vs = check_voxel_size(voxel_size_a)
    opts = _with_voxel_size(options or FitOptions(), vs)
    centres = np.asarray(centres, float).reshape(-1, 3)
    radii = np.maximum(2.0, np.asarray(radii, float).reshape(-1))
    ids = np.arange(1, len(radii) + 1) if ids is None else np.asarray(ids)
    items = [(int(i), c, float(r)) for i, c, r in zip(ids, centres, radii)]
    return _fit_items(intensity, _with_neighbours(items, opts, mask_neighbours), vs, opts, False)


def _fit_items(
    intensity: np.ndarray, items: list, vs: float, opts: FitOptions, progress: bool, cache: dict | None = None
):
    """Fit every item (id, centre, radius, neighbours) on the worker processes
    (:mod:`cryoves.parallel`). ``cache`` maps an item's start (centre, radius) to its outcome, the
    boxes the fit looked at and the neighbours that reached into them: an item with that start is
    not fitted again when the same neighbours (no more, no fewer) reach into those boxes -- the fit
    would repeat every step exactly."""
    from cryoves import parallel

    cache = {} if cache is None else cache
    keys = [_item_key(it) for it in items]
    todo = [k for k, (it, key) in enumerate(zip(items, keys, strict=True))
            if key not in cache or cache[key][2] != _reaching(it[3], cache[key][1])]
    with parallel.shared(intensity, parallel.workers() > 1 and len(todo) > 1) as volume:
        tasks = [(volume, chunk, opts) for chunk in parallel.chunks([items[k] for k in todo])]
        done = parallel.pmap(_fit_task, tasks, progress="fitting spheres" if progress else None)
    outcomes = {}
    for k, (out, boxes) in zip(todo, (o for chunk in done for o in chunk), strict=True):
        outcomes[k] = out
        cache[keys[k]] = (out, boxes, _reaching(items[k][3], boxes))
    ids, fits, rejected = [], [], []
    for k, ((i, cen, r0, _), key) in enumerate(zip(items, keys, strict=True)):
        out = outcomes[k] if k in outcomes else cache[key][0]
        if isinstance(out, str):
            rejected.append((i, cen, r0, out))
            continue
        out.voxel_size = vs
        ids.append(i)
        fits.append(out)
    table = table_from_fits(ids, fits, vs)
    log.info("fitted %d spheres, %d objects could not be fitted, %d fits reused", len(fits), len(rejected),
             len(items) - len(todo))
    return table, rejected_rows(rejected, "fit")


def _item_key(item) -> tuple:
    _, cen, r0, others = item
    return (np.asarray(cen, float).tobytes(), float(r0), others is None)


def _reaching(others: tuple[np.ndarray, np.ndarray] | None, boxes: np.ndarray) -> frozenset:
    """The neighbours (centre, radius) that reach into ``boxes`` (see :func:`_near`)."""
    if others is None or len(others[1]) == 0:
        return frozenset()
    cs, rs = np.asarray(others[0], float), np.asarray(others[1], float)
    near = _near(cs, rs, boxes)
    return frozenset(map(tuple, np.column_stack([cs[near], rs[near]]).tolist()))


def _fit_task(task) -> list:
    """Worker side of :func:`_fit_items`: (a SphereFit or the failure's reason, the boxes the fit
    looked at) per item."""
    from cryoves.parallel import attached

    volume, items, opts = task
    out: list = []
    with attached(volume) as vol:
        for _, cen, r0, others in items:
            boxes: list = []
            try:
                res = _fit(vol, cen, r0, opts, others, boxes)
            except FitFailure as exc:
                res = str(exc)
            out.append((res, np.array(boxes).reshape(-1, 7)))
    return out

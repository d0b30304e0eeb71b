"""Imaging model: tilt series about y, CTF, shot noise, weighted back-projection, post-filters.

Tilting about y makes every y-row an independent 2-D parallel-beam problem in the x–z plane,
so projection and back-projection are one sparse matrix (all tilts stacked, linear
interpolation onto detector bins, mass-preserving) applied to all y-rows at once, and its
transpose. Both are exact adjoints, deterministic, and take ~1 s for 256³ × 61 tilts.
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import scipy.fft as sfft
import scipy.sparse as sp

from cryoves.simulate.config import SimulationConfig

log = logging.getLogger(__name__)


def electron_wavelength_a(voltage_kv: float) -> float:
    """Relativistic electron wavelength (Å) at ``voltage_kv``."""
    v = voltage_kv * 1e3
    return 12.2643 / np.sqrt(v * (1 + 0.978466e-6 * v))


def interaction_constant(voltage_kv: float) -> float:
    """Phase shift per projected potential, rad / (V·Å) (≈ 6.5e-4 at 300 kV)."""
    v = voltage_kv * 1e3
    mc2 = 510998.95
    return 2 * np.pi / (electron_wavelength_a(voltage_kv) * v) * (mc2 + v) / (2 * mc2 + v)


@functools.lru_cache(maxsize=4)
def projector(nz: int, nx: int, angles_deg: tuple[float, ...]) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Sparse (n_tilts·nx, nz·nx) projection matrix and its transpose (CSR, float32).

    Voxel (z, x) at tilt θ lands on detector coordinate u = (x - cx)·cosθ + (z - cz)·sinθ + cx,
    split linearly between the two nearest bins (detector pixel = voxel size, nx bins).
    """
    z = np.arange(nz, dtype=np.float64) - (nz - 1) / 2
    x = np.arange(nx, dtype=np.float64) - (nx - 1) / 2
    zz, xx = np.meshgrid(z, x, indexing="ij")
    zz, xx = zz.ravel(), xx.ravel()
    col = np.arange(nz * nx, dtype=np.int32)
    rows, cols, vals = [], [], []
    for a, th in enumerate(np.radians(angles_deg)):
        u = xx * np.cos(th) + zz * np.sin(th) + (nx - 1) / 2
        j = np.floor(u).astype(np.int32)
        f = (u - j).astype(np.float32)
        for jj, w in ((j, 1 - f), (j + 1, f)):
            ok = (jj >= 0) & (jj < nx)
            rows.append(jj[ok] + a * nx)
            cols.append(col[ok])
            vals.append(w[ok])
    mat = sp.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
        shape=(len(angles_deg) * nx, nz * nx),
        dtype=np.float32,
    )
    return mat, mat.T.tocsr()


def project(volume: np.ndarray, angles_deg) -> np.ndarray:
    """Line integrals (voxel units) of ``volume`` (z, y, x) → projections (n_tilts, y, x)."""
    nz, ny, nx = volume.shape
    mat, _ = projector(nz, nx, tuple(float(a) for a in angles_deg))
    cols = np.ascontiguousarray(np.asarray(volume, dtype=np.float32).transpose(0, 2, 1)).reshape(nz * nx, ny)
    out = mat @ cols  # (n_tilts * nx, ny)
    return np.ascontiguousarray(out.reshape(len(angles_deg), nx, ny).transpose(0, 2, 1))


def back_project(projections: np.ndarray, angles_deg, nz: int) -> np.ndarray:
    """Adjoint of :func:`project`: (n_tilts, y, x) → volume (nz, y, x), float32."""
    nt, ny, nx = projections.shape
    _, mat_t = projector(nz, nx, tuple(float(a) for a in angles_deg))
    cols = np.ascontiguousarray(projections.astype(np.float32).transpose(0, 2, 1)).reshape(nt * nx, ny)
    out = mat_t @ cols
    return np.ascontiguousarray(out.reshape(nz, nx, ny).transpose(0, 2, 1))


def ctf_transfer(shape_yx: tuple[int, int], cfg: SimulationConfig) -> np.ndarray:
    """Complex wave transfer exp(iχ(k))·exp(-B k²/4) on an FFT grid of ``shape_yx`` (pixel = voxel).

    χ = π λ Δf k² - π/2 Cs λ³ k⁴ with Δf > 0 underfocus, so that dense objects are dark at low
    frequency (intensity ≈ 1 - 2 sinχ·φ - 2 a cosχ·φ for a weak object).
    """
    lam = electron_wavelength_a(cfg.voltage_kv)
    ky = sfft.fftfreq(shape_yx[0], d=cfg.voxel_size_a)[:, None]
    kx = sfft.fftfreq(shape_yx[1], d=cfg.voxel_size_a)[None, :]
    k2 = kx**2 + ky**2
    chi = np.pi * lam * cfg.defocus_um * 1e4 * k2 - 0.5 * np.pi * cfg.cs_mm * 1e7 * lam**3 * k2**2
    return (np.exp(1j * chi) * np.exp(-cfg.bfactor_a2 * k2 / 4)).astype(np.complex64)


def ctf_sign(shape_yx: tuple[int, int], cfg: SimulationConfig) -> np.ndarray:
    """Sign (±1, float32) of the weak-object contrast transfer sinχ + a·cosχ on an FFT grid.

    A weak phase object φ with amplitude contrast gives intensity ≈ 1 - 2 (sinχ + a cosχ)·φ
    (a = A/√(1 - A²), the transfer of :func:`ctf_transfer` and :func:`tilt_series`), so dense
    material is dark wherever this is positive; multiplying an image's spectrum by the sign makes
    it dark at every frequency (phase flipping).
    """
    h = ctf_transfer(shape_yx, cfg)
    a = cfg.amplitude_contrast / np.sqrt(1 - cfg.amplitude_contrast**2)
    return np.where(h.imag + a * h.real < 0, -1.0, 1.0).astype(np.float32)


def phase_flip(images: np.ndarray, cfg: SimulationConfig) -> np.ndarray:
    """CTF correction by phase flipping of each (mean-normalised) tilt image (n_tilts, y, x).

    Images are reflect-padded like in :func:`tilt_series` so that the flip does not wrap around.
    """
    nt, ny, nx = images.shape
    pad = min(32, ny // 4, nx // 4)
    flip = ctf_sign((ny + 2 * pad, nx + 2 * pad), cfg)
    out = np.empty_like(images, dtype=np.float32)
    for t in range(nt):
        img = np.pad(images[t].astype(np.float64), pad, mode="reflect")
        out[t] = sfft.ifft2(sfft.fft2(img) * flip).real[pad:pad + ny, pad:pad + nx]
    return out


def tilt_series(
    potential: np.ndarray, cfg: SimulationConfig, rng: np.random.Generator | None, ice_nm: float
) -> np.ndarray:
    """Simulated, mean-normalised tilt images (n_tilts, y, x): counts/mean - 1 (dense = negative).

    ``potential`` is in volts (z, y, x). Material of the ice slab beyond the box in x is added as
    its mean potential so that the box edges do not show up as truncation artefacts. ``rng`` None
    gives noise-free images.
    """
    angles = cfg.tilt_angles_deg
    nz, ny, nx = potential.shape
    v = cfg.voxel_size_a
    proj = project(potential, angles) * np.float32(v)  # V·Å
    # ice slab outside the box: path length of the slab per ray minus what the box already holds
    slab = (potential > 0.5).astype(np.float32)
    slab_mean = float(potential[slab > 0].mean()) if slab.any() else 0.0
    inside = project(slab[:, :1, :], angles)[:, 0, :]  # (n_tilts, x), voxels
    ice_vox = ice_nm * 10 / v
    cos = np.cos(np.radians(angles))[:, None]
    outside = np.clip(ice_vox / cos - inside, 0, None)
    proj += (slab_mean * v * outside)[:, None, :].astype(np.float32)

    sigma = interaction_constant(cfg.voltage_kv)
    a = cfg.amplitude_contrast / np.sqrt(1 - cfg.amplitude_contrast**2)
    pad = min(32, ny // 4, nx // 4)
    shp = (ny + 2 * pad, nx + 2 * pad)
    h = ctf_transfer(shp, cfg)
    ky = sfft.fftfreq(shp[0])[:, None]
    kx = sfft.fftfreq(shp[1])[None, :]
    # per-tilt envelope: radiation damage for the dose received before this tilt (dose-symmetric
    # order, Grant & Grigorieff 2015 critical exposure) and beam-induced motion blur
    k = np.sqrt(ky**2 + kx**2) / v  # 1/Å
    crit = 0.245 * np.maximum(k, 1e-6) ** -1.665 + 2.81
    order = np.argsort(np.argsort(np.abs(angles) + 1e-3 * (angles < 0)))
    dose_before = (order + 0.5) * cfg.dose_e_per_a2 / len(angles)
    blur = np.exp(-2 * np.pi**2 * (cfg.motion_blur_nm * 10) ** 2 * k**2)
    shifts = np.zeros((len(angles), 2))
    if rng is not None and cfg.alignment_error_nm > 0:
        shifts = rng.normal(0, cfg.alignment_error_nm * 10 / v, (len(angles), 2))
    images = np.empty((len(angles), ny, nx), dtype=np.float32)
    for t in range(len(angles)):
        phi = sigma * proj[t].astype(np.float64)
        phi -= phi.mean()
        wave = np.exp((1j - a) * np.pad(phi, pad, mode="reflect")).astype(np.complex64)
        ht = h * blur
        if cfg.radiation_damage:
            ht = ht * np.exp(-dose_before[t] / (2 * crit))
        ht = ht.astype(np.complex64)
        if shifts[t].any():  # residual misalignment: the image lands shifted on the detector
            ht = ht * np.exp(-2j * np.pi * (ky * shifts[t, 0] + kx * shifts[t, 1])).astype(np.complex64)
        img = sfft.ifft2(sfft.fft2(wave) * ht)[pad:-pad or None, pad:-pad or None]
        inten = (img.real**2 + img.imag**2) * np.exp(-ice_nm / (cfg.inelastic_mfp_nm * cos[t, 0]))
        if rng is not None:
            electrons = cfg.dose_e_per_a2 * cfg.detector_dqe / len(angles) * v * v
            inten = rng.poisson(inten * electrons).astype(np.float64)
        images[t] = inten / max(float(inten.mean()), 1e-12) - 1.0
    return images


def reconstruction_filter(n: int, cfg: SimulationConfig) -> np.ndarray:
    """rfft-domain filter for rows of length ``n`` (zero-padded): ramp (or SIRT-like) × roll-off."""
    f = np.abs(sfft.rfftfreq(n))
    ramp = f.copy()
    ramp[0] = 0.25 / n  # the DC term of a discrete ramp
    if cfg.reconstruction == "sirt-like":
        g = np.clip((1.0 / n) / np.maximum(f, 1e-12), 0, 1)
        ramp = ramp * (1 - (1 - g) ** cfg.sirt_iterations)
    roll = np.where(f > cfg.radial_cutoff, np.exp(-0.5 * ((f - cfg.radial_cutoff) / cfg.radial_falloff) ** 2), 1.0)
    return (ramp * roll).astype(np.float32)


def reconstruct(images: np.ndarray, cfg: SimulationConfig, nz: int) -> np.ndarray:
    """Weighted back-projection of (n_tilts, y, x) images into (nz, y, x), float32.

    With ``cfg.ctf_correction == "phase-flip"`` the images are phase-flipped first.
    """
    if cfg.ctf_correction == "phase-flip":
        images = phase_flip(images, cfg)
    nt, ny, nx = images.shape
    npad = int(sfft.next_fast_len(2 * nx))
    filt = reconstruction_filter(npad, cfg)
    spec = sfft.rfft(images, n=npad, axis=-1) * filt
    filtered = sfft.irfft(spec, n=npad, axis=-1)[..., :nx].astype(np.float32)
    vol = back_project(filtered, cfg.tilt_angles_deg, nz)
    return vol * np.float32(np.pi / nt)


def post_filter(vol: np.ndarray, cfg: SimulationConfig) -> np.ndarray:
    """Optional Gaussian or anisotropic-diffusion smoothing, as labs apply before segmentation."""
    if cfg.post_filter == "gaussian":
        from scipy import ndimage

        return ndimage.gaussian_filter(vol, cfg.post_filter_sigma_nm / cfg.voxel_size_nm).astype(np.float32)
    if cfg.post_filter == "diffusion":
        return anisotropic_diffusion(vol, cfg.diffusion_iterations)
    return vol


def anisotropic_diffusion(
    vol: np.ndarray, iterations: int, kappa_quantile: float = 0.9, dt: float = 0.14
) -> np.ndarray:
    """Perona–Malik diffusion (exponential conductance), κ from the gradient-magnitude quantile."""
    u = vol.astype(np.float32).copy()
    kappa = None
    for _ in range(iterations):
        flux = np.zeros_like(u)
        for ax in range(3):
            g = np.diff(u, axis=ax)
            if kappa is None:
                kappa = float(np.quantile(np.abs(g[::2, ::2, ::2]), kappa_quantile)) + 1e-12
            c = np.exp(-((g / kappa) ** 2))
            f = c * g
            lo = [slice(None)] * 3
            hi = [slice(None)] * 3
            lo[ax] = slice(0, -1)
            hi[ax] = slice(1, None)
            flux[tuple(lo)] += f
            flux[tuple(hi)] -= f
        u += np.float32(dt) * flux
    return u

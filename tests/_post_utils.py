"""Small synthetic vesicle volumes for the post-processing tests (no simulator needed)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter


@dataclass
class Synthetic:
    intensity: np.ndarray  # float32, dense = dark
    prob: np.ndarray  # float32 in [0, 1]
    centres: np.ndarray  # (N, 3) voxels
    radii: np.ndarray  # (N,) outer membrane radius, voxels
    voxel_size: float  # Å


def paint(shape, centres, radii, thickness=4.0, lumen=-0.15, membrane=-1.0):
    """Noise-free vesicles: membrane shell [R - thickness, R] and a slightly dark lumen (voxels)."""
    vol = np.zeros(shape, np.float32)
    filled = np.zeros(shape, np.float32)
    for c, r in zip(np.asarray(centres, float), np.asarray(radii, float)):
        lo = np.maximum(np.floor(c - r - 2).astype(int), 0)
        hi = np.minimum(np.ceil(c + r + 3).astype(int), shape)
        g = np.ogrid[tuple(slice(a, b) for a, b in zip(lo, hi))]
        d = np.sqrt(sum((gi - ci) ** 2 for gi, ci in zip(g, c)))
        sl = tuple(slice(a, b) for a, b in zip(lo, hi))
        v = vol[sl]
        v[d <= r - thickness] = lumen
        v[(d > r - thickness) & (d <= r)] = membrane
        filled[sl][d <= r] = 1.0
    return vol, filled


def synthetic(
    shape=(48, 64, 64),
    centres=((24, 20, 20), (24, 40, 44)),
    radii=(10.0, 12.0),
    voxel_size=10.0,
    thickness=4.0,
    noise=0.15,
    blur=0.8,
    prob_blur=1.5,
    seed=0,
) -> Synthetic:
    """Vesicles (dark bilayer shell, slightly dark lumen) with Gaussian noise; prob = blurred filled balls."""
    rng = np.random.default_rng(seed)
    centres = np.asarray(centres, float).reshape(-1, 3)
    radii = np.asarray(radii, float).reshape(-1)
    vol, filled = paint(shape, centres, radii, thickness)
    vol = gaussian_filter(vol, blur) + rng.normal(0, noise, shape).astype(np.float32)
    prob = np.clip(gaussian_filter(filled, prob_blur) * 1.02, 0, 1).astype(np.float32)
    return Synthetic(vol.astype(np.float32), prob, centres, radii, voxel_size)


def random_scene(n=8, shape=(64, 96, 96), r_range=(8.0, 12.0), seed=0, gap=3.0, border=None, **kw) -> Synthetic:
    """``n`` non-overlapping vesicles at random sub-voxel positions (fewer if the volume is full)."""
    rng = np.random.default_rng(seed)
    cs, rs = [], []
    for _ in range(2000):
        if len(cs) == n:
            break
        r = rng.uniform(*r_range)
        b = r + 2 if border is None else border
        c = rng.uniform([b] * 3, np.array(shape) - b)
        if all(np.linalg.norm(c - c2) > r + r2 + gap for c2, r2 in zip(cs, rs)):
            cs.append(c)
            rs.append(r)
    return synthetic(shape=shape, centres=cs, radii=rs, seed=seed, **kw)


def missing_wedge(vol: np.ndarray, max_tilt_deg: float = 60.0) -> np.ndarray:
    """Remove the Fourier wedge of a single-axis tilt series about y (tilt range +-max_tilt_deg).

    Frequencies (kz, kx) with |kz| > |kx| * tan(max_tilt) are missing, so membranes whose normal is
    near z (the vesicle caps) lose their contrast, as in a real tomogram.
    """
    kz = np.fft.fftfreq(vol.shape[0])[:, None, None]
    kx = np.fft.rfftfreq(vol.shape[2])[None, None, :]
    keep = np.abs(kz) <= np.abs(kx) * np.tan(np.deg2rad(max_tilt_deg))
    keep = np.broadcast_to(keep, (vol.shape[0], vol.shape[1], keep.shape[2])).copy()
    keep[0, :, 0] = True  # keep the mean
    f = np.fft.rfftn(vol)
    return np.fft.irfftn(f * keep, s=vol.shape, axes=(0, 1, 2)).astype(np.float32)


def bilayer_vesicle(seed=0, voxel_nm=1.6, radius=12.0, thickness_nm=4.5, ctf=None, defocus_um=8.0,
                     coat=0, noise=0.3, n=48):
    """The simulator's bilayer (outer edge at ``radius`` voxels) imaged through a Gaussian blur or an
    uncorrected CTF (300 kV, Cs 2.7 mm, B 500 Å²: bright/dark fringes), optionally under a coat of
    ``coat`` protein blobs (sigma 2.5 nm, half the simulator's peak, centred 3 nm outside the edge)."""
    from cryoves.simulate.scene import PROTEIN_V, bilayer

    rng = np.random.default_rng(seed)
    c = np.full(3, (n - 1) / 2) + rng.uniform(-0.5, 0.5, 3)
    g = np.ogrid[:n, :n, :n]
    pot = bilayer((np.sqrt(sum((gi - ci) ** 2 for gi, ci in zip(g, c))) - radius) * voxel_nm, thickness_nm, voxel_nm)
    u = rng.normal(size=(coat, 3))
    for p in c + u / np.linalg.norm(u, axis=1, keepdims=True) * (radius + 3.0 / voxel_nm):
        pot += 0.5 * PROTEIN_V * np.exp(-0.5 * sum((gi - pi) ** 2 for gi, pi in zip(g, p)) * (voxel_nm / 2.5) ** 2)
    f = np.fft.fftfreq(n)
    k2 = (f[:, None, None] ** 2 + f[None, :, None] ** 2 + f[None, None, :] ** 2) / (10 * voxel_nm) ** 2  # 1/Å²
    if ctf:
        lam, cs = 0.019687, 2.7e7
        chi = np.pi * lam * defocus_um * 1e4 * k2 - 0.5 * np.pi * cs * lam**3 * k2**2
        tf = -(np.sqrt(1 - 0.07**2) * np.sin(chi) + 0.07 * np.cos(chi)) * np.exp(-500 * k2 / 4)
    else:
        tf = -np.exp(-2 * np.pi**2 * 0.6**2 * k2 * (10 * voxel_nm) ** 2)
    img = np.fft.ifftn(np.fft.fftn(pot) * tf).real
    img += rng.normal(0, noise * img.std(), img.shape)
    return img.astype(np.float32), c, radius, 10 * voxel_nm

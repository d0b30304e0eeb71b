"""Side-by-side comparison of a simulated and a real tomogram (slices and power spectra).

Used to make ``docs/simulated_vs_real.png``; matplotlib is imported lazily.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cryoves.atomic import atomic_path


def xz_power_spectrum(volume: np.ndarray, voxel_size_a: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean over y of |FFT|² of the x–z slices of a (z, y, x) volume, centred, log10.

    Returns (spectrum (kz, kx), kz, kx) with frequencies in 1/nm.
    """
    vol = np.asarray(volume, dtype=np.float32)
    vol = (vol - vol.mean()) / max(float(vol.std()), 1e-12)
    win = np.hanning(vol.shape[0])[:, None, None] * np.hanning(vol.shape[2])[None, None, :]
    spec = (np.abs(np.fft.fft2(vol * win, axes=(0, 2))) ** 2).mean(axis=1)
    spec = np.fft.fftshift(spec)
    kz = np.fft.fftshift(np.fft.fftfreq(vol.shape[0], d=voxel_size_a / 10))
    kx = np.fft.fftshift(np.fft.fftfreq(vol.shape[2], d=voxel_size_a / 10))
    return np.log10(spec + 1e-12), kz, kx


def radial_power(volume: np.ndarray, voxel_size_a: float, nbins: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """XY-plane radially averaged power spectrum (mean over z) → (k in 1/nm, normalised power)."""
    vol = np.asarray(volume, dtype=np.float32)
    vol = (vol - vol.mean()) / max(float(vol.std()), 1e-12)
    spec = (np.abs(np.fft.fft2(vol, axes=(1, 2))) ** 2).mean(axis=0)
    ky = np.fft.fftfreq(vol.shape[1], d=voxel_size_a / 10)[:, None]
    kx = np.fft.fftfreq(vol.shape[2], d=voxel_size_a / 10)[None, :]
    k = np.sqrt(ky**2 + kx**2)
    edges = np.linspace(0, k.max() * 0.999, nbins + 1)
    which = np.digitize(k.ravel(), edges) - 1
    ok = (which >= 0) & (which < nbins)
    p = np.bincount(which[ok], weights=spec.ravel()[ok], minlength=nbins) / np.maximum(
        np.bincount(which[ok], minlength=nbins), 1)
    return 0.5 * (edges[1:] + edges[:-1]), p / p.sum()


def comparison_figure(
    panels: list[tuple[str, np.ndarray, float]], path: str | Path, z_slice: list[int] | None = None
) -> Path:
    """Figure with one row per volume: XY slice, XZ slice, XZ power spectrum; plus radial spectra.

    ``panels``: (title, volume (z, y, x) dense = dark, voxel size Å). Written atomically as PNG.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(panels)
    fig, axes = plt.subplots(n, 4, figsize=(18, 4.3 * n), gridspec_kw={"width_ratios": [1, 1.3, 1, 1]})
    axes = np.atleast_2d(axes)
    for i, (title, vol, vs) in enumerate(panels):
        vol = np.asarray(vol, dtype=np.float32)
        z = vol.shape[0] // 2 if z_slice is None else z_slice[i]
        y = vol.shape[1] // 2
        ext_xy = [0, vol.shape[2] * vs / 10, vol.shape[1] * vs / 10, 0]
        ext_xz = [0, vol.shape[2] * vs / 10, vol.shape[0] * vs / 10, 0]
        for ax, img, ext, lab in ((axes[i, 0], vol[max(z - 1, 0) : z + 2].mean(0), ext_xy, "XY"),
                                  (axes[i, 1], vol[:, max(y - 1, 0) : y + 2].mean(1), ext_xz, "XZ")):
            lo, hi = np.percentile(img, [1, 99])
            ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, extent=ext)
            ax.set_title(f"{title}: {lab} (3-slice avg), nm")
        spec, kz, kx = xz_power_spectrum(vol, vs)
        lo, hi = np.percentile(spec, [5, 99.9])
        axes[i, 2].imshow(spec, cmap="magma", vmin=lo, vmax=hi, extent=[kx[0], kx[-1], kz[-1], kz[0]], aspect="auto")
        axes[i, 2].set_title(f"{title}: XZ power (kx, kz in 1/nm)")
        k, p = radial_power(vol, vs)
        for j in range(n):
            axes[j, 3].semilogy(k, p, label=title, lw=2 if j == i else 1)
    for j in range(n):
        axes[j, 3].set_xlabel("k (1/nm)")
        axes[j, 3].set_title("XY radial power spectrum (normalised)")
        axes[j, 3].legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=60, format="png")
    plt.close(fig)
    return Path(path)


def make_comparison(real_path: str | Path, out_path: str | Path, seed: int = 3) -> Path:
    """Simulate a synapse at 22 Å and at 40 Å and compare with a real tomogram (dense = bright
    TIFF, ~40 Å voxels, e.g. the HIV-1 VLP sample) in one figure at ``out_path``."""
    import tifffile

    from cryoves.simulate import SimulationConfig, simulate

    real = -np.asarray(tifffile.imread(str(real_path)), dtype=np.float32)  # to dense = dark
    a = simulate(SimulationConfig.preset("synapse", shape=(128, 256, 256)), seed=seed)
    b = simulate(SimulationConfig.preset("synapse", shape=real.shape, voxel_size_a=40.0), seed=seed)
    zs = [int(np.median(s.vesicles.df["z"])) if len(s.vesicles) else s.tomogram.shape[0] // 2 for s in (a, b)]
    return comparison_figure(
        [("sim 22 Å", a.tomogram.data, 22.0), ("sim 40 Å", b.tomogram.data, 40.0),
         ("real HIV-1 VLP ~40 Å (inverted)", real, 40.0)],
        out_path, z_slice=zs + [real.shape[0] // 2],
    )


def make_gallery(out_path: str | Path, shape: tuple[int, int, int] = (96, 192, 192)) -> Path:
    """XY slices of the dense-core and large-vesicle presets and two randomised volumes, with labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cryoves.simulate import SimulationConfig, randomize_config, simulate

    items = [("preset dense-core", SimulationConfig.preset("dense-core", shape=shape)),
             ("preset large-vesicles", SimulationConfig.preset("large-vesicles", shape=shape)),
             ("randomize seed 1", randomize_config(1, shape=shape)),
             ("randomize seed 4", randomize_config(4, shape=shape))]
    fig, ax = plt.subplots(2, len(items), figsize=(4.5 * len(items), 9))
    for i, (title, cfg) in enumerate(items):
        sim = simulate(cfg, seed=i)
        vol = sim.tomogram.data
        z = int(np.median(sim.vesicles.df["z"])) if len(sim.vesicles) else vol.shape[0] // 2
        img = vol[max(z - 1, 0) : z + 2].mean(0)
        lo, hi = np.percentile(img, [1, 99])
        ax[0, i].imshow(img, cmap="gray", vmin=lo, vmax=hi)
        ax[0, i].set_title(f"{title}: XY z={z}\n{cfg.voxel_size_a:.1f} Å, defocus {cfg.defocus_um:.1f} µm, "
                           f"{cfg.reconstruction}/{cfg.post_filter}", fontsize=9)
        ax[1, i].imshow(sim.labels[z] > 0, cmap="gray")
        ax[1, i].set_title(f"ground-truth labels ({len(sim.vesicles)} vesicles)", fontsize=9)
        for a in ax[:, i]:
            a.axis("off")
    fig.tight_layout()
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, dpi=55, format="png")
    plt.close(fig)
    return Path(out_path)


def make_wedge_figure(out_path: str | Path, seed: int = 4) -> Path:
    """XY/XZ/YZ through the largest whole vesicle: noise-free scene, noise-free and noisy tomogram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cryoves.simulate import SimulationConfig, simulate

    cfg = SimulationConfig.preset("synapse", shape=(96, 160, 160))
    sims = [simulate(cfg, seed=seed), simulate(cfg.replace(noise=False), seed=seed)]
    t = sims[0].vesicles
    ok = np.all((t.centres - t.radii[:, None] - 6 >= 0) & (t.centres + t.radii[:, None] + 6 <= np.array(cfg.shape) - 1), 1)
    k = int(np.argmax(np.where(ok, t.radii, -1)))
    c, r = np.rint(t.centres[k]).astype(int), int(t.radii[k]) + 8
    rows = [("noise-free scene", sims[0].scene), ("noise-free tomogram", sims[1].tomogram.data),
            ("tomogram", sims[0].tomogram.data)]
    fig, ax = plt.subplots(len(rows), 3, figsize=(11, 3.6 * len(rows)))
    for i, (name, vol) in enumerate(rows):
        cuts = [vol[c[0], c[1] - r : c[1] + r, c[2] - r : c[2] + r], vol[c[0] - r : c[0] + r, c[1], c[2] - r : c[2] + r],
                vol[c[0] - r : c[0] + r, c[1] - r : c[1] + r, c[2]]]
        for j, (img, lab) in enumerate(zip(cuts, ("XY", "XZ (z down)", "YZ (z down; y = tilt axis)"))):
            lo, hi = np.percentile(img, [1, 99])
            ax[i, j].imshow(img, cmap="gray", vmin=lo, vmax=hi)
            ax[i, j].set_title(f"{name}: {lab}", fontsize=9)
            ax[i, j].axis("off")
    fig.suptitle(f"One vesicle (outer radius {t.df['radius_nm'][k]:.1f} nm), 22 Å, ±60°: caps fade along z")
    fig.tight_layout()
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, dpi=60, format="png")
    plt.close(fig)
    return Path(out_path)


if __name__ == "__main__":  # python -m cryoves.simulate.realism REAL.tif DOCS_DIR
    import sys

    docs = Path(sys.argv[2])
    make_comparison(sys.argv[1], docs / "simulated_vs_real.png")
    make_gallery(docs / "sim_presets.png")
    make_wedge_figure(docs / "sim_missing_wedge.png")

"""Post-processing speed: ours vs a naive baseline (20 erosions + per-vesicle integer-voxel fitting).

Builds a synthetic tomogram with N vesicles on a jittered grid (dark bilayer, noise; probability map
= blurred filled balls), then times, in the same run:

- ours: global_threshold (one pass) + label_vesicles + fit_spheres + repair;
- baseline (the original's approach): threshold search with one binary erosion per candidate,
  scikit-image labelling and regionprops, per-vesicle refinement with integer centres, integer
  distance bins and scikit-image phase_cross_correlation (<= 10 cycles), as described in the spec §4.4-4.7.

Prints CPU and wall times, the speed-up ratios, and the centre/radius errors of both against the truth.
Usage: python bench/postprocess_speed.py [--n 500] [--seed 0]
       python bench/postprocess_speed.py --wedge   (missing-wedge cap accuracy study on the simulator)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from scipy.ndimage import binary_erosion, gaussian_filter, gaussian_filter1d, generate_binary_structure
from scipy.spatial import cKDTree

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _post_utils import paint
from cryoves.postprocess import fit_spheres, global_threshold, label_vesicles, repair


def _clock() -> float:
    """CPU seconds of this process (the machine is shared: wall time is inflated by other jobs)."""
    return time.process_time()


def make_scene(n: int, seed: int):
    rng = np.random.default_rng(seed)
    pitch = 26
    nz = 4
    ny = nx = int(np.ceil(np.sqrt(n / nz)))
    shape = (nz * pitch + 8, ny * pitch + 8, nx * pitch + 8)
    grid = np.stack(np.meshgrid(*[np.arange(k) for k in (nz, ny, nx)], indexing="ij"), -1).reshape(-1, 3)[:n]
    centres = 4 + pitch / 2 + grid * pitch + rng.uniform(-2, 2, (n, 3))
    radii = rng.uniform(8, 11, n)
    vol, filled = paint(shape, centres, radii, thickness=4.0)
    vol = gaussian_filter(vol, 0.8) + rng.normal(0, 0.15, shape).astype(np.float32)
    prob = np.clip(gaussian_filter(filled, 1.5) * 1.02, 0, 1).astype(np.float32)
    return vol.astype(np.float32), prob, centres, radii


def ours(vol, prob, vs):
    t = {}
    t0 = _clock()
    th = global_threshold(prob, vol)
    t["threshold"] = _clock() - t0
    t0 = _clock()
    labels, _ = label_vesicles(prob, th.threshold, vs, min_radius_nm=5.0)
    t["label"] = _clock() - t0
    t0 = _clock()
    table, _ = fit_spheres(vol, labels, vs)
    t["fit"] = _clock() - t0
    t0 = _clock()
    table, _ = repair(table, vol, min_radius_nm=5.0)
    t["repair"] = _clock() - t0
    return table.centres, table.radii, t


# ----------------------------------------------------------------------------- naive baseline
def _baseline_profile(box):
    c = np.array(box.shape) // 2
    zz, yy, xx = np.indices(box.shape)
    d = np.sqrt((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2).astype(int)
    prof = np.bincount(d.ravel(), box.ravel()) / np.maximum(np.bincount(d.ravel()), 1)
    return prof, d


def _baseline_radius(prof):
    L = len(prof)
    lo, hi = int(round(0.1 * L)), int(round(0.7 * L))
    dm = lo + int(np.argmin(prof[lo:hi]))
    h = dm + int(np.argmax(prof[dm:hi]))
    if h <= dm:
        raise ValueError
    d2 = gaussian_filter1d(np.diff(prof, 2), 1, mode="reflect")
    return dm + int(np.argmin(d2[dm:h]))


def _baseline_box(vol, c, r, m=2):
    h = r + m
    lo, hi = c - h, c + h
    corr = np.max(np.maximum(0, -lo) + np.maximum(0, hi - np.array(vol.shape)))
    lo, hi = lo + corr, hi - corr
    if np.any(hi <= lo):
        raise ValueError
    return vol[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]


def baseline(vol, prob, vs):
    from skimage.measure import label, regionprops
    from skimage.registration import phase_cross_correlation

    t = {}
    t0 = _clock()
    st = generate_binary_structure(3, 1)
    scores = []
    for th in np.arange(0.8, 1.0, 0.01):
        b = prob > th
        s = b & ~binary_erosion(b, st, border_value=1)
        scores.append(vol[s].mean() if s.any() else np.inf)
    th = np.arange(0.8, 1.0, 0.01)[int(np.argmin(scores))]
    t["threshold"] = _clock() - t0
    t0 = _clock()
    lab = label(prob > th, connectivity=1)
    props = regionprops(lab)
    t["label"] = _clock() - t0
    t0 = _clock()
    cs, rs = [], []
    for p in props:
        c0 = np.round(p.centroid).astype(int)
        r = max(int(max((b - a) // 2 for a, b in zip(p.bbox[:3], p.bbox[3:]))), 2)
        total = np.zeros(3, int)
        zeros = 0
        try:
            for _ in range(10):
                box = _baseline_box(vol, c0 - total, r)
                prof, d = _baseline_profile(box)
                avg = prof[d]
                s, _, _ = phase_cross_correlation(avg, box, normalization=None)
                s = np.round(s).astype(int)
                total += s
                if not s.any():
                    zeros += 1
                    if zeros > 1:
                        break
                r = max(_baseline_radius(_baseline_profile(_baseline_box(vol, c0 - total, r))[0]), 2)
        except ValueError:
            continue
        cs.append(c0 - total)
        rs.append(r)
    t["fit"] = _clock() - t0
    return np.array(cs, float).reshape(-1, 3), np.array(rs, float), t


def _errors(c, r, gc, gr):
    d, j = cKDTree(gc).query(c)
    return d.mean(), np.abs(r - gr[j]).mean()


def wedge_study(seeds: range) -> None:
    """Centre/radius errors on the simulator ("small" preset, GT labels blurred as the probability
    map) for missing-wedge cap exclusion 0 (baseline) / 45 / 60 degrees; ratios against cap 0."""
    from cryoves.simulate import SimulationConfig, simulate

    caps = (0.0, 45.0, 60.0)
    err = {c: [] for c in caps}
    for seed in seeds:
        sim = simulate(SimulationConfig.preset("small"), seed=seed)
        vol, gt = sim.tomogram.asarray(), sim.vesicles
        prob = np.clip(gaussian_filter((sim.labels > 0).astype(np.float32), 1.5) * 1.02, 0, 1)
        labels, _ = label_vesicles(prob, 0.8, gt.voxel_size)
        for c in caps:
            t, _ = fit_spheres(vol, labels, gt.voxel_size, wedge_cap_deg=c)
            d, j = cKDTree(gt.centres).query(t.centres)
            nm = gt.voxel_size / 10
            err[c].append(np.column_stack([d * nm, (t.radii - gt.radii[j]) * nm]))
    base = np.concatenate(err[0.0])
    print(f"missing-wedge cap study: simulator 'small', seeds {seeds.start}-{seeds.stop - 1}, {len(base)} vesicles")
    for c in caps:
        e = np.concatenate(err[c])
        print(
            f"  cap {c:4.0f} deg: centre error mean {e[:, 0].mean():.3f} nm (x{e[:, 0].mean() / base[:, 0].mean():.2f}), "
            f"max {e[:, 0].max():.3f} nm (x{e[:, 0].max() / base[:, 0].max():.2f}); radius bias {e[:, 1].mean():+.3f} nm"
        )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--wedge", action="store_true", help="run the missing-wedge cap study instead")
    a = ap.parse_args()
    if a.wedge:
        wedge_study(range(8))
        return
    vol, prob, gc, gr = make_scene(a.n, a.seed)
    vs = 10.0
    print(f"scene: {a.n} vesicles, shape {vol.shape}, {vol.size / 1e6:.1f} Mvoxel")
    w = time.perf_counter()
    c1, r1, t1 = ours(vol, prob, vs)
    w1 = time.perf_counter() - w
    w = time.perf_counter()
    c0, r0, t0 = baseline(vol, prob, vs)
    w0 = time.perf_counter() - w
    tot1, tot0 = sum(t1.values()), sum(t0.values())
    print("CPU seconds (time.process_time) of this process; ratio = baseline / ours")
    print(f"{'step':10s} {'ours s':>8s} {'baseline s':>11s} {'ratio':>7s}")
    for k in t0:
        print(f"{k:10s} {t1[k]:8.2f} {t0[k]:11.2f} {t0[k] / max(t1[k], 1e-9):7.1f}x")
    print(f"{'repair':10s} {t1['repair']:8.2f} {'-':>11s}")
    print(f"{'total':10s} {tot1:8.2f} {tot0:11.2f} {tot0 / tot1:7.1f}x")
    print(f"{'wall':10s} {w1:8.2f} {w0:11.2f} {w0 / w1:7.1f}x   (wall clock, contended)")
    e1, e0 = _errors(c1, r1, gc, gr), _errors(c0, r0, gc, gr)
    print(f"ours:     {len(r1)} spheres, mean centre error {e1[0]:.3f} vx, mean |radius error| {e1[1]:.3f} vx")
    print(f"baseline: {len(r0)} spheres, mean centre error {e0[0]:.3f} vx, mean |radius error| {e0[1]:.3f} vx")


if __name__ == "__main__":
    main()

"""The compiled post-processing kernels against the numpy code they replaced, in one process, one run.

1. Sphere fits: ``spheres._fit`` of this tree against the same function of a baseline revision
   (its ``spheres.py`` taken from git, run against this tree's helpers), on a simulated synapse,
   every vesicle started from a perturbed centre (±1.5 voxels) and radius (×0.7–1.3) with its
   neighbours masked. Prints ms per fit and how far the results differ.
2. Label statistics: ``postprocess._common.label_statistics`` against ``cc3d.statistics`` on the
   label volume of the same scene, enlarged by tiling (``--label-copies``); prints seconds per
   pass and whether the numbers agree.

    python bench/kernel_speed.py [--baseline-rev 74a0723] [--fits 300] [--label-copies 8]
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parents[1]


def baseline_spheres(rev: str):
    """The baseline revision's ``spheres`` module (imports resolve against this tree)."""
    text = subprocess.run(["git", "show", f"{rev}:src/cryoves/postprocess/spheres.py"], cwd=HERE, check=True,
                          capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp(prefix="cryoves-bench-")) / "spheres_baseline.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("spheres_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["spheres_baseline"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def time_fits(module, volume, items, voxel_size):
    opts = module.FitOptions(voxel_size_a=voxel_size)
    out = []
    t0 = time.perf_counter()
    for _, centre, radius, others in items:
        try:
            f = module._fit(volume, centre, radius, opts, others)
            out.append(np.r_[f.centre, f.radius, f.membrane_thickness, f.fit_residual])
        except module.FitFailure:
            out.append(np.full(6, np.nan))
    return (time.perf_counter() - t0) / len(items), np.array(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline-rev", default="74a0723", help="revision with the numpy fit code")
    ap.add_argument("--fits", type=int, default=300)
    ap.add_argument("--label-copies", type=int, default=8, help="tile the label volume this many times along z")
    args = ap.parse_args()

    import cc3d

    from cryoves.postprocess import spheres
    from cryoves.postprocess._common import label_statistics
    from cryoves.simulate import SimulationConfig, simulate

    sim = simulate(SimulationConfig.preset("synapse", shape=(100, 256, 256), voxel_size_a=22.0), seed=7)
    volume, vs = sim.tomogram.asarray(), sim.tomogram.voxel_size_a
    truth = sim.vesicles
    rng = np.random.default_rng(0)
    centres = truth.centres + rng.normal(0, 1.5, truth.centres.shape)
    radii = truth.radii * rng.uniform(0.7, 1.3, len(truth.radii))
    items = spheres._with_neighbours([(i + 1, c, float(r)) for i, (c, r) in enumerate(zip(centres, radii))],
                                     spheres.FitOptions(), True)
    items = (items * (args.fits // max(len(items), 1) + 1))[: args.fits]
    old = baseline_spheres(args.baseline_rev)
    spheres._fit(volume, items[0][1], items[0][2], spheres.FitOptions(voxel_size_a=vs), items[0][3])  # compile
    t_old, r_old = time_fits(old, volume, items, vs)
    t_new, r_new = time_fits(spheres, volume, items, vs)
    same = np.all((r_old == r_new) | (np.isnan(r_old) & np.isnan(r_new)), axis=1)
    print(f"sphere fits ({len(items)}, {len(truth)} vesicles): {args.baseline_rev} {t_old * 1e3:.1f} ms/fit, "
          f"this tree {t_new * 1e3:.1f} ms/fit -> {t_old / t_new:.2f}x; identical {same.sum()}/{len(same)}, "
          f"max |difference| centre {np.nanmax(np.abs(r_old[:, :3] - r_new[:, :3])):.1e}, "
          f"radius {np.nanmax(np.abs(r_old[:, 3] - r_new[:, 3])):.1e} voxel")

    labels = np.tile(truth.to_labels(sim.tomogram.shape).astype(np.uint32), (args.label_copies, 1, 1))
    label_statistics(labels[:4])  # compile
    t0 = time.perf_counter()
    want = cc3d.statistics(labels)
    t_cc = time.perf_counter() - t0
    t0 = time.perf_counter()
    got = label_statistics(labels)
    t_ours = time.perf_counter() - t0
    agree = (np.array_equal(want["voxel_counts"], got["voxel_counts"])
             and np.array_equal(want["centroids"], got["centroids"], equal_nan=True))
    print(f"label statistics ({labels.size / 1e6:.0f} M voxels): cc3d {t_cc:.2f} s, this tree {t_ours:.2f} s "
          f"-> {t_cc / t_ours:.2f}x; counts and centroids identical: {agree}")


if __name__ == "__main__":
    main()

"""Speed of `cryoves.simulate` on the synapse preset (256³ at 22 Å, 61 tilts at ±60°/2°).

Prints the total time, the time per stage, and the ratio of our projector + reconstruction
(one sparse matrix for all tilts applied to all y-rows) against a baseline measured in the
same run: scikit-image ``radon``/``iradon`` per y-slice on a subset of slices, extrapolated
to all 256 slices. Timings on a shared machine are contended; compare ratios, not seconds.

    python bench/simulate_speed.py [--shape 256] [--slices 6]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from cryoves.simulate import SimulationConfig, simulate
from cryoves.simulate.imaging import back_project, project


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", type=int, default=256)
    ap.add_argument("--slices", type=int, default=6, help="y-slices timed for the skimage baseline")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    n = args.shape
    cfg = SimulationConfig.preset("synapse", shape=(n, n, n))
    angles = cfg.tilt_angles_deg
    print(f"shape {cfg.shape}, voxel {cfg.voxel_size_a} Å, {len(angles)} tilts")

    t0 = time.perf_counter()
    sim = simulate(cfg, seed=args.seed)
    total = time.perf_counter() - t0
    print(f"simulate(): {total:.1f} s total; stages: "
          + ", ".join(f"{k} {v:.1f} s" for k, v in sim.timings_s.items())
          + f"; {len(sim.vesicles)} vesicles; target <= 60 s")

    vol = np.asarray(sim.scene, dtype=np.float32)
    t0 = time.perf_counter()
    p = project(vol, angles)
    back_project(p, angles, n)
    ours = time.perf_counter() - t0

    from skimage.transform import iradon, radon

    t0 = time.perf_counter()
    for y in np.linspace(0, n - 1, args.slices).astype(int):
        # radon's image is (rows, cols) = (x, z) turned so that the beam runs along z at 0°
        sino = radon(vol[:, y, :].T, theta=angles + 90.0, circle=False)
        iradon(sino, theta=angles + 90.0, circle=False, filter_name="ramp")
    base = (time.perf_counter() - t0) / args.slices * n
    print(f"projection + back-projection: ours {ours:.2f} s, skimage radon/iradon per slice "
          f"{base:.1f} s (extrapolated from {args.slices} slices); speed-up x{base / ours:.1f}")


if __name__ == "__main__":
    main()

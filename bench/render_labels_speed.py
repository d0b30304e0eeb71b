"""Speed of VesicleTable.to_labels / labels_to_table on a full-size synapse.

Default: 5,000 vesicles (radius 8-20 voxels) in a 512 x 1024 x 1024 uint16 volume (1 GiB).
Baseline, measured in the same run: one write pass over the whole volume (``labels[...] = 0``
on a fresh array), i.e. the memory-bandwidth floor of touching every voxel once. Prints the
ratios render/baseline and labels_to_table/baseline.

    python bench/render_labels_speed.py [--n 5000] [--shape 512 1024 1024]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from cryoves.vesicles import VesicleTable, labels_to_table


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--shape", type=int, nargs=3, default=(512, 1024, 1024))
    args = ap.parse_args()
    shape = tuple(args.shape)
    rng = np.random.default_rng(0)
    centres = rng.uniform(0, 1, size=(args.n, 3)) * np.array(shape)
    radii = rng.uniform(8, 20, size=args.n)
    table = VesicleTable.from_spheres(centres, radii, 14.0)

    t0 = time.perf_counter()
    base = np.empty(shape, np.uint16)
    base[...] = 0
    t_base = time.perf_counter() - t0
    del base

    t0 = time.perf_counter()
    labels = table.to_labels(shape, dtype=np.uint16)
    t_render = time.perf_counter() - t0

    t0 = time.perf_counter()
    back = labels_to_table(labels, 14.0)
    t_table = time.perf_counter() - t0

    print(f"shape {shape}, {args.n} vesicles, {len(back)} labels present")
    print(f"baseline (one write pass): {t_base:.2f} s")
    print(f"to_labels:                 {t_render:.2f} s  ratio {t_render / t_base:.1f}")
    print(f"labels_to_table:           {t_table:.2f} s  ratio {t_table / t_base:.1f}")


if __name__ == "__main__":
    main()

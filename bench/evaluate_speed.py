"""Speed of ``cryoves.evaluate`` on a synapse-sized scene, against naive baselines measured in the same run.

Scene: N non-overlapping GT spheres (radius 8-15 voxels) in a (z, y, x) volume; the prediction
finds 90 % of them (centre jitter ~1.5 voxels, radius ±10 %) and adds 5 % false positives.

* tables: ``evaluate(pred_table, gt_table)`` (exact spheres) vs. a dense N×M IoU matrix with a full
  Hungarian assignment (what one writes first).
* labels: ``evaluate(pred_labels, gt_labels)`` vs. the naive per-GT-label full-volume comparison
  (``gt == id`` over the whole volume, then the predicted ids under it), timed on a few labels and
  extrapolated to N.

Usage: python bench/evaluate_speed.py [--shape 512 1024 1024] [--n 2000] [--naive-labels 3]
Timings on a shared machine are noisy; compare the ratios, not the seconds.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree

from cryoves.evaluate import evaluate, sphere_iou
from cryoves.vesicles import VesicleTable

VS = 8.0  # Å


def make_scene(shape, n, seed=0):
    rng = np.random.default_rng(seed)
    shape_a = np.asarray(shape)
    centres, radii = [], []
    tries = 0
    while len(centres) < n and tries < 50 * n:
        tries += 1
        r = rng.uniform(8, 15)
        c = rng.uniform(r + 1, shape_a - r - 2)
        if centres:
            d = np.linalg.norm(np.asarray(centres) - c, axis=1)
            if np.any(d < np.asarray(radii) + r + 2):
                continue
        centres.append(c)
        radii.append(r)
    gt_c, gt_r = np.asarray(centres), np.asarray(radii)
    found = rng.random(len(gt_r)) < 0.9
    p_c = gt_c[found] + rng.normal(0, 1.5 / np.sqrt(3), (found.sum(), 3))
    p_r = gt_r[found] * rng.uniform(0.9, 1.1, found.sum())
    # false positives in free space
    tree = cKDTree(gt_c)
    fps = []
    for c in rng.uniform(12, shape_a - 12, (200 * n, 3)):
        if len(fps) >= int(0.05 * n):
            break
        if tree.query(c)[0] > 27:  # clear of every GT sphere (r <= 15) by > 2 voxels
            fps.append(c)
    p_c = np.vstack([p_c, np.asarray(fps).reshape(-1, 3)])
    p_r = np.concatenate([p_r, np.full(len(fps), 10.0)])
    return VesicleTable.from_spheres(p_c, p_r, VS), VesicleTable.from_spheres(gt_c, gt_r, VS)


def naive_tables(pred, gt):
    iou = sphere_iou(pred.centres[:, None], pred.radii[:, None], gt.centres[None], gt.radii[None])
    r, c = linear_sum_assignment(-iou)
    return int(np.count_nonzero(iou[r, c] >= 0.5))


def naive_labels(pl, gl, ids):
    hits = 0
    for gid in ids:
        sel = gl == gid
        under = np.unique(pl[sel])
        hits += int(np.count_nonzero(under))
    return hits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=[512, 1024, 1024])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--naive-labels", type=int, default=3, help="GT labels timed for the naive baseline")
    args = ap.parse_args()
    shape = tuple(args.shape)

    pred, gt = make_scene(shape, args.n)
    print(f"scene: {len(gt)} GT, {len(pred)} predicted vesicles in {shape}")

    t = time.perf_counter()
    res = evaluate(pred, gt)
    t_tab = time.perf_counter() - t
    t = time.perf_counter()
    naive_tp = naive_tables(pred, gt)
    t_tab_naive = time.perf_counter() - t
    assert naive_tp == res.metrics["tp_iou50"], (naive_tp, res.metrics["tp_iou50"])
    print(f"tables: evaluate {t_tab:.2f} s | dense IoU + full Hungarian {t_tab_naive:.2f} s "
          f"| ratio {t_tab_naive / t_tab:.1f}x | f1_centre {res.metrics['f1_centre']:.3f} "
          f"f1_iou50 {res.metrics['f1_iou50']:.3f}")

    t = time.perf_counter()
    gl = gt.to_labels(shape, dtype=np.uint16)
    pl = pred.to_labels(shape, dtype=np.uint16)
    t_render = time.perf_counter() - t
    t = time.perf_counter()
    res_l = evaluate(pl, gl, voxel_size=VS)
    t_lab = time.perf_counter() - t
    k = max(1, args.naive_labels)
    t = time.perf_counter()
    naive_labels(pl, gl, gt.ids[:k])
    t_naive = (time.perf_counter() - t) / k * len(gt)
    print(f"labels: (render {t_render:.1f} s) evaluate {t_lab:.2f} s | naive per-label full volume "
          f"{t_naive:.0f} s (extrapolated from {k}) | ratio {t_naive / t_lab:.0f}x "
          f"| dice {res_l.metrics['dice']:.3f} f1_iou50 {res_l.metrics['f1_iou50']:.3f}")


if __name__ == "__main__":
    main()

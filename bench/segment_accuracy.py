"""Accuracy of `cryoves segment` on a fixed benchmark set of simulated synapse tomograms.

Prints, per tomogram and on average, the field's metrics (both F1 protocols, hard Dice, Δc, δd)
and the per-step Dice table of the CryoVesNet paper (soft probability → global threshold →
adaptive → spheres → final), for one or more models in the same run.

    python bench/segment_accuracy.py                       # cryoves-default (+ cryovesnet if found)
    python bench/segment_accuracy.py --model cryovesnet --model path/to/weights.safetensors

The set (never used to tune defaults): 4 seeds, voxel sizes 14–24 Å, different doses.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

BENCH_SET = [
    # (seed, voxel size Å, electron dose e/Å², shape)
    (101, 14.0, 80.0, (112, 256, 256)),
    (102, 17.0, 120.0, (104, 224, 224)),
    (103, 20.0, 60.0, (96, 192, 192)),
    (104, 24.0, 100.0, (80, 160, 160)),
]
TARGETS = {"f1_centre": 0.97, "f1_iou50": 0.95, "dice": 0.90, "delta_c_nm_mean": 1.0, "delta_d": 0.04}
REFERENCE_WEIGHTS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "weights.h5"


def _simulate(seed: int, vs: float, dose: float, shape):
    from cryoves.simulate import SimulationConfig, simulate

    cfg = SimulationConfig.preset("synapse", shape=shape, voxel_size_a=vs, dose_e_per_a2=dose)
    return simulate(cfg, seed=seed)


def _stage_dice(res, sim) -> dict[str, float]:
    from cryoves.evaluate import dice, soft_dice

    gt = sim.labels > 0
    out = {"soft": soft_dice(res.probability, gt)}
    for name, lab in res.stage_labels.items():
        out[name] = dice(lab > 0, gt)
    out["final"] = dice(res.labels > 0, gt)
    return out


def run(models: list[str], workdir: Path) -> dict:
    from cryoves.evaluate import evaluate
    from cryoves.io import write_mrc
    from cryoves.pipeline import SegmentConfig, segment

    results: dict[str, list[dict]] = {m: [] for m in models}
    for seed, vs, dose, shape in BENCH_SET:
        sim = _simulate(seed, vs, dose, shape)
        path = workdir / f"bench_{seed}.mrc"
        write_mrc(path, sim.tomogram.asarray(), sim.tomogram.voxel_size)
        for m in models:
            t0 = time.perf_counter()
            res = segment(path, None, SegmentConfig(model=m, report=False), keep_stages=True)
            secs = time.perf_counter() - t0
            ev = evaluate(res.vesicles, sim.vesicles, shape=sim.tomogram.shape, prob=res.probability).metrics
            row = {"seed": seed, "voxel_size_a": vs, "dose": dose, "seconds": round(secs, 1)}
            row.update({k: ev[k] for k in ("n_gt", "n_pred", "f1_centre", "f1_iou50", "dice", "delta_c_nm_mean", "delta_d")})
            row["stage_dice"] = _stage_dice(res, sim)
            results[m].append(row)
            print(_fmt_row(m, row), flush=True)
    return results


def _fmt_row(model: str, r: dict) -> str:
    sd = " → ".join(f"{v:.3f}" for v in r["stage_dice"].values())
    return (
        f"{model:>16} seed {r['seed']} {r['voxel_size_a']:>4.0f} Å: GT {r['n_gt']:>3} pred {r['n_pred']:>3} "
        f"F1c {r['f1_centre']:.3f} F1iou {r['f1_iou50']:.3f} Dice {r['dice']:.3f} Δc {r['delta_c_nm_mean']:.2f} nm "
        f"δd {r['delta_d']:.3f} | stage Dice {sd} | {r['seconds']:.0f} s"
    )


def summarise(results: dict) -> str:
    lines = ["", "mean over the benchmark set (targets: F1c ≥ 0.97, F1iou ≥ 0.95, Dice ≥ 0.90, Δc ≤ 1.0 nm, δd ≤ 0.04)"]
    header = f"{'model':>16} | {'F1 centre':>9} | {'F1 IoU50':>8} | {'Dice':>6} | {'Δc nm':>6} | {'δd':>6} | stage Dice (soft → global → adaptive → spheres → final)"
    lines += [header, "-" * len(header)]
    for m, rows in results.items():
        mean = {k: float(np.mean([r[k] for r in rows])) for k in TARGETS}
        stages = {k: float(np.mean([r["stage_dice"][k] for r in rows])) for k in rows[0]["stage_dice"]}
        ok = all(
            mean[k] >= v if not k.startswith("delta") else mean[k] <= v for k, v in TARGETS.items()
        )
        lines.append(
            f"{m:>16} | {mean['f1_centre']:9.3f} | {mean['f1_iou50']:8.3f} | {mean['dice']:6.3f} | "
            f"{mean['delta_c_nm_mean']:6.2f} | {mean['delta_d']:6.3f} | "
            + " → ".join(f"{v:.3f}" for v in stages.values())
            + ("   (all targets met)" if ok else "   (targets NOT all met)")
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", help="model name or path (repeatable)")
    ap.add_argument("--workdir", default="out/bench_segment")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    models = args.model
    if not models:
        from cryoves.model import available_models

        models = [m for m in ("cryoves-default",) if m in available_models()]
        if REFERENCE_WEIGHTS.exists() or os.environ.get("CRYOVES_CRYOVESNET_WEIGHTS"):
            models.append(str(REFERENCE_WEIGHTS) if REFERENCE_WEIGHTS.exists() else "cryovesnet")
    if not models:
        sys.exit("no model available: pass --model")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    results = run(models, workdir)
    print(summarise(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""Accuracy of `cryoves segment` on fixed benchmark sets of simulated synapse tomograms.

Prints, per tomogram and on average, the field's metrics (both F1 protocols, hard Dice, Δc, δd),
the bias and SD of the outer radius and of the membrane-centre radius (nm), the per-step Dice table
of the CryoVesNet paper (soft probability → global threshold → adaptive → spheres → final) and the
per-step recall (map → global threshold → split → sphere fit → QC → final: where each vesicle the
network saw is lost), for one or more models in the same run.

    python bench/segment_accuracy.py                       # both sets, cryoves-default (+ cryovesnet if found)
    python bench/segment_accuracy.py --set hard --model cryovesnet --model path/to/weights.safetensors
    python bench/segment_accuracy.py --set mixed --variant auto --variant single   # size search vs one scale

Sets (seeds never used to tune defaults):
  easy: 4 synapse-preset tomograms, voxel sizes 14–24 Å, different doses, 38–54 loosely placed SVs.
  hard: 6 tomograms of the dense-pool / uncorrected / phase-flipped presets: SV pools up to ~24 % of
        the cytosol with 1–3 nm gaps and half the SVs protein-coated, tilt ranges down to ±45°,
        SIRT-like and WBP reconstructions, 14–16 Å voxels without CTF correction (fringes) or phase
        flipped, doses 40–60 e/Å².
  mixed: 4 synapses with SVs and eight 40–75 nm vesicles (16–28 Å voxels, one coated with a ±50°
        tilt range) and 2 virus-like-particle tomograms (r 55 ± 6 nm, 24 and 36 Å), scored per
        population (SVs, large vesicles, VLPs).

Variants: "auto" is the default run (size search over 12–90 nm); "single" is one network pass at
the model's own scale (``--vesicle-radius`` = the training radius), as before the size search;
"fp32" is the default run with the network in fp32 (the CPU default before bf16 on AMX CPUs);
"whole" is the default run with the network on every slice (``--whole-volume``, no vacuum skip).
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
HARD_SET = [
    # (seed, preset, overrides)
    (301, "dense-pool", {"shape": (128, 256, 256), "voxel_size_a": 22.0}),
    (302, "dense-pool", {"shape": (128, 256, 256), "voxel_size_a": 18.0, "tilt_min_deg": -45.0,
                         "tilt_max_deg": 45.0, "dose_e_per_a2": 40.0}),
    (303, "dense-pool", {"shape": (112, 256, 256), "voxel_size_a": 20.0, "reconstruction": "wbp",
                         "tilt_min_deg": -45.0, "tilt_max_deg": 45.0}),
    (304, "uncorrected", {"shape": (112, 224, 224), "voxel_size_a": 14.0}),
    (305, "uncorrected", {"shape": (112, 224, 224), "voxel_size_a": 16.0, "dose_e_per_a2": 40.0}),
    (306, "phase-flipped", {"shape": (112, 224, 224), "voxel_size_a": 14.0}),
]
MIXED_SET = [
    (401, "mixed-sizes", {"voxel_size_a": 22.0}),
    (402, "mixed-sizes", {"voxel_size_a": 16.0, "shape": (128, 320, 320)}),
    (403, "mixed-sizes", {"voxel_size_a": 28.0, "shape": (112, 224, 224), "dose_e_per_a2": 60.0}),
    (404, "mixed-sizes", {"voxel_size_a": 20.0, "shape": (128, 288, 288), "coat_fraction": 0.5,
                          "tilt_min_deg": -50.0, "tilt_max_deg": 50.0}),
    (405, "vlp", {}),
    (406, "vlp", {"voxel_size_a": 24.0, "shape": (128, 224, 224)}),
]
SETS = {
    "easy": [(seed, "synapse", {"voxel_size_a": vs, "dose_e_per_a2": dose, "shape": shape})
             for seed, vs, dose, shape in BENCH_SET],
    "hard": HARD_SET,
    "mixed": MIXED_SET,
}
STEPS = ["map", "threshold", "split", "fit", "qc", "final"]
TARGETS = {"f1_centre": 0.97, "f1_iou50": 0.95, "dice": 0.90, "delta_c_nm_mean": 1.0, "delta_d": 0.04}
REFERENCE_WEIGHTS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "weights.h5"


def _simulate(seed: int, preset: str, overrides: dict):
    from cryoves.simulate import SimulationConfig, simulate

    return simulate(SimulationConfig.preset(preset, **overrides), seed=seed)


def _step_recall(res, sim) -> dict[str, float]:
    from cryoves.evaluate import step_recall

    stages = {
        "map": res.probability,
        "threshold": res.stage_labels["global_threshold"] > 0,
        "split": res.stage_labels["adaptive"],
        "fit": res.stage_tables["spheres"],
        "qc": res.stage_tables["outliers"],
        "final": res.vesicles,
    }
    return step_recall(sim.vesicles, stages)


def _radius_errors(res, sim) -> dict[str, float]:
    """Bias and SD (nm) of the outer radius and of the membrane-centre radius over centre matches."""
    from cryoves.evaluate import match_centre

    m = match_centre(res.vesicles, sim.vesicles)
    p = res.vesicles.df.set_index("id").loc[m["pred_id"]]
    g = sim.vesicles.df.set_index("id").loc[m["gt_id"]]
    d_out = p["radius_nm"].to_numpy() - g["radius_nm"].to_numpy()
    d_mem = (p["radius_nm"] - p["membrane_thickness_nm"] / 2).to_numpy() - (
        g["radius_nm"] - g["membrane_thickness_nm"] / 2).to_numpy()
    return {"radius_bias_nm": float(np.mean(d_out)), "radius_sd_nm": float(np.std(d_out)),
            "membrane_bias_nm": float(np.mean(d_mem)), "membrane_sd_nm": float(np.std(d_mem))}


def _per_population(res, sim) -> dict[str, dict[str, float]]:
    """F1 (centre protocol) and δd per ground-truth population; an unmatched prediction counts
    against the population whose median radius is nearest its own (log scale)."""
    from cryoves.evaluate import match_centre

    m = match_centre(res.vesicles, sim.vesicles)
    g = sim.vesicles.df.set_index("id")
    p = res.vesicles.df.set_index("id")
    pops = sorted(g["population"].unique())
    med = np.array([g.loc[g["population"] == q, "radius_nm"].median() for q in pops])
    fp_r = p.drop(index=m["pred_id"])["radius_nm"].to_numpy()
    fp_pop = [pops[int(np.argmin(np.abs(np.log(r / med))))] for r in fp_r]
    out = {}
    for q in pops:
        sel = g.loc[m["gt_id"], "population"].to_numpy() == q
        tp, n_gt, fp = int(sel.sum()), int((g["population"] == q).sum()), fp_pop.count(q)
        rp = p.loc[m["pred_id"][sel], "radius_nm"].to_numpy()
        rg = g.loc[m["gt_id"][sel], "radius_nm"].to_numpy()
        out[q] = {"n_gt": n_gt, "tp": tp, "fp": fp, "f1_centre": 2 * tp / max(1, 2 * tp + fp + n_gt - tp),
                  "delta_d": float(np.mean(1 - np.minimum(rp, rg) / np.maximum(rp, rg))) if tp else float("nan")}
    return out


def _stage_dice(res, sim) -> dict[str, float]:
    from cryoves.evaluate import dice, soft_dice

    gt = sim.labels > 0
    out = {"soft": soft_dice(res.probability, gt)}
    for name, lab in res.stage_labels.items():
        out[name] = dice(lab > 0, gt)
    out["final"] = dice(res.labels > 0, gt)
    return out


def _config(model: str, variant: str):
    from cryoves.model import model_info
    from cryoves.pipeline import SegmentConfig

    hint = model_info(model).vesicle_radius_nm if variant == "single" else None
    precision = "fp32" if variant == "fp32" else "auto"
    return SegmentConfig(model=model, report=False, vesicle_radius_nm=hint, precision=precision,
                         whole_volume=variant == "whole")


def run(models: list[str], workdir: Path, set_name: str, variants: list[str], seeds: list[int] | None = None) -> dict:
    from cryoves.evaluate import evaluate
    from cryoves.io import write_mrc
    from cryoves.pipeline import segment

    runs = [(m, v) for m in models for v in variants]
    stems = [Path(m).stem for m in models]
    if len(set(stems)) < len(stems):  # e.g. a retrained cryoves-default.safetensors beside the packaged one
        raise SystemExit(f"two models would share a name in the results ({', '.join(models)}); rename a file")
    results: dict[str, list[dict]] = {_label(m, v): [] for m, v in runs}
    for seed, preset, overrides in SETS[set_name]:
        if seeds and seed not in seeds:
            continue
        sim = _simulate(seed, preset, overrides)
        path = workdir / f"{set_name}_{seed}.mrc"
        write_mrc(path, sim.tomogram.asarray(), sim.tomogram.voxel_size)
        for m, variant in runs:
            t0 = time.perf_counter()
            res = segment(path, None, _config(m, variant), keep_stages=True)
            secs = time.perf_counter() - t0
            ev = evaluate(res.vesicles, sim.vesicles, shape=sim.tomogram.shape, prob=res.probability).metrics
            row = {"seed": seed, "preset": preset, "voxel_size_a": sim.tomogram.voxel_size_a, "seconds": round(secs, 1)}
            row.update({k: ev[k] for k in ("n_gt", "n_pred", "f1_centre", "f1_iou50", "dice", "delta_c_nm_mean", "delta_d")})
            row["n_flagged"] = int((res.vesicles.df.get("flags", "") != "").sum())
            row.update(_radius_errors(res, sim))
            row["stage_dice"] = _stage_dice(res, sim)
            row["step_recall"] = _step_recall(res, sim)
            row["populations"] = _per_population(res, sim)
            results[_label(m, variant)].append(row)
            print(_fmt_row(_label(m, variant), row), flush=True)
    return results


def _label(model: str, variant: str) -> str:
    name = Path(model).stem if os.sep in model else model
    return name if variant == "auto" else f"{name} [{variant}]"


def _fmt_row(model: str, r: dict) -> str:
    sd = " → ".join(f"{v:.3f}" for v in r["stage_dice"].values())
    rc = " → ".join(f"{v:.3f}" for v in r["step_recall"].values())
    return (
        f"{model:>16} {r['preset']:>13} {r['seed']} {r['voxel_size_a']:>4.0f} Å: GT {r['n_gt']:>3} pred {r['n_pred']:>3} "
        f"(flagged {r['n_flagged']}) F1c {r['f1_centre']:.3f} F1iou {r['f1_iou50']:.3f} Dice {r['dice']:.3f} "
        f"Δc {r['delta_c_nm_mean']:.2f} nm δd {r['delta_d']:.3f} | radius bias {r['radius_bias_nm']:+.2f} SD "
        f"{r['radius_sd_nm']:.2f} nm, membrane centre {r['membrane_bias_nm']:+.2f} / {r['membrane_sd_nm']:.2f} nm | "
        f"stage Dice {sd} | recall {rc} | "
        + " ".join(f"{q}: F1c {v['f1_centre']:.3f} δd {v['delta_d']:.3f} ({v['tp']}/{v['n_gt']}, {v['fp']} FP)"
                   for q, v in r["populations"].items())
        + f" | {r['seconds']:.0f} s"
    )


def summarise(results: dict, set_name: str) -> str:
    lines = ["", f"{set_name} set, mean (targets: F1c ≥ 0.97, F1iou ≥ 0.95, Dice ≥ 0.90, Δc ≤ 1.0 nm, δd ≤ 0.04)"]
    header = (f"{'model':>16} | {'F1 centre':>9} | {'F1 IoU50':>8} | {'Dice':>6} | {'Δc nm':>6} | {'δd':>6} | "
              f"{'r bias':>6} | {'r SD':>5} | {'m bias':>6} | {'m SD':>5} | stage Dice (soft → global → adaptive → spheres → final)")
    lines += [header, "-" * len(header)]
    for m, rows in results.items():
        mean = {k: float(np.mean([r[k] for r in rows])) for k in TARGETS}
        err = {k: float(np.mean([r[k] for r in rows])) for k in ("radius_bias_nm", "radius_sd_nm", "membrane_bias_nm", "membrane_sd_nm")}
        stages = {k: float(np.mean([r["stage_dice"][k] for r in rows])) for k in rows[0]["stage_dice"]}
        ok = all(
            mean[k] >= v if not k.startswith("delta") else mean[k] <= v for k, v in TARGETS.items()
        )
        lines.append(
            f"{m:>16} | {mean['f1_centre']:9.3f} | {mean['f1_iou50']:8.3f} | {mean['dice']:6.3f} | "
            f"{mean['delta_c_nm_mean']:6.2f} | {mean['delta_d']:6.3f} | {err['radius_bias_nm']:+6.2f} | "
            f"{err['radius_sd_nm']:5.2f} | {err['membrane_bias_nm']:+6.2f} | {err['membrane_sd_nm']:5.2f} | "
            + " → ".join(f"{v:.3f}" for v in stages.values())
            + ("   (all targets met)" if ok else "   (targets NOT all met)")
            + f"; lowest F1c {min(r['f1_centre'] for r in rows):.3f}"
        )
    lines += ["", f"{set_name} set, per population (counts summed over tomograms; δd mean over tomograms)"]
    for m, rows in results.items():
        pops = sorted({q for r in rows for q in r["populations"]})
        parts = []
        for q in pops:
            v = [r["populations"][q] for r in rows if q in r["populations"]]
            tp, n, fp = (sum(x[k] for x in v) for k in ("tp", "n_gt", "fp"))
            dd = np.nanmean([x["delta_d"] for x in v])
            parts.append(f"{q}: F1c {2 * tp / max(1, tp + n + fp):.3f} ({tp}/{n} found, {fp} FP) δd {dd:.3f}")
        lines.append(f"{m:>16} | " + " | ".join(parts))
    lines += ["", f"{set_name} set, per-step recall (mean): " + " → ".join(STEPS)]
    for m, rows in results.items():
        rec = [float(np.mean([r["step_recall"][k] for r in rows])) for k in STEPS]
        lines.append(f"{m:>16} | " + " → ".join(f"{v:.3f}" for v in rec)
                     + f"   (final − map: {rec[-1] - rec[0]:+.3f})")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", help="model name or path (repeatable)")
    ap.add_argument("--set", choices=["easy", "hard", "mixed", "all"], default="all", help="which benchmark set(s)")
    ap.add_argument("--variant", action="append", choices=["auto", "single", "fp32", "whole"],
                    help="auto (size search, the default) and/or single (one pass at the model's scale)")
    ap.add_argument("--seed", type=int, action="append", help="only these seeds of the chosen set(s)")
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
    sets = ["easy", "hard", "mixed"] if args.set == "all" else [args.set]
    results = {name: run(models, workdir, name, args.variant or ["auto"], args.seed) for name in sets}
    for name in sets:
        print(summarise(results[name], name))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

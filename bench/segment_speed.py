"""Wall time of the whole `cryoves segment` on a 200×400×400 simulated synapse (target ≤ 60 s, 2 cores).

Prints the per-step timings from the run manifest and the ratio against the original's tiling
strategy for the network step (64³ tiles keeping 24³, one tile per call — measured in this run on a
sub-block and extrapolated to the same number of model-grid voxels).

With ``--size-search-cost N`` it also times, cold and alternating N times, the default run (size
search over 12–90 nm) against one network pass at the model's scale (``--vesicle-radius`` = the
training radius), and prints the median ratio.

    python bench/segment_speed.py [--model NAME|PATH] [--shape 200 400 400] [--size-search-cost 2]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cryoves-default")
    ap.add_argument("--shape", type=int, nargs=3, default=[200, 400, 400])
    ap.add_argument("--voxel-size", type=float, default=22.0)
    ap.add_argument("--workdir", default="out/bench_speed")
    ap.add_argument("--size-search-cost", type=int, default=0, metavar="N",
                    help="also time the size search against one pass, N alternating cold runs each")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import torch

    from cryoves.io import write_mrc
    from cryoves.model import load_model
    from cryoves.pipeline import SegmentConfig, segment
    from cryoves.simulate import SimulationConfig, simulate
    from predict_speed import baseline

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    sim = simulate(SimulationConfig.preset("synapse", shape=tuple(args.shape), voxel_size_a=args.voxel_size), seed=7)
    path = work / "tomo.mrc"
    write_mrc(path, sim.tomogram.asarray(), sim.tomogram.voxel_size)
    print(f"tomogram {tuple(args.shape)} at {args.voxel_size} Å, {len(sim.vesicles)} true vesicles, "
          f"torch threads {torch.get_num_threads()}")
    model = load_model(args.model)
    t0 = time.perf_counter()
    res = segment(path, work / "seg", SegmentConfig(model=args.model, report=False), force=True, model=model)
    total = time.perf_counter() - t0
    steps = res.manifest["timings_s"]
    for k, v in steps.items():
        print(f"  {k:>18}: {v:7.2f} s")
    print(f"segment total: {total:.1f} s (target ≤ 60 s) -> {'OK' if total <= 60 else 'over target'}; "
          f"{len(res.vesicles)} vesicles")
    # Baseline network step: the original's tiling on a 72³ block, extrapolated.
    block = np.random.default_rng(0).standard_normal((72, 72, 72)).astype(np.float32)
    _, secs = baseline(model.net, block)
    grid = np.asarray(res.manifest["prediction"].get("model_grid_shape") or args.shape)
    base_secs = secs / (72 // 24 + 1) ** 3 * float(np.prod(grid // 24 + 1))  # per-window time × windows
    print(f"network step: ours {steps['predict']:.1f} s vs original tiling {base_secs:.0f} s (extrapolated) "
          f"-> {base_secs / steps['predict']:.0f}x")
    if args.size_search_cost:
        size_search_cost(path, model, args.size_search_cost)


def size_search_cost(path: Path, model, repeats: int) -> None:
    """Cold runs (no output folder, so no cached map), alternating: size search vs one pass."""
    from cryoves.pipeline import SegmentConfig, segment

    configs = {"size search": SegmentConfig(model=model.info.name, report=False),
               "one pass": SegmentConfig(model=model.info.name, report=False,
                                         vesicle_radius_nm=model.info.vesicle_radius_nm)}
    secs: dict[str, list[float]] = {k: [] for k in configs}
    counts: dict[str, int] = {}
    for _ in range(repeats):
        for name, cfg in configs.items():
            t0 = time.perf_counter()
            res = segment(path, None, cfg, model=model)
            secs[name].append(time.perf_counter() - t0)
            counts[name] = len(res.vesicles)
            levels = {k: v for k, v in res.manifest["timings_s"].items() if k.startswith("level_") or k == "merge_levels"}
            print(f"  {name:>11}: {secs[name][-1]:6.1f} s, {counts[name]} vesicles, levels {levels}", flush=True)
    med = {k: float(np.median(v)) for k, v in secs.items()}
    print(f"size search {med['size search']:.1f} s vs one pass {med['one pass']:.1f} s (medians of {repeats}) "
          f"-> {med['size search'] / med['one pass']:.2f}x (target <= 1.3x)")


if __name__ == "__main__":
    main()

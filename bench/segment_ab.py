"""Wall time of the whole `cryoves segment` (cold: no cached map), this checkout against another one.

Runs `python -m cryoves segment` on the same simulated synapse (200×400×400 at 22 Å by default),
alternating the two source trees, and prints per-step timings and the ratio of the medians. The
baseline is any other checkout of cryoves, e.g. a worktree of the previous release:

    git worktree add --detach ../cryoves-old v0.1.0
    python bench/segment_ab.py --baseline ../cryoves-old [--runs 2] [--shape 200 400 400]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def _segment(src: Path, tomo: Path, out: Path) -> tuple[float, dict]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    shutil.rmtree(out, ignore_errors=True)  # cold: a folder from an earlier run would lend its cached map
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "cryoves", "segment", str(tomo), "-o", str(out), "--force"],
                         capture_output=True, text=True, env=env)
    secs = time.perf_counter() - t0
    if run.returncode:
        raise SystemExit(f"segment failed with {src}:\n{run.stderr[-2000:]}")
    return secs, json.loads((out / "manifest.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", required=True, help="another cryoves checkout (its src/ is used)")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--shape", type=int, nargs=3, default=[200, 400, 400])
    ap.add_argument("--workdir", default="out/bench_ab")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    tomo = work / f"synapse_{'x'.join(map(str, args.shape))}.mrc"
    if not tomo.exists():
        sys.path.insert(0, str(HERE / "src"))
        from cryoves.io import write_mrc
        from cryoves.simulate import SimulationConfig, simulate

        sim = simulate(SimulationConfig.preset("synapse", shape=tuple(args.shape), voxel_size_a=22.0), seed=7)
        write_mrc(tomo, sim.tomogram.asarray(), sim.tomogram.voxel_size)
        print(f"{tomo}: {len(sim.vesicles)} vesicles")
    trees = {"baseline": Path(args.baseline).resolve() / "src", "this": HERE / "src"}
    times: dict[str, list[float]] = {k: [] for k in trees}
    for rep in range(args.runs):
        for name, src in trees.items():
            secs, man = _segment(src, tomo, work / f"{name}_{rep}")
            times[name].append(secs)
            steps = {k: v for k, v in man.get("timings_s", {}).items() if v >= 0.5}
            print(f"{name:>8} run {rep}: {secs:6.1f} s, {man.get('n_vesicles')} vesicles, steps {steps}", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"median: baseline {med['baseline']:.1f} s, this {med['this']:.1f} s, ratio {med['this'] / med['baseline']:.2f}")


if __name__ == "__main__":
    main()

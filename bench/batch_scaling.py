"""Batch throughput on this machine: 1 Dask worker × all torch threads vs W workers × fewer threads.

Simulates N small tomograms ("small" simulator preset at a chosen shape, 22 Å), then runs
``cryoves.batch.run_batch`` on each local-cluster layout and prints tomograms/min, the ratio
against the 1-worker baseline measured in the same run, and where the time goes (per-step seconds
from the manifests: network prediction vs the rest). Cluster start-up and the model load are not
timed: each cluster first segments one warm-up tomogram.

With ``--split``, also one larger tomogram (``--split-shape``) split into blocks across 1 and W
workers (``cryoves.blockwise``, ``segment --workers``), against the single-process ``segment`` of
the same run: the overhead of splitting and what the extra worker gains.

Usage: python bench/batch_scaling.py [--n 6] [--shape 64 128 128] [--workers 2] [--model PATH] [--repeat 1]
       [--split] [--split-shape 128 320 320]
Model: the CryoVesNet weights in ../shared/reference/weights.h5 when present (realistic probability
maps, so post-processing has real work), else a random network (timings of the network only
roughly representative). Timings on a shared machine are noisy; compare the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from cryoves.batch import run_batch
from cryoves.cluster import make_client
from cryoves.io import write_mrc
from cryoves.pipeline import SegmentConfig

REFERENCE_WEIGHTS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "weights.h5"


def simulate_inputs(folder: Path, n: int, shape: tuple[int, int, int]) -> list[Path]:
    from cryoves.simulate import SimulationConfig, simulate

    paths = []
    for seed in range(n + 1):  # +1: the warm-up tomogram
        sim = simulate(SimulationConfig.preset("small", shape=shape, n_vesicles=12), seed=seed)
        p = folder / f"tomo{seed:02d}.mrc"
        write_mrc(p, sim.tomogram.asarray(), sim.tomogram.voxel_size)
        paths.append(p)
    return paths


def default_model(folder: Path) -> str:
    if REFERENCE_WEIGHTS.exists():
        return str(REFERENCE_WEIGHTS)
    import torch

    from cryoves.model import ModelInfo, UNet3D, save_checkpoint

    torch.manual_seed(0)
    p = folder / "random.safetensors"
    save_checkpoint(p, UNet3D().eval(), ModelInfo(name="random"))
    return str(p)


def step_seconds(outdirs: list[Path]) -> dict[str, float]:
    """Mean seconds per tomogram: network prediction vs everything else (from manifest.json)."""
    pred, rest = [], []
    for d in outdirs:
        t = json.loads((d / "manifest.json").read_text())["timings_s"]
        pred.append(t.get("predict", 0.0))
        rest.append(sum(v for k, v in t.items() if k != "predict"))
    return {"predict": float(np.mean(pred)), "rest": float(np.mean(rest))}


def run_layout(workers: int, threads: int, inputs: list[Path], warm: Path, out: Path, cfg: SegmentConfig) -> dict:
    client = make_client(len(inputs), n_workers=workers, threads=threads)
    cluster = client.cluster
    try:
        # warm-up on every worker: model load, torch/oneDNN kernel caches
        run_batch([warm] * workers, out / "warm", cfg, client=client, force=True, progress=False)
        t0 = time.perf_counter()
        summary = run_batch([str(p) for p in inputs], out / "run", cfg, client=client, force=True, progress=False)
        wall = time.perf_counter() - t0
    finally:
        client.close()
        cluster.close()
    if (summary["status"] != "ok").any():
        raise RuntimeError(f"batch failed:\n{summary[['tomogram', 'status', 'error']]}")
    steps = step_seconds([Path(o) for o in summary["output"]])
    return {"workers": workers, "threads": threads, "wall": wall, "per_min": 60.0 * len(inputs) / wall, **steps}


def run_split(path: Path, workers: int, cores: int, cfg: SegmentConfig, out: Path) -> None:
    """One tomogram: single process vs split across 1 and ``workers`` local workers."""
    from cryoves.blockwise import segment_split
    from cryoves.pipeline import segment
    from cryoves.predict import use_all_cores

    use_all_cores()
    segment(path, out / "warm", cfg, force=True)  # warm-up: model download/cache, kernels
    t0 = time.perf_counter()
    ref = segment(path, out / "single", cfg, force=True)
    base = time.perf_counter() - t0
    print(f"\nsplit {path.name}: single process {base:.1f} s ({len(ref.vesicles)} vesicles; per step "
          f"predict {ref.manifest['timings_s']['predict']:.1f} s, spheres {ref.manifest['timings_s']['spheres']:.1f} s)")
    for w in sorted({1, workers}):
        t0 = time.perf_counter()
        res = segment_split(path, out / f"split{w}", cfg, workers=w, force=True)
        wall = time.perf_counter() - t0
        same = res.vesicles.df.equals(ref.vesicles.df)
        t = res.manifest["timings_s"]
        print(f"  {w} worker(s) x {max(1, cores // w)} thread(s): {wall:.1f} s incl. cluster start "
              f"(predict {t['predict']:.1f} s in {res.manifest['prediction']['blocks']} blocks, spheres "
              f"{t['spheres']:.1f} s); speed vs single process {base / wall:.2f}; same table: {same}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=6, help="tomograms per run")
    ap.add_argument("--shape", type=int, nargs=3, default=(64, 128, 128), help="tomogram shape z y x")
    ap.add_argument("--workers", type=int, default=2, help="workers of the parallel layout")
    ap.add_argument("--model", default=None, help="weights (default: CryoVesNet reference, else random)")
    ap.add_argument("--repeat", type=int, default=1, help="alternate the two layouts this many times")
    ap.add_argument("--split", action="store_true", help="also time one larger tomogram split across workers")
    ap.add_argument("--split-shape", type=int, nargs=3, default=(128, 320, 320), help="its shape z y x")
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="cryoves-bench-") as tmp:
        tmp = Path(tmp)
        paths = simulate_inputs(tmp, args.n, tuple(args.shape))
        warm, inputs = paths[0], paths[1:]
        model = args.model or default_model(tmp)
        cfg = SegmentConfig(model=model, device="cpu", report=False)
        print(f"{args.n} tomograms {tuple(args.shape)} at 22 Å, model {Path(model).name}, {cores} cores")
        layouts = [(1, cores), (args.workers, max(1, cores // args.workers))]
        results: dict[tuple[int, int], list[dict]] = {lay: [] for lay in layouts}
        for r in range(args.repeat):
            for k, (w, t) in enumerate(layouts):
                res = run_layout(w, t, inputs, warm, tmp / f"out{r}{k}", cfg)
                results[(w, t)].append(res)
                print(f"  run {r + 1}: {w} worker(s) x {t} torch thread(s): {res['wall']:.1f} s, "
                      f"{res['per_min']:.2f} tomograms/min (per tomogram: predict {res['predict']:.1f} s, "
                      f"rest {res['rest']:.1f} s)")
        base = np.median([r["per_min"] for r in results[layouts[0]]])
        par = np.median([r["per_min"] for r in results[layouts[1]]])
        print(f"\nthroughput 1x{layouts[0][1]}: {base:.2f} tomograms/min; {layouts[1][0]}x{layouts[1][1]}: "
              f"{par:.2f} tomograms/min; ratio {par / base:.2f} (ideal <= {min(args.workers, cores)})")
        b, q = results[layouts[0]][0], results[layouts[1]][0]
        w = layouts[1][0]
        model_ratio = w * (b["predict"] + b["rest"]) / (q["predict"] + q["rest"])
        print(
            f"Why (per tomogram, seconds): 1 worker: network {b['predict']:.1f} + rest {b['rest']:.1f}; "
            f"{w} workers: network {q['predict']:.1f} + rest {q['rest']:.1f}. Throughput ratio ~ {w} x "
            f"(1-worker time / {w}-worker time) = {model_ratio:.2f}. The network (torch) uses all threads it is "
            f"given, so giving each worker fewer threads slows it by {q['predict'] / max(b['predict'], 1e-9):.2f}x "
            f"(ideal {cores // layouts[1][1] if layouts[1][1] else 1}x); the rest is mostly single-threaded "
            f"numpy/scipy, which leaves cores idle with 1 worker and runs side by side with {w} "
            f"(slowed {q['rest'] / max(b['rest'], 1e-9):.2f}x by sharing cores, caches and memory bandwidth). More workers win "
            f"when the idle share of the 1-worker run ({100 * b['rest'] / (b['predict'] + b['rest']):.0f} % here) "
            "outweighs the loss of torch's imperfect thread scaling; the ratio can never exceed the core count."
        )
        if args.split:
            from cryoves.simulate import SimulationConfig, simulate

            sim = simulate(SimulationConfig.preset("small", shape=tuple(args.split_shape), n_vesicles=60), seed=99)
            big = tmp / "big.mrc"
            write_mrc(big, sim.tomogram.asarray(), sim.tomogram.voxel_size)
            run_split(big, args.workers, cores, cfg, tmp / "split")

if __name__ == "__main__":
    main()

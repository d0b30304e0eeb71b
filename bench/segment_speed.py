"""Wall time, per-step times and peak memory of the whole `cryoves segment`, against a baseline checkout.

Each run is a fresh `python -m cryoves segment TOMO -o OUT` process (cold: no cached map, start-up
included), alternating this source tree and the baseline's, on the same simulated synapse
(200×400×400 at 22 Å, ~400 vesicles, by default). Printed per run: wall time, the seconds from
process start to the first network tile, the manifest's per-step times, peak RSS of the main process
and peak PSS of the whole process tree (main + post-processing workers; PSS splits shared pages,
so the shared tomogram is counted once), the machine's CPU time during the run (Linux: core-seconds
from /proc/stat, i.e. the work of every process and thread; on a quiet machine that is the
command's) and how much of it the main process did (exact) and its post-processing workers (sampled
every 0.2 s, so a little low), then medians and ratios (baseline / this). Core-seconds tell work from overlap: a run
that keeps every core busy gets faster only with less work.

    python bench/segment_speed.py --baseline-rev 9c2a079 [--runs 2] [--shape 200 400 400]
    python bench/segment_speed.py --baseline ../cryoves-old     # any other checkout
    python bench/segment_speed.py --no-baseline --shape 300 1024 1024 --voxel-size 14.7 --preset synapse
    python bench/segment_speed.py --size-search-cost 2          # size search vs one pass (this tree)

``--baseline-rev`` makes a temporary git worktree of that revision. Extra segment options go
after ``--``, e.g. ``-- --precision fp32``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def _tree_pss(pid: int, cpu: dict[int, float] | None = None) -> int:
    """Proportional set size (bytes) of ``pid`` and its descendants (0 for vanished ones); ``cpu``
    (a dict) receives each process's CPU seconds so far (user + system) by pid."""
    import psutil

    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_full_info().pss
            if cpu is not None:
                t = p.cpu_times()
                cpu[p.pid] = t.user + t.system
        except psutil.Error:
            pass
    return total


def _busy_seconds() -> float:
    """Core-seconds the machine has spent busy since boot (/proc/stat; NaN elsewhere)."""
    try:
        with open("/proc/stat") as fh:
            ticks = [int(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return float("nan")
    busy = sum(ticks[i] for i in (0, 1, 2, 5, 6) if i < len(ticks))  # user, nice, system, irq, softirq
    return busy / os.sysconf("SC_CLK_TCK")


def run_segment(src: Path, tomo: Path, out: Path, extra: list[str]) -> dict:
    """One cold CLI run: wall time, seconds from process start to the first network tile (the
    progress bar of the tiles appears), the manifest's steps, peak RSS of the main process, peak
    PSS of the process tree."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    shutil.rmtree(out, ignore_errors=True)  # a folder from an earlier run would lend its cached map
    cmd = [sys.executable, "-m", "cryoves", "segment", str(tomo), "-o", str(out), *extra]
    t0, busy0 = time.perf_counter(), _busy_seconds()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    peak, to_network, to_step, lines = [0], [float("nan")], [float("nan")], []
    cpu_by_pid: dict[int, float] = {}
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.2):
            peak[0] = max(peak[0], _tree_pss(proc.pid, cpu_by_pid))

    def read() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            if line.startswith("predict:") and to_network[0] != to_network[0]:
                to_network[0] = time.perf_counter() - t0
            if "step: predict" in line and to_step[0] != to_step[0]:
                to_step[0] = time.perf_counter() - t0
            lines.append(line)

    threads = [threading.Thread(target=f, daemon=True) for f in (watch, read)]
    for th in threads:
        th.start()
    _, status, usage = os.wait4(proc.pid, 0)  # this process is small: ru_maxrss is the child's own
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall, busy = time.perf_counter() - t0, _busy_seconds() - busy0
    done.set()
    for th in threads:
        th.join()
    if proc.returncode:
        raise SystemExit(f"segment failed with {src}:\n{''.join(lines)[-2000:]}")
    man = json.loads((out / "manifest.json").read_text())
    return {
        "wall": wall,
        "cpu": busy,
        # the main process's own CPU (exact); its descendants' (workers, their server) as last sampled
        "cpu_main": usage.ru_utime + usage.ru_stime,
        "cpu_others": sum(v for k, v in cpu_by_pid.items() if k != proc.pid),
        "to_network": to_network[0],
        "to_step": to_step[0],
        "steps": man.get("timings_s", {}),
        "n": man.get("n_vesicles"),
        "rss": usage.ru_maxrss * 1024,
        "pss": peak[0],
        "precision": man.get("prediction", {}).get("precision"),
    }


def _fmt(name: str, rep: int, r: dict) -> str:
    steps = ", ".join(f"{k} {v:.1f}" for k, v in r["steps"].items() if v >= 0.05)
    return (f"{name:>8} run {rep}: {r['wall']:6.1f} s, {r['n']} vesicles, predict step after {r['to_step']:.2f} s, "
            f"first tile after {r['to_network']:.2f} s, "
            f"peak RSS {r['rss'] / 2**30:.2f} GiB, tree PSS {r['pss'] / 2**30:.2f} GiB ({r['precision']}), "
            f"{_fmt_cpu(r['cpu'], r['wall'])}: main process {r['cpu_main']:.1f}, workers {r['cpu_others']:.1f}; {steps}")


def _fmt_cpu(core_s: float, wall: float) -> str:
    n = os.cpu_count() or 1
    return f"CPU {core_s:.1f} core-s ({100 * core_s / (wall * n):.0f} % of {n} cores)"


def _baseline_tree(args, stack: list) -> Path | None:
    if args.no_baseline:
        return None
    if args.baseline:
        return Path(args.baseline).resolve() / "src"
    tmp = Path(tempfile.mkdtemp(prefix="cryoves-baseline-"))
    subprocess.run(["git", "-C", str(HERE), "worktree", "add", "--detach", str(tmp / "tree"), args.baseline_rev],
                   check=True, capture_output=True)
    stack.append(tmp / "tree")
    return tmp / "tree" / "src"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", help="another cryoves checkout (its src/ is used)")
    ap.add_argument("--baseline-rev", default="9c2a079", help="git revision for a temporary baseline worktree")
    ap.add_argument("--no-baseline", action="store_true", help="time this tree only")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--shape", type=int, nargs=3, default=[200, 400, 400])
    ap.add_argument("--voxel-size", type=float, default=22.0)
    ap.add_argument("--preset", default="synapse")
    ap.add_argument("--workdir", default="out/bench_speed")
    ap.add_argument("--size-search-cost", type=int, default=0, metavar="N",
                    help="only time the size search against one pass (this tree), N alternating runs each")
    ap.add_argument("extra", nargs="*", help="segment options for both trees (after --)")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    shape = "x".join(map(str, args.shape))
    tomo = work / f"{args.preset}_{shape}_{args.voxel_size:g}A.mrc"
    if not tomo.exists():  # simulated in a child process: ru_maxrss of the runs must not inherit its memory
        code = ("import sys; from cryoves.io import write_mrc; from cryoves.simulate import SimulationConfig, simulate; "
                f"sim = simulate(SimulationConfig.preset({args.preset!r}, shape={tuple(args.shape)}, "
                f"voxel_size_a={args.voxel_size}), seed=7); "
                f"write_mrc({str(tomo)!r}, sim.tomogram.asarray(), sim.tomogram.voxel_size); "
                "print(len(sim.vesicles), 'true vesicles')")
        sim = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(HERE / "src")},
                             capture_output=True, text=True, check=True)
        print(f"{tomo}: {sim.stdout.strip()}", flush=True)
    print(f"{tomo}: {tomo.stat().st_size / 2**30:.2f} GiB, {os.cpu_count()} CPUs", flush=True)
    if args.size_search_cost:
        variants = {"size search": [], "one pass": ["--vesicle-radius", "19"]}
        trees = {k: (HERE / "src", v) for k, v in variants.items()}
    else:
        trees = {"this": (HERE / "src", [])}
    worktrees: list[Path] = []
    try:
        base = None if args.size_search_cost else _baseline_tree(args, worktrees)
        if base is not None:
            trees = {"baseline": (base, []), **trees}
        results: dict[str, list[dict]] = {k: [] for k in trees}
        for rep in range(args.runs):
            for name, (src, opts) in trees.items():
                r = run_segment(src, tomo, work / f"{name.replace(' ', '_')}_{rep}", [*opts, *args.extra])
                results[name].append(r)
                print(_fmt(name, rep, r), flush=True)
    finally:
        for wt in worktrees:
            subprocess.run(["git", "-C", str(HERE), "worktree", "remove", "--force", str(wt)], capture_output=True)
    med = {k: {"wall": statistics.median(r["wall"] for r in v), "rss": max(r["rss"] for r in v),
               "pss": max(r["pss"] for r in v), "to_network": statistics.median(r["to_network"] for r in v),
               "to_step": statistics.median(r["to_step"] for r in v), "cpu": statistics.median(r["cpu"] for r in v)}
           for k, v in results.items()}
    input_gib = tomo.stat().st_size / 2**30
    for k, m in med.items():
        print(f"{k:>11}: median {m['wall']:.1f} s, predict step after {m['to_step']:.2f} s (start-up, read, checksum), "
              f"first tile after {m['to_network']:.2f} s (+ network input preparation), peak RSS "
              f"{m['rss'] / 2**30:.2f} GiB (limit 2.5 x input + 1 = {2.5 * input_gib + 1:.2f} GiB), tree PSS "
              f"{m['pss'] / 2**30:.2f} GiB, {_fmt_cpu(m['cpu'], m['wall'])}")
    names = list(med)
    if len(names) == 2:
        a, b = names
        steps = sorted({s for r in results[a] + results[b] for s in r["steps"]},
                       key=lambda s: list(results[b][0]["steps"]).index(s) if s in results[b][0]["steps"] else 99)
        for s in steps:
            va = statistics.median(r["steps"].get(s, 0.0) for r in results[a])
            vb = statistics.median(r["steps"].get(s, 0.0) for r in results[b])
            print(f"  {s:>16}: {a} {va:6.2f} s  {b} {vb:6.2f} s" + (f"  -> {va / vb:.2f}x" if vb > 0.05 else ""))
        print(f"whole segment: {a} {med[a]['wall']:.1f} s, {b} {med[b]['wall']:.1f} s -> "
              f"{med[a]['wall'] / med[b]['wall']:.2f}x")


if __name__ == "__main__":
    main()

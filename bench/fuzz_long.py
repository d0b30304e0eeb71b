"""Long fuzzing runs of the parsers we own: MRC header handling, IMOD .mod, CSV/STAR vesicle tables.

Engines:
  atheris  coverage-guided (libFuzzer) on the cryoves readers; needs ``pip install 'cryoves[fuzz]'``.
  mutate   pure-Python random mutation of valid seed files (byte flips, field overwrites, cuts,
           splices); no extra dependency.

Every input must give a result or a typed ``cryoves.errors.CryovesError``; anything else is a
crash: the input is saved in the corpus folder as ``crash-*`` and the exit code is 1.

    python bench/fuzz_long.py --engine atheris --target all --seconds 600
    python bench/fuzz_long.py --engine mutate --target mrc --seconds 60
    python bench/fuzz_long.py --engine atheris --target table --seed 7 --runs 5000   # reproducible

Prints one line per target: ``<target>: <N> inputs tried in <S> s, <C> crashes``.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[1] / "tests"))

TARGETS = ("mrc", "mod", "table")


def seeds(target: str) -> list[bytes]:
    """Valid files to start from (and to mutate)."""
    import numpy as np

    from _hardening_utils import valid_mrc_bytes

    if target == "mrc":
        return [valid_mrc_bytes(dt) for dt in (np.float32, np.int8, np.int16, np.uint16)]
    if target == "mod":
        from cryoves.io.imod import ImodContour, ImodModel, ImodObject, model_to_bytes

        objs = [
            ImodObject.of_kind("closed", contours=[ImodContour([[1, 1, 2], [8, 1, 2], [8, 7, 2]])]),
            ImodObject.of_kind("open", contours=[ImodContour([[0, 0, 1], [9, 9, 3]])]),
            ImodObject.of_kind("scattered", sphere_size=3,
                               contours=[ImodContour([[4.5, 5.5, 2]], sizes=[2.5]), ImodContour([[2, 3, 1]])]),
        ]
        return [model_to_bytes(ImodModel(objects=objs, xmax=12, ymax=10, zmax=6, pixel_size=2.2, units=-9))]
    from cryoves.io.tables import write_star
    from cryoves.vesicles import VesicleTable

    t = VesicleTable.from_spheres(np.array([[2.0, 3.0, 4.0], [4.0, 6.0, 8.5]]), np.array([2.0, 3.0]), 22.0)
    d = Path(tempfile.mkdtemp())
    csv = t.write_csv(d / "t.csv").read_bytes()
    star = write_star(d / "t.star", t).read_bytes()
    return [csv, star]


def _target_fn(target: str):
    from _hardening_utils import FUZZ_TARGETS

    return FUZZ_TARGETS[target]


# ------------------------------------------------------------------------------------ mutate
def _mutate(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        if op == 0 and b:  # flip bits
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1 and len(b) >= 4:  # overwrite an aligned 32-bit word (header fields)
            i = rng.randrange(0, min(len(b), 1024) // 4) * 4
            b[i : i + 4] = rng.choice([b"\0\0\0\0", b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff",
                                       rng.randbytes(4), (rng.randint(-3, 20) & 0xFFFFFFFF).to_bytes(4, "little")])
        elif op == 2:  # cut
            b = b[: rng.randrange(len(b) + 1)]
        elif op == 3:  # insert random bytes
            i = rng.randrange(len(b) + 1)
            b[i:i] = rng.randbytes(rng.randint(1, 16))
        elif op == 4 and pool:  # splice with another input
            other = rng.choice(pool)
            i, j = rng.randrange(len(b) + 1), rng.randrange(len(other) + 1)
            b = b[:i] + other[j:]
        elif op == 5 and b:  # text-level mutation for tables: replace a token
            i = rng.randrange(len(b))
            b[i : i + 1] = rng.choice([b",", b"\n", b" ", b"nan", b"-1", b"1e400", b"_rln", b"loop_\n", b"data_\n"])
    return bytes(b)


def run_mutate(target: str, seconds: float, corpus: Path, seed: int) -> tuple[int, int]:
    fn = _target_fn(target)
    pool = seeds(target)
    rng = random.Random(seed)
    n = crashes = 0
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:
        data = _mutate(rng, rng.choice(pool), pool)
        n += 1
        try:
            fn(data)
        except Exception:  # noqa: BLE001 - a crash: keep the input and go on
            crashes += 1
            path = corpus / f"crash-{target}-{n}"
            path.write_bytes(data)
            print(f"CRASH ({path}):\n{traceback.format_exc()}", file=sys.stderr)
        if n % 50 == 0 and len(pool) < 200:
            pool.append(data)
    return n, crashes


# ------------------------------------------------------------------------------------ atheris
def _atheris_child(target: str, seconds: float, corpus: Path, seed: int, runs: int | None) -> None:
    import atheris

    with atheris.instrument_imports(include=["cryoves"]):
        import cryoves.io
        import cryoves.io.imod
        import cryoves.io.mrc
        import cryoves.io.tables  # noqa: F401
    fn = _target_fn(target)
    for k, s in enumerate(seeds(target)):
        (corpus / f"seed-{k}").write_bytes(s)
    bound = [f"-runs={runs}"] if runs else [f"-max_total_time={int(seconds)}"]
    atheris.Setup([sys.argv[0], *bound, f"-seed={seed}", "-rss_limit_mb=4096", "-print_final_stats=1",
                   f"-artifact_prefix={corpus}/crash-", str(corpus)], fn)
    atheris.Fuzz()


def run_atheris(target: str, seconds: float, corpus: Path, seed: int, runs: int | None = None) -> tuple[int, int]:
    corpus.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(HERE), "--atheris-child", "--target", target, "--seconds", str(seconds),
           "--corpus", str(corpus), "--seed", str(seed)] + (["--runs", str(runs)] if runs else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 600)
    m = re.search(r"Done (\d+) runs", proc.stderr) or re.search(r"stat::number_of_executed_units:\s*(\d+)", proc.stderr)
    n = int(m.group(1)) if m else 0
    if proc.returncode != 0:
        print(proc.stderr[-6000:], file=sys.stderr)
        return n, 1
    return n, 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", choices=["atheris", "mutate"], default="mutate")
    ap.add_argument("--target", choices=[*TARGETS, "all"], default="all")
    ap.add_argument("--seconds", type=float, default=60.0, help="per target")
    ap.add_argument("--corpus", type=Path, default=None, help="folder for the corpus and crash inputs")
    ap.add_argument("--seed", type=int, default=0, help="random seed (atheris: libFuzzer -seed; 0 = from the clock)")
    ap.add_argument("--runs", type=int, default=None,
                    help="atheris: stop after this many inputs instead of --seconds (reproducible with a fixed --seed)")
    ap.add_argument("--atheris-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    corpus_root = args.corpus or Path(tempfile.mkdtemp(prefix="cryoves-fuzz-"))
    if args.atheris_child:
        _atheris_child(args.target, args.seconds, corpus_root, args.seed, args.runs)
        return 0
    import logging
    import warnings

    logging.disable(logging.CRITICAL)
    warnings.simplefilter("ignore")
    failed = 0
    for target in TARGETS if args.target == "all" else (args.target,):
        corpus = corpus_root / target
        corpus.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        if args.engine == "atheris":
            n, crashes = run_atheris(target, args.seconds, corpus, args.seed, args.runs)
        else:
            n, crashes = run_mutate(target, args.seconds, corpus, args.seed)
        print(f"{target}: {n} inputs tried in {time.perf_counter() - t0:.0f} s ({args.engine}), {crashes} crashes",
              flush=True)
        failed += crashes
    print(f"corpus and crash inputs: {corpus_root}")
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())

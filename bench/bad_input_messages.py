"""Print the bad-input catalogue as a Markdown table: case → command → exit code → message.

Runs every case of ``tests/_hardening_utils.py`` through the CLI (in-process) with a random-init
model, exactly as ``tests/test_bad_inputs.py`` does. The output is pasted into docs/hardening.md.

    python bench/bad_input_messages.py [--case NAME]
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _hardening_utils import CASES, run_cli


def _short(msg: str, root: Path) -> str:
    msg = msg.replace(str(root) + "/", "").replace(str(root), "")
    msg = re.sub(r"\s+", " ", msg)
    return msg.replace("|", "\\|")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", action="append", help="only these cases (repeatable)")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    import torch

    from cryoves.model import ModelInfo, UNet3D, save_checkpoint

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        model = save_checkpoint(tmp / "random.safetensors", UNet3D(), ModelInfo(name="random"))
        print("| case | what | command | exit | message |")
        print("|---|---|---|---|---|")
        n = 0
        for case in CASES:
            if args.case and case.name not in args.case:
                continue
            for cmd in case.commands:
                root = tmp / f"{case.name}-{cmd}"
                (root / "in").mkdir(parents=True)
                setup = case.build(root / "in")
                res = run_cli(cmd, setup, root, model)
                flag = "" if res.code == case.exit_code(cmd) else f" (expected {case.exit_code(cmd)})"
                print(f"| {case.name} | {case.description} | {cmd} | {res.code}{flag} | {_short(res.message, root)} |")
                n += 1
    print(f"\n{len(CASES)} cases, {n} runs, {time.perf_counter() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()

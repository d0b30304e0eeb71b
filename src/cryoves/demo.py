"""The built-in example: simulate a small synapse tomogram, segment it, score it against its ground truth."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from cryoves import DEFAULT_MODEL
from cryoves.atomic import write_json_atomic

log = logging.getLogger(__name__)

#: Demo scene: small enough for ~1 minute on a 2-core laptop, large enough for tens of vesicles.
DEMO_SHAPE = (96, 192, 192)
DEMO_VOXEL_SIZE_A = 22.0


def run_demo(outdir: str | os.PathLike, *, seed: int = 1, force: bool = False, model: str = DEFAULT_MODEL) -> dict[str, Any]:
    """Simulate → segment → evaluate. Returns the metrics; writes everything under ``outdir``.

    ``outdir/simulation/`` holds the tomogram and its ground truth, ``outdir/segmentation/`` the
    result of ``cryoves segment``, ``outdir/evaluation.json`` the scores.
    """
    from cryoves.evaluate import evaluate
    from cryoves.pipeline import SegmentConfig, segment
    from cryoves.simulate import SimulationConfig, simulate, write_simulation

    outdir = Path(outdir)
    cfg = SimulationConfig.preset("synapse", shape=DEMO_SHAPE, voxel_size_a=DEMO_VOXEL_SIZE_A)
    log.info("simulating a %s synapse tomogram at %g Å (seed %d)", DEMO_SHAPE, DEMO_VOXEL_SIZE_A, seed)
    sim = simulate(cfg, seed=seed)
    sim_dir = outdir / "simulation"
    write_simulation(sim, sim_dir, force=force)
    seg = segment(sim_dir / "tomogram.mrc", outdir / "segmentation", SegmentConfig(model=model), force=force)
    result = evaluate(seg.vesicles, sim.vesicles, shape=sim.tomogram.shape, prob=seg.probability)
    write_json_atomic(outdir / "evaluation.json", result.metrics)
    return {
        "metrics": result.metrics,
        "simulation": str(sim_dir),
        "segmentation": str(outdir / "segmentation"),
        "evaluation": str(outdir / "evaluation.json"),
    }

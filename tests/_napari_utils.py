"""Helpers for the vesicle-editor tests: a small phantom tomogram with known vesicles."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cryoves.atomic import write_json_atomic
from cryoves.io import write_mrc
from cryoves.vesicles import VesicleTable

VOXEL_SIZE_A = 20.0
SHAPE = (40, 64, 64)
#: (z, y, x, outer radius) in voxels; not overlapping, at least one radius from the borders
TRUTH = np.array(
    [
        [20.0, 16.0, 16.0, 8.0],
        [20.3, 16.4, 44.6, 9.0],
        [19.6, 44.2, 20.5, 7.5],
        [20.0, 45.0, 46.0, 8.5],
    ]
)


def phantom(truth: np.ndarray = TRUTH, shape=SHAPE, seed: int = 0, noise: float = 0.15) -> np.ndarray:
    """Grey volume (z, y, x) with dark 2-voxel membranes (dense = dark) at the given spheres."""
    rng = np.random.default_rng(seed)
    vol = np.ones(shape, np.float32) + rng.normal(0, noise, shape).astype(np.float32)
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    for cz, cy, cx, r in truth:
        d = np.sqrt((z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2)
        vol -= (np.clip(r + 0.5 - d, 0, 1) * np.clip(d - (r - 2.5), 0, 1)).astype(np.float32)
    return vol


def truth_table(rows: np.ndarray = TRUTH, **columns) -> VesicleTable:
    return VesicleTable.from_spheres(rows[:, :3], rows[:, 3], VOXEL_SIZE_A, **columns)


def fake_segment_output(outdir: Path, table: VesicleTable, volume: np.ndarray, rejected=None) -> Path:
    """Write a minimal folder laid out like the output of ``cryoves segment``."""
    outdir.mkdir(parents=True, exist_ok=True)
    tomo = write_mrc(outdir.parent / f"{outdir.name}_tomo.mrc", volume, VOXEL_SIZE_A)
    table.write_csv(outdir / "vesicles.csv")
    write_mrc(outdir / "labels.mrc", table.to_labels(volume.shape), VOXEL_SIZE_A)
    if rejected is not None:
        rejected.to_csv(outdir / "rejected.csv", index=False)
    write_json_atomic(
        outdir / "manifest.json",
        {"inputs": {"tomogram": str(tomo), "voxel_size_a": VOXEL_SIZE_A}, "outputs": ["vesicles.csv"]},
    )
    return outdir

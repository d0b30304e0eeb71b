"""Tomogram simulator with exact ground truth (synapse-like scenes, physical imaging model).

Python API::

    from cryoves.simulate import SimulationConfig, simulate, write_simulation, randomize_config
    sim = simulate(SimulationConfig.preset("small"), seed=1)
    sim.tomogram.data   # float32 (z, y, x), dense = dark, zero mean / unit sd
    sim.vesicles        # VesicleTable, exact centres (voxels) and outer radii
    write_simulation(sim, "out/")
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cryoves import __version__
from cryoves.atomic import write_json_atomic, write_text_atomic
from cryoves.io import Tomogram, write_mrc
from cryoves.results import MANIFEST_NAME, OUTPUT_FILES, prepare_output_dir
from cryoves.simulate.config import (
    PRESETS,
    SimulationConfig,
    VesiclePopulation,
    dense_core_population,
    large_vesicle_population,
    randomize_config,
)
from cryoves.simulate.geometry import Layout, layout_scene
from cryoves.simulate.imaging import post_filter, reconstruct, tilt_series
from cryoves.simulate.scene import render_scene
from cryoves.vesicles import VesicleTable

log = logging.getLogger(__name__)

__all__ = [
    "PRESETS",
    "Simulation",
    "SimulationConfig",
    "VesiclePopulation",
    "dense_core_population",
    "large_vesicle_population",
    "randomize_config",
    "simulate",
    "simulate_to_folder",
    "write_simulation",
]


@dataclass
class Simulation:
    """A simulated tomogram and its ground truth. All arrays are (z, y, x) on the output grid.

    Attributes:
        tomogram: reconstruction, float32, dense = dark, zero mean and unit sd, voxel size in Å.
        scene: noise-free, unfiltered ground-truth density: minus the potential in volts (so
            dense = dark, like the tomogram; vacuum 0, ice -4).
        labels: uint32 instance labels rendered from ``vesicles`` (filled outer spheres).
        vesicles: ground-truth table (voxels and nm; ``source`` "ground_truth"; ``population``
            "sv"/"dense_core"/"large"; ``distance_to_pm_nm`` from the outer surface to the plasma
            membrane mid-plane, NaN without membrane).
        cytoplasm_mask: presynaptic cytoplasm inside the ice (vesicles and organelles included).
        active_zone_mask: plasma-membrane voxels inside the active-zone disc.
        az_points: (n, 3) voxel coordinates (z, y, x) of points on the active-zone membrane
            mid-surface, one per voxel² of area.
        membrane_points: (m, 3) the same for the whole presynaptic plasma membrane in the box.
        membrane: the plasma-membrane geometry (``PlasmaMembrane.describe()``) or None.
        distractors: table of distractor objects (kind, centre in voxels, extent in nm).
        config, seed: what produced it.
    """

    tomogram: Tomogram
    scene: np.ndarray
    labels: np.ndarray
    vesicles: VesicleTable
    cytoplasm_mask: np.ndarray
    active_zone_mask: np.ndarray
    az_points: np.ndarray
    membrane_points: np.ndarray
    membrane: dict | None
    distractors: pd.DataFrame
    config: SimulationConfig
    seed: int
    timings_s: dict[str, float] = field(default_factory=dict)


def simulate(config: SimulationConfig | None = None, seed: int = 0) -> Simulation:
    """Simulate a tomogram with ground truth; bit-identical for the same config and seed."""
    cfg = SimulationConfig.preset("synapse") if config is None else config
    seed = int(seed)
    scene_rng, noise_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    lay = layout_scene(cfg, scene_rng)
    vol = render_scene(cfg, lay, scene_rng)
    times["scene"] = time.perf_counter() - t0
    log.info("scene: %d vesicles, %d distractors (%.1f s)", len(lay.radii_nm), len(lay.obstacles), times["scene"])

    t0 = time.perf_counter()
    images = tilt_series(vol.potential, cfg, noise_rng if cfg.noise else None, ice_nm=cfg.ice_nm)
    times["tilt_series"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    rec = reconstruct(images, cfg, cfg.shape[0])
    rec = post_filter(rec, cfg)
    rec = (rec - rec.mean()) / max(float(rec.std()), 1e-12)
    times["reconstruction"] = time.perf_counter() - t0

    vs = cfg.voxel_size_a
    table = _vesicle_table(lay, vol, cfg)
    labels = table.to_labels(dtype=np.uint32)
    az_pts, mem_pts = _membrane_points(lay, cfg)
    return Simulation(
        tomogram=Tomogram(data=rec.astype(np.float32), voxel_size=(vs, vs, vs)),
        scene=(-vol.potential).astype(np.float32),
        labels=labels,
        vesicles=table,
        cytoplasm_mask=vol.cytoplasm_mask,
        active_zone_mask=vol.active_zone_mask,
        az_points=az_pts,
        membrane_points=mem_pts,
        membrane=None if lay.membrane is None else lay.membrane.describe(),
        distractors=pd.DataFrame([o.describe(cfg.voxel_size_nm) for o in lay.obstacles],
                                 columns=["kind", "z", "y", "x", "extent_radius_nm"]),
        config=cfg,
        seed=seed,
        timings_s=times,
    )


def _vesicle_table(lay: Layout, vol, cfg: SimulationConfig) -> VesicleTable:
    v = cfg.voxel_size_nm
    c = lay.centres_nm
    if lay.membrane is not None and len(c):
        dpm = lay.membrane.signed_distance(c[:, 0], c[:, 1], c[:, 2])
        dist = -dpm - lay.radii_nm - lay.membrane.thickness_nm / 2
    else:
        dist = np.full(len(c), np.nan)
    return VesicleTable.from_spheres(
        c / v,
        lay.radii_nm / v,
        cfg.voxel_size_a,
        shape=cfg.shape,
        origin=(0.0, 0.0, 0.0),
        membrane_thickness_nm=lay.thickness_nm,
        source=["ground_truth"] * len(c),
        population=list(lay.population),
        distance_to_pm_nm=dist,
    )


def _membrane_points(lay: Layout, cfg: SimulationConfig) -> tuple[np.ndarray, np.ndarray]:
    mem = lay.membrane
    if mem is None:
        return np.zeros((0, 3)), np.zeros((0, 3))
    v = cfg.voxel_size_nm
    half = 0.5 * float(np.linalg.norm(lay.box_nm[1:])) + v
    w = np.arange(-half, half, v)
    zr = np.arange(lay.ice_z_nm[0], lay.ice_z_nm[1], v) - mem.centre_nm[0]
    ww, zz = np.meshgrid(w, zr, indexing="ij")
    pts = mem.point(ww.ravel(), zz.ravel(), 0.0)
    inside = np.all((pts >= -0.5 * v) & (pts <= lay.box_nm + 0.5 * v), axis=1)
    az = mem.in_active_zone(ww.ravel(), zz.ravel())
    return pts[inside & az] / v, pts[inside] / v


def write_simulation(sim: Simulation, outdir: str | Path, force: bool = False) -> Path:
    """Write tomogram, ground truth and manifest (last) into ``outdir``.

    Files: tomogram.mrc, scene.mrc, labels.mrc, cytoplasm_mask.mrc, active_zone_mask.mrc,
    vesicles.csv, distractors.csv, active_zone.csv (points, voxels z, y, x), manifest.json.
    Refuses an existing result unless ``force``.
    """
    out = prepare_output_dir(outdir, force=force)
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    vs = sim.tomogram.voxel_size
    f = OUTPUT_FILES
    write_mrc(out / "tomogram.mrc", sim.tomogram.data, vs)
    write_mrc(out / "scene.mrc", sim.scene, vs)
    write_mrc(out / f["labels"], sim.labels, vs)
    write_mrc(out / f["cytoplasm_mask"], sim.cytoplasm_mask.astype(np.uint8), vs)
    write_mrc(out / f["active_zone_mask"], sim.active_zone_mask.astype(np.uint8), vs)
    sim.vesicles.write_csv(out / f["vesicles"])
    write_text_atomic(out / "distractors.csv", sim.distractors.to_csv(index=False, float_format="%.3f"))
    az = pd.DataFrame(sim.az_points, columns=["z", "y", "x"])
    write_text_atomic(out / "active_zone.csv", az.to_csv(index=False, float_format="%.3f"))
    manifest: dict[str, Any] = {
        "tool": "cryoves simulate",
        "version": __version__,
        "seed": sim.seed,
        "config": sim.config.to_dict(),
        "voxel_size_a": vs[2],
        "shape_zyx": list(sim.tomogram.shape),
        "n_vesicles": len(sim.vesicles),
        "plasma_membrane": sim.membrane,
        "polarity": "dense = dark (tomogram and scene)",
        "timings_s": sim.timings_s,
        "files": ["tomogram.mrc", "scene.mrc", f["labels"], f["cytoplasm_mask"], f["active_zone_mask"],
                  f["vesicles"], "distractors.csv", "active_zone.csv"],
    }
    write_json_atomic(out / MANIFEST_NAME, manifest)
    return out


def simulate_to_folder(
    outdir: str | Path,
    *,
    preset: str = "synapse",
    randomize: bool = False,
    seed: int = 0,
    shape: tuple[int, int, int] | None = None,
    voxel_size_a: float | None = None,
    force: bool = False,
) -> Simulation:
    """Build a config (preset, or randomised from ``seed``), simulate and write to ``outdir``.

    ``shape`` (z, y, x voxels) and ``voxel_size_a`` (Å) override the preset / random draw.
    The output folder is checked before any work starts. This is ``cryoves simulate``.
    """
    prepare_output_dir(outdir, force=force)
    if randomize:
        cfg = randomize_config(seed, shape=shape)
    else:
        cfg = SimulationConfig.preset(preset)
        if shape is not None:
            cfg = cfg.replace(shape=tuple(shape))
    if voxel_size_a is not None:
        cfg = cfg.replace(voxel_size_a=float(voxel_size_a))
    sim = simulate(cfg, seed=seed)
    write_simulation(sim, outdir, force=force)
    return sim

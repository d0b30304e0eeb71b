"""Training data: real tomograms with labels, simulated tomograms, and the patch sampler.

Every source becomes a :class:`TrainingVolume` on the *model grid* (the model's voxel size),
prepared exactly as :func:`cryoves.predict.predict_tomogram` prepares its input: resampled with
:func:`cryoves.preprocess.to_model_grid`, polarity made dense = dark, then normalised with
:func:`cryoves.preprocess.normalise`. Targets are 0/1 vesicle masks (filled balls: lumen +
membrane) resampled with the same voxel-centre alignment; the weight mask is 0 where the labels
are unknown (outside a region mask, padding). Arrays are (z, y, x).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cryoves.errors import FormatError, InputError
from cryoves.io.tomogram import Tomogram
from cryoves.model import ModelInfo
from cryoves.results import OUTPUT_FILES
from cryoves.train.config import SimulatedSource, TomogramSource
from cryoves.vesicles import VesicleTable, render_labels

log = logging.getLogger(__name__)

#: Pyto label files: ids >= this are vesicles (1 = cytoplasm, 2 = active zone).
PYTO_FIRST_VESICLE_ID = 10
#: Outer radius (nm) the model should see vesicles at; simulated large vesicles are shrunk to it,
#: as ``predict --vesicle-radius`` does.
TRAINING_RADIUS_NM = 19.0
#: Foreground voxel indices kept per volume for foreground-centred patches.
_MAX_FG_INDICES = 200_000


@dataclass
class TrainingVolume:
    """One volume on the model grid.

    Attributes:
        name: where it came from (file stem or ``sim-<seed>``).
        image: float32 (z, y, x), normalised, dense = dark.
        target: uint8 0/1 vesicle mask (filled balls).
        weight: uint8 0/1 loss mask (0 = ignore), same shape.
        vesicles: ground-truth spheres on the model grid, when known (for validation F1).
        source_voxel_size_a: voxel size of the original data (Å).
        scale: model voxels per original voxel (z, y, x).
    """

    name: str
    image: np.ndarray
    target: np.ndarray
    weight: np.ndarray
    vesicles: VesicleTable | None = None
    source_voxel_size_a: float = float("nan")
    scale: tuple[float, float, float] = (1.0, 1.0, 1.0)
    fg_index: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), repr=False)

    def __post_init__(self) -> None:
        if not (self.image.shape == self.target.shape == self.weight.shape):
            raise InputError(
                f"{self.name}: image {self.image.shape}, labels {self.target.shape} and mask "
                f"{self.weight.shape} must have the same shape on the model grid"
            )
        if self.fg_index.size == 0:
            self.fg_index = _foreground_index(self.target, self.weight)

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.image.shape),
            "source_voxel_size_a": round(float(self.source_voxel_size_a), 3),
            "n_vesicles": None if self.vesicles is None else len(self.vesicles),
            "foreground_fraction": round(float(self.target.mean()), 4),
        }


def _foreground_index(target: np.ndarray, weight: np.ndarray, seed: int = 0) -> np.ndarray:
    idx = np.flatnonzero((target > 0) & (weight > 0))
    if idx.size > _MAX_FG_INDICES:
        idx = np.sort(np.random.default_rng(seed).choice(idx, _MAX_FG_INDICES, replace=False))
    return idx.astype(np.int64)


# ---------------------------------------------------------------------- preparation
def model_grid(voxel_size_a: float = 22.0, normalisation: str = "robust_zscore", prefilter_sigma: float = 0.0,
               name: str = "training") -> ModelInfo:
    """The metadata of the network being trained, as far as its input is concerned (dense = dark,
    vesicles seen at :data:`TRAINING_RADIUS_NM`)."""
    return ModelInfo(name=name, voxel_size_a=voxel_size_a, normalisation=normalisation,
                     prefilter_sigma=prefilter_sigma, polarity="dense_dark", vesicle_radius_nm=TRAINING_RADIUS_NM)


def prepare_image(tomo: Tomogram, grid: ModelInfo, invert: bool, vesicle_radius_nm: float | None = None,
                  ) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Tomogram → normalised float32 model-grid image (dense = dark): :func:`cryoves.preprocess.prepare_input`."""
    from cryoves.preprocess import prepare_input

    image, info = prepare_input(tomo, grid, invert=invert, vesicle_radius_nm=vesicle_radius_nm)
    return image, tuple(info["scale"])  # type: ignore[return-value]


def mask_to_grid(mask: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Resample a binary (z, y, x) mask to ``shape`` (linear, centre-aligned, > 0.5) as uint8."""
    from cryoves.preprocess import resample

    m = np.asarray(mask)
    if tuple(m.shape) == tuple(shape):
        return (m > 0).astype(np.uint8)
    return (resample((m > 0).astype(np.float32), tuple(int(s) for s in shape), order=1) > 0.5).astype(np.uint8)


def table_to_grid(table: VesicleTable, scale: tuple[float, float, float], voxel_size_a: float) -> VesicleTable:
    """Map spheres from the input grid to a grid scaled by ``scale`` (centre-aligned, see preprocess)."""
    s = np.asarray(scale, dtype=float)
    centres = (table.centres + 0.5) * s - 0.5
    return VesicleTable.from_spheres(centres, table.radii * float(np.mean(s)), voxel_size_a, ids=table.ids)


def _read_table(path: Path, voxel_size_a: float) -> VesicleTable:
    """A vesicle table (.csv/.star/.mod) in voxels of the tomogram (voxel size from the tomogram)."""
    from cryoves.io.tables import read_vesicles

    return read_vesicles(path, voxel_size=voxel_size_a)


def _label_kind(src: TomogramSource) -> str:
    if src.labels_kind != "auto":
        return src.labels_kind
    suffix = Path(src.labels).suffix.lower()
    return "table" if suffix in (".csv", ".star", ".mod", ".tsv") else "labels"


def load_tomogram_source(src: TomogramSource, grid: ModelInfo) -> TrainingVolume:
    """Read a real tomogram with its labels (+ optional region mask) onto the model grid."""
    from cryoves.io import read_tomogram

    tomo = read_tomogram(src.tomogram, voxel_size=src.voxel_size)
    if not tomo.is_isotropic:
        raise InputError(f"{src.tomogram}: anisotropic voxels {tomo.voxel_size} Å; resample it to isotropic first")
    invert = src.invert
    if invert is None:
        from cryoves.preprocess import detect_polarity

        polarity, score = detect_polarity(np.asarray(tomo.data, dtype=np.float32))
        invert = polarity == "dense_bright"
        log.info("%s: polarity %s (score %.3g)", Path(src.tomogram).name, polarity, score)
    image, scale = prepare_image(tomo, grid, invert)
    model_voxel_size_a = grid.voxel_size_a
    kind = _label_kind(src)
    lab_path = Path(src.labels)
    if not lab_path.exists():
        raise InputError(f"labels not found: {lab_path}")
    table: VesicleTable | None = None
    if kind == "table":
        table = _read_table(lab_path, tomo.voxel_size_a)
        grid_table = table_to_grid(table, scale, model_voxel_size_a)
        target = (render_labels(grid_table.centres, grid_table.radii, grid_table.ids, image.shape) > 0).astype(np.uint8)
    else:
        labels = np.asarray(read_tomogram(lab_path, voxel_size=tomo.voxel_size).data)
        if labels.shape != tomo.shape:
            raise FormatError(f"labels {lab_path} have shape {labels.shape}, the tomogram {tomo.shape}")
        fg = labels >= PYTO_FIRST_VESICLE_ID if kind == "pyto" else labels > 0
        target = mask_to_grid(fg, image.shape)
        grid_table = _table_from_binary(target, model_voxel_size_a)
    weight = np.ones(image.shape, np.uint8)
    if src.mask is not None:
        m = np.asarray(read_tomogram(src.mask, voxel_size=tomo.voxel_size).data)
        if m.shape != tomo.shape:
            raise FormatError(f"mask {src.mask} has shape {m.shape}, the tomogram {tomo.shape}")
        weight = mask_to_grid(m, image.shape)
    return TrainingVolume(
        name=Path(src.tomogram).name, image=image, target=target, weight=weight, vesicles=grid_table,
        source_voxel_size_a=tomo.voxel_size_a, scale=scale,
    )


def _table_from_binary(target: np.ndarray, voxel_size_a: float) -> VesicleTable:
    """Spheres of equal volume at the centroids of the connected components (approximate GT)."""
    import cc3d

    lab = cc3d.connected_components(target, connectivity=6)
    return _components_to_table(lab, voxel_size_a)


def _components_to_table(lab: np.ndarray, voxel_size_a: float, min_voxels: int = 1) -> VesicleTable:
    from scipy import ndimage

    n = int(lab.max())
    if n == 0:
        return VesicleTable.empty(voxel_size_a)
    ids = np.arange(1, n + 1)
    counts = np.bincount(lab.ravel(), minlength=n + 1)[1:]
    keep = counts >= min_voxels
    if not keep.any():
        return VesicleTable.empty(voxel_size_a)
    cents = np.asarray(ndimage.center_of_mass(np.ones(lab.shape, np.uint8), lab, ids[keep]), dtype=float)
    radii = np.cbrt(3 * counts[keep] / (4 * np.pi))
    return VesicleTable.from_spheres(cents.reshape(-1, 3), radii, voxel_size_a)


# ---------------------------------------------------------------------- simulations
def simulation_config(seed: int, src: SimulatedSource, model_voxel_size_a: float, large: bool):
    """The randomised :class:`~cryoves.simulate.SimulationConfig` for pool member ``seed`` and the
    radius hint (nm) to shrink it with (None for synaptic-vesicle volumes).

    The simulation grid is chosen so that the volume covers ``src.shape`` on the model grid;
    it is capped at 192 voxels per side (speed), which makes fine-voxel volumes smaller.
    """
    from cryoves.simulate import SimulationConfig, randomize_config

    if src.preset != "randomize":
        return SimulationConfig.preset(src.preset), None
    rng = np.random.default_rng([seed, 7])
    cfg = randomize_config(seed, shape=(32, 32, 32))
    hint = None
    # training boxes are small (~140 × 280 × 280 nm): pack vesicles densely and close to the
    # membrane, else most boxes hold only a handful of them
    changes: dict[str, Any] = dict(
        cluster_distance_nm=float(rng.uniform(15.0, 70.0)),
        vesicle_volume_fraction=float(rng.uniform(0.12, 0.35)),
        cluster_neighbour_prob=float(rng.uniform(0.4, 0.9)),
        pm_position=float(rng.uniform(0.3, 0.9)),
    )
    ice_fraction = float(rng.uniform(0.75, 1.0))
    if large:
        # a pool of large vesicles only (50–150 nm across), seen at the scale predict's size hint uses
        r_mean = float(rng.uniform(30.0, 70.0))
        changes.update(
            radius_mean_nm=r_mean, radius_sd_nm=0.12 * r_mean, large_tail_fraction=0.0,
            large_tail_max_nm=r_mean * 1.5, membrane_thickness_nm=float(rng.uniform(4.0, 11.0)),
            populations=(), cluster_neighbour_prob=float(rng.uniform(0.0, 0.6)),
            gap_max_nm=float(rng.uniform(10.0, 40.0)), vesicle_volume_fraction=float(rng.uniform(0.08, 0.3)),
        )
        hint = r_mean
    eff_model_vs = model_voxel_size_a * (hint / TRAINING_RADIUS_NM if hint else 1.0)
    vs = cfg.voxel_size_a
    if large:
        # fine sampling is wasted when the volume is shrunk a lot afterwards
        vs = float(np.clip(eff_model_vs / rng.uniform(1.2, 2.5), 10.0, 45.0))
        changes["voxel_size_a"] = round(vs, 3)
        changes["post_filter_sigma_nm"] = cfg.post_filter_sigma_nm * vs / cfg.voxel_size_a
    shape = tuple(int(min(192, max(32, round(n * eff_model_vs / vs)))) for n in src.shape)
    ice = ice_fraction * shape[0] * vs / 10.0
    changes.update(shape=shape, ice_thickness_nm=ice)
    return cfg.replace(**changes), hint


def simulate_volume(seed: int, src: SimulatedSource, grid: ModelInfo, large: bool = False) -> TrainingVolume:
    """Simulate one randomised tomogram and bring it onto the model grid."""
    from cryoves.simulate import simulate

    cfg, hint = simulation_config(seed, src, grid.voxel_size_a, large)
    sim = simulate(cfg, seed=seed)
    image, scale = prepare_image(sim.tomogram, grid, invert=False, vesicle_radius_nm=hint)
    target = mask_to_grid(np.asarray(sim.labels) > 0, image.shape)
    vs_grid = sim.tomogram.voxel_size_a / float(np.mean(scale))
    table = table_to_grid(sim.vesicles, scale, vs_grid)
    return TrainingVolume(
        name=f"sim-{seed}{'-large' if large else ''}", image=image, target=target,
        weight=np.ones(image.shape, np.uint8), vesicles=table,
        source_voxel_size_a=sim.tomogram.voxel_size_a, scale=scale,
    )


def _cache_key(seed: int, src: SimulatedSource, grid: ModelInfo, large: bool) -> str:
    """Hash of everything that determines a cached volume: the simulation settings actually used,
    the seed, the model grid and the simulator's source code."""
    cfg, hint = simulation_config(seed, src, grid.voxel_size_a, large)
    grid_key = dict(voxel_size_a=grid.voxel_size_a, normalisation=grid.normalisation, prefilter_sigma=grid.prefilter_sigma)
    d = dict(seed=seed, sim=cfg.to_dict(), hint=hint, grid=grid_key, large=large,
             code=_simulator_fingerprint())
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def _simulator_fingerprint() -> str:
    """Hash of the simulator's source files, so that cached volumes follow simulator changes."""
    import cryoves.simulate as sim_pkg

    h = hashlib.sha256()
    for p in sorted(Path(sim_pkg.__file__).parent.glob("*.py")):
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def cached_simulation(seed: int, src: SimulatedSource, grid: ModelInfo, cache: Path | None,
                      large: bool = False) -> TrainingVolume:
    """:func:`simulate_volume`, stored as ``.npy`` files under ``cache`` and reused when present."""
    if cache is None:
        return simulate_volume(seed, src, grid, large)
    key = _cache_key(seed, src, grid, large)
    folder = Path(cache) / f"sim-{seed}-{key}"
    meta_path = folder / "meta.json"
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
            image = np.load(folder / "image.npy")
            target = np.load(folder / "target.npy")
            df = pd.read_csv(folder / OUTPUT_FILES["vesicles"])
            table = VesicleTable(df, meta["grid_voxel_size_a"])
            return TrainingVolume(
                name=meta["name"], image=image, target=target, weight=np.ones(image.shape, np.uint8),
                vesicles=table, source_voxel_size_a=meta["source_voxel_size_a"], scale=tuple(meta["scale"]),
            )
        except (OSError, ValueError, KeyError) as exc:
            log.warning("ignoring unreadable cached simulation %s: %s", folder, exc)
    vol = simulate_volume(seed, src, grid, large)
    from cryoves.atomic import atomic_path, write_json_atomic

    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in (("image", vol.image), ("target", vol.target)):
        with atomic_path(folder / f"{name}.npy") as tmp:
            np.save(tmp, arr)
    assert vol.vesicles is not None
    vol.vesicles.write_csv(folder / OUTPUT_FILES["vesicles"])
    write_json_atomic(meta_path, dict(name=vol.name, source_voxel_size_a=vol.source_voxel_size_a,
                                      scale=list(vol.scale), grid_voxel_size_a=vol.vesicles.voxel_size))
    return vol


class SimulatedPool:
    """A pool of simulated volumes; optionally one member is replaced every ``refresh_every`` steps.

    Member ``k`` of generation ``g`` uses seed ``seed_offset + base_seed·10⁶ + g·pool_size + k``,
    so runs with the same seed see the same data. Validation volumes use seeds from another range.
    """

    def __init__(self, src: SimulatedSource, grid: ModelInfo, base_seed: int, cache: Path | None):
        self.src = src
        self.grid = grid
        self.base = src.seed_offset + base_seed * 1_000_000
        self.cache = cache
        self.generation = [0] * src.pool_size
        self.volumes: list[TrainingVolume] = []

    def _is_large(self, seed: int) -> bool:
        return bool(np.random.default_rng([seed, 3]).random() < self.src.large_vesicle_fraction)

    def _make(self, seed: int) -> TrainingVolume:
        return cached_simulation(seed, self.src, self.grid, self.cache, self._is_large(seed))

    def seed_of(self, k: int, generation: int) -> int:
        return self.base + generation * self.src.pool_size + k

    def fill(self, progress: bool = False) -> None:
        from tqdm.auto import tqdm

        todo = range(len(self.volumes), self.src.pool_size)
        for k in tqdm(todo, desc="simulating training pool", disable=not progress or not len(todo)):
            self.volumes.append(self._make(self.seed_of(k, 0)))

    def validation_volumes(self) -> list[TrainingVolume]:
        """``val_count`` held-out simulations (seeds disjoint from every training generation)."""
        out = []
        for k in range(self.src.val_count):
            seed = self.base + 900_000 + k
            # validation covers both populations in proportion: every other one large when mixed
            large = self.src.large_vesicle_fraction > 0 and k % 2 == 1
            out.append(cached_simulation(seed, self.src, self.grid, self.cache, large))
        return out

    def refresh(self, step: int) -> None:
        """Replace one member at multiples of ``refresh_every`` steps (round-robin)."""
        r = self.src.refresh_every
        if r <= 0 or step == 0 or step % r:
            return
        n = step // r - 1
        k = n % self.src.pool_size
        self.generation[k] += 1
        self.volumes[k] = self._make(self.seed_of(k, self.generation[k]))

    def summary(self) -> dict[str, Any]:
        return {
            "pool_size": self.src.pool_size,
            "refresh_every": self.src.refresh_every,
            "large_vesicle_fraction": self.src.large_vesicle_fraction,
            "model_grid_shape": list(self.src.shape),
            "source_voxel_sizes_a": [round(float(v.source_voxel_size_a), 2) for v in self.volumes],
            "n_vesicles": int(sum(len(v.vesicles) for v in self.volumes if v.vesicles is not None)),
        }


# ---------------------------------------------------------------------- sampling
def _pad_to(vol: TrainingVolume, p: int) -> TrainingVolume:
    """Pad volumes smaller than the patch (image reflected, weight 0 in the padding)."""
    pads = [(0, max(0, p - s)) for s in vol.image.shape]
    if not any(b for _, b in pads):
        return vol
    mode = "reflect" if all(s > b for s, (_, b) in zip(vol.image.shape, pads, strict=True)) else "edge"
    return dataclasses.replace(
        vol,
        image=np.pad(vol.image, pads, mode=mode),
        target=np.pad(vol.target, pads, mode=mode),
        weight=np.pad(vol.weight, pads, mode="constant"),
        fg_index=np.zeros(0, np.int64),
    )


class PatchSampler:
    """Draws (image, target, weight) batches of cubic patches.

    A patch comes from the simulated pool with probability ``sim_fraction``, else from a real
    volume (uniformly). With probability ``foreground_fraction`` it is centred (± a quarter patch)
    on a random vesicle voxel, else placed uniformly.
    """

    def __init__(self, real: list[TrainingVolume], pool: SimulatedPool | None, sim_fraction: float,
                 patch: int, foreground_fraction: float, rng: np.random.Generator):
        self.real = [_pad_to(v, patch) for v in real]
        self.pool = pool
        self.sim_fraction = sim_fraction if pool is not None else 0.0
        if not self.real:
            self.sim_fraction = 1.0
        self.patch = patch
        self.fg = foreground_fraction
        self.rng = rng

    def _volume(self) -> TrainingVolume:
        if self.pool is not None and self.rng.random() < self.sim_fraction:
            k = int(self.rng.integers(len(self.pool.volumes)))
            vol = self.pool.volumes[k]
            if min(vol.image.shape) < self.patch:
                vol = self.pool.volumes[k] = _pad_to(vol, self.patch)
            return vol
        return self.real[int(self.rng.integers(len(self.real)))]

    def _origin(self, vol: TrainingVolume) -> np.ndarray:
        p = self.patch
        shape = np.asarray(vol.image.shape)
        hi = shape - p
        if vol.fg_index.size and self.rng.random() < self.fg:
            c = np.asarray(np.unravel_index(vol.fg_index[int(self.rng.integers(vol.fg_index.size))], vol.image.shape))
            o = c - p // 2 + self.rng.integers(-(p // 4), p // 4 + 1, size=3)
        else:
            o = np.array([self.rng.integers(0, h + 1) for h in hi])
        return np.clip(o, 0, hi)

    def sample(self, batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Arrays of shape (batch, 1, p, p, p): float32 image, float32 target, float32 weight."""
        p = self.patch
        img = np.empty((batch, 1, p, p, p), np.float32)
        tgt = np.empty_like(img)
        wgt = np.empty_like(img)
        for b in range(batch):
            vol = self._volume()
            z, y, x = self._origin(vol)
            sl = (slice(z, z + p), slice(y, y + p), slice(x, x + p))
            img[b, 0] = vol.image[sl]
            tgt[b, 0] = vol.target[sl]
            wgt[b, 0] = vol.weight[sl]
        return img, tgt, wgt

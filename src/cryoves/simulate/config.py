"""Simulation settings: one dataclass with units in every name, presets, and domain randomisation.

Densities are electrostatic potentials in volts relative to vacuum (vitreous ice ≈ 4 V,
protein/lipid head groups a few volts more); the imaging model turns them into phase shifts.
Geometry is given in nm, the voxel size in Å, arrays are (z, y, x).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cryoves.errors import ParameterError

#: Voxel sizes the simulator accepts (Å); the issue asks for 0.8–4 nm.
MIN_SIM_VOXEL_A = 5.0
MAX_SIM_VOXEL_A = 50.0
POST_FILTERS = ("none", "gaussian", "diffusion")
RECONSTRUCTIONS = ("wbp", "sirt-like")
CTF_CORRECTIONS = ("none", "phase-flip")


@dataclass(frozen=True)
class VesiclePopulation:
    """An extra vesicle population besides the synaptic vesicles (all its members are ground truth).

    ``radius_*_nm`` are outer membrane radii. ``dense_core`` adds a dense granule inside the lumen.
    ``clustered`` places members near the active zone like SVs; otherwise anywhere in the cytosol.
    """

    name: str
    count: int
    radius_mean_nm: float
    radius_sd_nm: float
    membrane_thickness_nm: float = 5.0
    lumen_excess_v: float = 0.15
    dense_core: bool = False
    clustered: bool = False


def dense_core_population(count: int = 6) -> VesiclePopulation:
    """Dense-core vesicles: 70–110 nm across with a dark granule."""
    return VesiclePopulation("dense_core", count, 42.0, 6.0, dense_core=True, lumen_excess_v=0.2)


def large_vesicle_population(count: int = 5) -> VesiclePopulation:
    """Large (50–150 nm across) vesicles, extracellular-vesicle-like, empty lumen."""
    return VesiclePopulation("large", count, 45.0, 12.0, lumen_excess_v=0.1)


@dataclass(frozen=True)
class SimulationConfig:
    """Every parameter of :func:`cryoves.simulate.simulate`.

    Scene (nm unless stated):
        shape: output grid (z, y, x) in voxels; z is the beam axis at 0° tilt.
        voxel_size_a: output voxel size in Å (5–50).
        ice_thickness_nm: thickness of the vitreous-ice slab (centred in z); None → 90 % of the
            box height, at most 250 nm. Above and below the slab is vacuum. A slab thicker than
            the box makes the box a crop inside the ice (vesicles then are cut by the z faces too).
        n_vesicles: number of synaptic vesicles; None → from ``vesicle_volume_fraction``.
        vesicle_volume_fraction: SV volume / presynaptic cytosol volume when ``n_vesicles`` is None.
        radius_mean_nm, radius_sd_nm: outer-radius distribution of SVs (normal).
        large_tail_fraction, large_tail_max_nm: share of SVs drawn uniformly from
            [mean + 2 sd, large_tail_max_nm] (the tail of larger vesicles).
        membrane_thickness_nm: SV bilayer thickness (outer edge to inner edge).
        lumen_excess_v: SV lumen potential above the cytosol background (V).
        gap_min_nm, gap_max_nm: gaps between neighbouring vesicles in a cluster; no two vesicles
            are ever closer than gap_min_nm.
        cluster_neighbour_prob: chance that a new SV is placed right next to an existing one.
        cluster_distance_nm: mean distance of free SVs from the plasma membrane (exponential).
        docked_fraction: share of SVs placed touching the active zone (gap 0.5–3 nm).
        max_vesicles: cap on the SV count derived from ``vesicle_volume_fraction``.
        placement_tries: random positions tried per clustered vesicle before it is given up
            (more tries pack a dense pool closer to the requested fraction; other vesicles get 150).
        coat_fraction: share of SVs carrying surface proteins (0 = no coats).
        coat_density_per_100nm2: protein blobs per 100 nm² of a coated SV's outer surface.
        coat_thickness_nm: how far the blobs reach beyond the outer bilayer edge (nm); the
            ground-truth radius stays the outer edge of the lipid bilayer.
        coat_transmembrane_fraction: share of coat blobs centred inside the outer leaflet
            (transmembrane-like), protruding only ~1–3 nm.
        plasma_membrane, pm_angle_deg, pm_position, pm_curvature_per_um, pm_thickness_nm: the
            presynaptic membrane: a curved sheet through the whole ice, seen as a line in XY;
            its normal lies in the XY plane at ``pm_angle_deg`` from +x; ``pm_position`` is its
            distance from the box centre as a fraction of the half width (positive: towards +x).
        cleft_width_nm, postsynaptic: the synaptic cleft and an opposing postsynaptic membrane.
        active_zone_radius_nm: radius of the active-zone disc on the plasma membrane.
        crowding: scale of the number of cytosolic macromolecule blobs (1 = default density).
        crowding_volume_fraction: volume share of 3–15 nm blobs in the cytosol at crowding = 1.
        crowding_patchiness: relative amplitude of smooth ~100 nm variations of the crowding.
        connectors, tethers: thin filaments between neighbouring SVs and from SVs to the membrane.
        distractors: whether to add mitochondrion, endosomes, microtubules, actin and dense clumps.
        n_endosomes, mitochondrion, n_microtubules, n_actin, n_clumps: their numbers.
        n_gold: 10 nm gold fiducials on the ice surfaces (very dense; they streak). Never ground truth.
        populations: extra vesicle populations (dense-core, large) — ground truth as well.

    Imaging:
        tilt_min_deg, tilt_max_deg, tilt_step_deg: single-axis tilt series about y.
        voltage_kv, cs_mm, amplitude_contrast: microscope.
        defocus_um: underfocus (positive) in µm. bfactor_a2: envelope exp(-B k²/4), Å².
        dose_e_per_a2: total dose over the series (e/Å²), split equally over the tilts.
        inelastic_mfp_nm: inelastic mean free path (zero-loss filtered images lose
            exp(-path/mfp) of the beam).
        noise: add shot noise (False: noise-free projections, still CTF-filtered).
        detector_dqe: detective quantum efficiency; the shot noise is that of dose × DQE.
        alignment_error_nm: sd of random per-tilt image shifts (x and y) left after alignment.
        motion_blur_nm: sd of a Gaussian image blur from beam-induced motion.
        radiation_damage: attenuate each tilt for the dose received before it (dose-symmetric
            order, critical-exposure model of Grant & Grigorieff).
        ctf_correction: "none" (the CTF stays in the images: fringes around dense edges) or
            "phase-flip" (each tilt image's phases are flipped where the CTF is negative).
        reconstruction: "wbp" (weighted back-projection, ramp filter) or "sirt-like"
            (ramp filter modified to mimic ``sirt_iterations`` SIRT iterations).
        radial_cutoff, radial_falloff: Gaussian roll-off of the filter (cycles/pixel, as IMOD).
        post_filter: "none", "gaussian" (sigma ``post_filter_sigma_nm``) or "diffusion"
            (``diffusion_iterations`` steps of edge-preserving anisotropic diffusion).
    """

    shape: tuple[int, int, int] = (256, 256, 256)
    voxel_size_a: float = 22.0
    ice_thickness_nm: float | None = None
    # --- synaptic vesicles
    n_vesicles: int | None = None
    vesicle_volume_fraction: float = 0.10
    radius_mean_nm: float = 20.0
    radius_sd_nm: float = 3.0
    large_tail_fraction: float = 0.05
    large_tail_max_nm: float = 35.0
    membrane_thickness_nm: float = 4.5
    lumen_excess_v: float = 0.15
    gap_min_nm: float = 2.0
    gap_max_nm: float = 10.0
    cluster_neighbour_prob: float = 0.6
    cluster_distance_nm: float = 120.0
    docked_fraction: float = 0.05
    max_vesicles: int = 800
    placement_tries: int = 40
    # --- surface proteins on SVs (off by default)
    coat_fraction: float = 0.0
    coat_density_per_100nm2: float = 2.0
    coat_thickness_nm: float = 5.0
    coat_transmembrane_fraction: float = 0.2
    # --- membranes
    plasma_membrane: bool = True
    pm_angle_deg: float = 0.0
    pm_position: float = 0.55
    pm_curvature_per_um: float = 1.0
    pm_thickness_nm: float = 5.0
    cleft_width_nm: float = 22.0
    postsynaptic: bool = True
    active_zone_radius_nm: float = 150.0
    # --- cytosol and distractors
    crowding: float = 1.0
    crowding_volume_fraction: float = 0.12
    crowding_patchiness: float = 0.4
    connectors: bool = True
    tethers: bool = True
    distractors: bool = True
    n_endosomes: int = 2
    mitochondrion: bool = True
    n_microtubules: int = 1
    n_actin: int = 6
    n_clumps: int = 4
    n_gold: int = 0
    populations: tuple[VesiclePopulation, ...] = field(default_factory=tuple)
    # --- imaging
    tilt_min_deg: float = -60.0
    tilt_max_deg: float = 60.0
    tilt_step_deg: float = 2.0
    voltage_kv: float = 300.0
    cs_mm: float = 2.7
    amplitude_contrast: float = 0.07
    defocus_um: float = 5.0
    bfactor_a2: float = 300.0
    dose_e_per_a2: float = 100.0
    inelastic_mfp_nm: float = 350.0
    noise: bool = True
    detector_dqe: float = 0.7
    alignment_error_nm: float = 0.5
    motion_blur_nm: float = 0.5
    radiation_damage: bool = True
    ctf_correction: str = "none"
    reconstruction: str = "wbp"
    sirt_iterations: int = 15
    radial_cutoff: float = 0.35
    radial_falloff: float = 0.035
    post_filter: str = "none"
    post_filter_sigma_nm: float = 2.0
    diffusion_iterations: int = 5

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in np.broadcast_to(np.asarray(self.shape), (3,)))
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "populations", tuple(self.populations))
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise :class:`ParameterError` for values outside their valid range."""
        if min(self.shape) < 16 or max(self.shape) > 1024:
            raise ParameterError(f"shape {self.shape} must have every side in [16, 1024] voxels")
        if not MIN_SIM_VOXEL_A <= self.voxel_size_a <= MAX_SIM_VOXEL_A:
            raise ParameterError(
                f"voxel size {self.voxel_size_a:g} Å is outside [{MIN_SIM_VOXEL_A:g}, "
                f"{MAX_SIM_VOXEL_A:g}] Å; choose --voxel-size in that range"
            )
        if not (-90 < self.tilt_min_deg < self.tilt_max_deg < 90) or self.tilt_step_deg <= 0:
            raise ParameterError(
                f"tilt range [{self.tilt_min_deg:g}, {self.tilt_max_deg:g}] step {self.tilt_step_deg:g} "
                "is invalid; use -90 < min < max < 90 and a positive step"
            )
        if self.radius_mean_nm <= 2 * self.membrane_thickness_nm or self.radius_sd_nm < 0:
            raise ParameterError(
                f"radius mean {self.radius_mean_nm:g} nm must exceed twice the membrane thickness "
                f"and the sd ({self.radius_sd_nm:g} nm) must be >= 0"
            )
        if not 0 <= self.amplitude_contrast < 1:
            raise ParameterError(f"amplitude contrast {self.amplitude_contrast:g} must be in [0, 1)")
        if self.dose_e_per_a2 <= 0 or self.defocus_um < 0:
            raise ParameterError("dose must be positive and defocus (underfocus, µm) non-negative")
        if self.reconstruction not in RECONSTRUCTIONS:
            raise ParameterError(f"reconstruction '{self.reconstruction}' unknown; use one of {RECONSTRUCTIONS}")
        if self.post_filter not in POST_FILTERS:
            raise ParameterError(f"post filter '{self.post_filter}' unknown; use one of {POST_FILTERS}")
        if not 0 <= self.gap_min_nm <= self.gap_max_nm:
            raise ParameterError("gaps must satisfy 0 <= gap_min_nm <= gap_max_nm")
        if self.ice_thickness_nm is not None and not 10 <= self.ice_thickness_nm <= 2000:
            raise ParameterError(f"ice thickness {self.ice_thickness_nm:g} nm must be in [10, 2000] nm")
        if self.n_vesicles is not None and self.n_vesicles < 0:
            raise ParameterError("n_vesicles must be >= 0")
        if self.max_vesicles < 1 or self.placement_tries < 1:
            raise ParameterError(
                f"max_vesicles ({self.max_vesicles}) and placement_tries ({self.placement_tries}) must be >= 1"
            )
        if not 0 <= self.vesicle_volume_fraction <= 0.6:
            raise ParameterError(
                f"vesicle volume fraction {self.vesicle_volume_fraction:g} must be in [0, 0.6]"
            )
        for name in ("coat_fraction", "coat_transmembrane_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ParameterError(f"{name} {getattr(self, name):g} must be in [0, 1]")
        if not 0 <= self.coat_density_per_100nm2 <= 20:
            raise ParameterError(
                f"coat density {self.coat_density_per_100nm2:g} per 100 nm² must be in [0, 20]"
            )
        if not 1 <= self.coat_thickness_nm <= 20:
            raise ParameterError(f"coat thickness {self.coat_thickness_nm:g} nm must be in [1, 20] nm")
        if self.ctf_correction not in CTF_CORRECTIONS:
            raise ParameterError(
                f"ctf correction '{self.ctf_correction}' unknown; use one of {CTF_CORRECTIONS}"
            )

    # ------------------------------------------------------------------ derived
    @property
    def voxel_size_nm(self) -> float:
        return self.voxel_size_a / 10.0

    @property
    def tilt_angles_deg(self) -> np.ndarray:
        """Tilt angles in degrees, from min to max inclusive (within 1e-6 of the step)."""
        n = int(np.floor((self.tilt_max_deg - self.tilt_min_deg) / self.tilt_step_deg + 1e-6)) + 1
        return self.tilt_min_deg + self.tilt_step_deg * np.arange(n)

    @property
    def ice_nm(self) -> float:
        """Ice-slab thickness in nm actually used."""
        box = self.shape[0] * self.voxel_size_nm
        if self.ice_thickness_nm is None:
            return min(0.9 * box, 250.0)
        return float(self.ice_thickness_nm)

    def replace(self, **overrides: Any) -> SimulationConfig:
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dictionary of every field."""
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        d["populations"] = [dict(p) for p in d["populations"]]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SimulationConfig:
        d = dict(d)
        d["populations"] = tuple(VesiclePopulation(**p) for p in d.get("populations", ()))
        d["shape"] = tuple(d.get("shape", (256, 256, 256)))
        return cls(**d)

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str = "synapse", **overrides: Any) -> SimulationConfig:
        """A named preset with optional field overrides.

        "synapse": 256³ at 22 Å (563 nm box, 250 nm ice), ~150–250 SVs near an active zone, all
        distractors. "small": 64×96×96 at 22 Å inside 200 nm ice (no vacuum in the box) with a
        few vesicles, for unit tests (< 3 s).
        "large-vesicles": synapse plus large 50–150 nm vesicles. "dense-core": synapse plus
        dense-core vesicles.
        Hard cases (default shapes are moderate; benchmarks set their own shape / voxel size):
        "dense-pool": 128×256×256 at 22 Å, SVs fill 22 % of the presynaptic cytosol with
        1–3 nm gaps (~900 SVs at 200×400×400), half of them coated, tilt ±50°, SIRT-like,
        60 e/Å². "uncorrected": 96×192×192 at 14 Å, 7.5 µm underfocus without CTF correction
        (contrast reversed beyond the first CTF zero, kept by a 0.45 radial cutoff), 50 e/Å²,
        half the SVs coated, a dense-ish pool (16 %, 1.5–5 nm gaps). "phase-flipped": the same
        with ``ctf_correction="phase-flip"``.
        Sizes: "mixed-sizes": 128×256×256 at 22 Å, SVs plus eight 40–75 nm vesicles, no
        endosomes (single-sphere endosomes are large vesicles missing from the ground truth).
        "vlp": 96×160×160 at 36 Å, no synapse, 14 virus-like particles (r 55 ± 6 nm, 6 nm
        membrane, dense lumen).
        """
        if name not in PRESETS:
            raise ParameterError(f"unknown preset '{name}'; choose one of {', '.join(PRESETS)}")
        base = dict(PRESETS[name])
        base.update(overrides)
        return cls(**base)


PRESETS: dict[str, dict[str, Any]] = {
    "synapse": {},
    "small": {
        "shape": (64, 96, 96),
        "ice_thickness_nm": 200.0,  # a crop inside the ice (141 nm box): no vacuum slabs
        "n_vesicles": 10,
        "n_endosomes": 1,
        "mitochondrion": False,
        "n_actin": 2,
        "n_clumps": 2,
        "active_zone_radius_nm": 60.0,
        "cluster_distance_nm": 40.0,
        "pm_position": 0.6,
        "tilt_step_deg": 3.0,
    },
    "large-vesicles": {"populations": (large_vesicle_population(6),)},
    "dense-core": {"populations": (dense_core_population(8),)},
    "dense-pool": {
        "shape": (128, 256, 256),
        "vesicle_volume_fraction": 0.22,
        "gap_min_nm": 1.0,
        "gap_max_nm": 3.0,
        "cluster_neighbour_prob": 0.9,
        "max_vesicles": 2500,
        "placement_tries": 200,
        "coat_fraction": 0.5,
        "coat_density_per_100nm2": 3.0,
        "tilt_min_deg": -50.0,
        "tilt_max_deg": 50.0,
        "reconstruction": "sirt-like",
        "dose_e_per_a2": 60.0,
    },
}
PRESETS["uncorrected"] = {
    "shape": (96, 192, 192),
    "voxel_size_a": 14.0,
    "defocus_um": 7.5,
    "ctf_correction": "none",
    "radial_cutoff": 0.45,
    "dose_e_per_a2": 50.0,
    "vesicle_volume_fraction": 0.16,
    "gap_min_nm": 1.5,
    "gap_max_nm": 5.0,
    "cluster_neighbour_prob": 0.8,
    "max_vesicles": 2500,
    "placement_tries": 100,
    "coat_fraction": 0.5,
    "coat_density_per_100nm2": 3.0,
}
PRESETS["phase-flipped"] = {**PRESETS["uncorrected"], "ctf_correction": "phase-flip"}
# SVs and 40-75 nm vesicles in one synapse (the size search must find both populations). No
# endosomes: a third of them are single membrane spheres of 25-100 nm, i.e. large vesicles that
# the ground truth does not list
PRESETS["mixed-sizes"] = {
    "shape": (128, 256, 256),
    "populations": (VesiclePopulation("large", 8, 57.0, 9.0),),
    "n_endosomes": 0,
}
# virus-like particles only: 90-130 nm across, dense lumen
PRESETS["vlp"] = {
    "shape": (96, 160, 160),
    "voxel_size_a": 36.0,
    "n_vesicles": 0,
    "plasma_membrane": False,
    "postsynaptic": False,
    "mitochondrion": False,
    "n_endosomes": 0,
    "populations": (VesiclePopulation("vlp", 14, 55.0, 6.0, membrane_thickness_nm=6.0, lumen_excess_v=0.3),),
}


def randomize_config(rng_or_seed: Any = None, shape: tuple[int, int, int] | None = None) -> SimulationConfig:
    """Draw a configuration from broad ranges (domain randomisation for training).

    Voxel size 8–40 Å, defocus 2–10 µm, dose 60–180 e/Å² (a fifth of the draws 40–60 e/Å²;
    DQE 0.25–0.8), tilt range ±45–±70° at 1.5–4°, B-factor 50–1500 Å², reconstruction and
    post-filter, CTF correction (a third phase-flipped), crowding 0.3–2, SV radius mean 15–28 nm
    and sd 1.5–5 nm, volume fraction 3–20 % (a fifth of the draws: a dense pool of 15–25 % with
    1–1.5 nm minimum gaps), gaps, coats on half of the draws (coat_fraction 0.1–0.8, 1–4 blobs
    per 100 nm², 2–8 nm thick), membrane orientation/curvature, extra populations. ``shape``
    defaults to (128, 192, 192). Fields added later are drawn after the earlier ones, so a seed
    keeps its earlier values unless a dense pool or low dose is drawn for it.
    """
    rng = np.random.default_rng(rng_or_seed)
    shape = (128, 192, 192) if shape is None else tuple(int(s) for s in shape)
    vs = float(np.exp(rng.uniform(np.log(8.0), np.log(40.0))))
    tilt_max = float(rng.uniform(45, 70))
    tilt_min = -float(rng.uniform(45, 70))
    pops: list[VesiclePopulation] = []
    if rng.random() < 0.3:
        pops.append(dense_core_population(int(rng.integers(1, 8))))
    if rng.random() < 0.3:
        pops.append(large_vesicle_population(int(rng.integers(1, 6))))
    radius_mean = float(rng.uniform(15, 28))
    thickness = float(rng.uniform(3.5, 6.0))
    filt = str(rng.choice(["none", "none", "gaussian", "diffusion"]))
    fields: dict[str, Any] = dict(
        shape=shape,
        voxel_size_a=round(vs, 3),
        ice_thickness_nm=float(rng.uniform(0.5, 1.6) * shape[0] * vs / 10.0),
        vesicle_volume_fraction=float(rng.uniform(0.03, 0.2)),
        radius_mean_nm=radius_mean,
        radius_sd_nm=float(rng.uniform(1.5, 5.0)),
        large_tail_fraction=float(rng.uniform(0, 0.15)),
        large_tail_max_nm=radius_mean + float(rng.uniform(10, 25)),
        membrane_thickness_nm=thickness,
        lumen_excess_v=float(rng.uniform(0.0, 0.4)),
        gap_min_nm=float(rng.uniform(1.0, 3.0)),
        gap_max_nm=float(rng.uniform(5.0, 15.0)),
        cluster_neighbour_prob=float(rng.uniform(0.2, 0.9)),
        cluster_distance_nm=float(rng.uniform(40, 250)),
        docked_fraction=float(rng.uniform(0, 0.15)),
        plasma_membrane=bool(rng.random() < 0.85),
        pm_angle_deg=float(rng.uniform(0, 360)),
        pm_position=float(rng.uniform(0.2, 0.9)),
        pm_curvature_per_um=float(rng.uniform(-2, 4)),
        postsynaptic=bool(rng.random() < 0.7),
        active_zone_radius_nm=float(rng.uniform(60, 250)),
        crowding=float(rng.uniform(0.3, 2.0)),
        crowding_patchiness=float(rng.uniform(0.0, 0.7)),
        detector_dqe=float(rng.uniform(0.25, 0.8)),
        alignment_error_nm=float(rng.uniform(0.0, 1.5)),
        motion_blur_nm=float(rng.uniform(0.0, 1.5)),
        connectors=bool(rng.random() < 0.8),
        tethers=bool(rng.random() < 0.8),
        distractors=bool(rng.random() < 0.9),
        n_endosomes=int(rng.integers(0, 4)),
        mitochondrion=bool(rng.random() < 0.5),
        n_microtubules=int(rng.integers(0, 3)),
        n_actin=int(rng.integers(0, 12)),
        n_clumps=int(rng.integers(0, 8)),
        n_gold=int(rng.choice([0, 0, 1, 2, 4])),
        populations=tuple(pops),
        tilt_min_deg=tilt_min,
        tilt_max_deg=tilt_max,
        tilt_step_deg=float(rng.choice([1.5, 2.0, 2.5, 3.0, 4.0])),
        amplitude_contrast=float(rng.uniform(0.05, 0.12)),
        defocus_um=float(rng.uniform(2.0, 10.0)),
        bfactor_a2=float(rng.uniform(50, 1500)),
        dose_e_per_a2=float(rng.uniform(60, 180)),
        reconstruction=str(rng.choice(["wbp", "wbp", "sirt-like"])),
        sirt_iterations=int(rng.integers(5, 30)),
        radial_cutoff=float(rng.uniform(0.3, 0.5)),
        post_filter=filt,
        post_filter_sigma_nm=float(rng.uniform(0.5, 1.5)) * vs / 10.0,
        diffusion_iterations=int(rng.integers(2, 10)),
    )
    # --- later additions: drawn after everything above, so that a seed keeps its earlier values
    # (a dense pool or low dose, when drawn, overrides them)
    coated = rng.random() < 0.5
    fields.update(
        coat_fraction=float(rng.uniform(0.1, 0.8)) if coated else 0.0,
        coat_density_per_100nm2=float(rng.uniform(1.0, 4.0)),
        coat_thickness_nm=float(rng.uniform(2.0, 8.0)),
        coat_transmembrane_fraction=float(rng.uniform(0.0, 0.4)),
        ctf_correction=str(rng.choice(["none", "none", "phase-flip"])),
    )
    if rng.random() < 0.2:  # a dense pool: 15–25 % SVs, 1–3 nm gaps between neighbours
        gap_min = float(rng.uniform(1.0, 1.5))
        fields.update(
            vesicle_volume_fraction=float(rng.uniform(0.15, 0.25)), gap_min_nm=gap_min,
            gap_max_nm=gap_min + float(rng.uniform(1.5, 3.0)),
            cluster_neighbour_prob=float(rng.uniform(0.8, 0.95)), max_vesicles=2500, placement_tries=200,
        )
    if rng.random() < 0.2:  # low dose
        fields["dose_e_per_a2"] = float(rng.uniform(40.0, 60.0))
    return SimulationConfig(**fields)

"""Scene geometry in nm: the plasma membrane, organelles and filaments, and vesicle placement.

Points are (z, y, x) in nm from the centre of voxel (0, 0, 0). Every obstacle exposes a signed
distance (nm, negative inside) so that vesicles can be placed without overlaps.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from cryoves.simulate.config import SimulationConfig, VesiclePopulation

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- plasma membrane
@dataclass
class PlasmaMembrane:
    """A gently curved sheet containing the z axis direction, with an active-zone disc.

    In-plane frame: ``u`` along the normal (in XY), ``w`` along the membrane in XY, ``z``.
    The surface is ``u = offset + curvature/2·w² + wobble(w, z)``; ``u < surface`` is presynaptic.
    """

    centre_nm: np.ndarray  # (3,) box centre (z, y, x)
    angle_rad: float
    offset_nm: float
    curvature_per_nm: float
    wobble_nm: tuple[float, float, float, float]  # amp_w, wavelength_w, amp_z, wavelength_z
    phases: tuple[float, float]
    az_w_nm: float
    az_z_nm: float
    az_radius_nm: float
    thickness_nm: float

    def frame(self, z, y, x):
        """(u, w, zr) coordinates (nm) of points given as broadcastable z, y, x arrays (nm)."""
        cz, cy, cx = self.centre_nm
        ca, sa = np.cos(self.angle_rad), np.sin(self.angle_rad)
        u = (x - cx) * ca + (y - cy) * sa
        w = -(x - cx) * sa + (y - cy) * ca
        return u, w, z - cz

    def surface_u(self, w, zr):
        aw, lw, az, lz = self.wobble_nm
        return (
            self.offset_nm
            + 0.5 * self.curvature_per_nm * w**2
            + aw * np.sin(2 * np.pi * w / lw + self.phases[0])
            + az * np.sin(2 * np.pi * zr / lz + self.phases[1])
        )

    def _slope2(self, w, zr):
        aw, lw, az, lz = self.wobble_nm
        dw = self.curvature_per_nm * w + aw * 2 * np.pi / lw * np.cos(2 * np.pi * w / lw + self.phases[0])
        dz = az * 2 * np.pi / lz * np.cos(2 * np.pi * zr / lz + self.phases[1])
        return dw**2 + dz**2

    def signed_distance(self, z, y, x):
        """Approximate signed distance (nm) to the membrane mid-plane; negative = presynaptic."""
        u, w, zr = self.frame(z, y, x)
        return (u - self.surface_u(w, zr)) / np.sqrt(1.0 + self._slope2(w, zr))

    def point(self, w, zr, d):
        """(…, 3) points (z, y, x, nm) at in-plane position (w, zr) and distance d along -normal side."""
        u = self.surface_u(w, zr) + d
        ca, sa = np.cos(self.angle_rad), np.sin(self.angle_rad)
        cz, cy, cx = self.centre_nm
        x = cx + u * ca - w * sa
        y = cy + u * sa + w * ca
        return np.stack(np.broadcast_arrays(cz + zr, y, x), axis=-1)

    def in_active_zone(self, w, zr):
        return (w - self.az_w_nm) ** 2 + (zr - self.az_z_nm) ** 2 <= self.az_radius_nm**2

    def normal_xy(self) -> tuple[float, float]:
        """Unit normal (y, x) pointing from the presynaptic side into the cleft (flat part)."""
        return float(np.sin(self.angle_rad)), float(np.cos(self.angle_rad))

    def describe(self) -> dict:
        return {
            "centre_nm_zyx": [float(v) for v in self.centre_nm],
            "normal_angle_deg": float(np.degrees(self.angle_rad)),
            "offset_nm": self.offset_nm,
            "curvature_per_um": self.curvature_per_nm * 1000,
            "wobble_nm": list(self.wobble_nm),
            "active_zone_centre_w_z_nm": [self.az_w_nm, self.az_z_nm],
            "active_zone_radius_nm": self.az_radius_nm,
            "thickness_nm": self.thickness_nm,
            "convention": "u=(x-cx)cos(a)+(y-cy)sin(a), w=-(x-cx)sin(a)+(y-cy)cos(a); presynaptic where "
            "u < offset + curvature/2 w^2 + wobble",
        }


# ---------------------------------------------------------------------------- obstacles
@dataclass
class Obstacle:
    """A distractor object. ``kind`` names it; geometry depends on the kind.

    sphere-like objects: ``centres`` (k, 3) and ``radii`` (k,) (union of spheres);
    ellipsoid: ``centres`` (1, 3), ``axes`` (3,) semi-axes (nm) and ``rotation`` (3, 3);
    filaments: ``path`` (m, 3) polyline and ``radius``.
    """

    kind: str
    centres: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    radii: np.ndarray = field(default_factory=lambda: np.zeros(0))
    axes: np.ndarray | None = None
    rotation: np.ndarray | None = None
    path: np.ndarray | None = None
    radius: float = 0.0

    def signed_distance(self, p: np.ndarray) -> np.ndarray:
        """Signed distance (nm, negative inside) of points p (n, 3)."""
        p = np.atleast_2d(p)
        if self.kind == "mitochondrion":
            q = (p - self.centres[0]) @ self.rotation
            k0 = np.linalg.norm(q / self.axes, axis=1)
            k1 = np.linalg.norm(q / self.axes**2, axis=1)
            return k0 * (k0 - 1.0) / np.maximum(k1, 1e-9)
        if self.path is not None:
            return _polyline_distance(p, self.path) - self.radius
        d = np.linalg.norm(p[:, None, :] - self.centres[None], axis=2) - self.radii[None]
        return d.min(axis=1)

    def bounding_sphere(self) -> tuple[np.ndarray, float]:
        if self.kind == "mitochondrion":
            return self.centres[0], float(self.axes.max())
        if self.path is not None:
            c = self.path.mean(axis=0)
            return c, float(np.linalg.norm(self.path - c, axis=1).max() + self.radius)
        c = self.centres.mean(axis=0)
        return c, float((np.linalg.norm(self.centres - c, axis=1) + self.radii).max())

    def describe(self, voxel_nm: float) -> dict:
        c, r = self.bounding_sphere()
        return {"kind": self.kind, "z": c[0] / voxel_nm, "y": c[1] / voxel_nm, "x": c[2] / voxel_nm,
                "extent_radius_nm": r}


def _polyline_distance(p: np.ndarray, path: np.ndarray) -> np.ndarray:
    a, b = path[:-1], path[1:]
    ab = b - a
    t = np.einsum("nsk,sk->ns", p[:, None, :] - a[None], ab) / np.maximum((ab * ab).sum(1), 1e-9)
    t = np.clip(t, 0, 1)
    closest = a[None] + t[..., None] * ab[None]
    return np.linalg.norm(p[:, None, :] - closest, axis=2).min(axis=1)


# ---------------------------------------------------------------------------- layout
@dataclass
class Layout:
    """Everything placed in the scene, in nm."""

    box_nm: np.ndarray  # (3,) extent (z, y, x) of voxel centres: (shape-1)*voxel
    ice_z_nm: tuple[float, float]
    membrane: PlasmaMembrane | None
    obstacles: list[Obstacle]
    centres_nm: np.ndarray  # (n, 3)
    radii_nm: np.ndarray  # (n,)
    population: np.ndarray  # (n,) str
    thickness_nm: np.ndarray  # (n,)
    lumen_excess_v: np.ndarray  # (n,)
    dense_core: np.ndarray  # (n,) bool
    cluster_centre_nm: np.ndarray  # (3,)


def make_membrane(cfg: SimulationConfig, rng: np.random.Generator, box: np.ndarray, ice) -> PlasmaMembrane:
    centre = box / 2
    angle = np.radians(cfg.pm_angle_deg)
    half = 0.5 * (abs(np.cos(angle)) * box[2] + abs(np.sin(angle)) * box[1])
    ice_mid = 0.5 * (ice[0] + ice[1]) - centre[0]
    return PlasmaMembrane(
        centre_nm=centre,
        angle_rad=float(angle),
        offset_nm=float(cfg.pm_position * half),
        curvature_per_nm=cfg.pm_curvature_per_um / 1000.0,
        wobble_nm=(float(rng.uniform(2, 8)), float(rng.uniform(150, 400)),
                   float(rng.uniform(1, 6)), float(rng.uniform(150, 400))),
        phases=(float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(0, 2 * np.pi))),
        az_w_nm=float(rng.normal(0, 0.1 * box[1])),
        az_z_nm=float(ice_mid),
        az_radius_nm=cfg.active_zone_radius_nm,
        thickness_nm=cfg.pm_thickness_nm,
    )


class _Placer:
    """Random sequential placement of spheres with gaps, inside the box/ice and outside obstacles."""

    def __init__(self, cfg, box, ice, membrane, obstacles):
        self.cfg, self.box, self.ice, self.membrane, self.obstacles = cfg, box, ice, membrane, obstacles
        self.centres = np.zeros((0, 3))
        self.radii = np.zeros(0)

    def fits(self, c: np.ndarray, r: float, pm_gap: float) -> bool:
        if np.any(c < 0) or np.any(c > self.box):
            return False
        if c[0] - r < self.ice[0] + 1.0 or c[0] + r > self.ice[1] - 1.0:
            return False
        if self.membrane is not None:
            if self.membrane.signed_distance(c[0], c[1], c[2]) > -(r + pm_gap + self.membrane.thickness_nm / 2):
                return False
        if len(self.radii):
            gaps = np.linalg.norm(self.centres - c, axis=1) - self.radii - r
            if gaps.min() < self.cfg.gap_min_nm:
                return False
        for ob in self.obstacles:
            if ob.signed_distance(c[None])[0] < r + self.cfg.gap_min_nm:
                return False
        return True

    def add(self, c, r):
        self.centres = np.vstack([self.centres, c[None]])
        self.radii = np.append(self.radii, r)


def _random_dirs(rng, n):
    v = rng.normal(size=(n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _sv_radii(cfg: SimulationConfig, rng, n: int) -> np.ndarray:
    r = rng.normal(cfg.radius_mean_nm, cfg.radius_sd_nm, n)
    lo = cfg.radius_mean_nm + 2 * cfg.radius_sd_nm
    tail = rng.random(n) < cfg.large_tail_fraction
    r[tail] = rng.uniform(lo, max(lo + 1e-3, cfg.large_tail_max_nm), tail.sum())
    return np.clip(r, 2 * cfg.membrane_thickness_nm + 1.0, None)


def place_obstacles(cfg, rng, box, ice, membrane, cluster_centre) -> list[Obstacle]:
    """Distractors in the presynaptic cytosol (kept away from the vesicle cluster where possible)."""
    if not cfg.distractors:
        return []
    obs: list[Obstacle] = []
    ice_h = ice[1] - ice[0]
    # counts are per synapse-preset volume (~500 × 500 × 300 nm); smaller boxes get fewer
    frac = min(1.0, ice_h * box[1] * box[2] / 7.5e7)

    def scaled(n: int) -> int:
        x = n * frac
        return int(np.floor(x) + (rng.random() < x - np.floor(x)))

    r_max = max(25.0, min(70.0, 0.3 * float(min(box[1], box[2]))))

    def presyn(p, margin):
        return membrane is None or membrane.signed_distance(p[0], p[1], p[2]) < -margin

    def free(c, r):
        return all(o.signed_distance(c[None])[0] > r + 5 for o in obs)

    def random_point():
        return np.array([rng.uniform(*ice), rng.uniform(0, box[1]), rng.uniform(0, box[2])])

    if cfg.mitochondrion and rng.random() < 3 * frac:
        for _ in range(50):
            axes = np.array([min(rng.uniform(0.3, 0.45) * ice_h, 90.0), rng.uniform(60, 100), rng.uniform(150, 300)])
            axes = np.minimum(axes, [0.45 * ice_h, 0.35 * box[1], 0.45 * box[2]])
            c = random_point()
            c[0] = 0.5 * (ice[0] + ice[1])
            rot = _rotation_z(rng.uniform(0, np.pi))
            ob = Obstacle("mitochondrion", centres=c[None], axes=axes, rotation=rot)
            if presyn(c, axes.max() + 10) and np.linalg.norm(c - cluster_centre) > axes.max() + 60:
                obs.append(ob)
                break
    for _ in range(scaled(cfg.n_endosomes)):
        for _ in range(50):
            c = random_point()
            k = int(rng.integers(1, 4))
            rr = rng.uniform(25, r_max, k)
            cc = c + rng.normal(0, 1, (k, 3)) * rr[:, None] * 0.7
            cc[:, 0] = np.clip(cc[:, 0], ice[0] + rr + 3, ice[1] - rr - 3)
            if np.any(rr * 2 > ice_h - 8):
                continue
            ob = Obstacle("endosome", centres=cc, radii=rr)
            cen, rad = ob.bounding_sphere()
            if presyn(cen, rad + 5) and free(cen, rad) and np.linalg.norm(cen - cluster_centre) > rad + 40:
                obs.append(ob)
                break
    for _ in range(scaled(cfg.n_clumps)):
        for _ in range(30):
            c = random_point()
            r = rng.uniform(10, 30)
            if (presyn(c, r + 5) and free(c, r) and ice[0] + r < c[0] < ice[1] - r
                    and np.linalg.norm(c - cluster_centre) > r + 30):
                obs.append(Obstacle("dense_clump", centres=c[None], radii=np.array([r])))
                break
    # fiducials sit on the top or bottom ice surface, where that surface is inside the box
    surfaces = [s for s, inside in ((ice[0] + 5.0, ice[0] > 0), (ice[1] - 5.0, ice[1] < box[0])) if inside]
    for _ in range(cfg.n_gold if surfaces else 0):
        c = np.array([surfaces[int(rng.integers(len(surfaces)))], rng.uniform(0, box[1]), rng.uniform(0, box[2])])
        if free(c, 5.0):
            obs.append(Obstacle("gold", centres=c[None], radii=np.array([5.0])))
    for kind, n, radius in (("microtubule", cfg.n_microtubules, 12.5), ("actin", cfg.n_actin, 3.5)):
        if ice_h < 2 * radius + 10:  # too thin for this filament
            continue
        for _ in range(scaled(n) if kind == "actin" else n):
            for _ in range(30):
                path = _filament_path(rng, box, ice, long=(kind == "microtubule"))
                ob = Obstacle(kind, path=path, radius=radius)
                mids = path[::4]
                if all(presyn(p, radius + 3) for p in mids) and all(
                    o.signed_distance(mids).min() > radius + 3 for o in obs
                ):
                    obs.append(ob)
                    break
    return obs


def _rotation_z(a: float) -> np.ndarray:
    """Rotation (z, y, x) about z (in-plane)."""
    c, s = np.cos(a), np.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def _filament_path(rng, box, ice, long: bool) -> np.ndarray:
    """A gently curved polyline (nm) mostly in XY, of 20 nodes."""
    margin = min(20.0, 0.49 * (ice[1] - ice[0]))
    start = np.array([rng.uniform(ice[0] + margin, ice[1] - margin), rng.uniform(0, box[1]), rng.uniform(0, box[2])])
    length = rng.uniform(0.8, 1.5) * box[1:].max() if long else rng.uniform(80, 300)
    d = _random_dirs(rng, 1)[0]
    d[0] *= 0.2
    d /= np.linalg.norm(d)
    bend = rng.normal(0, 0.05 if long else 0.1, (19, 3))
    pts = [start]
    for i in range(19):
        d = d + bend[i]
        d[0] *= 0.8
        d /= np.linalg.norm(d)
        pts.append(pts[-1] + d * length / 19)
    path = np.array(pts)
    if long:
        path -= path.mean(axis=0) - np.array([0.5 * (ice[0] + ice[1]), rng.uniform(0, box[1]), rng.uniform(0, box[2])])
    m = min(15.0, 0.49 * (ice[1] - ice[0]))
    path[:, 0] = np.clip(path[:, 0], ice[0] + m, ice[1] - m)
    return path


def layout_scene(cfg: SimulationConfig, rng: np.random.Generator) -> Layout:
    """Place the membrane, distractors and all vesicles (nm)."""
    v = cfg.voxel_size_nm
    box = (np.asarray(cfg.shape, dtype=float) - 1) * v
    ice_h = cfg.ice_nm
    ice = (0.5 * box[0] - ice_h / 2, 0.5 * box[0] + ice_h / 2)
    membrane = make_membrane(cfg, rng, box, ice) if cfg.plasma_membrane else None
    if membrane is not None:
        cluster_centre = membrane.point(membrane.az_w_nm, membrane.az_z_nm, -min(cfg.cluster_distance_nm, 0.3 * box[2]))
        cluster_centre = np.asarray(cluster_centre, dtype=float).reshape(3)
    else:
        cluster_centre = np.array(
            [0.5 * (ice[0] + ice[1]), rng.uniform(0.3, 0.7) * box[1], rng.uniform(0.3, 0.7) * box[2]])
    # the part of the ice inside the box: where things are sampled (a thick slab is cropped)
    ice_in = (max(ice[0], 0.0), min(ice[1], box[0]))
    obstacles = place_obstacles(cfg, rng, box, ice_in, membrane, cluster_centre)
    placer = _Placer(cfg, box, ice, membrane, obstacles)

    pops: list[tuple[VesiclePopulation, int]] = []
    n_sv = cfg.n_vesicles
    if n_sv is None:
        n_sv = _auto_count(cfg, box, ice, membrane)
    sv = VesiclePopulation("sv", n_sv, cfg.radius_mean_nm, cfg.radius_sd_nm,
                           cfg.membrane_thickness_nm, cfg.lumen_excess_v, False, True)
    # big ones first: they are the hardest to fit
    pops = [(p, p.count) for p in cfg.populations] + [(sv, n_sv)]
    names, thick, lumen, core = [], [], [], []
    for pop, n in pops:
        if pop.name == "sv":
            radii = _sv_radii(cfg, rng, n)
        else:
            radii = rng.normal(pop.radius_mean_nm, pop.radius_sd_nm, n)
            radii = np.clip(radii, 2 * pop.membrane_thickness_nm + 2, None)
        placed = 0
        for r in radii:
            if _place_one(placer, cfg, rng, membrane, cluster_centre, box, ice, r, pop.clustered):
                placed += 1
                names.append(pop.name)
                thick.append(pop.membrane_thickness_nm)
                lumen.append(pop.lumen_excess_v)
                core.append(pop.dense_core)
        if placed < n:
            log.info("placed %d of %d %s vesicles (no room for the rest)", placed, n, pop.name)
    return Layout(
        box_nm=box, ice_z_nm=ice, membrane=membrane, obstacles=obstacles,
        centres_nm=placer.centres, radii_nm=placer.radii, population=np.array(names, dtype=object),
        thickness_nm=np.array(thick, dtype=float), lumen_excess_v=np.array(lumen, dtype=float),
        dense_core=np.array(core, dtype=bool), cluster_centre_nm=cluster_centre,
    )


def _auto_count(cfg, box, ice, membrane) -> int:
    # presynaptic share of the box estimated on a coarse grid
    g = [np.linspace(ice[0], ice[1], 9), np.linspace(0, box[1], 17), np.linspace(0, box[2], 17)]
    z, y, x = np.meshgrid(*g, indexing="ij")
    share = 1.0 if membrane is None else float((membrane.signed_distance(z, y, x) < 0).mean())
    vol = share * (ice[1] - ice[0]) * box[1] * box[2]
    mean_vol = 4 / 3 * np.pi * (cfg.radius_mean_nm**3 + 3 * cfg.radius_mean_nm * cfg.radius_sd_nm**2)
    return int(min(cfg.max_vesicles, max(1, round(cfg.vesicle_volume_fraction * vol / mean_vol))))


def _place_one(placer, cfg, rng, membrane, cluster_centre, box, ice, r, clustered) -> bool:
    for _ in range(cfg.placement_tries if clustered else 150):
        pm_gap = cfg.gap_min_nm
        if clustered and len(placer.radii) and rng.random() < cfg.cluster_neighbour_prob:
            j = int(rng.integers(len(placer.radii)))
            d = _random_dirs(rng, 1)[0]
            c = placer.centres[j] + d * (placer.radii[j] + r + rng.uniform(cfg.gap_min_nm, cfg.gap_max_nm))
        elif clustered and membrane is not None:
            if rng.random() < cfg.docked_fraction:
                pm_gap = 0.3
                ang, rad = rng.uniform(0, 2 * np.pi), membrane.az_radius_nm * np.sqrt(rng.random())
                dist = -(r + membrane.thickness_nm / 2 + rng.uniform(0.5, 3.0))
            else:
                # spreads are capped by the box so that small boxes still get a cluster
                lateral = min(1.3 * membrane.az_radius_nm, 0.5 * float(box.max()))
                depth = min(cfg.cluster_distance_nm, 0.3 * float(box[1:].max()))
                ang, rad = rng.uniform(0, 2 * np.pi), abs(rng.normal(0, lateral))
                dist = -(r + membrane.thickness_nm / 2 + cfg.gap_min_nm + rng.exponential(depth))
            w = membrane.az_w_nm + rad * np.cos(ang)
            zr = membrane.az_z_nm + rad * np.sin(ang)
            c = np.asarray(membrane.point(w, zr, dist), dtype=float).reshape(3)
        elif clustered:
            c = cluster_centre + rng.normal(0, 1, 3) * np.minimum(cfg.cluster_distance_nm, 0.25 * box)
            c[0] = rng.uniform(*_z_range(ice, box, r))
        else:
            c = np.array([rng.uniform(*_z_range(ice, box, r)), rng.uniform(0, box[1]), rng.uniform(0, box[2])])
        if placer.fits(c, r, pm_gap):
            placer.add(c, r)
            return True
    return False


def _z_range(ice, box, r) -> tuple[float, float]:
    """z range (nm) for the centre of a sphere of radius r: inside the box and fully in the ice."""
    lo, hi = max(ice[0] + r + 1.0, 0.0), min(ice[1] - r - 1.0, box[0])
    return lo, max(lo, hi)

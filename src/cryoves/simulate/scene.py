"""Render a :class:`~cryoves.simulate.geometry.Layout` into a potential map (volts, (z, y, x)).

Thin layers (membrane leaflets) are evaluated analytically at voxel centres with their width
widened by the voxel's own blur (σ² + v²/12) and their amplitude scaled to keep the projected
mass, so a 4.5 nm bilayer keeps its mass and position at any voxel size from 0.5 to 5 nm
without building a finer grid. Small particles (crowding blobs, filament subunits, connectors)
are splatted as weighted points (trilinear) and blurred with a Gaussian per size class.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from cryoves.simulate.config import SimulationConfig
from cryoves.simulate.geometry import Layout, Obstacle

log = logging.getLogger(__name__)

ICE_V = 4.0  # vitreous ice mean inner potential
CYTOSOL_V = 0.25  # small solutes above ice in cytosol
CLEFT_V = 0.1
PROTEIN_V = 2.5  # peak excess potential of a macromolecule blob
HEADGROUP_V = 3.0  # peak excess of a lipid head-group layer (at 0.45 nm sigma)
LEAFLET_SIGMA_NM = 0.45
TAIL_V = -0.3  # lipid tails are a little below ice/cytosol


@dataclass
class SceneVolumes:
    potential: np.ndarray  # float32 (z, y, x), volts
    cytoplasm_mask: np.ndarray  # bool
    active_zone_mask: np.ndarray  # bool
    pm_distance_nm: np.ndarray | None  # float32 signed distance to the plasma membrane


class _Splats:
    """Point sources grouped by Gaussian sigma (nm); rendered all at once."""

    def __init__(self, shape, voxel_nm):
        self.shape, self.v = shape, voxel_nm
        self.groups: dict[float, list[tuple[np.ndarray, np.ndarray]]] = {}

    def add(self, points_nm: np.ndarray, peak_v: np.ndarray | float, sigma_nm: float) -> None:
        """Gaussian blobs of peak ``peak_v`` (V) and width ``sigma_nm`` at ``points_nm`` (n, 3)."""
        pts = np.asarray(points_nm, dtype=float).reshape(-1, 3)
        peak = np.broadcast_to(np.asarray(peak_v, dtype=float), (len(pts),))
        s = round(float(sigma_nm), 2)
        self.groups.setdefault(s, []).append((pts, peak))

    def render(self, out: np.ndarray) -> None:
        """Add every blob to ``out``, each evaluated exactly on the voxels within 3 sigma."""
        for sigma_nm in sorted(self.groups):
            pts = np.concatenate([p for p, _ in self.groups[sigma_nm]]) / self.v
            peak = np.concatenate([w for _, w in self.groups[sigma_nm]])
            # widen by the voxel (box average) and keep the mass
            s = np.sqrt((sigma_nm / self.v) ** 2 + 1 / 12)
            peak = peak * (sigma_nm / self.v / s) ** 3
            _add_gaussians(out, pts, peak.astype(np.float32), s)


def _add_gaussians(out: np.ndarray, centres: np.ndarray, peak: np.ndarray, sigma_vox: float,
                   chunk_entries: int = 8_000_000) -> None:
    """Add isotropic Gaussians (peak value, sigma in voxels) at fractional voxel centres (n, 3)."""
    shape = np.asarray(out.shape)
    half = max(int(np.ceil(3 * sigma_vox)), 1)
    offs = np.arange(-half, half + 1)
    k = len(offs)
    flat = out.reshape(-1)
    per = max(1, chunk_entries // k**3)
    for a in range(0, len(centres), per):
        c = centres[a : a + per]
        base = np.rint(c).astype(np.int64)
        idx = base[:, :, None] + offs[None, None, :]  # (n, 3, k)
        g = np.exp(-0.5 * ((idx - c[:, :, None]) / sigma_vox) ** 2).astype(np.float32)
        g *= ((idx >= 0) & (idx < shape[None, :, None]))
        idx = np.clip(idx, 0, shape[None, :, None] - 1)
        w = (peak[a : a + per, None, None, None] * g[:, 0, :, None, None] * g[:, 1, None, :, None]
             * g[:, 2, None, None, :])
        lin = ((idx[:, 0, :, None, None] * shape[1] + idx[:, 1, None, :, None]) * shape[2]
               + idx[:, 2, None, None, :])
        flat += np.bincount(lin.ravel(), weights=w.ravel(), minlength=flat.size).astype(np.float32)


def layer(d: np.ndarray, centre_nm: float, sigma_nm: float, peak_v: float, voxel_nm: float) -> np.ndarray:
    """Gaussian layer across signed distance ``d`` (nm), widened by the voxel, mass-preserving."""
    s_eff = np.sqrt(sigma_nm**2 + voxel_nm**2 / 12.0)
    return (peak_v * sigma_nm / s_eff) * np.exp(-0.5 * ((d - centre_nm) / s_eff) ** 2)


def bilayer(d: np.ndarray, thickness_nm: float, voxel_nm: float) -> np.ndarray:
    """Bilayer profile across ``d`` = signed distance to the OUTER surface (nm, < 0 inside).

    Two head-group layers at 0.9 nm inside each edge and a slightly light tail region; the
    outer edge (d = 0) is where the outer head-group density has fallen to ~1/7 of its peak.
    """
    h = min(0.9, 0.25 * thickness_nm)
    out = layer(d, -h, LEAFLET_SIGMA_NM, HEADGROUP_V, voxel_nm)
    out += layer(d, -(thickness_nm - h), LEAFLET_SIGMA_NM, HEADGROUP_V, voxel_nm)
    out += layer(d, -thickness_nm / 2, max(thickness_nm / 2 - h, 0.3) / 1.5, TAIL_V, voxel_nm)
    return out


def smooth_step(d: np.ndarray, width_nm: float) -> np.ndarray:
    """≈1 where d << 0, 0 where d >> 0 (logistic edge)."""
    return 1.0 / (1.0 + np.exp(np.clip(d / max(width_nm, 1e-3), -50, 50)))


def _box(centre_nm, extent_nm, v, shape):
    lo = np.maximum(np.floor((np.asarray(centre_nm) - extent_nm) / v).astype(int), 0)
    hi = np.minimum(np.ceil((np.asarray(centre_nm) + extent_nm) / v).astype(int) + 1, shape)
    if np.any(hi <= lo):
        return None
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    grids = np.meshgrid(*[np.arange(a, b) * v for a, b in zip(lo, hi)], indexing="ij", sparse=True)
    return sl, grids


def render_scene(cfg: SimulationConfig, lay: Layout, rng: np.random.Generator) -> SceneVolumes:
    """Potential map (V), cytoplasm and active-zone masks for a layout."""
    shape, v = cfg.shape, cfg.voxel_size_nm
    z = (np.arange(shape[0]) * v)[:, None, None]
    y = (np.arange(shape[1]) * v)[None, :, None]
    x = (np.arange(shape[2]) * v)[None, None, :]
    ice = smooth_step(np.maximum(lay.ice_z_nm[0] - z, z - lay.ice_z_nm[1]), 1.0).astype(np.float32)
    pot = np.broadcast_to(ICE_V * ice, shape).astype(np.float32)
    mem = lay.membrane
    region = np.broadcast_to(ice, shape).astype(np.float32)  # crowding weight
    if mem is not None:
        dpm = mem.signed_distance(z, y, x).astype(np.float32)
        pre = smooth_step(dpm + mem.thickness_nm / 2, 1.0)
        region = region * pre
        post_d = dpm - (cfg.cleft_width_nm + mem.thickness_nm)
        cleft = (1 - pre) * smooth_step(post_d, 1.0) if cfg.postsynaptic else 1 - pre
        post = (1 - pre) * (1 - smooth_step(post_d - mem.thickness_nm / 2, 1.0)) if cfg.postsynaptic else 0 * pre
        pot += ice * (CYTOSOL_V * (pre + post) + CLEFT_V * cleft)
        region = region + ice * (0.25 * cleft + 0.8 * post)
        offsets = [mem.thickness_nm / 2] + ([cfg.cleft_width_nm + mem.thickness_nm] if cfg.postsynaptic else [])
        for off in offsets:  # only voxels near the sheet are evaluated
            near = np.flatnonzero(np.abs(dpm - off) < mem.thickness_nm + 3 * v + 3)
            dn = dpm.reshape(-1)[near] - off
            pot.reshape(-1)[near] += np.broadcast_to(ice, shape).reshape(-1)[near] * bilayer(dn, mem.thickness_nm, v)
        cyto = (dpm < -mem.thickness_nm / 2) & (ice > 0.5)
    else:
        dpm = None
        pot += ice * CYTOSOL_V
        cyto = np.broadcast_to(ice > 0.5, shape).copy()
    region = np.ascontiguousarray(region, dtype=np.float32)

    splats = _Splats(shape, v)
    exclusion = np.zeros(shape, dtype=bool)
    for ob in lay.obstacles:
        _render_obstacle(ob, pot, exclusion, splats, rng, v, shape)
    for c, r in zip(lay.centres_nm, lay.radii_nm):
        b = _box(c, r, v, shape)
        if b is not None:
            sl, (gz, gy, gx) = b
            exclusion[sl] |= (gz - c[0]) ** 2 + (gy - c[1]) ** 2 + (gx - c[2]) ** 2 <= r * r
    region[exclusion] = 0

    crowd = np.zeros(shape, dtype=np.float32)
    blob_splats = _Splats(shape, v)
    _add_crowding(cfg, lay, region, blob_splats, rng, v)
    if mem is not None:
        _add_active_zone_material(cfg, lay, blob_splats, rng, v)
    blob_splats.render(crowd)
    mean_crowd = float(crowd[cyto & ~exclusion].mean()) if np.any(cyto & ~exclusion) else 0.0
    pot += crowd
    del crowd

    if cfg.connectors or cfg.tethers:
        _add_connectors(cfg, lay, splats, rng)
    _render_vesicles(lay, pot, v, shape, mean_crowd, rng)
    if cfg.coat_fraction > 0 and cfg.coat_density_per_100nm2 > 0:  # last draws: off = unchanged scene
        _add_coats(cfg, lay, splats, rng)
    splats.render(pot)

    az = np.zeros(shape, dtype=bool)
    if mem is not None:
        near = np.flatnonzero((np.abs(dpm) <= mem.thickness_nm / 2 + 0.5 * v) & (ice > 0.5))
        iz, iy, ix = np.unravel_index(near, shape)
        _, w, zr = mem.frame(iz * v, iy * v, ix * v)
        az.reshape(-1)[near[mem.in_active_zone(w, zr)]] = True
    return SceneVolumes(potential=pot, cytoplasm_mask=cyto, active_zone_mask=az, pm_distance_nm=dpm)


def _patch_field(box_nm, amount: float, rng):
    """A smooth random density modulation (≈100 nm patches), mean 1, in [1 - amount, 1 + amount].

    Returns a function of points (n, 3) in nm; evaluated only where blobs are placed.
    """
    from scipy import ndimage

    coarse_shape = [max(2, int(np.ceil(b / 100.0)) + 1) for b in box_nm]
    coarse = rng.uniform(-1, 1, coarse_shape)

    def at(points_nm: np.ndarray) -> np.ndarray:
        if amount <= 0 or len(points_nm) == 0:
            return np.ones(len(points_nm))
        idx = points_nm / np.maximum(np.asarray(box_nm), 1e-9) * (np.asarray(coarse_shape) - 1)
        return 1.0 + amount * np.clip(ndimage.map_coordinates(coarse, idx.T, order=3, mode="nearest"), -1, 1)

    return at


def _render_vesicles(lay: Layout, pot, v, shape, mean_crowd, rng) -> None:
    for k, (c, r) in enumerate(zip(lay.centres_nm, lay.radii_nm)):
        b = _box(c, r + 3, v, shape)
        if b is None:
            continue
        sl, (gz, gy, gx) = b
        dist = np.sqrt((gz - c[0]) ** 2 + (gy - c[1]) ** 2 + (gx - c[2]) ** 2)
        t = lay.thickness_nm[k]
        d = dist - r
        val = bilayer(d, t, v)
        val += (mean_crowd + lay.lumen_excess_v[k]) * smooth_step(d + t, 0.5)
        if lay.dense_core[k]:
            core_r = (r - t) * rng.uniform(0.55, 0.8)
            val += 1.2 * PROTEIN_V * smooth_step(dist - core_r, 1.5)
        pot[sl] += val.astype(np.float32)


def _render_obstacle(ob: Obstacle, pot, exclusion, splats, rng, v, shape) -> None:
    if ob.kind in ("microtubule", "actin"):
        _filament_points(ob, splats, rng)
        return
    cen, rad = ob.bounding_sphere()
    if ob.kind == "gold":
        splats.add(ob.centres, GOLD_V, sigma_nm=2.5)
        return
    if ob.kind == "dense_clump":
        n = int(rng.integers(15, 40))
        pts = cen + rng.normal(0, 0.45 * rad, (n, 3))
        splats.add(pts, rng.uniform(1.0, 2.0, n) * PROTEIN_V, sigma_nm=float(rng.uniform(3, 5)))
        return
    b = _box(cen, rad + 4, v, shape)
    if b is None:
        return
    sl, (gz, gy, gx) = b
    pts = np.stack(np.broadcast_arrays(gz, gy, gx), axis=-1).reshape(-1, 3)
    d = ob.signed_distance(pts).reshape(np.broadcast_shapes(gz.shape, gy.shape, gx.shape))
    exclusion[sl] |= d < 0
    if ob.kind == "endosome":
        val = bilayer(d, 5.0, v) + 0.35 * smooth_step(d + 5.0, 0.8)
    else:  # mitochondrion: outer + inner membrane, dense matrix, lamellar cristae
        inner = d + 8.0
        val = bilayer(d, 5.5, v) + bilayer(inner, 5.5, v)
        matrix = smooth_step(inner + 5.5, 0.8)
        q = (pts - ob.centres[0]) @ ob.rotation
        long_ax = q[:, 2].reshape(d.shape)
        # irregular lamellar cristae: flat sacs across the long axis at random spacing and tilt
        span = float(ob.axes[2])
        pos = -span + np.cumsum(rng.uniform(25, 70, int(2 * span / 25) + 2))
        pos = pos[pos < span]
        tilt = rng.normal(0, 0.25, (len(pos), 2))
        depth = rng.uniform(20, 60, len(pos))
        crista = np.zeros(d.shape, dtype=np.float32)
        for p0, (ta, tb), dep in zip(pos, tilt, depth):
            sdist = (long_ax - p0 - ta * q[:, 0].reshape(d.shape) - tb * q[:, 1].reshape(d.shape))
            near = np.abs(sdist) < 16
            if near.any():
                reach = smooth_step(-(inner[near] + 5.5) - dep, 3.0)  # grows from the inner membrane
                crista[near] = np.maximum(crista[near], bilayer(np.abs(sdist[near]) - 7.0, 5.0, v) * (1 - reach))
        crista *= matrix
        val = val + crista + 0.6 * matrix
        inside = np.argwhere(matrix.ravel() > 0.5).ravel()
        if len(inside):
            pick = rng.choice(inside, size=min(len(inside), int(len(inside) * v**3 / 400) + 1), replace=False)
            splats.add(pts[pick], rng.uniform(0.3, 1.0, len(pick)) * PROTEIN_V, sigma_nm=2.0)
    pot[sl] += val.astype(np.float32)


def _filament_points(ob: Obstacle, splats, rng) -> None:
    path = ob.path
    seg = np.diff(path, axis=0)
    seglen = np.linalg.norm(seg, axis=1)
    length = seglen.sum()
    step = 4.0 if ob.kind == "microtubule" else 2.75
    s = np.arange(0, length, step)
    cum = np.concatenate([[0], np.cumsum(seglen)])
    i = np.clip(np.searchsorted(cum, s, side="right") - 1, 0, len(seg) - 1)
    t = ((s - cum[i]) / seglen[i])[:, None]
    axis_pts = path[i] + t * seg[i]
    tang = seg[i] / seglen[i][:, None]
    ref = np.where(np.abs(tang[:, :1]) < 0.9, np.array([[1.0, 0, 0]]), np.array([[0, 1.0, 0]]))
    e1 = np.cross(tang, ref)
    e1 /= np.linalg.norm(e1, axis=1, keepdims=True)
    e2 = np.cross(tang, e1)
    if ob.kind == "microtubule":
        angles = 2 * np.pi * np.arange(13) / 13
        phase = (s / step * 2 * np.pi * 3 / 13)[:, None] / 13
        a = angles[None, :] + phase
        ring = np.cos(a)[..., None] * e1[:, None, :] + np.sin(a)[..., None] * e2[:, None, :]
        pts = axis_pts[:, None, :] + 11.0 * ring
        splats.add(pts.reshape(-1, 3), 0.6 * PROTEIN_V, sigma_nm=1.8)
    else:
        a = s / 2.75 * np.radians(166.0)
        pts = axis_pts + 2.2 * (np.cos(a)[:, None] * e1 + np.sin(a)[:, None] * e2)
        splats.add(pts, 0.9 * PROTEIN_V, sigma_nm=1.6)


def _add_crowding(cfg, lay, region, splats, rng, v) -> None:
    """Macromolecules 3–15 nm: Gaussian blobs in four size classes, some in small clusters."""
    shape = region.shape
    vol = float(np.prod(shape)) * v**3
    patch = _patch_field((np.asarray(shape) - 1) * v, cfg.crowding_patchiness, rng)
    for sigma_nm, share in ((1.3, 0.35), (2.0, 0.3), (3.0, 0.2), (4.5, 0.15)):
        blob_vol = (2 * np.pi) ** 1.5 * sigma_nm**3
        n = int(cfg.crowding * cfg.crowding_volume_fraction * share * vol / blob_vol)
        if n == 0:
            continue
        pts = rng.uniform(0, 1, (n, 3)) * (np.asarray(shape) - 1) * v
        # a third of the blobs come in small irregular groups (complexes of several units)
        grp = rng.random(n) < 0.33
        pts[grp] = pts[rng.integers(0, n, grp.sum())] + rng.normal(0, 1.6 * sigma_nm, (grp.sum(), 3))
        idx = np.clip(np.rint(pts / v).astype(int), 0, np.asarray(shape) - 1)
        w = region[idx[:, 0], idx[:, 1], idx[:, 2]] * patch(pts)
        keep = w > 0.01
        splats.add(pts[keep], PROTEIN_V * w[keep] * rng.uniform(0.3, 1.0, keep.sum()), sigma_nm)


def _add_active_zone_material(cfg, lay, splats, rng, v) -> None:
    """Dense projections on the cytoplasmic face of the active zone."""
    mem = lay.membrane
    n = int(mem.az_radius_nm**2 * np.pi / 60)
    ang = rng.uniform(0, 2 * np.pi, n)
    rad = mem.az_radius_nm * np.sqrt(rng.random(n))
    w = mem.az_w_nm + rad * np.cos(ang)
    zr = mem.az_z_nm + rad * np.sin(ang)
    d = -(mem.thickness_nm / 2 + rng.exponential(7.0, n))
    pts = np.asarray(mem.point(w, zr, d)).reshape(-1, 3)
    splats.add(pts, rng.uniform(0.4, 1.0, n) * PROTEIN_V, sigma_nm=2.0)


#: size classes (sigma, nm) of surface proteins on coated SVs: 3–6 nm across
COAT_SIGMAS_NM = (1.2, 1.5, 1.9, 2.5)


def _add_coats(cfg, lay, splats, rng) -> None:
    """Surface proteins on a share (``coat_fraction``) of the SVs: Gaussian blobs on the outside.

    Per coated SV, Poisson(``coat_density_per_100nm2`` × area/100 nm²) blobs at uniform
    directions with σ from :data:`COAT_SIGMAS_NM` and peak 0.4–1 × PROTEIN_V (like cytosolic
    proteins). A blob's centre lies σ + U(0, coat_thickness − 2σ) outside the outer bilayer edge,
    so that it reaches about ``coat_thickness_nm`` at most; a share
    (``coat_transmembrane_fraction``) sits in the outer leaflet instead and protrudes 1–3 nm.
    Blobs that would lie inside another vesicle or beyond the plasma membrane are dropped.
    """
    c, r = lay.centres_nm, lay.radii_nm
    sv = np.flatnonzero(lay.population == "sv")
    if len(sv) == 0:
        return
    coated = sv[rng.random(len(sv)) < cfg.coat_fraction]
    area = 4 * np.pi * r[coated] ** 2
    counts = rng.poisson(cfg.coat_density_per_100nm2 * area / 100.0)
    owner = np.repeat(coated, counts)
    n = len(owner)
    if n == 0:
        return
    dirs = _unit_vectors(rng, n)
    cls = rng.integers(0, len(COAT_SIGMAS_NM), n)
    sigma = np.asarray(COAT_SIGMAS_NM)[cls]
    out = sigma + rng.random(n) * np.maximum(cfg.coat_thickness_nm - 2 * sigma, 0.0)
    tm = rng.random(n) < cfg.coat_transmembrane_fraction
    out[tm] = -rng.uniform(0.3, 0.5, tm.sum()) * lay.thickness_nm[owner[tm]]
    peak = rng.uniform(0.4, 1.0, n) * PROTEIN_V
    pts = c[owner] + dirs * (r[owner] + out)[:, None]
    keep = np.ones(n, dtype=bool)
    # neither inside a neighbouring vesicle nor across the plasma membrane
    reach = float(r.max()) + cfg.coat_thickness_nm + 3.0
    ends = np.cumsum(counts)
    for k, a, b in zip(coated, ends - counts, ends):
        near = np.flatnonzero(np.linalg.norm(c - c[k], axis=1) < r[k] + reach)
        near = near[near != k]
        if len(near) == 0 or a == b:
            continue
        mine = slice(a, b)
        d = np.linalg.norm(pts[mine, None, :] - c[None, near, :], axis=2) - r[near][None]
        keep[mine] &= (d > 0.5 * sigma[mine, None]).all(axis=1)
    if lay.membrane is not None:
        dpm = lay.membrane.signed_distance(pts[:, 0], pts[:, 1], pts[:, 2])
        keep &= dpm < -(lay.membrane.thickness_nm / 2 + 0.5 * sigma)
    for k, s_nm in enumerate(COAT_SIGMAS_NM):
        sel = keep & (cls == k)
        if sel.any():
            splats.add(pts[sel], peak[sel], sigma_nm=s_nm)


def _unit_vectors(rng, n: int) -> np.ndarray:
    u = rng.normal(size=(n, 3))
    return u / np.linalg.norm(u, axis=1, keepdims=True)


GOLD_V = 30.0  # gold's mean inner potential is far above protein's


def _add_connectors(cfg, lay, splats, rng) -> None:
    """Thin (≈3 nm) filaments between close neighbours and from vesicles to the membrane."""
    c, r = lay.centres_nm, lay.radii_nm
    segs = []
    if cfg.connectors and len(r) > 1:
        dist = np.linalg.norm(c[:, None] - c[None], axis=2) - r[:, None] - r[None]
        i, j = np.nonzero(np.triu(dist < 12.0, 1))
        for a, b in zip(i, j):
            if rng.random() < 0.6:
                u = (c[b] - c[a]) / np.linalg.norm(c[b] - c[a])
                ua = u + rng.normal(0, 0.25, 3)
                ua /= np.linalg.norm(ua)
                p0 = c[a] + ua * r[a]
                ub = -u + rng.normal(0, 0.25, 3)
                ub /= np.linalg.norm(ub)
                segs.append((p0, c[b] + ub * r[b]))
    mem = lay.membrane
    if cfg.tethers and mem is not None and len(r):
        d = mem.signed_distance(c[:, 0], c[:, 1], c[:, 2])
        ny, nx = mem.normal_xy()
        normal = np.array([0.0, ny, nx])
        for k in np.nonzero(-d - r < 45.0)[0]:
            for _ in range(int(rng.integers(1, 4))):
                dirn = normal + rng.normal(0, 0.3, 3)
                dirn /= np.linalg.norm(dirn)
                p0 = c[k] + dirn * r[k]
                length = max(-d[k] - r[k] - mem.thickness_nm / 2, 1.0)
                segs.append((p0, p0 + normal * length))
    pts = []
    for p0, p1 in segs:
        n = max(int(np.linalg.norm(p1 - p0) / 1.0), 2)
        pts.append(p0 + np.linspace(0, 1, n)[:, None] * (p1 - p0))
    if pts:
        # points 1 nm apart overlap: per-point peak chosen so the line peaks near 0.8·PROTEIN_V
        splats.add(np.concatenate(pts), 0.27 * PROTEIN_V, sigma_nm=1.2)

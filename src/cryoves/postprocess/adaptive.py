"""Labelling and adaptive local thresholds: from a thresholded probability map to one object per vesicle.

Connected components use 6-connectivity everywhere. Merged vesicles are split in two passes:

1. by the map: the threshold is raised locally (to 0.99 at most) until the object falls apart (recursively); the voxels
   of the merged object that drop below the new threshold are given back to the nearest piece by a
   watershed on the probability, so nothing is lost;
2. by the shape: in dense pools (coats fill the 1-3 nm gaps, the missing wedge smears vesicles along z)
   the map can stay near 1 between neighbours, so every object is also cut at the necks between the
   balls it holds (seeded watershed on its distance transform, z distances x 1.5 against the wedge
   elongation). Over-split pieces are rejoined after the sphere fit (:func:`rejoin_duplicate_pieces`).
   Measured on dense simulated pools (dev seeds, not the benchmark's): recall after the split step
   0.848 -> 0.882 and 0.925 -> 0.941, no merged objects left; z factor 1.5 vs 1: +0.2-0.4 % F1.

Partly detected vesicles are grown by lowering the threshold locally. Objects are finally discarded by
extent (unless a ball of half the minimum radius fits inside) and by a minimum volume (a ball of
``min_radius_nm``). All boxes are clipped to the volume.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import cc3d
import numpy as np
import pandas as pd
from scipy.ndimage import binary_dilation
from skimage.segmentation import watershed

from cryoves.errors import ParameterError
from cryoves.postprocess._common import (
    bounding_box,
    check_volume,
    check_voxel_size,
    label_statistics,
    rejected_rows,
    relabel,
    sphere_pairs,
)

log = logging.getLogger(__name__)

CONNECTIVITY = 6


@dataclass(frozen=True)
class _Obj:
    id: int
    volume: int
    extent: float
    box: tuple[slice, slice, slice]
    centroid: np.ndarray


def _objects(labels: np.ndarray) -> list[_Obj]:
    st = label_statistics(labels)
    out = []
    for i, (n, bb) in enumerate(zip(st["voxel_counts"], st["bounding_boxes"])):
        if i == 0 or bb is None or n == 0:
            continue
        bvol = np.prod([s.stop - s.start for s in bb])
        out.append(_Obj(i, int(n), float(n) / float(bvol), bb, np.asarray(st["centroids"][i], float)))
    return out


def _objects_in(labels: np.ndarray, box: tuple[slice, ...], ids) -> dict[int, _Obj]:
    """The objects ``ids`` of ``labels`` that lie wholly inside ``box``, measured there: the numbers
    :func:`_objects` gives for them (integer coordinate sums / count), without a pass over the volume."""
    sub = labels[box]
    out = {}
    for i in ids:
        idx = np.nonzero(sub == i)
        n = len(idx[0])
        if not n:
            continue
        bb = tuple(slice(int(a.min()) + s.start, int(a.max()) + 1 + s.start) for a, s in zip(idx, box))
        bvol = np.prod([b.stop - b.start for b in bb])
        sums = np.array([int(a.sum()) + n * s.start for a, s in zip(idx, box)], np.int64)
        out[int(i)] = _Obj(int(i), n, float(n) / float(bvol), bb, sums / np.float64(n))
    return out


def _pad_box(box: tuple[slice, ...], pad: int, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """Enlarge a box by ``pad`` voxels per side, clipped to the volume (never a negative start)."""
    return tuple(slice(max(s.start - pad, 0), min(s.stop + pad, n)) for s, n in zip(box, shape))


def _equiv_radius(volume: float) -> float:
    return float((3.0 * volume / (4.0 * np.pi)) ** (1.0 / 3.0))


def _split_thresholds(t0: float) -> np.ndarray:
    """The thresholds tried by the map split: 0.01 ... 0.99 above ``t0``.

    The original went on in steps of 0.001 and 0.0001 up to 0.9999. Up there the lumen of a single
    vesicle falls apart into islands of its plateau: on the 200x400x400 speed tomogram 209 of 393
    single-vesicle objects split at 0.997-0.9998, every merged pair below 0.88, and in dense pools no
    merged object split first above 0.99. Those pieces were fitted, rejoined and fitted again, and a
    large vesicle's fit then started from whichever pieces were rejoined. Without the two finer
    ladders (dev seeds 501-506 and 601-606, both models): the same vesicles within one per
    tomogram, Dice and centre error equal or better (large vesicles and VLPs: Δc 0.1-1.3 nm
    smaller on five of six), and 32 instead of 324 splits on the speed tomogram.
    """
    t = np.round(np.arange(0.01, 1.0, 0.01), 6)
    return t[t > t0 + 1e-9]


def _try_split(prob_box: np.ndarray, obj: np.ndarray, t0: float, min_piece: int) -> tuple[np.ndarray, float] | None:
    """Raise the threshold inside ``obj`` until it has >= 2 pieces of >= ``min_piece`` voxels.

    Returns (piece labels 1..k over all of ``obj``, threshold) or None when it never separates.
    The number of big pieces at every threshold comes from one union-find pass over the object's
    voxels (:func:`~cryoves.postprocess._label_kernels.big_pieces_per_level`), the pieces from one
    labelling at the threshold found: the result of labelling at each threshold in turn.
    """
    from cryoves.postprocess import _label_kernels

    bb = bounding_box(obj)
    p, o = prob_box[bb], obj[bb]
    levels = _split_thresholds(t0)
    vmax = float(p[o].max(initial=-np.inf))
    # the lowest threshold at which the object holds two big pieces; above its maximum it is empty
    counts = _label_kernels.big_pieces_per_level(np.ascontiguousarray(p), np.ascontiguousarray(o), levels, min_piece)
    hit = np.flatnonzero((counts >= 2) & (levels < vmax))
    if not len(hit):
        return None
    th = levels[hit[0]]
    lab = cc3d.connected_components((p > th) & o, connectivity=CONNECTIVITY, out_dtype=np.uint32)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    big = np.flatnonzero(sizes >= min_piece)
    remap = np.zeros(len(sizes), dtype=np.int32)
    remap[big] = np.arange(1, len(big) + 1)
    markers = np.zeros(prob_box.shape, np.int32)
    markers[bb] = remap[lab]
    pieces = watershed(-prob_box.astype(np.float64), markers, mask=obj, connectivity=1)
    return pieces.astype(np.int32), float(th)


def _distance_inside(mask: np.ndarray, z_scale: float = 1.0) -> np.ndarray:
    """Distance (voxels, z distances x ``z_scale``) of every voxel of ``mask`` to the nearest voxel
    outside it; the edge of the array counts as outside."""
    import edt

    return edt.edt(mask.astype(np.uint8), anisotropy=(z_scale, 1.0, 1.0), black_border=True).astype(np.float64)


def _inscribed_radius(mask: np.ndarray) -> float:
    """Radius (voxels) of the largest ball inside ``mask``."""
    return float(_distance_inside(mask).max()) if mask.any() else 0.0


def _give_fresh_ids(lab_box: np.ndarray, obj: np.ndarray, pieces: np.ndarray, next_id: int) -> np.ndarray:
    """Write pieces 1..k of ``obj`` into ``lab_box`` (in place) as ids ``next_id`` ...; returns those ids."""
    new_ids = np.arange(next_id, next_id + int(pieces.max()), dtype=np.uint32)
    lab_box[obj] = new_ids[pieces[obj] - 1]
    return new_ids


def _elongation(mask: np.ndarray) -> float:
    """Largest distance of a voxel from the object's centroid over its equivalent-ball radius.

    About 1 for a ball; about 1.6 for two touching equal balls."""
    pts = np.argwhere(mask).astype(np.float64)
    if len(pts) < 2:
        return 1.0
    dmax = np.sqrt(((pts - pts.mean(axis=0)) ** 2).sum(axis=1).max()) + 0.5
    return float(dmax / _equiv_radius(len(pts)))


def _needs_split(volume: int, extent: float, elong: float, stats: tuple[float, float, float], opts: dict) -> bool:
    mean_v, std_v, median_v = stats
    z = (volume - mean_v) / std_v if std_v > 0 else 0.0
    if extent < opts["split_extent"] and z > opts["split_zscore"]:
        return True
    return volume > opts["split_volume_factor"] * median_v or elong > opts["split_elongation"]


#: Placeholder ids of the pieces a worker makes (far above any real id); the caller turns them
#: into the ids the sequential algorithm gives, in its order.
_LOCAL_IDS = np.uint32(2**31)


def _separate(prob, labels, threshold, min_piece, opts, objects: dict[int, _Obj]) -> int:
    """Split merged objects in place; return the number of splits. ``objects`` (id -> object, of
    ``labels``) is kept up to date.

    Each merged object is split recursively on its own (on the worker processes); the pieces get
    the ids of a depth-first pass over the objects from the last to the first, in one process."""
    from cryoves import parallel

    objs = [objects[i] for i in sorted(objects)]
    if len(objs) < 2:
        return 0
    vols = np.array([o.volume for o in objs], float)
    stats = (vols.mean(), vols.std(), float(np.median(vols)))
    todo = [o for o in objs if _needs_split(o.volume, o.extent, _elongation(labels[o.box] == o.id), stats, opts)]
    tasks = []
    for o in todo:
        pbox = _pad_box(o.box, opts["box_pad"], labels.shape)
        tasks.append((prob[pbox], labels[pbox], o.id, tuple(s.start for s in pbox), labels.shape, threshold,
                      stats, min_piece, opts))
    done = parallel.pmap(_split_many, parallel.chunks(tasks))
    results = [r for chunk in done for r in chunk]
    next_id = max(objects) + 1
    n_splits = 0
    for o, (made, n_new, n) in reversed(list(zip(todo, results, strict=True))):
        if not n:
            continue
        lab_box = labels[_pad_box(o.box, opts["box_pad"], labels.shape)]
        lab_box[lab_box == o.id] = np.where(made >= _LOCAL_IDS, made - _LOCAL_IDS + np.uint32(next_id), made)
        del objects[o.id]
        objects.update(_objects_in(labels, o.box, range(next_id, next_id + n_new)))
        next_id += n_new
        n_splits += n
    return n_splits


def _split_many(tasks: list) -> list:
    return [_split_recursive(*t) for t in tasks]


def _split_recursive(prob_box, lab_box, oid, origin, shape, threshold, stats, min_piece, opts):
    """One merged object split recursively in its padded box (a copy): (its voxels' final ids,
    with pieces numbered from :data:`_LOCAL_IDS` in the sequential order, number of new ids,
    number of splits)."""
    lab_box = lab_box.copy()
    own = lab_box == oid
    full = tuple(slice(o, o + n) for o, n in zip(origin, lab_box.shape))
    next_id, n_splits = _LOCAL_IDS, 0
    queue = [(oid, tuple(slice(0, n) for n in lab_box.shape), threshold, 0)]  # boxes local to lab_box
    while queue:
        pid, box, t0, depth = queue.pop()
        if depth >= opts["max_split_depth"]:
            continue
        # the padded box of the sequential algorithm, in this box's coordinates
        gbox = tuple(slice(b.start + f.start, b.stop + f.start) for b, f in zip(box, full))
        pbox = tuple(slice(g.start - f.start, g.stop - f.start)
                     for g, f in zip(_pad_box(gbox, opts["box_pad"], shape) if depth else gbox, full))
        sub = lab_box[pbox]
        obj = sub == pid
        res = _try_split(prob_box[pbox], obj, t0, min_piece)
        if res is None:
            continue
        pieces, th = res
        n_splits += 1
        new_ids = _give_fresh_ids(sub, obj, pieces, int(next_id))
        next_id += np.uint32(len(new_ids))
        for j, nid in enumerate(new_ids, start=1):
            pm = pieces == j
            idx = np.nonzero(pm)
            sbox = tuple(slice(int(i.min()) + s.start, int(i.max()) + 1 + s.start) for i, s in zip(idx, pbox))
            vol = int(pm.sum())
            ext = vol / float(np.prod([s.stop - s.start for s in sbox]))
            if _needs_split(vol, ext, _elongation(pm), stats, opts):
                queue.append((int(nid), sbox, th, depth + 1))
    return lab_box[own], int(next_id - _LOCAL_IDS), n_splits


def _h_maxima(image: np.ndarray, h: float) -> np.ndarray:
    """``skimage.morphology.h_maxima(image, h) > 0`` for a float64 ``image`` (the same voxels: the
    same shift by h and rounding allowance), with a compiled reconstruction 4x faster than skimage's."""
    from cryoves.postprocess import _label_kernels

    if h > np.ptp(image):
        return np.zeros(image.shape, bool)
    shifted = image - h - 2 * np.finfo(image.dtype).resolution * np.abs(image)
    return (image - _label_kernels.reconstruct_by_dilation(shifted, image)) >= h


def _split_by_shape(obj: np.ndarray, depth: float, min_core: float, z_scale: float) -> np.ndarray | None:
    """Pieces (1..k over ``obj``) from a seeded watershed on the distance transform, or None.

    Seeds are the maxima of the distance to the background (z distances x ``z_scale``, which undoes
    part of the missing-wedge elongation) that rise at least ``depth`` voxels above the saddle to any
    higher one and lie at least ``min_core`` voxels deep: touching balls meet at a neck, whatever the
    probability does between them.
    """
    dist = _distance_inside(obj, z_scale)
    if dist.max() < min_core + depth:
        return None
    peaks = _h_maxima(dist, depth) & (dist >= min_core)
    markers = cc3d.connected_components(peaks, connectivity=26, out_dtype=np.uint32)
    if markers.max() < 2:
        return None
    return watershed(-dist, markers.astype(np.int32), mask=obj, connectivity=1).astype(np.int32)


def _separate_by_shape(labels, min_r_vox, opts, objects: dict[int, _Obj]) -> int:
    """Split every object whose shape holds several balls (see :func:`_split_by_shape`), in place
    (``objects`` kept up to date); the objects are examined on the worker processes, the fresh ids
    given here in object order."""
    from cryoves import parallel

    depth = opts["shape_depth"] * min_r_vox
    min_core = opts["shape_min_core"] * min_r_vox
    # an object smaller than the ball its deepest voxel must be the centre of cannot be split (half
    # the objects of a dense pool: the tiny ones, 15 % of this step's time)
    fewest = _voxels_within(min_core + depth, opts["shape_z_scale"])
    objs = [objects[i] for i in sorted(objects) if objects[i].volume >= fewest]
    boxes = [_pad_box(o.box, 1, labels.shape) for o in objs]
    tasks = [(labels[b] == o.id, depth, min_core, opts["shape_z_scale"]) for o, b in zip(objs, boxes, strict=True)]
    done = parallel.pmap(_shape_many, parallel.chunks(tasks))
    next_id = max(objects, default=0) + 1
    n = 0
    for o, (obj, *_), pbox, pieces in zip(objs, tasks, boxes, (p for chunk in done for p in chunk), strict=True):
        if pieces is None:
            continue
        new_ids = _give_fresh_ids(labels[pbox], obj, pieces, next_id)
        del objects[o.id]
        objects.update(_objects_in(labels, o.box, new_ids))
        next_id += len(new_ids)
        n += 1
    return n


def _voxels_within(d: float, z_scale: float) -> int:
    """Voxels around a voxel nearer than ``d`` (z distances x ``z_scale``), a little fewer for float
    rounding: a voxel at distance >= ``d`` from an object's outside has all of them in the object."""
    r = d - 1e-3
    k = int(np.ceil(r))
    z, y, x = np.ogrid[-k : k + 1, -k : k + 1, -k : k + 1]
    return int(np.count_nonzero((z * z_scale) ** 2 + y**2 + x**2 < r * r))


def _shape_many(tasks: list) -> list:
    return [_split_by_shape(*t) for t in tasks]


def _expand(prob, labels, threshold, min_vol, opts, objects: dict[int, _Obj]) -> int:
    """Grow objects smaller than ``min_vol`` by lowering the threshold locally (``objects`` kept up
    to date); return how many grew."""
    n = 0
    pad = opts["expand_pad"]
    steps = np.arange(threshold - opts["expand_step"], opts["expand_min"] - 1e-9, -opts["expand_step"])
    for o in [objects[i] for i in sorted(objects)]:
        if o.volume >= min_vol:
            continue
        pbox = _pad_box(o.box, pad, labels.shape)
        lab_box = labels[pbox]
        obj = lab_box == o.id
        pb = prob[pbox]
        for th in steps:
            comp_lab = cc3d.connected_components(pb > th, connectivity=CONNECTIVITY, out_dtype=np.uint32)
            cid = np.bincount(comp_lab[obj]).argmax()
            if cid == 0:
                break
            comp = comp_lab == cid
            others = comp & (lab_box != 0) & ~obj
            # reaching the box face (not the volume face) means the component leaks into the background
            touches_border = any(
                (comp.take(0, axis=a).any() and s.start > 0) or (comp.take(-1, axis=a).any() and s.stop < labels.shape[a])
                for a, s in enumerate(pbox)
            )
            if others.any() or touches_border:
                break
            if comp.sum() >= min_vol:
                lab_box[comp] = o.id
                objects.update(_objects_in(labels, pbox, [o.id]))
                n += 1
                break
    return n


def label_vesicles(
    prob: np.ndarray,
    threshold: float,
    voxel_size_a: float,
    min_radius_nm: float = 12.0,
    *,
    min_volume_fraction: float = 0.5,
    separate: bool = True,
    shape_split: bool = True,
    shape_depth: float = 0.2,
    shape_min_core: float = 0.5,
    shape_z_scale: float = 1.5,
    expand: bool = True,
    extent_range: tuple[float, float] = (0.25, 0.75),
    min_inscribed: float = 0.5,
    split_extent: float = 0.5,
    split_zscore: float = 1.0,
    split_volume_factor: float = 1.8,
    split_elongation: float = 1.3,
    max_split_depth: int = 4,
    box_pad: int = 10,
    expand_step: float = 0.025,
    expand_min: float = 0.5,
) -> tuple[np.ndarray, pd.DataFrame]:
    """Label vesicles in a probability map (z, y, x) thresholded at ``threshold``.

    Steps: 6-connected components of ``prob > threshold``; if ``separate``, merged objects (extent <
    ``split_extent`` with volume z-score > ``split_zscore``, volume > ``split_volume_factor`` x the
    median, or elongation -- farthest voxel from the centroid over the equivalent-ball radius -- above
    ``split_elongation``) are split by raising the threshold locally (fresh ids, recursive up to ``max_split_depth``);
    if ``shape_split``, every object is then cut at the necks between the balls it holds: seeds are the
    maxima of its distance transform (z distances x ``shape_z_scale``) at least ``shape_min_core`` x the
    minimum radius deep and ``shape_depth`` x the minimum radius above their saddles;
    if ``expand``, objects smaller than the minimum volume are grown by lowering the threshold in steps of
    ``expand_step`` down to ``expand_min`` (never into a neighbour); finally objects with extent outside
    ``extent_range`` or volume below ``min_volume_fraction`` x a ball of radius ``min_radius_nm`` (nm;
    ``voxel_size_a`` in Å) are removed. The fraction (default 0.5, the original used 1) allows for the
    thresholded object being smaller than the vesicle; the exact radius rule is applied to the fitted
    spheres (:func:`cryoves.postprocess.outliers.repair`). An object below the extent range is kept when
    a ball of ``min_inscribed`` x ``min_radius_nm`` fits inside it: the irregular pieces of a split pool
    (extent 0.2-0.25, measured on dense simulated pools) are vesicles, membrane sheets and filaments
    hold no such ball; the sphere fit and QC judge what is kept. Returns (uint32 labels, rejected table with
    step ``"label"``); ids are not renumbered.
    """
    prob = check_volume(prob, "probability map")
    vs = check_voxel_size(voxel_size_a)
    if not 0.0 <= threshold < 1.0:
        raise ParameterError(f"threshold must be in [0, 1), got {threshold}")
    if min_radius_nm < 0:
        raise ParameterError(f"min_radius_nm must be >= 0, got {min_radius_nm}")
    opts = dict(
        split_extent=split_extent,
        split_zscore=split_zscore,
        split_volume_factor=split_volume_factor,
        split_elongation=split_elongation,
        max_split_depth=max_split_depth,
        box_pad=int(box_pad),
        expand_step=expand_step,
        expand_min=expand_min,
    )
    min_r_vox = min_radius_nm * 10.0 / vs
    if not 0.0 <= min_volume_fraction <= 1.0:
        raise ParameterError(f"min_volume_fraction must be between 0 and 1, got {min_volume_fraction}")
    min_vol = min_volume_fraction * 4.0 / 3.0 * np.pi * min_r_vox**3
    labels = cc3d.connected_components(prob > threshold, connectivity=CONNECTIVITY, out_dtype=np.uint32)
    # measured once; each step below updates the objects it changes (a pass over a 315 M-voxel
    # volume takes 0.6 s)
    objects = {o.id: o for o in _objects(labels)}
    log.info("threshold %.3f: %d connected components", threshold, len(objects))
    if separate:
        min_piece = max(8, int(0.1 * min_vol))
        n = _separate(prob, labels, threshold, min_piece, opts, objects)
        log.info("split %d merged objects", n)
    if shape_split:
        opts.update(shape_depth=shape_depth, shape_min_core=shape_min_core, shape_z_scale=shape_z_scale)
        n = _separate_by_shape(labels, min_r_vox, opts, objects)
        log.info("split %d objects holding several balls", n)
    if expand:
        opts["expand_pad"] = int(np.ceil(2 * min_r_vox)) + 2
        n = _expand(prob, labels, threshold, min_vol, opts, objects)
        log.info("grew %d partly detected objects", n)
    rejected: list[tuple[int, np.ndarray, float, str]] = []
    objs = [objects[i] for i in sorted(objects)]
    drop = np.zeros(max(objects, default=0) + 1, dtype=bool)
    for o in objs:
        reason = None
        if o.volume < min_vol:
            reason = (
                f"volume {o.volume} voxels below {min_volume_fraction:g} x a {min_radius_nm:g} nm ball "
                f"({min_vol:.0f} voxels)"
            )
        elif o.extent < extent_range[0] and _inscribed_radius(labels[o.box] == o.id) < min_inscribed * min_r_vox:
            reason = (
                f"extent {o.extent:.2f} below {extent_range[0]:g} and no ball of {min_inscribed:g} x "
                f"{min_radius_nm:g} nm inside (not ball-like)"
            )
        elif o.extent > extent_range[1]:
            reason = f"extent {o.extent:.2f} above {extent_range[1]:g} (not ball-like)"
        if reason:
            drop[o.id] = True
            rejected.append((o.id, o.centroid, _equiv_radius(o.volume), reason))
    if drop.any():
        keep = np.arange(len(drop), dtype=labels.dtype)
        keep[drop] = 0
        relabel(labels, keep, out=labels)
    log.info("%d objects kept, %d discarded", len(objs) - int(drop.sum()), int(drop.sum()))
    return labels, rejected_rows(rejected, "label")


def rejoin_duplicate_pieces(
    labels: np.ndarray, ids: np.ndarray, centres: np.ndarray, radii: np.ndarray, *, inplace: bool = False
) -> tuple[np.ndarray, list[int]]:
    """Rejoin touching objects whose fitted spheres claim the same vesicle.

    Splitting can cut one vesicle into pieces (e.g. when it was merged with a membrane sheet or a
    neighbour); the spheres fitted to the pieces then converge on the same vesicle, a centre lying
    inside the other sphere, but each started from an off-centre piece. Touching (6-neighbour) such
    pieces are joined under a fresh id so the whole object can be refitted.
    ``ids``/``centres``/``radii`` (voxels) describe the fitted objects of ``labels``. Returns (a new
    label volume with each group of pieces under one fresh id, the fresh ids); ``labels`` is
    unchanged unless ``inplace`` (then it is the volume returned: no second label volume in memory).
    """
    ids = np.asarray(ids, dtype=np.int64)
    i, j, _, dup = sphere_pairs(centres, radii)
    if not dup.any():
        return labels, []
    parent = {int(k): int(k) for k in ids}

    def root(k: int) -> int:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    boxes = label_statistics(labels)["bounding_boxes"]
    for a, b in zip(ids[i[dup]], ids[j[dup]]):
        ra, rb = root(int(a)), root(int(b))
        if ra == rb:
            continue
        box = tuple(
            slice(max(min(sa.start, sb.start) - 1, 0), min(max(sa.stop, sb.stop) + 1, n))
            for sa, sb, n in zip(boxes[a], boxes[b], labels.shape)
        )
        sub = labels[box]
        if (binary_dilation(sub == a) & (sub == b)).any():
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = {}
    for k in parent:
        groups.setdefault(root(k), []).append(k)
    groups = {r: g for r, g in groups.items() if len(g) > 1}
    if not groups:
        return labels, []
    next_id = int(labels.max()) + 1
    lut = np.arange(next_id + len(groups), dtype=np.uint32)
    new_ids = []
    for n, members in enumerate(groups.values()):
        lut[members] = next_id + n
        new_ids.append(next_id + n)
    log.info("rejoined %d groups of split pieces whose spheres fit the same vesicle", len(new_ids))
    return relabel(labels, lut, out=labels if inplace else None), new_ids

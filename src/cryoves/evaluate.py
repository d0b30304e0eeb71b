"""Evaluation metrics: voxel Dice (hard and soft) and per-vesicle matching with both protocols.

Either side may be a :class:`~cryoves.vesicles.VesicleTable` (spheres) or an instance label volume
(z, y, x), 0 = background, every other value one vesicle.

Per-vesicle protocols, both one-to-one:

* **centre** (CryoVesNet's criterion): a prediction may match a GT vesicle when its centre lies
  inside it (GT sphere: distance <= GT radius; GT label: the voxel nearest to the predicted centre
  carries the GT id). Among the candidates, the assignment with the most matches and then the
  smallest total centre distance is chosen (Hungarian). Unlike the original, a GT vesicle is never
  matched twice and false positives are counted one by one.
* **iou50** (SynapseNet's criterion): Hungarian matching on IoU among pairs with IoU >= 0.5.

Geometry. When both sides are tables and no ``shape`` is given, everything is computed on exact
continuous spheres: IoU and Dice from the lens volume of two spheres, hard Dice as
``2 * sum(lens volumes) / (sum of GT + predicted sphere volumes)``. This assumes the spheres of
one table do not overlap each other (true after overlap repair). Otherwise (a label volume on
either side, or ``shape`` given) overlaps are counted in voxels: each instance is rendered only
inside its bounding box (a voxel belongs to a sphere when its centre is within the radius), so no
full-size volume is ever allocated. Instances of one side are assumed disjoint.

Mask. With a region mask, GT and predicted vesicles whose centre voxel lies outside the mask
(or outside the volume) are dropped before every metric; in voxel mode only voxels inside the
mask are counted. Centres of label instances are voxel centroids; their diameter is the diameter
of the sphere of equal volume. δd and Δc are computed over the centre-protocol matches.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from cryoves.atomic import atomic_path, make_dir, removing_new_dirs, write_json_atomic
from cryoves.errors import InputError, OutputExistsError, VoxelSizeError
from cryoves.results import is_result_folder, open_result
from cryoves.vesicles import VesicleTable

log = logging.getLogger(__name__)

TABLE_SUFFIXES = {".csv", ".star", ".mod"}
_MAX_DIRECT_ID = 1 << 24
METRIC_KEYS = [
    "n_pred", "n_gt",
    "tp_centre", "fp_centre", "fn_centre", "precision_centre", "recall_centre", "f1_centre",
    "tp_iou50", "fp_iou50", "fn_iou50", "precision_iou50", "recall_iou50", "f1_iou50",
    "sbd", "dice", "dice_soft", "delta_d", "delta_c_nm_mean", "delta_c_nm_sd", "geometry",
]


# --------------------------------------------------------------------------- plain metrics
def dice(a: Any, b: Any) -> float:
    """Hard Dice ``2|A∩B| / (|A| + |B|)`` of two binary arrays (non-zero = foreground); 1 if both empty."""
    a = np.asarray(a) != 0
    b = np.asarray(b) != 0
    if a.shape != b.shape:
        raise InputError(f"Dice needs equal shapes, got {a.shape} and {b.shape}")
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(a & b)) / total


def soft_dice(p: Any, g: Any) -> float:
    """Soft Dice ``2 Σ p·g / (Σ p + Σ g)`` of a probability map ``p`` and a binary GT ``g``.

    No smoothing term (CryoVesNet adds 1 to numerator and denominator); 1 if both sums are 0.
    """
    p = np.asarray(p, dtype=np.float64)
    g = np.asarray(g) != 0
    if p.shape != g.shape:
        raise InputError(f"soft Dice needs equal shapes, got {p.shape} and {g.shape}")
    denom = float(p.sum()) + float(np.count_nonzero(g))
    return 1.0 if denom == 0 else 2.0 * float(p[g].sum()) / denom


def sphere_volume(r: Any) -> np.ndarray:
    """Volume of balls of radius ``r`` (any unit, cubed)."""
    return 4.0 / 3.0 * np.pi * np.asarray(r, dtype=float) ** 3


def sphere_intersection(c1: Any, r1: Any, c2: Any, r2: Any) -> np.ndarray:
    """Intersection volume of balls (c1, r1) and (c2, r2); centres (..., 3), broadcast over rows."""
    c1, c2 = np.asarray(c1, dtype=float), np.asarray(c2, dtype=float)
    r1, r2 = np.asarray(r1, dtype=float), np.asarray(r2, dtype=float)
    d = np.linalg.norm(c1 - c2, axis=-1)
    d, r1, r2 = np.broadcast_arrays(d, r1, r2)
    out = np.zeros(d.shape, dtype=float)
    nested = d <= np.abs(r1 - r2)
    out[nested] = sphere_volume(np.minimum(r1, r2)[nested])
    lens = ~nested & (d < r1 + r2)
    dl, a, b = d[lens], r1[lens], r2[lens]
    out[lens] = np.pi * (a + b - dl) ** 2 * (dl**2 + 2 * dl * (a + b) - 3 * (a - b) ** 2) / (12 * dl)
    return out


def sphere_iou(c1: Any, r1: Any, c2: Any, r2: Any) -> np.ndarray:
    """Exact IoU of balls (c1, r1) and (c2, r2), vectorised over rows (same units for all)."""
    inter = sphere_intersection(c1, r1, c2, r2)
    union = sphere_volume(r1) + sphere_volume(r2) - inter
    return inter / union


# --------------------------------------------------------------------------- instances
@dataclass
class _Instances:
    """One side of the comparison: ids, centres (z, y, x), radii and bounding radii.

    Units are voxels of the tomogram grid, or nm for two tables compared as exact spheres
    (:func:`_in_nm`). Label instances: centroid, radius of the sphere of equal volume, and a bounding
    radius that reaches every voxel of the instance.
    """

    ids: np.ndarray
    centres: np.ndarray
    radii: np.ndarray
    bound: np.ndarray
    voxel_size: float  # Å
    is_table: bool
    labels: np.ndarray | None = None
    boxes: np.ndarray | None = None  # (N, 2, 3) lo/hi voxel indices (hi exclusive)
    df: pd.DataFrame | None = None
    values: np.ndarray | None = None  # the ids as stored in ``labels`` (differ after renumbering)

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, keep: np.ndarray) -> _Instances:
        return _Instances(
            self.ids[keep], self.centres[keep], self.radii[keep], self.bound[keep], self.voxel_size,
            self.is_table, self.labels, None if self.boxes is None else self.boxes[keep],
            None if self.df is None else self.df.loc[keep].reset_index(drop=True),
            None if self.values is None else self.values[keep],
        )

    def mask_in(self, k: int, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Boolean mask of instance ``k`` inside the voxel box [lo, hi)."""
        if self.labels is not None:
            value = self.ids[k] if self.values is None else self.values[k]
            return self.labels[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] == value
        c, r = self.centres[k], self.radii[k]
        gz, gy, gx = ((np.arange(lo[i], hi[i]) - c[i]) ** 2 for i in range(3))
        return gz[:, None, None] + gy[None, :, None] + gx[None, None, :] <= r * r


def _label_instances(labels: np.ndarray, voxel_size: float) -> _Instances:
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise InputError(f"a label volume must be 3-D (z, y, x), got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.all(np.mod(labels, 1) == 0):
            raise InputError("a label volume must hold integer ids; got non-integer values")
        labels = labels.astype(np.int64)
    if labels.size and labels.min() < 0:
        raise InputError("a label volume must not hold negative ids")
    original = None
    if labels.size and int(labels.max()) > _MAX_DIRECT_ID:
        # find_objects allocates one slot per id value: renumber huge ids first (rare, slower)
        original, inverse = np.unique(labels, return_inverse=True)
        labels = inverse.reshape(labels.shape).astype(np.int64)
        if original[0] != 0:  # no background: shift so that every id is a foreground value
            original, labels = np.concatenate([[0], original]), labels + 1
    slices = ndimage.find_objects(labels)
    ids, centres, boxes, sizes = [], [], [], []
    for i, sl in enumerate(slices):
        if sl is None:
            continue
        lab = i + 1
        lo = np.array([s.start for s in sl])
        idx = np.nonzero(labels[sl] == lab)
        ids.append(lab)
        centres.append(np.array([ix.mean() for ix in idx]) + lo)
        boxes.append([lo, [s.stop for s in sl]])
        sizes.append(len(idx[0]))
    n = len(ids)
    centres_a = np.asarray(centres, dtype=float).reshape(n, 3)
    boxes_a = np.asarray(boxes, dtype=np.int64).reshape(n, 2, 3)
    radii = np.cbrt(3.0 * np.asarray(sizes, dtype=float) / (4.0 * np.pi))
    corners = np.maximum(np.abs(boxes_a[:, 0] - 0.5 - centres_a), np.abs(boxes_a[:, 1] - 0.5 - centres_a))
    bound = np.linalg.norm(corners, axis=1) if n else np.zeros(0)
    values = np.asarray(ids, dtype=np.int64)
    ids_a = values if original is None else original[values].astype(np.int64)
    return _Instances(ids_a, centres_a, radii, bound, voxel_size, False, labels=labels, boxes=boxes_a,
                      values=values)


def _table_instances(table: VesicleTable) -> _Instances:
    c, r = table.centres, table.radii
    boxes = np.stack([np.ceil(c - r[:, None]), np.floor(c + r[:, None]) + 1], axis=1).astype(np.int64)
    return _Instances(table.ids.astype(np.int64), c, r, r.copy(), table.voxel_size, True,
                      boxes=boxes.reshape(-1, 2, 3), df=table.df)


def _as_instances(obj: Any, voxel_size: float | None, what: str, fallback: float | None = None) -> _Instances:
    """``voxel_size`` (given by the user) overrides a label Tomogram's; bare arrays use it or ``fallback``."""
    if isinstance(obj, VesicleTable):
        return _table_instances(obj)
    if hasattr(obj, "data") and hasattr(obj, "voxel_size_a"):  # a Tomogram holding labels
        vs = voxel_size if voxel_size is not None else obj.voxel_size_a
        return _label_instances(np.asarray(obj.data), float(vs))
    if isinstance(obj, np.ndarray):
        voxel_size = voxel_size if voxel_size is not None else fallback
        if voxel_size is None:
            raise VoxelSizeError(f"{what} is a bare label array: pass voxel_size (Å) to evaluate()")
        return _label_instances(obj, float(voxel_size))
    raise InputError(f"{what} must be a VesicleTable or a label volume, got {type(obj).__name__}")


def _label_voxel_size(*objs: Any) -> float | None:
    for o in objs:
        if isinstance(o, VesicleTable):
            return o.voxel_size
        if hasattr(o, "voxel_size_a"):
            return float(o.voxel_size_a)
    return None


# --------------------------------------------------------------------------- pairs and assignment
def _candidate_pairs(a: _Instances, b: _Instances, reach_a: np.ndarray, reach_b: np.ndarray):
    """Index pairs (i in a, j in b) with centre distance < reach_a[i] + reach_b[j] (voxels)."""
    if len(a) == 0 or len(b) == 0:
        e = np.zeros(0, dtype=np.int64)
        return e, e, np.zeros(0)
    tree = cKDTree(b.centres)
    hits = tree.query_ball_point(a.centres, r=reach_a + reach_b.max())
    counts = np.fromiter((len(h) for h in hits), dtype=np.int64, count=len(hits))
    ia = np.repeat(np.arange(len(a)), counts)
    jb = np.fromiter((j for h in hits for j in h), dtype=np.int64, count=int(counts.sum()))
    dist = np.linalg.norm(a.centres[ia] - b.centres[jb], axis=1)
    keep = dist <= reach_a[ia] + reach_b[jb]
    return ia[keep], jb[keep], dist[keep]


def assign_one_to_one(n_a: int, n_b: int, ia: np.ndarray, jb: np.ndarray, cost: np.ndarray):
    """Maximum-cardinality, then minimum-cost one-to-one matching among candidate pairs.

    Solved per connected block of the sparse candidate graph (Hungarian on each block); returns the
    positions (into ``ia``/``jb``/``cost``) of the chosen pairs.
    """
    ia, jb, cost = np.asarray(ia), np.asarray(jb), np.asarray(cost, dtype=float)
    if len(ia) == 0:
        return np.zeros(0, dtype=np.int64)
    graph = coo_matrix((np.ones(len(ia)), (ia, n_a + jb)), shape=(n_a + n_b, n_a + n_b))
    _, comp = connected_components(graph, directed=False)
    edge_comp = comp[ia]
    order = np.argsort(edge_comp, kind="stable")
    _, starts, counts = np.unique(edge_comp[order], return_index=True, return_counts=True)
    chosen = [order[starts[counts == 1]]]
    for s, c in zip(starts[counts > 1], counts[counts > 1]):
        e = order[s : s + c]
        ra, rows = np.unique(ia[e], return_inverse=True)
        rb, cols = np.unique(jb[e], return_inverse=True)
        # a cost for non-candidates that is larger than any sum of real costs keeps cardinality first
        big = (float(cost[e].max()) + 1.0) * (len(ra) + len(rb) + 1)
        m = np.full((len(ra), len(rb)), big)
        m[rows, cols] = cost[e]
        pos = np.full((len(ra), len(rb)), -1, dtype=np.int64)
        pos[rows, cols] = e
        r, cc = linear_sum_assignment(m)
        sel = pos[r, cc]
        chosen.append(sel[sel >= 0])
    return np.sort(np.concatenate(chosen))


# --------------------------------------------------------------------------- overlaps
def _overlaps(p: _Instances, g: _Instances, voxel: bool, mask: np.ndarray | None, shape):
    """Candidate pairs (ip, jg) with their intersection, plus the size of every instance.

    Voxel counts (inside ``mask``) in voxel mode; exact volumes (instance units³) for spheres.
    """
    ip, jg, _ = _candidate_pairs(p, g, p.bound, g.bound)
    if not voxel:
        inter = sphere_intersection(p.centres[ip], p.radii[ip], g.centres[jg], g.radii[jg])
        return ip, jg, inter, sphere_volume(p.radii), sphere_volume(g.radii)
    shape_a = np.asarray(shape)
    size_p = np.array([_count(p, k, p.boxes[k, 0], p.boxes[k, 1], mask, shape_a) for k in range(len(p))])
    size_g = np.array([_count(g, k, g.boxes[k, 0], g.boxes[k, 1], mask, shape_a) for k in range(len(g))])
    inter = np.zeros(len(ip))
    for n, (i, j) in enumerate(zip(ip, jg)):
        lo = np.maximum(np.maximum(p.boxes[i, 0], g.boxes[j, 0]), 0)
        hi = np.minimum(np.minimum(p.boxes[i, 1], g.boxes[j, 1]), shape_a)
        if np.any(hi <= lo):
            continue
        both = p.mask_in(i, lo, hi) & g.mask_in(j, lo, hi)
        if mask is not None:
            both &= mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        inter[n] = np.count_nonzero(both)
    keep = inter > 0
    return ip[keep], jg[keep], inter[keep], size_p.astype(float), size_g.astype(float)


def _count(obj: _Instances, k: int, lo, hi, mask, shape_a) -> int:
    lo, hi = np.maximum(lo, 0), np.minimum(hi, shape_a)
    if np.any(hi <= lo):
        return 0
    m = obj.mask_in(k, lo, hi)
    if mask is not None:
        m &= mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    return int(np.count_nonzero(m))


def _best_dice(n: int, idx: np.ndarray, pair_dice: np.ndarray) -> float:
    best = np.zeros(n)
    np.maximum.at(best, idx, pair_dice)
    return float(best.mean())


def _sbd(n_p: int, n_g: int, ip, jg, pair_dice) -> float:
    if n_p == 0 and n_g == 0:
        return 1.0
    if n_p == 0 or n_g == 0:
        return 0.0
    return min(_best_dice(n_p, ip, pair_dice), _best_dice(n_g, jg, pair_dice))


def _prf(tp: int, n_pred: int, n_gt: int) -> tuple[float, float, float]:
    if n_pred == 0 and n_gt == 0:
        return 1.0, 1.0, 1.0
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gt if n_gt else 0.0
    return precision, recall, 2.0 * tp / (n_pred + n_gt)


# --------------------------------------------------------------------------- public matching API
def match_centre(pred: VesicleTable, gt: VesicleTable) -> pd.DataFrame:
    """One-to-one centre-inside matching of two tables: columns pred_id, gt_id, centre_dist_nm."""
    p, g = _in_nm(_table_instances(pred)), _in_nm(_table_instances(gt))
    ip, jg, dist = _centre_candidates(p, g)
    sel = assign_one_to_one(len(p), len(g), ip, jg, dist)
    return pd.DataFrame({
        "pred_id": p.ids[ip[sel]], "gt_id": g.ids[jg[sel]],
        "centre_dist_nm": _centre_dist_nm(p, g, ip[sel], jg[sel]),
    })


def step_recall(gt: VesicleTable, stages: dict[str, Any]) -> dict[str, float]:
    """Recall of the ground-truth vesicles after each pipeline step, in the order given.

    ``stages`` maps a step name to what that step produced (all on the grid of ``gt``, voxels):
    a float array = probability map (a vesicle counts when p > 0.5 at its centre voxel); a bool
    array = binary mask (centre voxel inside); an integer array = instance labels (one object per
    vesicle: the GT centres inside an object count once, so merged vesicles are lost here); a
    :class:`VesicleTable` = fitted spheres (one-to-one centre matching, :func:`match_centre`).
    Locates every loss: a vesicle the map holds and a later step drops is lost by that step.
    """
    n = len(gt)
    out: dict[str, float] = {}
    if n == 0:
        return {k: float("nan") for k in stages}
    vox = np.rint(gt.centres).astype(np.int64)
    for name, obj in stages.items():
        if isinstance(obj, VesicleTable):
            out[name] = len(match_centre(obj, gt)) / n
            continue
        arr = np.asarray(obj)
        inside = np.all((vox >= 0) & (vox < np.asarray(arr.shape)), axis=1)
        vals = np.zeros(n, dtype=arr.dtype)
        vals[inside] = arr[tuple(vox[inside].T)]
        if arr.dtype == bool:
            out[name] = float(np.count_nonzero(vals)) / n
        elif np.issubdtype(arr.dtype, np.floating):
            out[name] = float(np.count_nonzero(vals > 0.5)) / n
        else:
            out[name] = len(np.unique(vals[vals > 0])) / n
    return out


def match_iou(pred: Any, gt: Any, threshold: float = 0.5, voxel_size: float | None = None) -> pd.DataFrame:
    """One-to-one Hungarian matching at IoU >= ``threshold``: columns pred_id, gt_id, iou.

    Two tables: exact sphere IoU; otherwise voxel IoU (see the module docstring).
    """
    p, g, voxel, grid = _prepare(pred, gt, voxel_size, None)
    ip, jg, inter, sp, sg = _overlaps(p, g, voxel, None, grid)
    iou = inter / (sp[ip] + sg[jg] - inter) if len(ip) else np.zeros(0)
    ok = iou >= threshold
    sel = assign_one_to_one(len(p), len(g), ip[ok], jg[ok], 1.0 - iou[ok])
    return pd.DataFrame({"pred_id": p.ids[ip[ok][sel]], "gt_id": g.ids[jg[ok][sel]], "iou": iou[ok][sel]})


def symmetric_best_dice(pred_labels: Any, gt_labels: Any, voxel_size: float | None = None) -> float:
    """Symmetric best Dice (min of the two mean best-Dice directions) of two label volumes or tables."""
    vs = voxel_size if voxel_size is not None else (_label_voxel_size(pred_labels, gt_labels) or 10.0)
    p, g, voxel, grid = _prepare(pred_labels, gt_labels, vs, None)
    ip, jg, inter, sp, sg = _overlaps(p, g, voxel, None, grid)
    return _sbd(len(p), len(g), ip, jg, 2.0 * inter / (sp[ip] + sg[jg]) if len(ip) else np.zeros(0))


def _centre_candidates(p: _Instances, g: _Instances):
    """Pairs where the predicted centre lies inside the GT vesicle, with centre distances (voxels)."""
    if g.is_table:
        return _candidate_pairs(p, g, np.zeros(len(p)), g.radii)
    if len(p) == 0 or len(g) == 0:
        e = np.zeros(0, dtype=np.int64)
        return e, e, np.zeros(0)
    vox = np.rint(p.centres).astype(np.int64)
    inside = np.all((vox >= 0) & (vox < np.asarray(g.labels.shape)), axis=1)
    hit = np.zeros(len(p), dtype=np.int64)
    hit[inside] = g.labels[tuple(vox[inside].T)]
    values = g.ids if g.values is None else g.values  # ascending, as find_objects lists them
    pos = np.minimum(np.searchsorted(values, hit), len(g) - 1)
    ok = (hit > 0) & (values[pos] == hit)
    ip, jg = np.nonzero(ok)[0], pos[ok]
    return ip, jg, np.linalg.norm(p.centres[ip] - g.centres[jg], axis=1)


def _centre_dist_nm(p: _Instances, g: _Instances, ip, jg) -> np.ndarray:
    """Centre distances in nm (each side in its own voxel size, so tables of any binning compare)."""
    return np.linalg.norm(p.centres[ip] * p.voxel_size / 10 - g.centres[jg] * g.voxel_size / 10, axis=1)


def _shape_of(*objs: Any) -> tuple[int, int, int] | None:
    """The shape shared by the label volumes among ``objs`` (None if all are tables)."""
    shapes = {
        tuple(int(s) for s in (o.data.shape if hasattr(o, "data") else np.shape(o)))
        for o in objs if o is not None and not isinstance(o, VesicleTable)
    }
    if len(shapes) > 1:
        raise InputError(f"label volumes have different shapes {sorted(shapes)}; they must share one grid")
    return shapes.pop() if shapes else None



def _prepare(pred: Any, gt: Any, voxel_size: float | None, shape: Any, nm: bool = True):
    """Both sides as instances in common units, the geometry mode and the voxel grid (or None).

    Two tables without ``shape``: exact spheres in nm units (voxel_size set to 10 Å so that the
    nm conversions stay identities), which also compares tables of different binnings.
    """
    fallback = _label_voxel_size(pred, gt)
    p, g = _as_instances(pred, voxel_size, "pred", fallback), _as_instances(gt, voxel_size, "gt", fallback)
    label_shape = _shape_of(pred, gt)
    voxel = label_shape is not None or shape is not None
    if not voxel:
        return (_in_nm(p), _in_nm(g), False, None) if nm else (p, g, False, None)
    if abs(p.voxel_size / g.voxel_size - 1) > 0.01:
        raise VoxelSizeError(
            f"pred ({p.voxel_size:g} Å) and GT ({g.voxel_size:g} Å) are on different grids; "
            "compare vesicle tables or give both as labels of the same tomogram"
        )
    grid = label_shape or tuple(int(s) for s in shape)
    return p, g, True, grid


def _in_nm(obj: _Instances) -> _Instances:
    f = obj.voxel_size / 10.0
    return _Instances(obj.ids, obj.centres * f, obj.radii * f, obj.bound * f, 10.0, obj.is_table,
                      None, None, obj.df)

# --------------------------------------------------------------------------- evaluate
@dataclass
class EvaluationResult:
    """Metrics (``metrics``, JSON keys), centre-protocol ``matches``, ``misses`` and ``false_positives``.

    ``matches``: pred_id, gt_id, iou, centre_dist_nm, d_pred_nm, d_gt_nm (centre protocol);
    ``matches_iou50``: pred_id, gt_id, iou. ``misses``/``false_positives``: unmatched GT/predicted
    vesicles (centre protocol) with id, z, y, x (voxels), radius (voxels), z_nm, y_nm, x_nm,
    radius_nm and ``matched_iou50`` (whether the other protocol matched it).
    """

    metrics: dict
    matches: pd.DataFrame
    misses: pd.DataFrame
    false_positives: pd.DataFrame
    matches_iou50: pd.DataFrame = field(default_factory=pd.DataFrame)

    def to_json(self, path: str | Path) -> Path:
        """Write metrics plus the lists of misses and false positives as JSON (atomically)."""
        obj = {k: _jsonable(v) for k, v in self.metrics.items()}
        obj["misses"] = [{k: _jsonable(v) for k, v in r.items()} for r in self.misses.to_dict("records")]
        obj["false_positives"] = [
            {k: _jsonable(v) for k, v in r.items()} for r in self.false_positives.to_dict("records")
        ]
        return write_json_atomic(path, obj)

    def report(self) -> str:
        """A short plain-text report: the per-protocol table and the voxel/diameter/centre metrics."""
        m = self.metrics
        lines = [
            f"{m['n_pred']} predicted, {m['n_gt']} ground-truth vesicles ({m['geometry']})",
            self.summary().to_string(float_format=lambda v: f"{v:.3f}"),
            f"Dice {_fmt(m['dice'])}  soft Dice {_fmt(m['dice_soft'])}  SBD {_fmt(m['sbd'])}",
            f"delta_d {_fmt(m['delta_d'])}  delta_c {_fmt(m['delta_c_nm_mean'])} ± {_fmt(m['delta_c_nm_sd'])} nm",
        ]
        return "\n".join(lines)

    def summary(self) -> pd.DataFrame:
        """The per-protocol metrics as a small table (rows: protocols)."""
        m = self.metrics
        return pd.DataFrame(
            {
                "TP": [m["tp_centre"], m["tp_iou50"]], "FP": [m["fp_centre"], m["fp_iou50"]],
                "FN": [m["fn_centre"], m["fn_iou50"]],
                "precision": [m["precision_centre"], m["precision_iou50"]],
                "recall": [m["recall_centre"], m["recall_iou50"]], "F1": [m["f1_centre"], m["f1_iou50"]],
            },
            index=["centre", "iou50"],
        )


def _fmt(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3f}"


def write_evaluation(result: EvaluationResult, outdir: str | Path, force: bool = False) -> Path:
    """Write evaluation.json, matches.csv, misses.csv and false_positives.csv into ``outdir``."""
    outdir = Path(outdir)
    target = outdir / "evaluation.json"
    if target.exists() and not force:
        raise OutputExistsError(f"{outdir} already holds an evaluation; pass --force or choose another --output")
    names = ["matches.csv", "misses.csv", "false_positives.csv"]
    with removing_new_dirs(outdir):
        make_dir(outdir)
        try:
            target.unlink(missing_ok=True)  # an old marker must not vouch for half-new files
            for name, df in zip(names, (result.matches, result.misses, result.false_positives), strict=True):
                with atomic_path(outdir / name) as tmp:
                    df.to_csv(tmp, index=False, float_format="%.4f")
            result.to_json(target)  # last: marks a complete evaluation
        except BaseException:
            for name in names:  # e.g. disk full half-way: leave no partial evaluation
                (outdir / name).unlink(missing_ok=True)
            raise
    return outdir


def _jsonable(v: Any) -> Any:
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return None if not math.isfinite(float(v)) else float(v)
    if isinstance(v, np.bool_):
        return bool(v)
    return v


def _restrict(obj: _Instances, mask: np.ndarray) -> _Instances:
    vox = np.rint(obj.centres).astype(np.int64)
    inside = np.all((vox >= 0) & (vox < np.asarray(mask.shape)), axis=1)
    keep = np.zeros(len(obj), dtype=bool)
    keep[inside] = mask[tuple(vox[inside].T)]
    return obj.subset(keep)


def _listing(obj: _Instances, rows: np.ndarray, iou_matched: np.ndarray) -> pd.DataFrame:
    if obj.df is not None:  # a table: its own voxel and nm columns
        out = obj.df.loc[rows, ["id", "z", "y", "x", "radius", "z_nm", "y_nm", "x_nm", "radius_nm"]]
        return out.reset_index(drop=True).assign(matched_iou50=iou_matched[rows])
    nm = obj.voxel_size / 10.0
    c, r = obj.centres[rows], obj.radii[rows]
    return pd.DataFrame({
        "id": obj.ids[rows], "z": c[:, 0], "y": c[:, 1], "x": c[:, 2], "radius": r,
        "z_nm": c[:, 0] * nm, "y_nm": c[:, 1] * nm, "x_nm": c[:, 2] * nm, "radius_nm": r * nm,
        "matched_iou50": iou_matched[rows],
    })


def evaluate(
    pred: Any,
    gt: Any,
    mask: Any = None,
    prob: Any = None,
    shape: tuple[int, int, int] | None = None,
    voxel_size: float | None = None,
) -> EvaluationResult:
    """Compare predicted vesicles with ground truth (see the module docstring for the definitions).

    Args:
        pred, gt: a ``VesicleTable`` or a label volume (numpy array or label ``Tomogram``), (z, y, x).
        mask: optional region mask (z, y, x), non-zero = inside.
        prob: optional probability map (z, y, x) in [0, 1] for the soft Dice against the GT.
        shape: grid (z, y, x) on which to count voxels when both sides are tables (default: exact
            spheres, no grid).
        voxel_size: Å; needed only for bare label arrays when no table or Tomogram supplies it.
    """
    mask_arr = None if mask is None else np.asarray(getattr(mask, "data", mask)) != 0
    prob_arr = None if prob is None else np.asarray(getattr(prob, "data", prob), dtype=np.float32)
    p, g, voxel, grid = _prepare(pred, gt, voxel_size, shape, nm=False)
    for name, arr in (("mask", mask_arr), ("probability map", prob_arr)):
        if arr is not None and voxel and tuple(arr.shape) != tuple(grid):
            raise InputError(f"{name} shape {arr.shape} differs from the label/volume shape {grid}; give it on the same grid")
    if prob_arr is not None and mask_arr is not None and prob_arr.shape != mask_arr.shape:
        raise InputError(f"mask shape {mask_arr.shape} differs from the probability map shape {prob_arr.shape}")
    if mask_arr is not None:
        p, g = _restrict(p, mask_arr), _restrict(g, mask_arr)
    g_voxels = g  # voxel units, for the soft Dice
    if not voxel:
        p, g = _in_nm(p), _in_nm(g)
    n_p, n_g = len(p), len(g)

    ip, jg, inter, sp, sg = _overlaps(p, g, voxel, mask_arr if voxel else None, grid)
    iou = inter / (sp[ip] + sg[jg] - inter) if len(ip) else np.zeros(0)
    pair_dice = 2.0 * inter / (sp[ip] + sg[jg]) if len(ip) else np.zeros(0)
    denom = float(sp.sum() + sg.sum())
    hard_dice = 1.0 if denom == 0 else 2.0 * float(inter.sum()) / denom

    ok = iou >= 0.5
    sel_iou = assign_one_to_one(n_p, n_g, ip[ok], jg[ok], 1.0 - iou[ok])
    mi_p, mi_g = ip[ok][sel_iou], jg[ok][sel_iou]

    cp, cg, cdist = _centre_candidates(p, g)
    sel_c = assign_one_to_one(n_p, n_g, cp, cg, cdist)
    mc_p, mc_g = cp[sel_c], cg[sel_c]
    pair_iou = dict(zip(zip(ip.tolist(), jg.tolist()), iou.tolist()))
    d_p = 2 * p.radii[mc_p] * p.voxel_size / 10
    d_g = 2 * g.radii[mc_g] * g.voxel_size / 10
    dist_nm = _centre_dist_nm(p, g, mc_p, mc_g)
    matches = pd.DataFrame({
        "pred_id": p.ids[mc_p], "gt_id": g.ids[mc_g],
        "iou": [pair_iou.get((a, b), 0.0) for a, b in zip(mc_p.tolist(), mc_g.tolist())],
        "centre_dist_nm": dist_nm, "d_pred_nm": d_p, "d_gt_nm": d_g,
    })

    soft = float("nan")
    if prob_arr is not None:
        soft = _soft_dice_instances(prob_arr, g_voxels, mask_arr)

    tp_c, tp_i = len(mc_p), len(mi_p)
    pc, rc, fc = _prf(tp_c, n_p, n_g)
    pi, ri, fi = _prf(tp_i, n_p, n_g)
    iou_p = np.zeros(n_p, dtype=bool)
    iou_p[mi_p] = True
    iou_g = np.zeros(n_g, dtype=bool)
    iou_g[mi_g] = True
    metrics = {
        "n_pred": n_p, "n_gt": n_g,
        "tp_centre": tp_c, "fp_centre": n_p - tp_c, "fn_centre": n_g - tp_c,
        "precision_centre": pc, "recall_centre": rc, "f1_centre": fc,
        "tp_iou50": tp_i, "fp_iou50": n_p - tp_i, "fn_iou50": n_g - tp_i,
        "precision_iou50": pi, "recall_iou50": ri, "f1_iou50": fi,
        "sbd": _sbd(n_p, n_g, ip, jg, pair_dice),
        "dice": hard_dice, "dice_soft": soft,
        "delta_d": float(np.mean(1 - np.minimum(d_p, d_g) / np.maximum(d_p, d_g))) if tp_c else float("nan"),
        "delta_c_nm_mean": float(dist_nm.mean()) if tp_c else float("nan"),
        "delta_c_nm_sd": float(dist_nm.std()) if tp_c else float("nan"),
        "geometry": "voxels" if voxel else "spheres",
    }
    unmatched_g = np.setdiff1d(np.arange(n_g), mc_g)
    unmatched_p = np.setdiff1d(np.arange(n_p), mc_p)
    return EvaluationResult(
        metrics=metrics,
        matches=matches,
        misses=_listing(g, unmatched_g, iou_g),
        false_positives=_listing(p, unmatched_p, iou_p),
        matches_iou50=pd.DataFrame({"pred_id": p.ids[mi_p], "gt_id": g.ids[mi_g], "iou": iou[ok][sel_iou]}),
    )


def _soft_dice_instances(prob: np.ndarray, g: _Instances, mask: np.ndarray | None) -> float:
    """Soft Dice of ``prob`` against the (kept) GT instances, summing p·g only inside their boxes."""
    shape_a = np.asarray(prob.shape)
    sum_p = float(prob.sum(dtype=np.float64) if mask is None else prob[mask].sum(dtype=np.float64))
    sum_g, sum_pg = 0, 0.0
    for k in range(len(g)):
        lo, hi = np.maximum(g.boxes[k, 0], 0), np.minimum(g.boxes[k, 1], shape_a)
        if np.any(hi <= lo):
            continue
        m = g.mask_in(k, lo, hi)
        if mask is not None:
            m &= mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        sum_g += int(np.count_nonzero(m))
        sum_pg += float(prob[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]][m].sum(dtype=np.float64))
    denom = sum_p + sum_g
    return 1.0 if denom == 0 else 2.0 * sum_pg / denom


# --------------------------------------------------------------------------- files
def read_evaluation_input(path: str | Path, voxel_size: float | None = None, min_label: int | None = None) -> Any:
    """Read a vesicle table (CSV/STAR/MOD, or a result folder's) as a ``VesicleTable`` or a label
    volume as a label ``Tomogram``.

    Labels below ``min_label`` become background (10 for pyto / CryoVesNet label files, where 1 is
    the cytoplasm and 2 the active zone). Default: the first vesicle id of a pyto ``.ids.json``
    sidecar when there is one, else 1.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"file not found: {path}; check the path")
    if is_result_folder(path):
        return open_result(path, voxel_size=voxel_size).vesicles
    if path.suffix.lower() in TABLE_SUFFIXES:
        from cryoves.io.tables import read_vesicles

        return read_vesicles(path, voxel_size=voxel_size)
    from cryoves.io import Tomogram, read_label_volume

    arr, vs = read_label_volume(path, voxel_size=voxel_size)
    vs = float(np.atleast_1d(vs)[-1])
    if min_label is None:
        min_label = _pyto_first_id(path)
    if min_label > 1:
        arr = np.where(arr >= min_label, arr, 0).astype(arr.dtype, copy=False)
    return Tomogram(arr, (vs, vs, vs), path=path)


def _pyto_first_id(path: Path) -> int:
    from cryoves.io.pyto import FIRST_VESICLE_ID, ids_path

    side = ids_path(path)
    if not side.exists():
        return 1
    try:
        return int(json.loads(side.read_text()).get("first_vesicle_id", FIRST_VESICLE_ID))
    except (OSError, ValueError) as exc:
        raise InputError(f"{side} is not a readable pyto ids file: {exc}") from exc


def evaluate_files(
    pred: str | Path,
    gt: str | Path,
    mask: str | Path | None = None,
    prob: str | Path | None = None,
    like: str | Path | None = None,
    voxel_size: float | None = None,
    min_label: int | None = None,
) -> EvaluationResult:
    """:func:`evaluate` on files: PRED/GT are vesicle CSVs or label volumes; MASK/PROB/LIKE are volumes.

    ``like``: a tomogram whose shape is the voxel grid for two tables (default: exact spheres).
    A label file whose header lacks a valid voxel size takes the other side's table voxel size.
    """
    from cryoves.io import read_tomogram

    paths = {"pred": Path(pred), "gt": Path(gt)}
    tables = {k: read_evaluation_input(v, voxel_size) for k, v in paths.items() if _is_table_path(v)}
    fallback = voxel_size if voxel_size is not None else next((t.voxel_size for t in tables.values()), None)
    sides = {}
    for k, v in paths.items():
        if k in tables:
            sides[k] = tables[k]
            continue
        try:
            sides[k] = read_evaluation_input(v, voxel_size, min_label)
        except VoxelSizeError:
            if fallback is None:
                raise
            log.info("%s: no valid voxel size in the header; using %g Å from the table", v, fallback)
            sides[k] = read_evaluation_input(v, fallback, min_label)
    vol_vs = voxel_size if voxel_size is not None else fallback
    m = None if mask is None else _read_plain(read_tomogram, mask, vol_vs)
    pr = None if prob is None else _read_plain(read_tomogram, prob, vol_vs)
    shape = None if like is None else _read_plain(read_tomogram, like, vol_vs).shape
    return evaluate(sides["pred"], sides["gt"], mask=m, prob=pr, shape=shape, voxel_size=voxel_size)


def _is_table_path(path: Path) -> bool:
    return path.suffix.lower() in TABLE_SUFFIXES or is_result_folder(path)


def _read_plain(reader, path: str | Path, voxel_size: float | None) -> Any:
    """A volume's data; its header voxel size is not needed (the grid is the labels'/tables')."""
    return reader(path, voxel_size=voxel_size if voxel_size is not None else 10.0, validate=False).data

"""Region masks: restrict the probability map and the vesicles to the cytoplasm (or any mask).

Masks are (z, y, x) arrays of the tomogram's shape; any non-zero voxel is inside. Build them from
IMOD models with ``cryoves.io.imod.mask_from_mod``. Unlike the original (whose region filter was a
no-op), vesicles outside the region really are removed and recorded in the rejected table.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from cryoves.errors import ParameterError
from cryoves.postprocess._common import check_same_shape, check_volume, rejected_frame
from cryoves.vesicles import VesicleTable

log = logging.getLogger(__name__)


def restrict_probability(prob: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Return a float32 copy of ``prob`` (z, y, x) with every voxel outside ``mask`` set to 0.

    The input is not modified.
    """
    prob = check_volume(prob, "probability map")
    mask = check_volume(mask, "region mask")
    check_same_shape(prob, mask, "probability map", "region mask")
    out = np.asarray(prob, dtype=np.float32).copy()
    out[np.asarray(mask) == 0] = 0
    if not np.any(mask):
        log.warning("region mask is empty: the restricted probability map is all zero")
    return out


def ball_fractions_inside(centres: np.ndarray, radii: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Fraction of each ball's voxels (centre within radius, voxels) that lie inside ``mask``.

    Voxels of a ball that fall outside the volume count as outside the region.
    """
    mask = np.asarray(mask) != 0
    shape = np.array(mask.shape)
    out = np.zeros(len(radii))
    for k, (c, r) in enumerate(zip(np.asarray(centres, float), np.asarray(radii, float))):
        lo = np.ceil(c - r).astype(int)
        hi = np.floor(c + r).astype(int) + 1
        grids = np.ogrid[tuple(slice(a, b) for a, b in zip(lo, hi))]
        d2 = sum((g - ci) ** 2 for g, ci in zip(grids, c))
        ball = d2 <= r * r
        total = int(ball.sum())
        if total == 0:
            continue
        clo, chi = np.maximum(lo, 0), np.minimum(hi, shape)
        if np.any(chi <= clo):
            continue
        sub = mask[tuple(slice(a, b) for a, b in zip(clo, chi))]
        ball_in = ball[tuple(slice(a - o, b - o) for a, b, o in zip(clo, chi, lo))]
        out[k] = np.count_nonzero(sub & ball_in) / total
    return out


def vesicles_in_region(
    table: VesicleTable, mask: np.ndarray, min_fraction: float = 0.5
) -> tuple[VesicleTable, pd.DataFrame]:
    """Split ``table`` into vesicles inside the region ``mask`` and rejected ones.

    A vesicle is kept when at least ``min_fraction`` of its ball's voxels lie inside the mask.
    Returns ``(kept, rejected)``; rejected rows carry step ``"region"`` and the fraction inside.
    """
    if not 0.0 <= min_fraction <= 1.0:
        raise ParameterError(f"min_fraction must be between 0 and 1, got {min_fraction}")
    mask = check_volume(mask, "region mask")
    frac = ball_fractions_inside(table.centres, table.radii, mask)
    keep = frac >= min_fraction
    df = table.df
    rejected = rejected_frame(
        df["id"][~keep],
        table.centres[~keep],
        table.radii[~keep],
        step="region",
        reasons=[f"only {f:.0%} of the vesicle lies inside the region mask" for f in frac[~keep]],
    )
    if (~keep).any():
        log.info("region mask: removed %d of %d vesicles lying mostly outside", int((~keep).sum()), len(df))
    return table.with_df(df[keep]), rejected

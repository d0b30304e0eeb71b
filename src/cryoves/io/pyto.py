"""Pyto label files: one uint16 MRC with 0 background, 1 cytoplasm (segmentation region),
2 active zone, and vesicles numbered ``first_id`` (10) upwards, plus a JSON list of the ids.

Painting order: cytoplasm, then active zone (overwrites 1), then vesicles (overwrite 1 and 2,
overlaps between vesicles resolved by :func:`cryoves.vesicles.render_labels`). Vesicle ``k``
(table row order) gets label ``first_id + k``. The sidecar ``<name>.ids.json`` holds the ids pyto's
``tomo_info`` needs (``all_ids``, ``boundary_ids``, ``vesicle_ids``, ``segmentation_region``,
``distance_id``) and ``table_ids``, the vesicle-table id of each vesicle label, so that a round trip
keeps the table ids.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cryoves.atomic import write_json_atomic
from cryoves.errors import FormatError, InputError
from cryoves.io.mrc import write_mrc
from cryoves.vesicles import VesicleTable, labels_to_table, render_labels

log = logging.getLogger(__name__)

CYTOPLASM_ID = 1
ACTIVE_ZONE_ID = 2
FIRST_VESICLE_ID = 10


def ids_path(labels_path: str | Path) -> Path:
    """The sidecar JSON that lists the ids of a pyto label file (``labels.mrc`` → ``labels.ids.json``)."""
    p = Path(labels_path)
    return p.with_name(p.with_suffix("").name + ".ids.json")


@dataclass
class PytoLabels:
    """A pyto label file read back: the vesicles and the two region masks (z, y, x)."""

    table: VesicleTable
    cytoplasm: np.ndarray
    active_zone: np.ndarray
    labels: np.ndarray


def make_pyto_labels(
    table: VesicleTable,
    shape: tuple[int, int, int],
    cytoplasm: Any = None,
    active_zone: Any = None,
    first_id: int = FIRST_VESICLE_ID,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Build the pyto uint16 label volume (z, y, x) and its id lists (see module docstring).

    ``cytoplasm``/``active_zone``: optional boolean masks (non-zero = inside) of ``shape``.
    """
    shape = tuple(int(s) for s in shape)
    n = len(table)
    if first_id <= ACTIVE_ZONE_ID:
        raise InputError(f"first vesicle id must be above {ACTIVE_ZONE_ID}, got {first_id}")
    if first_id + n - 1 > np.iinfo(np.uint16).max:
        raise FormatError(f"{n} vesicles from id {first_id} do not fit in a uint16 pyto label file")
    labels = np.zeros(shape, dtype=np.uint16)
    for value, mask, name in ((CYTOPLASM_ID, cytoplasm, "cytoplasm"), (ACTIVE_ZONE_ID, active_zone, "active zone")):
        if mask is None:
            continue
        mask = np.asarray(mask)
        if mask.shape != shape:
            raise InputError(f"{name} mask has shape {mask.shape}, the label volume {shape}")
        labels[mask != 0] = value
    vesicle_ids = np.arange(first_id, first_id + n, dtype=np.int64)
    render_labels(table.centres, table.radii, vesicle_ids, shape, out=labels)
    ids: dict[str, Any] = {
        "segmentation_region": CYTOPLASM_ID,
        "distance_id": ACTIVE_ZONE_ID,
        "first_vesicle_id": first_id,
        "vesicle_ids": vesicle_ids.tolist(),
        "boundary_ids": [ACTIVE_ZONE_ID] + vesicle_ids.tolist(),
        "all_ids": [CYTOPLASM_ID, ACTIVE_ZONE_ID] + vesicle_ids.tolist(),
        "max_sv_label": int(vesicle_ids[-1]) if n else None,
        "table_ids": table.ids.tolist(),
    }
    return labels, ids


def write_pyto_labels(
    path: str | Path,
    table: VesicleTable,
    shape: tuple[int, int, int],
    cytoplasm: Any = None,
    active_zone: Any = None,
    *,
    origin: Any = (0.0, 0.0, 0.0),
    first_id: int = FIRST_VESICLE_ID,
) -> tuple[Path, Path]:
    """Write a pyto label MRC (uint16, voxel size of ``table``) and its ids JSON, atomically.

    Returns (labels path, ids path).
    """
    labels, ids = make_pyto_labels(table, shape, cytoplasm, active_zone, first_id)
    side = ids_path(path)
    write_json_atomic(side, ids)
    write_mrc(path, labels, table.voxel_size, origin)
    return Path(path), side


def read_pyto_labels(path: str | Path, voxel_size: Any = None, first_id: int | None = None) -> PytoLabels:
    """Read a pyto label file: vesicles (labels ≥ ``first_id``) become spheres by
    :func:`~cryoves.vesicles.labels_to_table` (an approximation); ids come from the sidecar JSON
    when present (else label − first_id + 1). ``first_id`` defaults to the sidecar's or 10.
    """
    from cryoves.io import read_label_volume

    labels, vs = read_label_volume(path, voxel_size=voxel_size)
    side = ids_path(path)
    ids: dict[str, Any] = {}
    if side.exists():
        try:
            ids = json.loads(side.read_text())
        except (OSError, ValueError) as exc:
            raise FormatError(f"{side} is not a readable pyto ids file: {exc}") from exc
    if first_id is None:
        first_id = int(ids.get("first_vesicle_id", FIRST_VESICLE_ID))
    table = labels_to_table(labels, vs, min_id=first_id)
    label_ids = table.ids
    mapping = dict(zip(ids.get("vesicle_ids", []), ids.get("table_ids", [])))
    if mapping and all(int(i) in mapping for i in label_ids):
        new_ids = np.array([mapping[int(i)] for i in label_ids], dtype=np.int64)
    else:
        if mapping:
            log.warning("%s: labels differ from the ids file %s; ids renumbered from 1", path, side)
        new_ids = label_ids - first_id + 1
    df = table.df.copy()
    df["id"] = new_ids
    df["pyto_label"] = label_ids
    return PytoLabels(
        table=table.with_df(df),
        cytoplasm=labels == CYTOPLASM_ID,
        active_zone=labels == ACTIVE_ZONE_ID,
        labels=labels,
    )

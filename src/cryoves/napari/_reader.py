"""napari reader: MRC/REC tomograms (voxel size as layer scale, in nm) and cryoves result folders.

Layer builders here return napari ``LayerData`` tuples and import nothing from napari, so the
editor widget reuses them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cryoves.io import MRC_SUFFIXES
from cryoves.results import is_result_folder
from cryoves.vesicles import RejectedTable, VesicleTable

log = logging.getLogger(__name__)

LayerData = tuple[Any, dict, str]

#: Points border colour per vesicle ``source``
SOURCE_COLOURS = {"auto": "yellow", "edited": "orange", "fitted": "cyan", "restored": "lime", "manual": "magenta"}


def get_reader(path: str | Sequence[str]) -> Callable[[Any], list[LayerData]] | None:
    """npe2 reader command: a reader for one MRC/REC file or one cryoves output folder, else None."""
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    p = Path(path)
    if is_result_folder(p):
        return read_result_folder
    if p.is_file() and (p.suffix.lower() in MRC_SUFFIXES or p.name.lower().endswith(".rec.nad")):
        return read_tomogram_file
    return None


def _one(path: str | Sequence[str]) -> Path:
    return Path(path[0] if isinstance(path, (list, tuple)) else path)


def read_tomogram_file(path: str | Sequence[str]) -> list[LayerData]:
    """Read an MRC/REC tomogram as an image layer with scale = voxel size in nm, (z, y, x)."""
    from cryoves.io import read_tomogram

    return [tomogram_layer(read_tomogram(_one(path)))]


def tomogram_layer(tomo: Any, name: str | None = None) -> LayerData:
    """Image ``LayerData`` of a :class:`cryoves.io.Tomogram` (scale in nm; metadata keeps path and Å)."""
    vs_nm = tuple(v / 10.0 for v in tomo.voxel_size)
    meta = {"cryoves_tomogram": str(tomo.path) if tomo.path else None, "voxel_size_a": tuple(tomo.voxel_size)}
    kwargs = {
        "name": name or (tomo.path.stem if tomo.path else "tomogram"),
        "scale": vs_nm,
        "metadata": meta,
        "contrast_limits": robust_contrast_limits(tomo.data),
        "colormap": "gray",
    }
    return (tomo.data, kwargs, "image")


def robust_contrast_limits(data: Any, max_samples: int = 2_000_000) -> tuple[float, float]:
    """0.5–99.5 % intensity percentiles from a strided subsample (never reads the whole volume)."""
    shape = np.asarray(data.shape)
    step = max(1, int(np.ceil((np.prod(shape) / max_samples) ** (1 / 3))))
    sample = np.asarray(data[::step, ::step, ::step], dtype=np.float32)
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return (0.0, 1.0)
    lo, hi = np.percentile(sample, [0.5, 99.5])
    return (float(lo), float(hi) if hi > lo else float(lo) + 1.0)


def vesicle_layers(
    table: VesicleTable, labels: np.ndarray, rejected: Any = None, name: str = "vesicles"
) -> list[LayerData]:
    """Labels layer (the rendered table) and a points layer (centres, size = diameter), plus the
    rejected candidates (hidden) when given."""
    scale = (table.voxel_size / 10.0,) * 3
    layers: list[LayerData] = [
        (labels, {"name": name, "scale": scale, "opacity": 0.35}, "labels"),
        (table.centres, points_kwargs(table, name=f"{name} (spheres)", scale=scale), "points"),
    ]
    if isinstance(rejected, RejectedTable):
        rejected = rejected.df
    if rejected is not None and len(rejected):
        c = rejected[["z", "y", "x"]].to_numpy(float)
        r = rejected["radius"].to_numpy(float)
        ok = np.isfinite(c).all(axis=1) & np.isfinite(r) & (r > 0)
        layers.append(
            (
                c[ok],
                {
                    "name": f"{name} (rejected candidates)",
                    "scale": scale,
                    "size": 2 * r[ok],
                    "face_color": "transparent",
                    "border_color": "red",
                    "border_width": 0.04,
                    "visible": False,
                },
                "points",
            )
        )
    return layers


def points_kwargs(table: VesicleTable, name: str, scale: Sequence[float]) -> dict:
    """Keyword arguments of the vesicle points layer (sizes = diameters in voxels)."""
    return {
        "name": name,
        "scale": tuple(scale),
        "size": 2 * table.radii,
        "face_color": "transparent",
        "border_color": source_colours(table),
        "border_width": 0.04,
        "features": {"id": table.ids},
    }


def source_colours(table: VesicleTable) -> list[str]:
    src = table.df["source"] if "source" in table.df.columns else ["auto"] * len(table)
    return [SOURCE_COLOURS.get(str(s), "yellow") for s in src]


def read_result_folder(path: str | Sequence[str]) -> list[LayerData]:
    """Read a ``cryoves segment`` output folder: tomogram (when its file exists) + vesicle layers."""
    from cryoves.napari._session import load_result

    outdir = _one(path)
    session, tomo = load_result(outdir, recover=False, fitter=None)
    layers = [] if tomo is None else [tomogram_layer(tomo)]
    for data, kwargs, kind in vesicle_layers(session.table, session.labels, session.rejected):
        kwargs.setdefault("metadata", {})["cryoves_result"] = str(outdir)
        layers.append((data, kwargs, kind))
    return layers

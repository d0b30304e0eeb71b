"""Local OME-Zarr (NGFF v0.4, and the v0.5 ``ome`` attribute layout) reading and writing.

The first (full-resolution) dataset of the first multiscale is read lazily as a zarr array
with axes (z, y, x); other axes must have size 1 and are dropped. The voxel size is the product
of the multiscale-level and dataset-level ``scale`` transforms of the spatial axes, converted to Å
from the axis ``unit`` (angstrom, nanometer, micrometer; missing unit → error unless overridden).
A ``translation`` transform becomes the origin (Å).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from cryoves.atomic import atomic_dir
from cryoves.errors import FormatError, InputError
from cryoves.io.tomogram import Tomogram, resolve_voxel_size, validate_volume

log = logging.getLogger(__name__)

_NGFF_UNIT_TO_A = {"angstrom": 1.0, "nanometer": 10.0, "micrometer": 1e4, "millimeter": 1e7, "meter": 1e10}


def read_ome_zarr(path: str | Path, voxel_size: Any = None, *, validate: bool = True) -> Tomogram:
    """Read a local OME-Zarr image as a :class:`Tomogram` with a lazy zarr array (z, y, x).

    ``voxel_size`` (Å) overrides the metadata; ``validate=False`` skips the checks and lists
    problems in ``header_notes``.
    """
    import zarr

    path = Path(path)
    if not path.exists():
        raise InputError(f"file not found: {path}; check the path")
    notes: list[str] = []
    try:
        group = zarr.open_group(str(path), mode="r")
        attrs = dict(group.attrs)
    except Exception as exc:  # zarr raises many types for a non-zarr folder
        raise FormatError(f"{path} is not a readable OME-Zarr group: {exc}") from exc
    multiscales = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")
    if not multiscales:
        raise FormatError(f"{path} has no OME-NGFF 'multiscales' metadata; not an OME-Zarr image")
    ms = multiscales[0]
    try:
        dataset = ms["datasets"][0]
        array = group[dataset["path"]]
    except (KeyError, IndexError, TypeError) as exc:
        raise FormatError(f"{path}: OME-Zarr multiscales metadata has no readable dataset ({exc})") from exc
    axes = _axes(ms, array.ndim, path)
    scale, translation = _transforms(ms, dataset, array.ndim)
    space = [i for i, a in enumerate(axes) if a["name"].lower() in ("z", "y", "x")]
    order = {axes[i]["name"].lower(): i for i in space}
    if sorted(order) != ["x", "y", "z"]:
        raise FormatError(f"{path}: OME-Zarr image needs spatial axes z, y, x; has {[a['name'] for a in axes]}")
    extra = [i for i in range(array.ndim) if i not in space]
    if any(array.shape[i] != 1 for i in extra):
        raise InputError(
            f"{path}: OME-Zarr image has non-spatial axes of size > 1 ({[axes[i]['name'] for i in extra]}); "
            "extract one channel/time point first"
        )
    data: Any = array
    if extra or [order[a] for a in "zyx"] != space:
        index = tuple(0 if i in extra else slice(None) for i in range(array.ndim))
        data = _LazyView(array, index, [order[a] for a in "zyx"])
    header_vs = _voxel_size(axes, scale, order, notes)
    origin = _origin(axes, translation, order)
    vs = resolve_voxel_size(
        voxel_size, header_vs, where=f"OME-Zarr metadata (axis units) of {path.name}", validate=validate, notes=notes
    )
    if validate:
        validate_volume(data, source=str(path))
    return Tomogram(data=data, voxel_size=vs, origin=origin, path=path, header_notes=notes)


class _LazyView:
    """Drops size-1 axes and reorders the spatial axes to (z, y, x) without loading the array."""

    def __init__(self, array: Any, index: tuple, zyx: list[int]):
        self._array, self._index = array, index
        kept = [i for i, s in enumerate(index) if isinstance(s, slice)]
        self._perm = [kept.index(i) for i in zyx]
        self.shape = tuple(int(array.shape[i]) for i in zyx)
        self.dtype = np.dtype(array.dtype)
        self.ndim = 3

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        if len(key) > 3 or not all(isinstance(k, slice) for k in key):
            return np.asarray(self)[key]
        key = key + (slice(None),) * (3 - len(key))
        kept = [i for i, s in enumerate(self._index) if isinstance(s, slice)]
        index = list(self._index)
        for out_axis, k in enumerate(key):  # out axis j is kept axis self._perm[j]
            index[kept[self._perm[out_axis]]] = k
        return np.asarray(self._array[tuple(index)]).transpose(self._perm)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = np.asarray(self._array[self._index]).transpose(self._perm)
        return out if dtype is None else out.astype(dtype)


def _axes(ms: dict, ndim: int, path: Path) -> list[dict]:
    axes = ms.get("axes")
    if axes is None:  # NGFF <= 0.3: implicit t, c, z, y, x
        axes = ["t", "c", "z", "y", "x"][-ndim:]
    axes = [a if isinstance(a, dict) else {"name": str(a)} for a in axes]
    if len(axes) != ndim:
        raise FormatError(f"{path}: OME-Zarr lists {len(axes)} axes for a {ndim}-D array")
    return axes


def _transforms(ms: dict, dataset: dict, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    scale, translation = np.ones(ndim), np.zeros(ndim)
    # dataset-level transforms apply first, then the multiscale-level ones
    for transforms in (dataset.get("coordinateTransformations", []), ms.get("coordinateTransformations", [])):
        for t in transforms or []:
            if t.get("type") == "scale" and "scale" in t:
                s = np.asarray(t["scale"], dtype=float)
                scale, translation = scale * s, translation * s
            elif t.get("type") == "translation" and "translation" in t:
                translation = translation + np.asarray(t["translation"], dtype=float)
    return scale, translation


def _voxel_size(axes: list[dict], scale: np.ndarray, order: dict, notes: list[str]) -> tuple | None:
    out = []
    for name in "zyx":
        i = order[name]
        unit = axes[i].get("unit")
        factor = _NGFF_UNIT_TO_A.get(str(unit).lower()) if unit else None
        if factor is None:
            notes.append(f"axis {name} has unit {unit!r}; cannot tell the voxel size")
            return None
        out.append(float(scale[i]) * factor)
    return tuple(out)


def _origin(axes: list[dict], translation: np.ndarray, order: dict) -> tuple[float, float, float]:
    out = []
    for name in "zyx":
        i = order[name]
        factor = _NGFF_UNIT_TO_A.get(str(axes[i].get("unit", "")).lower(), 1.0)
        out.append(float(translation[i]) * factor)
    return (out[0], out[1], out[2])


def write_ome_zarr(
    path: str | Path,
    data: Any,
    voxel_size: Any,
    origin: Any = (0.0, 0.0, 0.0),
    *,
    unit: str = "nanometer",
    chunks: tuple[int, int, int] = (64, 64, 64),
) -> Path:
    """Write a (z, y, x) volume as a single-scale OME-Zarr (NGFF v0.4, zarr format 2), atomically.

    ``voxel_size`` and ``origin`` are in Å (scalar or (z, y, x)); they are stored as ``scale`` and
    ``translation`` in ``unit`` ("angstrom" or "nanometer").
    """
    import zarr

    if unit not in ("angstrom", "nanometer"):
        raise InputError(f"OME-Zarr unit must be 'angstrom' or 'nanometer', got {unit!r}")
    arr = np.asarray(data)
    if arr.ndim != 3:
        raise InputError(f"write_ome_zarr needs a 3-D (z, y, x) array, got shape {arr.shape}")
    factor = _NGFF_UNIT_TO_A[unit]
    scale = [float(v) / factor for v in np.broadcast_to(np.asarray(voxel_size, dtype=float), (3,))]
    trans = [float(v) / factor for v in np.broadcast_to(np.asarray(origin, dtype=float), (3,))]
    chunks = tuple(min(int(c), int(s)) for c, s in zip(chunks, arr.shape))
    with atomic_dir(path) as tmp:
        group = zarr.open_group(str(tmp), mode="w", zarr_format=2)
        z = group.create_array("0", shape=arr.shape, dtype=arr.dtype, chunks=chunks)
        z[...] = arr
        transforms: list[dict] = [{"type": "scale", "scale": scale}]
        if any(trans):
            transforms.append({"type": "translation", "translation": trans})
        group.attrs["multiscales"] = [
            {
                "version": "0.4",
                "name": Path(path).stem,
                "axes": [{"name": a, "type": "space", "unit": unit} for a in "zyx"],
                "datasets": [{"path": "0", "coordinateTransformations": transforms}],
            }
        ]
    return Path(path)

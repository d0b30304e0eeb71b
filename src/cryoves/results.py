"""The result folder: its file names, its manifest, how it is written and how it is read back.

A result folder is what ``cryoves segment`` writes and what the napari editor saves after a review
(see docs/formats.md). Every file in it is written atomically and ``manifest.json`` **last**,
listing the SHA-256 of every output: a folder whose manifest and checksums agree is complete
(:func:`is_complete_result`); anything else is an interrupted run. :func:`open_result` reads
either kind back (vesicle table, rejected table, voxel size, grid shape, paths).

Every other module names these files through :data:`OUTPUT_FILES` and :data:`MANIFEST_NAME`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cryoves import parallel
from cryoves.atomic import _as_output_error, write_json_atomic
from cryoves.checksum import file_sha256
from cryoves.errors import FormatError, InputError, OutputError, OutputExistsError
from cryoves.vesicles import RejectedTable, VesicleTable

log = logging.getLogger(__name__)

#: Name of the file that marks an output folder as holding a complete result; written last.
#: Also marks the output folders of ``simulate`` and ``train``.
MANIFEST_NAME = "manifest.json"

#: Fixed output names inside a result folder (see docs/formats.md).
OUTPUT_FILES = {
    "vesicles": "vesicles.csv",
    "star": "vesicles.star",
    "labels": "labels.mrc",
    "probability": "probability.mrc",
    "mod": "vesicles.mod",
    "rejected": "rejected.csv",
    "pyto": "pyto_labels.mrc",
    "cytoplasm_mask": "cytoplasm_mask.mrc",
    "active_zone_mask": "active_zone_mask.mrc",
}

#: ``manifest["kind"]`` of a folder written by ``cryoves segment`` (older manifests have no kind).
SEGMENT_KIND = "segment"
#: ``manifest["kind"]`` of a folder saved by the napari editor.
REVIEW_KIND = "review"


# ----------------------------------------------------------------------------------- manifests
def segment_manifest(
    *,
    version: str,
    created: str,
    inputs: dict[str, Any],
    parameters: dict[str, Any],
    prediction: dict[str, Any],
    threshold: float,
    threshold_searched: list[float] | None,
    n_vesicles: int,
    n_rejected: int,
    timings_s: dict[str, float],
) -> dict[str, Any]:
    """The manifest of a ``cryoves segment`` result (``outputs`` is filled in by :func:`write_result`).

    ``inputs``: ``tomogram`` (path or None), ``sha256``, ``shape`` (z, y, x), ``voxel_size_a`` and
    ``origin_a`` ((z, y, x), Å).
    """
    return {
        "kind": SEGMENT_KIND,
        "cryoves_version": version,
        "command": "segment",
        "created": created,
        "inputs": inputs,
        "parameters": parameters,
        "prediction": prediction,
        "threshold": threshold,
        "threshold_searched": threshold_searched,
        "n_vesicles": n_vesicles,
        "n_rejected": n_rejected,
        "timings_s": timings_s,
        "outputs": {},
    }


def review_manifest(
    *,
    session_id: str,
    source_dir: str | os.PathLike | None,
    inputs: dict[str, Any],
    counts: dict[str, Any],
    voxel_size_a: float,
    shape: Iterable[int],
    origin_a: Iterable[float] = (0.0, 0.0, 0.0),
) -> dict[str, Any]:
    """The manifest of a folder saved by the napari editor (``outputs`` filled in by :func:`write_result`)."""
    return {
        "kind": REVIEW_KIND,
        "review": {"session_id": session_id, "source_dir": str(source_dir) if source_dir else None},
        "inputs": inputs,
        "counts": counts,
        "voxel_size_a": voxel_size_a,
        "shape": [int(s) for s in shape],
        "origin_a": [float(o) for o in origin_a],
        "outputs": {},
    }


def read_manifest(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The folder's manifest, None when there is none; :class:`FormatError` when it is not JSON."""
    path = Path(folder) / MANIFEST_NAME
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc}") from exc
    try:
        manifest = json.loads(text)
    except ValueError as exc:
        raise FormatError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict):
        raise FormatError(f"{path} is not a cryoves manifest (no JSON object)")
    return manifest


def manifest_kind(manifest: dict[str, Any] | None) -> str | None:
    """``segment``, ``review`` or None (no manifest)."""
    if manifest is None:
        return None
    return str(manifest.get("kind", SEGMENT_KIND))


# ----------------------------------------------------------------------------------- writing
def prepare_output_dir(outdir: str | os.PathLike, *, force: bool = False) -> Path:
    """Create ``outdir`` for a command's outputs.

    Refuses (``OutputExistsError``) when the folder already holds a complete result, i.e. a
    manifest, and ``force`` is false. Checks that the folder is writable before any work starts.
    """
    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise OutputError(f"output {outdir} exists and is not a folder; choose another --output")
    if (outdir / MANIFEST_NAME).exists() and not force:
        raise OutputExistsError(
            f"{outdir} already holds a result ({MANIFEST_NAME}); pass --force to overwrite it "
            "or choose another --output"
        )
    try:
        outdir.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=outdir, prefix=".write-test.", delete=True)
        probe.close()
    except OSError as exc:
        raise _as_output_error(exc, outdir) from exc
    return outdir


def write_result(out: Path, write_files: Callable[[Path], list[str]], manifest: dict[str, Any]) -> Path:
    """Write a result folder transactionally: the files, then the manifest listing their checksums.

    ``write_files(out)`` writes the outputs (each atomically) and returns their names. The old
    manifest is removed first (a half-rewritten folder must not look complete), and temporaries
    of a killed earlier run are cleared; on any failure the outputs are removed, so the folder
    holds either a complete result or no result. Returns the manifest path.
    """
    manifest_path = out / MANIFEST_NAME
    manifest_path.unlink(missing_ok=True)
    for name in [*OUTPUT_FILES.values(), MANIFEST_NAME]:  # temporaries of a killed earlier run
        for stale in out.glob(f".{Path(name).stem}.*.tmp{Path(name).suffix}"):
            with contextlib.suppress(OSError):
                stale.unlink()
    written: list[str] = []
    try:
        written = write_files(out)
        sums = parallel.thread_map(lambda name: file_sha256(out / name), written)  # hashlib releases the GIL
        manifest["outputs"] = dict(zip(written, sums, strict=True))
        return write_json_atomic(manifest_path, manifest)
    except BaseException:
        # e.g. disk full half-way: leave no partial result (the manifest is already gone)
        from cryoves.io.pyto import ids_path

        for name in {*OUTPUT_FILES.values(), ids_path(out / OUTPUT_FILES["pyto"]).name, *written}:
            with contextlib.suppress(OSError):
                (out / name).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------------- reading
def is_complete_result(outdir: str | os.PathLike) -> bool:
    """True when ``outdir`` holds a manifest (segment or review) and every output it lists with a
    matching checksum."""
    outdir = Path(outdir)
    try:
        manifest = read_manifest(outdir)
        outputs = manifest["outputs"] if manifest is not None else None
    except (InputError, FormatError, KeyError, TypeError):
        return False
    if not isinstance(outputs, dict) or not outputs:
        return False
    return all((outdir / name).is_file() and file_sha256(outdir / name) == sha for name, sha in outputs.items())


@dataclass
class Result:
    """A result folder read back (:func:`open_result`)."""

    path: Path
    vesicles: VesicleTable
    """The vesicles, carrying the voxel size, grid shape and origin below."""
    rejected: RejectedTable
    """The removed candidates (empty when the folder has no rejected.csv)."""
    voxel_size_a: float
    """Isotropic voxel size (Å) of the grid the result was made on."""
    shape: tuple[int, int, int] | None
    """Tomogram grid (z, y, x); None when neither the manifest nor labels.mrc tells it."""
    manifest: dict[str, Any] = field(default_factory=dict)
    """The manifest; empty for a folder without one (an interrupted run or a hand-made folder)."""

    @property
    def kind(self) -> str | None:
        return manifest_kind(self.manifest or None)

    @property
    def inputs(self) -> dict[str, Any]:
        return dict(self.manifest.get("inputs") or {})

    @property
    def tomogram_path(self) -> Path | None:
        """The input tomogram named in the manifest (relative names resolved against the folder)."""
        name = self.inputs.get("tomogram")
        if not name:
            return None
        p = Path(name)
        return self.path / p if not p.is_absolute() and not p.exists() else p

    @property
    def origin_a(self) -> tuple[float, float, float]:
        """Grid origin (Å, z, y, x) from the manifest; (0, 0, 0) when it does not tell."""
        return _result_origin(self.manifest) or (0.0, 0.0, 0.0)

    def file(self, key: str) -> Path:
        """Path of output ``key`` of :data:`OUTPUT_FILES` (it may not exist)."""
        return self.path / OUTPUT_FILES[key]

    @property
    def paths(self) -> dict[str, Path]:
        """The outputs of :data:`OUTPUT_FILES` present in the folder, by key."""
        return {key: self.path / name for key, name in OUTPUT_FILES.items() if (self.path / name).is_file()}


def is_result_folder(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder with a vesicle table, i.e. something :func:`open_result` can read."""
    p = Path(path)
    return p.is_dir() and (p / OUTPUT_FILES["vesicles"]).is_file()


def result_voxel_size(folder: str | os.PathLike, manifest: dict[str, Any] | None = None) -> float | None:
    """The voxel size (Å, x) of a result: from the manifest, else the header of labels.mrc or
    probability.mrc; None when nothing tells it."""
    folder = Path(folder)
    manifest = read_manifest(folder) if manifest is None else manifest
    if manifest:
        vs = (manifest.get("inputs") or {}).get("voxel_size_a") or manifest.get("voxel_size_a")
        if vs is not None:
            return float(np.asarray(vs, dtype=float).ravel()[-1])  # (z, y, x) list or scalar; tables use x
    for key in ("labels", "probability"):
        path = folder / OUTPUT_FILES[key]
        if path.is_file():
            import mrcfile

            try:
                with mrcfile.mmap(path, permissive=True) as mrc:
                    vx = float(mrc.voxel_size.x)
            except (OSError, ValueError):
                continue
            if vx > 0:
                return vx
    return None


def _result_origin(manifest: dict[str, Any]) -> tuple[float, float, float] | None:
    origin = (manifest.get("inputs") or {}).get("origin_a") or manifest.get("origin_a")
    return tuple(float(v) for v in origin) if origin else None  # type: ignore[return-value]


def _result_shape(folder: Path, manifest: dict[str, Any]) -> tuple[int, int, int] | None:
    shape = (manifest.get("inputs") or {}).get("shape") or manifest.get("shape")
    if shape:
        return tuple(int(v) for v in shape)  # type: ignore[return-value]
    labels = folder / OUTPUT_FILES["labels"]
    if labels.is_file():
        import mrcfile

        try:
            with mrcfile.mmap(labels, permissive=True) as mrc:
                return tuple(int(v) for v in mrc.data.shape)  # type: ignore[return-value]
        except (OSError, ValueError):
            return None
    return None


def open_result(path: str | os.PathLike, *, voxel_size: float | None = None) -> Result:
    """Read a result folder (``cryoves segment`` output or a saved review).

    ``voxel_size`` (Å) overrides the one recovered by :func:`result_voxel_size`. The vesicle
    table carries the grid shape and origin the manifest names (``inputs.shape``,
    ``inputs.origin_a``; the shape of ``labels.mrc`` when the manifest does not tell). Raises
    :class:`InputError` when the folder has no vesicle table.
    """
    folder = Path(path)
    csv = folder / OUTPUT_FILES["vesicles"]
    if not csv.is_file():
        raise InputError(f"{folder} holds no {OUTPUT_FILES['vesicles']}; give a 'cryoves segment' output folder")
    manifest = read_manifest(folder) or {}
    vs = voxel_size if voxel_size is not None else result_voxel_size(folder, manifest)
    shape = _result_shape(folder, manifest)
    table = VesicleTable.read_csv(csv, voxel_size=vs, shape=shape, origin=_result_origin(manifest))
    rej_path = folder / OUTPUT_FILES["rejected"]
    rejected = _read_rejected(rej_path, len(table)) if rej_path.is_file() else RejectedTable.empty()
    return Result(folder, table, rejected, float(table.voxel_size), shape, manifest)


def _read_rejected(path: Path, n_vesicles: int) -> RejectedTable:
    """The rejected table; folders written before ids were unique get ids after the vesicles'."""
    import pandas as pd

    try:
        return RejectedTable.read_csv(path)
    except FormatError:
        df = pd.read_csv(path)
        if "id" not in df.columns or not df["id"].duplicated().any():
            raise
        log.info("%s: duplicate candidate ids (older cryoves); renumbered after the vesicles", path)
        return RejectedTable(df.drop(columns="id")).renumbered(n_vesicles + 1)

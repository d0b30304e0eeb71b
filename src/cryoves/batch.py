"""Many tomograms on Dask: local cluster, an existing scheduler, or SLURM/PBS via dask-jobqueue.

Each tomogram is one task that runs :func:`cryoves.pipeline.segment` into its own folder. A task
never raises: failures come back as a record with the error, so one bad tomogram never sinks the
batch. A folder whose manifest and outputs are complete is skipped (``force`` redoes it). Outputs
are written atomically and the manifest last, so a worker killed mid-task leaves nothing that looks
complete, and Dask re-runs the task on another worker.
"""

from __future__ import annotations

import glob
import logging
import os
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from cryoves.atomic import atomic_path, make_dir
from cryoves.cluster import managed_client
from cryoves.errors import CryovesError, InputError
from cryoves.io import MRC_SUFFIXES, TIFF_SUFFIXES
from cryoves.pipeline import SegmentConfig
from cryoves.results import OUTPUT_FILES, is_complete_result

log = logging.getLogger(__name__)

SUMMARY_NAME = "batch_summary.csv"
SUMMARY_COLUMNS = ["tomogram", "output", "status", "n_vesicles", "seconds", "worker", "error"]
_MANIFEST_KEYS = {"voxel_size", "mask_model", "mask", "az_model", "az_mask", "invert", "vesicle_radius_nm", "output"}

# Models loaded in this worker process, by name: one load per worker, not per task.
_WORKER_MODELS: dict[str, Any] = {}


@dataclass
class BatchItem:
    """One tomogram of a batch with its per-tomogram overrides of the shared configuration."""

    tomogram: Path
    output: str
    overrides: dict[str, Any] = field(default_factory=dict)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in sorted(MRC_SUFFIXES | TIFF_SUFFIXES | {".zarr"}, key=len, reverse=True):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name.rstrip(".") or path.name


def _is_tomogram(path: Path) -> bool:
    s = path.suffix.lower()
    return s in MRC_SUFFIXES or s in TIFF_SUFFIXES or s == ".zarr" or path.name.lower().endswith(".rec.nad")


def collect_inputs(inputs: list[str | os.PathLike]) -> list[BatchItem]:
    """Expand files, folders, glob patterns and CSV/YAML manifests into batch items.

    A manifest has one row per tomogram: column ``tomogram`` (required; relative paths are
    relative to the manifest) and optional ``output``, ``voxel_size``, ``mask_model``, ``mask``,
    ``az_model``, ``az_mask``, ``invert``, ``vesicle_radius_nm``.
    """
    items: list[BatchItem] = []
    for raw in inputs:
        text = str(raw)
        path = Path(text)
        if path.suffix.lower() in {".csv", ".yaml", ".yml"} and path.is_file():
            items.extend(_read_manifest(path))
        elif path.is_dir() and path.suffix.lower() != ".zarr":
            items.extend(BatchItem(p, _stem(p)) for p in sorted(path.iterdir()) if _is_tomogram(p))
        elif any(ch in text for ch in "*?["):
            matches = sorted(Path(p) for p in glob.glob(text))
            items.extend(BatchItem(p, _stem(p)) for p in matches if _is_tomogram(p))
        else:
            # A missing file is kept: it becomes a 'failed' row, not an abort of the whole batch.
            items.append(BatchItem(path, _stem(path)))
    if not items:
        raise InputError(f"no tomograms found in {', '.join(map(str, inputs))}")
    return _unique_outputs(items)


def _read_manifest(path: Path) -> list[BatchItem]:
    try:
        if path.suffix.lower() == ".csv":
            rows = pd.read_csv(path).to_dict("records")
        else:
            import yaml

            data = yaml.safe_load(path.read_text())
            rows = data.get("tomograms", data) if isinstance(data, dict) else data
    except Exception as exc:  # broad on purpose: any parse failure is a bad manifest
        raise InputError(f"cannot read batch manifest {path}: {exc}") from exc
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "tomogram" in r for r in rows):
        raise InputError(f"batch manifest {path} needs a list of rows with a 'tomogram' column")
    items = []
    for row in rows:
        tomo = Path(str(row["tomogram"]))
        if not tomo.is_absolute():
            tomo = path.parent / tomo
        unknown = set(row) - _MANIFEST_KEYS - {"tomogram"}
        if unknown:
            raise InputError(f"batch manifest {path}: unknown column(s) {', '.join(sorted(unknown))}")
        over = {k: v for k, v in row.items() if k in _MANIFEST_KEYS and k != "output" and not _isna(v)}
        for key in ("mask_model", "mask", "az_model", "az_mask"):
            if key in over and not Path(str(over[key])).is_absolute():
                over[key] = str(path.parent / str(over[key]))
        out = str(row.get("output")) if not _isna(row.get("output")) else _stem(tomo)
        items.append(BatchItem(tomo, out, over))
    return items


def _isna(v: Any) -> bool:
    return v is None or (isinstance(v, float) and v != v)


def _unique_outputs(items: list[BatchItem]) -> list[BatchItem]:
    seen: dict[str, int] = {}
    for it in items:
        n = seen.get(it.output, 0)
        seen[it.output] = n + 1
        if n:
            it.output = f"{it.output}_{n + 1}"
    return items


def segment_one(item: BatchItem, outroot: str, config: SegmentConfig, force: bool) -> dict[str, Any]:
    """Run one tomogram; never raises (the error goes into the returned record)."""
    from cryoves.pipeline import segment

    outdir = Path(outroot) / item.output
    record: dict[str, Any] = {
        "tomogram": str(item.tomogram),
        "output": str(outdir),
        "status": "ok",
        "n_vesicles": None,
        "seconds": 0.0,
        "worker": _worker_name(),
        "error": "",
    }
    t0 = time.perf_counter()
    try:
        cfg = replace(config, **item.overrides)
        model = _worker_model(cfg.model) if cfg.from_probability is None else None
        res = segment(item.tomogram, outdir, cfg, force=True, model=model)
        record["n_vesicles"] = len(res.vesicles)
    except CryovesError as exc:
        record.update(status="failed", error=" ".join(str(exc).split()))
    except Exception as exc:  # noqa: BLE001 - isolate every failure to its tomogram
        log.debug("batch task failed\n%s", traceback.format_exc())
        record.update(status="failed", error=f"{type(exc).__name__}: {' '.join(str(exc).split())}")
    record["seconds"] = round(time.perf_counter() - t0, 2)
    return record


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().name)
    except (ImportError, ValueError):
        return "local"


def _worker_model(name: str) -> Any:
    if name not in _WORKER_MODELS:
        from cryoves.model import load_model

        _WORKER_MODELS[name] = load_model(name)
    return _WORKER_MODELS[name]


def run_batch(
    inputs: list[str | os.PathLike],
    outroot: str | os.PathLike,
    config: SegmentConfig | None = None,
    *,
    client: Any = None,
    scheduler: str | None = None,
    slurm: str | os.PathLike | None = None,
    n_workers: int | None = None,
    force: bool = False,
    progress: bool = True,
) -> pd.DataFrame:
    """Segment every tomogram of ``inputs`` into ``outroot/<name>/``; return the summary table.

    The summary (one row per tomogram: status ok | skipped | failed, vesicle count, seconds,
    worker, error) is also written to ``outroot/batch_summary.csv``.
    """
    config = config or SegmentConfig()
    items = collect_inputs(inputs)
    outroot = make_dir(outroot)
    records: list[dict[str, Any]] = []
    todo: list[BatchItem] = []
    for it in items:
        if not force and is_complete_result(outroot / it.output):
            records.append(
                {"tomogram": str(it.tomogram), "output": str(outroot / it.output), "status": "skipped",
                 "n_vesicles": _count_rows(outroot / it.output / OUTPUT_FILES["vesicles"]), "seconds": 0.0,
                 "worker": "", "error": ""}
            )
        else:
            todo.append(it)
    if todo:
        with managed_client(len(todo), client=client, scheduler=scheduler, slurm=slurm, n_workers=n_workers) as c:
            records.extend(_run_tasks(c, todo, str(outroot), config, progress))
    order = {str(it.tomogram): k for k, it in enumerate(items)}
    summary = pd.DataFrame(records, columns=SUMMARY_COLUMNS)
    summary = summary.sort_values("tomogram", key=lambda s: s.map(order)).reset_index(drop=True)
    with atomic_path(outroot / SUMMARY_NAME) as tmp:
        summary.to_csv(tmp, index=False)
    return summary


def _count_rows(csv: Path) -> int | None:
    try:
        return int(len(pd.read_csv(csv)))
    except (OSError, ValueError, pd.errors.EmptyDataError):
        return None


def _run_tasks(client: Any, items: list[BatchItem], outroot: str, config: SegmentConfig, progress: bool) -> list[dict]:
    from distributed import as_completed
    from tqdm.auto import tqdm

    futures = {
        client.submit(segment_one, it, outroot, config, True, pure=False, key=f"segment-{it.output}-{time.time_ns()}"): it
        for it in items
    }
    records = []
    bar = tqdm(total=len(futures), desc="tomograms", unit="tomo", disable=not progress)
    for fut in as_completed(futures):
        it = futures[fut]
        try:
            rec = fut.result()
        except Exception as exc:  # noqa: BLE001 - e.g. KilledWorker after repeated worker deaths
            rec = {"tomogram": str(it.tomogram), "output": str(Path(outroot) / it.output), "status": "failed",
                   "n_vesicles": None, "seconds": 0.0, "worker": "", "error": f"{type(exc).__name__}: {exc}"}
        records.append(rec)
        bar.update(1)
        bar.set_postfix_str(f"{it.output}: {rec['status']}")
    bar.close()
    return records

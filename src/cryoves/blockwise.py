"""One huge tomogram split across Dask workers: blockwise prediction and blockwise sphere fitting.

Both functions give the same result as the single-process path (:func:`cryoves.predict.predict_tomogram`,
:func:`cryoves.postprocess.spheres.fit_spheres`), not an approximation of it:

* **Prediction.** The client resamples to the model grid and normalises with the global statistics
  exactly as ``predict_tomogram`` does, and stores the normalised volume as a ``.npy`` memory map
  that every worker reads. The single-process tile plan (:func:`cryoves.predict.plan_tiles`, which
  depends on the whole volume's shape) is grouped into blocks of about ``block`` voxels; a block task
  reads its kept box plus the tiles' context (the halo, ``context`` ≥ the network's receptive-field
  radius) and predicts the very same tiles, so each output voxel comes from the same tile and the
  same arithmetic as in one process. Block results come back to the client, which writes them into
  the output, so no two processes ever write to one file.
* **Sphere fitting.** The client takes the starting spheres and neighbour lists of the whole label
  volume (:func:`cryoves.postprocess.spheres.initial_spheres`, as ``fit_spheres`` does), groups the
  objects by the block of their centroid, and sends each task the intensity of its objects' bounding box plus a halo of
  ~1.5 vesicle diameters. Coordinates stay those of the whole volume (a read-only window), so
  every floating-point operation is the one of the single-process fit; a box that would leave the
  window is refitted on the client (counted in the log). The table, whose profile correlation is a
  statistic over all vesicles, is built on the client (``table_from_fits``) once all blocks are back.

The model is sent to every worker once (``client.scatter(..., broadcast=True)``) and its inference
copy is cached in the worker process.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cryoves.errors import ParameterError
from cryoves.io.tomogram import Tomogram

log = logging.getLogger(__name__)

#: Prediction blocks per worker when the block size is automatic (load balance vs per-task overhead).
BLOCKS_PER_WORKER = 2
#: Default sphere-fitting block (tomogram voxels, z, y, x).
DEFAULT_FIT_BLOCK = (128, 256, 256)

# Inference copies of the models this worker process has seen: id(model) -> (model, device,
# precision, prepared net). The model object is kept so that its id cannot be reused.
_WORKER_NETS: dict[int, tuple[Any, str, str, Any]] = {}
_MAX_WORKER_NETS = 4


# --------------------------------------------------------------------------------------------
# prediction


@dataclass
class Block:
    """A group of tiles of the single-process plan. ``keep``: the output box (model-grid voxels,
    (z, y, x) slices) the block fills; ``src``: the input box its tiles read (may extend beyond the
    volume end, read as zeros); ``tiles``: :class:`cryoves.predict.Tile` in volume coordinates."""

    keep: tuple[slice, slice, slice]
    src: tuple[slice, slice, slice]
    tiles: list[Any]


def _block_shape(block: int | Sequence[int]) -> tuple[int, int, int]:
    b = np.broadcast_to(np.asarray(block), (3,))
    if not np.issubdtype(b.dtype, np.integer) or np.any(b < 1):
        raise ParameterError(f"block must be positive integers (z, y, x), got {block!r}")
    return tuple(int(v) for v in b)  # type: ignore[return-value]


def plan_blocks(
    shape: Sequence[int], block: int | Sequence[int], tile: int, context: int | None = None
) -> list[Block]:
    """Group the tiles that :func:`cryoves.predict.predict_array` would use for a volume of
    ``shape`` (z, y, x, model grid) into blocks of about ``block`` voxels per axis.

    A tile belongs to the block whose grid cell holds the start of its kept range, so the blocks'
    kept boxes partition the volume and are unions of whole tiles (a block is never smaller than
    one tile).
    """
    from cryoves.predict import DEFAULT_CONTEXT, Tile, plan_axis

    context = DEFAULT_CONTEXT if context is None else context
    bshape = _block_shape(block)
    groups = []
    for n, b in zip(shape, bshape, strict=True):
        axis: dict[int, list[tuple[int, int, int, int]]] = {}
        for entry in plan_axis(int(n), int(tile), int(context)):
            axis.setdefault(entry[2] // b, []).append(entry)
        groups.append(list(axis.values()))
    blocks = []
    for gz in groups[0]:
        for gy in groups[1]:
            for gx in groups[2]:
                axes = (gz, gy, gx)
                keep = tuple(slice(g[0][2], g[-1][3]) for g in axes)
                src = tuple(slice(min(e[0] for e in g), max(e[1] for e in g)) for g in axes)
                tiles = [
                    Tile(tuple(slice(a[0], a[1]) for a in (ez, ey, ex)), tuple(slice(a[2], a[3]) for a in (ez, ey, ex)))
                    for ez in gz
                    for ey in gy
                    for ex in gx
                ]
                blocks.append(Block(keep, src, tiles))  # type: ignore[arg-type]
    return blocks


def auto_block(shape: Sequence[int], tile: int, context: int | None, n_blocks: int) -> tuple[int, int, int]:
    """A block size (model-grid voxels, z, y, x) that splits the tile plan of ``shape`` into at
    least ``n_blocks`` blocks where the tiles allow it, cutting the axis with most tiles per block first."""
    from cryoves.predict import DEFAULT_CONTEXT, plan_axis

    context = DEFAULT_CONTEXT if context is None else context
    n_tiles = [len(plan_axis(int(n), int(tile), int(context))) for n in shape]
    groups = [1, 1, 1]
    while math.prod(groups) < n_blocks and any(g < n for g, n in zip(groups, n_tiles, strict=True)):
        ax = max((a for a in range(3) if groups[a] < n_tiles[a]), key=lambda a: n_tiles[a] / groups[a])
        groups[ax] += 1
    return tuple(max(1, -(-int(n) // g)) for n, g in zip(shape, groups, strict=True))  # type: ignore[return-value]


def _worker_net(model: Any, device: str, precision: str) -> Any:
    """The prepared inference network of ``model`` in this process (prepared once)."""
    from cryoves.device import choose_device
    from cryoves.predict import prepare_network

    hit = _WORKER_NETS.get(id(model))
    if hit is not None and hit[0] is model and hit[1:3] == (device, precision):
        return hit[3]
    if len(_WORKER_NETS) >= _MAX_WORKER_NETS:
        _WORKER_NETS.clear()
    net = prepare_network(model.net, choose_device(device), precision)
    _WORKER_NETS[id(model)] = (model, device, precision, net)
    return net


def _read_box(volume: Any, box: tuple[slice, ...]) -> np.ndarray:
    """``volume[box]`` as float32, zero-filled where the box extends beyond the volume end."""
    buf = np.zeros(tuple(s.stop - s.start for s in box), np.float32)
    sl = tuple(slice(s.start, min(s.stop, n)) for s, n in zip(box, volume.shape, strict=True))
    part = np.asarray(volume[sl], dtype=np.float32)
    buf[tuple(slice(0, p) for p in part.shape)] = part
    return buf


def predict_tiles(
    net: Any, volume: Any, tiles: list[Any], out: Any, *, device: str, precision: str, tta: int, batch_size: int
) -> None:
    """Predict the given tiles of ``volume`` (normalised, model grid) into ``out`` (same
    coordinates), with exactly the per-tile arithmetic of :func:`cryoves.predict.predict_array`.
    ``net`` comes from :func:`cryoves.predict.prepare_network`."""
    from cryoves.device import choose_device
    from cryoves.predict import predict_tiles as _predict_tiles

    _predict_tiles(net, volume, tiles, out, choose_device(device), precision, tta, batch_size)


def _shift(box: tuple[slice, ...], origin: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(s.start - o, s.stop - o) for s, o in zip(box, origin, strict=True))


def _predict_block(
    input_path: str, box: tuple[tuple[int, int], ...], block: Block, model: Any, device: str, precision: str,
    tta: int, batch_size: int,
) -> tuple[tuple[slice, ...], np.ndarray]:
    """Worker task: the probabilities of one block's kept box (coordinates within ``box``, the
    part of the normalised input the network runs on: :func:`cryoves.predict.network_box`)."""
    from cryoves.predict import Tile

    volume = np.load(input_path, mmap_mode="r")[tuple(slice(a, b) for a, b in box)]
    origin = [s.start for s in block.src]
    local_in = _read_box(volume, block.src)
    local_tiles = [Tile(_shift(t.src, origin), _shift(t.keep, origin)) for t in block.tiles]  # type: ignore[arg-type]
    local_out = np.empty(local_in.shape, np.float32)
    net = _worker_net(model, device, precision)
    predict_tiles(net, local_in, local_tiles, local_out, device=device, precision=precision, tta=tta,
                  batch_size=batch_size)
    return block.keep, local_out[_shift(block.keep, origin)]


@contextlib.contextmanager
def _final_array(out: Path | None, tomo: Tomogram) -> Iterator[Any]:
    """Where the tomogram-grid result goes: memory, an .npy/.mrc memory map, or a zarr array."""
    if out is None:
        yield np.empty(tomo.shape, np.float32)
    elif out.suffix.lower() == ".zarr":
        import zarr

        from cryoves.atomic import atomic_dir

        with atomic_dir(out) as tmp:
            chunks = tuple(min(s, c) for s, c in zip(tomo.shape, (64, 256, 256), strict=True))
            yield zarr.open_array(store=str(tmp), mode="w", shape=tomo.shape, chunks=chunks, dtype="float32")
    else:
        from cryoves.predict import _output_array

        with _output_array(out, tomo) as arr:
            yield arr


def _open_final(out: Path) -> Any:
    if out.suffix.lower() == ".zarr":
        import zarr

        return zarr.open_array(store=str(out), mode="r")
    from cryoves.predict import _open_result

    return _open_result(out)


def predict_blockwise(
    tomo: Tomogram,
    model: str | os.PathLike | Any,
    client: Any,
    *,
    block: int | Sequence[int] | None = None,
    out: str | os.PathLike | None = None,
    scratch: str | os.PathLike | None = None,
    device: str = "auto",
    tta: int = 1,
    invert: bool | None = None,
    vesicle_radius_nm: float | None = None,
    tile: int | None = None,
    context: int | None = None,
    batch_size: int | None = None,
    precision: str = "auto",
    force: bool = False,
    progress: bool = True,
    skip_vacuum: bool = True,
    region: Sequence[slice] | None = None,
) -> Any:
    """Probability map of one (huge) tomogram, predicted block by block on the Dask ``client``.

    Equals :func:`cryoves.predict.predict_tomogram` with the same arguments (same tile plan; see
    the module docstring). ``block``: block size in model-grid voxels (z, y, x), rounded to whole
    tiles; default: about ``BLOCKS_PER_WORKER`` blocks per worker of ``client``. ``out``: ``.zarr`` (zarr array), ``.npy`` or ``.mrc`` written atomically and returned
    opened read-only; None keeps the map in memory. ``scratch``: folder for the normalised input
    and the model-grid map (memory maps; on a multi-node cluster it must be on a filesystem every
    worker sees; default: beside ``out``, else the system temporary folder). ``device`` and
    ``precision`` are resolved on the client, because the tile plan depends on them (so name a
    GPU only when the client sees one too). Returns a
    :class:`cryoves.predict.PredictionResult` (probabilities on the tomogram grid, (z, y, x)).
    """
    from cryoves.atomic import check_file_output
    from cryoves.device import choose_device, choose_precision
    from cryoves.model import LoadedModel, load_model
    from cryoves.predict import (
        DEFAULT_CONTEXT,
        DEFAULT_TILE_BUDGET,
        TTA_TRANSFORMS,
        PredictionResult,
        available_memory,
        choose_tile,
        estimate_tile_memory,
        network_box,
        network_filters,
        zero_outside,
    )
    from cryoves.preprocess import _target_shape, from_model_grid, model_grid_scale, prepare_input

    t0 = time.perf_counter()
    out_path = Path(out) if out is not None else None
    if out_path is not None:
        check_file_output(out_path, force=force)
    if not 1 <= int(tta) <= len(TTA_TRANSFORMS):
        raise ParameterError(f"--tta must be between 1 and {len(TTA_TRANSFORMS)}, got {tta}")
    context = DEFAULT_CONTEXT if context is None else int(context)
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    info = loaded.info
    dev = choose_device(device)
    prec = choose_precision(precision, dev)
    # the tile size and batch that predict_array would choose, so that the tile plans agree
    budget = min(DEFAULT_TILE_BUDGET, available_memory(dev) // 2)
    filters = network_filters(loaded.net)
    tile = choose_tile(budget, prec, filters=filters) if tile is None else int(tile)
    if tile % 4 or tile <= 2 * context:
        raise ParameterError(f"tile {tile} must be a multiple of 4 larger than {2 * context}")
    if batch_size is None:
        batch_size = max(1, int(budget // max(1, estimate_tile_memory(tile, 1, prec, filters))))
    mshape = _target_shape(tomo.shape, model_grid_scale(tomo.voxel_size, info.voxel_size_a, vesicle_radius_nm,
                                                         info.vesicle_radius_nm))
    scratch_root = Path(scratch) if scratch is not None else (out_path.parent if out_path is not None else None)
    if scratch_root is not None:
        scratch_root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".cryoves-blockwise.", dir=scratch_root))
    try:
        grid = np.lib.format.open_memmap(work / "input.npy", mode="w+", dtype=np.float32, shape=mshape)
        grid, pre = prepare_input(tomo, info, invert=invert, vesicle_radius_nm=vesicle_radius_nm, out=grid)
        # the same box as predict_tomogram, so that the tile plans agree
        box = network_box(grid, tomo.shape, skip_vacuum=skip_vacuum, region=region)
        grid.flush()
        del grid
        sub = tuple(s.stop - s.start for s in box)
        if block is None:
            n_workers = max(1, len(client.scheduler_info().get("workers", {})))
            block = auto_block(sub, tile, context, BLOCKS_PER_WORKER * n_workers)
        blocks = plan_blocks(sub, block, tile, context) if min(sub) > 0 else []
        with _final_array(out_path, tomo) as final:
            same_grid = tuple(mshape) == tuple(tomo.shape)
            prob_m = final if same_grid else np.lib.format.open_memmap(
                work / "prob.npy", mode="w+", dtype=np.float32, shape=mshape)
            zero_outside(prob_m, box)
            _run_blocks(client, blocks, str(work / "input.npy"), tuple((s.start, s.stop) for s in box), loaded,
                        str(dev), prec, int(tta), int(batch_size), prob_m, progress)
            if not same_grid:
                from_model_grid(prob_m, tomo.shape, out=final)
                del prob_m
            for z0 in range(0, tomo.shape[0], 32):  # trilinear cannot overshoot; guard rounding
                final[z0 : z0 + 32] = np.clip(np.asarray(final[z0 : z0 + 32]), 0.0, 1.0)
            if out_path is None:
                result = final
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if out_path is not None:
        result = _open_final(out_path)
    meta = dict(
        model=info.name, sha256=info.sha256, model_voxel_size_a=info.voxel_size_a, model_grid_shape=list(mshape),
        **pre, tta=int(tta), precision=prec, device=str(dev), vesicle_radius_nm=vesicle_radius_nm,
        tile=int(tile), batch_size=int(batch_size), context=int(context), tiles=sum(len(b.tiles) for b in blocks),
        blocks=len(blocks), network_box=[[int(s.start), int(s.stop)] for s in box],
        seconds=round(time.perf_counter() - t0, 3),
    )
    return PredictionResult(prob=result, info=meta)


def _run_blocks(client, blocks, input_path, box, loaded, device, precision, tta, batch_size, prob_m, progress) -> None:
    from distributed import as_completed
    from tqdm.auto import tqdm

    [model_ref] = client.scatter([loaded], broadcast=True, hash=False)
    futures = [
        client.submit(_predict_block, input_path, box, b, model_ref, device, precision, tta, batch_size, pure=False,
                      key=f"predict-block-{k}-{time.time_ns()}")
        for k, b in enumerate(blocks)
    ]
    with tqdm(total=len(futures), desc="predict blocks", unit="block", disable=not progress, leave=False) as bar:
        for fut in as_completed(futures):
            keep, arr = fut.result()  # keep: within the box
            prob_m[tuple(slice(k.start + b[0], k.stop + b[0]) for k, b in zip(keep, box, strict=True))] = arr
            fut.release()
            bar.update(1)
    if hasattr(prob_m, "flush"):
        prob_m.flush()


# --------------------------------------------------------------------------------------------
# sphere fitting


class _OutsideWindow(Exception):
    """A read reached beyond the intensity window a block task was given."""


class _Window:
    """Read-only view of ``data`` placed at ``origin`` inside a volume of ``shape`` (z, y, x).

    Reads keep whole-volume coordinates, so the fit's arithmetic is that of the whole volume."""

    def __init__(self, data: np.ndarray, origin: Sequence[int], shape: Sequence[int]):
        self.data, self.origin, self.shape = data, tuple(int(o) for o in origin), tuple(int(s) for s in shape)
        self.ndim, self.dtype = 3, data.dtype

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        local = []
        for s, o, n in zip(key, self.origin, self.data.shape, strict=True):
            a, b = s.start - o, s.stop - o
            if a < 0 or b > n:
                raise _OutsideWindow
            local.append(slice(a, b))
        return self.data[tuple(local)]


def _fit_block(window: np.ndarray, origin: Sequence[int], shape: Sequence[int], jobs: list, opts: Any) -> list:
    """Worker task: fit the objects ``jobs`` = [(k, centre, r0, others)]; returns [(k, kind, value)]
    with kind "fit" (SphereFit), "fail" (reason) or "outside" (refit on the client)."""
    from cryoves.postprocess.spheres import FitFailure, _fit

    vol = _Window(window, origin, shape)
    out = []
    for k, cen, r0, others in jobs:
        try:
            out.append((k, "fit", _fit(vol, cen, r0, opts, others)))
        except FitFailure as exc:
            out.append((k, "fail", str(exc)))
        except _OutsideWindow:
            out.append((k, "outside", None))
    return out


def fit_spheres_blockwise(
    intensity: np.ndarray,
    labels: np.ndarray,
    voxel_size_a: float,
    client: Any,
    *,
    block: int | Sequence[int] = DEFAULT_FIT_BLOCK,
    halo: int | None = None,
    options: Any = None,
    mask_neighbours: bool = True,
    progress: bool = False,
    **kwargs: Any,
) -> tuple[Any, pd.DataFrame]:
    """:func:`cryoves.postprocess.spheres.fit_spheres` with the objects split across Dask workers.

    Objects are grouped by the block (``block`` tomogram voxels, (z, y, x)) of their centroid;
    each task gets the intensity of its objects' extent plus ``halo`` voxels (default
    3 × the largest initial radius + membrane search + margin, ~1.5 vesicle diameters). Returns the
    same (VesicleTable, rejected) as ``fit_spheres`` with the same arguments, row for row.
    """
    from cryoves.postprocess._common import check_same_shape, check_volume, check_voxel_size
    from cryoves.postprocess.spheres import FitOptions, _with_voxel_size, initial_spheres

    intensity = check_volume(intensity, "tomogram")
    labels = check_volume(labels, "labels")
    check_same_shape(intensity, labels, "tomogram", "labels")
    vs = check_voxel_size(voxel_size_a)
    opts = _with_voxel_size(options or FitOptions(**kwargs), vs)
    bshape = np.asarray(_block_shape(block))
    # the starting centres, radii and neighbour lists of fit_spheres, from the whole label volume
    items = initial_spheres(labels, opts, mask_neighbours)
    groups: dict[tuple[int, ...], list[int]] = {}
    shape = np.asarray(intensity.shape)
    for k, (_, cen, _, _) in enumerate(items):
        cell = tuple(int(v) for v in np.clip(np.floor(cen), 0, shape - 1) // bshape)
        groups.setdefault(cell, []).append(k)
    futures = []
    for ks in groups.values():
        r_max = max(items[k][2] for k in ks)
        h = int(math.ceil(3.0 * r_max + opts.max_thickness + opts.margin + 4)) if halo is None else int(halo)
        cs = np.round(np.array([items[k][1] for k in ks])).astype(int)
        lo = np.clip(cs.min(axis=0) - h, 0, shape)
        hi = np.clip(cs.max(axis=0) + h + 1, 0, shape)
        window = np.ascontiguousarray(intensity[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))])
        jobs = [(k, *items[k][1:]) for k in ks]
        # scattered, not embedded in the task graph (large graphs are slow to send)
        [window_ref] = client.scatter([window], hash=False)
        futures.append(client.submit(_fit_block, window_ref, tuple(lo), tuple(shape), jobs, opts, pure=False,
                                     key=f"fit-block-{len(futures)}-{time.time_ns()}"))
    results: dict[int, tuple[str, Any]] = {}
    _collect_fits(futures, results, progress)
    return _assemble(intensity, items, results, opts, vs)


def _collect_fits(futures: list, results: dict, progress: bool) -> None:
    from distributed import as_completed
    from tqdm.auto import tqdm

    with tqdm(total=len(futures), desc="fit blocks", unit="block", disable=not progress, leave=False) as bar:
        for fut in as_completed(futures):
            for k, kind, value in fut.result():
                results[k] = (kind, value)
            fut.release()
            bar.update(1)


def _assemble(intensity, items, results, opts, vs) -> tuple[Any, pd.DataFrame]:
    """The table and rejected frame of ``fit_spheres`` from per-object results (in label order)."""
    from cryoves.postprocess._common import concat_rejected, rejected_frame
    from cryoves.postprocess.spheres import FitFailure, _fit, table_from_fits

    ids, fits, rejected = [], [], []
    n_outside = 0
    for k, (i, cen, r0, others) in enumerate(items):
        kind, value = results[k]
        if kind == "outside":  # the halo was too small for this vesicle: fit it on the whole volume
            n_outside += 1
            try:
                kind, value = "fit", _fit(intensity, cen, r0, opts, others)
            except FitFailure as exc:
                kind, value = "fail", str(exc)
        if kind == "fail":
            rejected.append(rejected_frame([i], cen[None], [r0], "fit", [value]))
            continue
        value.voxel_size = vs
        ids.append(i)
        fits.append(value)
    if n_outside:
        log.info("%d vesicle(s) reached beyond their block's halo and were fitted on the client", n_outside)
    log.info("fitted %d spheres, %d objects could not be fitted", len(fits), len(rejected))
    return table_from_fits(ids, fits, vs), concat_rejected(rejected)


# --------------------------------------------------------------------------------------------
# one tomogram on a cluster


class DaskBackend:
    """The :class:`cryoves.pipeline.Backend` that splits prediction and sphere fitting of one
    tomogram into blocks on the workers of ``client`` (same results as the single-process backend)."""

    def __init__(self, client: Any):
        self.client = client

    def predict(self, tomo: Tomogram, model: Any, **kwargs: Any) -> Any:
        return predict_blockwise(tomo, model, self.client, **kwargs)

    def fit_spheres(
        self, intensity: np.ndarray, labels: np.ndarray, voxel_size_a: float, cache: dict | None = None
    ) -> tuple[Any, pd.DataFrame]:
        """All objects fitted on the cluster (``cache`` is not used: the blocks are fitted again)."""
        return fit_spheres_blockwise(intensity, labels, voxel_size_a, self.client)


def segment_split(
    tomo: Tomogram | str | os.PathLike,
    outdir: str | os.PathLike | None,
    config: Any = None,
    *,
    workers: int | None = None,
    scheduler: str | None = None,
    slurm: str | os.PathLike | None = None,
    force: bool = False,
) -> Any:
    """:func:`cryoves.pipeline.segment` with one tomogram split across Dask workers.

    ``scheduler``: address of a running Dask scheduler (``tcp://host:8786``); ``slurm``: a
    dask-jobqueue YAML file (docs/batch.md); otherwise a local cluster of ``workers`` processes
    (default: sized to this machine, see :func:`cryoves.cluster.local_cluster_size`). A cluster
    started here is closed after the call.
    """
    from cryoves.cluster import managed_client
    from cryoves.pipeline import segment

    # many blocks: the local cluster is sized by cores and memory, not by the item count
    with managed_client(1 << 16, scheduler=scheduler, slurm=slurm, n_workers=workers) as client:
        return segment(tomo, outdir, config, force=force, backend=DaskBackend(client))

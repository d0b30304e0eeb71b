"""Tiled, memory-bounded U-Net inference with test-time augmentation.

Tiling: the (model-grid) volume is cut into kept blocks that partition it; each block is
predicted from a tile that adds ``context`` voxels on every side that is not a volume border.
At volume borders the network's own zero padding is used, as in a whole-volume forward pass.
Tile starts and sizes are multiples of 4 (the two poolings). With the default context of 24
voxels (≥ the receptive-field radius of the CryoVesNet U-Net) the tiled result equals the
whole-volume forward pass up to float rounding (measured max |Δp| 3e-6; the original's 20
voxels leave seams with |Δp| up to 0.03). The decoder computes only the kept block
(:meth:`UNet3D.forward_logits` with ``crop``), which saves ~40 % of the work per tile.

Memory: the output is written block by block into ``out`` (may be a ``np.memmap``). Peak
resident memory of :func:`predict_array` ≈ runtime (~0.45 GiB) + batch · T³ · B_act bytes for
tiles of side T (B_act ≈ 170 fp32 / 160 bf16 for 16 base filters, measured, less for narrower
networks: :func:`tile_voxel_bytes`; T = 148 by default → ≈ 0.5 GiB)
+ the input and output arrays if they are in memory (2 × 4 bytes per model-grid voxel; 0 for
memory maps).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryoves import DEFAULT_MODEL
from cryoves._malloc import keep_freed_memory
from cryoves.device import autocast, choose_device, choose_precision
from cryoves.errors import FormatError, ParameterError, ResourceError
from cryoves.io.mrc import reserve_space, set_header_stats
from cryoves.io.tomogram import Tomogram
from cryoves.model import LoadedModel, UNet3D, load_model
from cryoves.model.unet import fuse_conv_relu, fused_inference_copy
from cryoves.postprocess.threshold import DEFAULT_THRESHOLD_RANGE
from cryoves.preprocess import from_model_grid, prepare_input

log = logging.getLogger(__name__)

#: Context (model voxels) added on each inner side of a tile; multiple of 4. 24 covers the
#: receptive field of the default U-Net, so tiling is exact (see the module docstring).
DEFAULT_CONTEXT = 24
#: Peak bytes per tile voxel during one forward pass (measured on CPU, batch 1, tile 152,
#: a U-Net with 16 base filters: its 16- and 32-channel level-0 tensors dominate).
BYTES_PER_TILE_VOXEL = {"fp32": 170, "bf16": 160, "fp16": 160}
#: Share of those bytes that does not scale with the number of filters (input, output, logits):
#: 8 base filters measured 104 vs 155 B per voxel of 164 × 136 × 136 tiles in bf16 (0.67×).
FIXED_TILE_BYTES_SHARE = 0.3
#: Default activation-memory budget for choosing the tile size automatically (bytes). 512 MiB: the
#: same network time as 640 MiB on a CPU (200 × 400 × 400 at 22 Å: 16 instead of 12 tiles, 5.39 vs
#: 5.29 s, median of 5; 300 × 1024 × 1024: 17.1 vs 16.7-18.0 s) and a 0.1 GiB lower peak.
DEFAULT_TILE_BUDGET = 512 * 2**20
MIN_TILE = 48
MAX_TILE = 256

#: In-plane test-time transforms (rot90 k times in (y, x), flip x, flip z); z is never
#: swapped with y/x, so the missing wedge keeps its orientation.
TTA_TRANSFORMS: tuple[tuple[int, bool, bool], ...] = (
    (0, False, False), (0, True, False), (2, True, False), (0, False, True),
    (1, False, False), (3, False, False), (1, True, False), (3, True, False),
    (2, False, False), (2, False, True), (0, True, True), (2, True, True),
    (1, False, True), (3, False, True), (1, True, True), (3, True, True),
)


@dataclass
class PredictionResult:
    """``prob``: float32 (z, y, x) probabilities on the input tomogram grid (``np.memmap`` when
    written to a file); ``info``: model name, sha256, model voxel size, scale, inversion,
    polarity score (None when ``invert`` was given), tiles, seconds, precision, device."""

    prob: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)
    image: np.ndarray | None = None
    """With ``on_model_grid``: the network input (normalised, dense = dark) on the model grid."""


# --------------------------------------------------------------------------------------------
# devices, precision, threads


def use_all_cores() -> int:
    """Set torch's intra-op threads to the number of CPUs this process may use."""
    from cryoves.parallel import cpu_count

    n = cpu_count()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def available_memory(device: torch.device) -> int:
    """Free memory in bytes (CUDA: free device memory; CPU: MemAvailable, else total/2)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2)
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return 4 * 2**30


def tile_voxel_bytes(precision: str, filters: int = 16) -> float:
    """Peak activation bytes per tile voxel of a U-Net with ``filters`` base filters."""
    share = FIXED_TILE_BYTES_SHARE + (1.0 - FIXED_TILE_BYTES_SHARE) * filters / 16.0
    return BYTES_PER_TILE_VOXEL.get(precision, 170) * share


def network_filters(net: Any) -> int:
    """Base filters of ``net`` (a :class:`UNet3D` or its inference copy); 16 when unknown."""
    return int(getattr(net, "config", {}).get("base_filters", 16))


def estimate_tile_memory(tile: int | Sequence[int], batch_size: int, precision: str, filters: int = 16) -> int:
    """Approximate peak activation bytes of one batched forward pass of tiles of side ``tile``
    (or sides (z, y, x)) through a U-Net with ``filters`` base filters."""
    voxels = math.prod(np.broadcast_to(np.asarray(tile, dtype=np.int64), (3,)).tolist())
    return int(batch_size * voxels * tile_voxel_bytes(precision, filters))


def plan_tiles_memory(
    device: torch.device,
    precision: str,
    tile: int | None = None,
    batch_size: int | None = None,
    context: int = DEFAULT_CONTEXT,
    memory_budget: int | None = None,
    filters: int = 16,
) -> tuple[int, int]:
    """Tile side and batch size for ``device``; :class:`ResourceError` (naming a ``--tile`` that
    fits) when the activations of the requested tile cannot fit the available memory.

    ``tile`` None: the largest tile within ``memory_budget`` (default min(DEFAULT_TILE_BUDGET,
    ½ available memory)) for a U-Net with ``filters`` base filters. Cheap: call it before any
    work to fail early.
    """
    avail = available_memory(device)
    budget = memory_budget if memory_budget is not None else min(DEFAULT_TILE_BUDGET, avail // 2)
    if tile is None:
        tile = choose_tile(budget, precision, filters=filters)
    if tile % 4 or tile <= 2 * context:
        raise ParameterError(f"tile {tile} must be a multiple of 4 larger than {2 * context}; use e.g. --tile 96")
    if batch_size is None:
        batch_size = max(1, int(budget // max(1, estimate_tile_memory(tile, 1, precision, filters))))
    need = estimate_tile_memory(tile, batch_size, precision, filters)
    if need > avail:
        suggestion = choose_tile(avail // 2, precision, filters=filters)
        raise ResourceError(
            f"tile {tile}³ × batch {batch_size} needs ~{need / 2**30:.1f} GiB but only "
            f"{avail / 2**30:.1f} GiB is available; use --tile {suggestion} (and batch size 1)"
        )
    return int(tile), int(batch_size)


def choose_tile(budget: int, precision: str, divisor: int = 4, filters: int = 16) -> int:
    """Largest tile side (multiple of ``divisor``, 48…256) whose activations (U-Net with ``filters``
    base filters) fit ``budget`` bytes."""
    t = int((budget / tile_voxel_bytes(precision, filters)) ** (1 / 3))
    t = max(MIN_TILE, min(MAX_TILE, t - t % divisor))
    return t


# --------------------------------------------------------------------------------------------
# tiling


def plan_axis(length: int, tile: int, context: int, divisor: int = 4) -> list[tuple[int, int, int, int]]:
    """Split one axis of ``length`` voxels into tiles.

    Returns ``[(in_start, in_stop, keep_start, keep_stop)]`` in volume coordinates; kept ranges
    partition [0, length). ``in_stop`` may exceed ``length`` (zero-filled up to a multiple of
    ``divisor``). Inner tile sides carry ``context`` voxels; volume borders carry none.
    """
    if tile % divisor or context % divisor:
        raise ParameterError(f"tile ({tile}) and context ({context}) must be multiples of {divisor}")
    if tile <= 2 * context:
        raise ParameterError(f"tile {tile} must exceed twice the context ({2 * context})")
    padded = -(-length // divisor) * divisor
    if padded <= tile:
        return [(0, padded, 0, length)]
    cap_edge, cap_mid = tile - context, tile - 2 * context
    n_mid = max(0, math.ceil((padded - 2 * cap_edge) / cap_mid))
    caps = [cap_edge] + [cap_mid] * n_mid + [cap_edge]
    total = sum(caps)
    bounds = [0]
    acc = 0
    for c in caps[:-1]:
        acc += c
        b = int(round(acc * padded / total / divisor)) * divisor
        bounds.append(max(bounds[-1] + divisor, b))
    bounds.append(padded)
    tiles = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        lo = max(0, a - context)
        hi = min(padded, b + context)
        tiles.append((lo, hi, a, min(b, length)))
    return tiles


@dataclass
class Tile:
    """One tile: input box and kept box (volume coordinates, (z, y, x) slices)."""

    src: tuple[slice, slice, slice]
    keep: tuple[slice, slice, slice]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(s.stop - s.start for s in self.src)  # type: ignore[return-value]

    @property
    def crop(self) -> tuple[tuple[int, int], ...]:
        """Output voxels to drop at each end of each axis (the padded end counts as dropped)."""
        return tuple(
            (k.start - s.start, s.stop - k.stop) for s, k in zip(self.src, self.keep, strict=True)
        )


def tile_shape(shape: Sequence[int], tile: int, context: int = DEFAULT_CONTEXT, divisor: int = 4) -> tuple[int, int, int]:
    """Tile sides (z, y, x) for a volume of ``shape``: at most the voxels of a ``tile``³ cube (the
    same activation memory), with the fewest network input voxels over all tiles. Every boundary
    between two tiles costs twice the context, so a 160-slice slab is better covered by tiles as
    deep as the slab and narrower in-plane than by 160³ cubes (measured on the 200×400×400 speed
    tomogram: 18 % fewer input voxels). Tiling is exact: the map does not depend on the sides."""
    per_axis = []
    for n in shape:
        padded = -(-int(n) // divisor) * divisor
        smallest: dict[int, tuple[int, int, int]] = {}  # tiles -> (side, longest input, total input)
        for t in range(2 * context + divisor, max(padded, 2 * context + divisor) + 1, divisor):
            plan = plan_axis(int(n), t, context, divisor)
            if len(plan) not in smallest:
                smallest[len(plan)] = (t, max(hi - lo for lo, hi, _, _ in plan), sum(hi - lo for lo, hi, _, _ in plan))
        per_axis.append(list(smallest.values()))
    budget = int(tile) ** 3
    best = None
    for tz, lz, cz in per_axis[0]:
        for ty, ly, cy in per_axis[1]:
            if lz * ly * (2 * context + divisor) > budget:
                continue
            for tx, lx, cx in per_axis[2]:
                if lz * ly * lx > budget:
                    continue
                key = (cz * cy * cx, -lz * ly * lx)  # fewest input voxels, then the largest tiles
                if best is None or key < best[0]:
                    best = (key, (tz, ty, tx))
    if best is None:  # a tile smaller than the smallest useful one on every axis: keep the cube
        return (int(tile),) * 3
    return best[1]


def plan_tiles(shape: Sequence[int], tile: int | Sequence[int], context: int = DEFAULT_CONTEXT) -> list[Tile]:
    """All tiles for a volume of ``shape`` (z, y, x), tile side ``tile`` (scalar or per axis)."""
    t = np.broadcast_to(np.asarray(tile, dtype=int), (3,))
    axes = [plan_axis(int(s), int(ti), context) for s, ti in zip(shape, t, strict=True)]
    tiles = []
    for az in axes[0]:
        for ay in axes[1]:
            for ax in axes[2]:
                src = tuple(slice(a[0], a[1]) for a in (az, ay, ax))
                keep = tuple(slice(a[2], a[3]) for a in (az, ay, ax))
                tiles.append(Tile(src, keep))  # type: ignore[arg-type]
    return tiles


def _read_tile(volume: Any, t: Tile) -> torch.Tensor:
    """The tile's input box, zero-filled beyond the volume end: float32, or the dtype of a torch
    ``volume``."""
    sl = tuple(slice(s.start, min(s.stop, n)) for s, n in zip(t.src, volume.shape, strict=True))
    if isinstance(volume, torch.Tensor):
        part = volume[sl]
        buf = torch.zeros(t.shape, dtype=volume.dtype)
        buf[tuple(slice(0, p) for p in part.shape)] = part
        return buf
    part = np.asarray(volume[sl], dtype=np.float32)
    out = np.zeros(t.shape, np.float32)
    out[tuple(slice(0, p) for p in part.shape)] = part
    return torch.from_numpy(out)


# --------------------------------------------------------------------------------------------
# test-time augmentation


def _transform(x: torch.Tensor, k: int, fx: bool, fz: bool) -> torch.Tensor:
    if fz:
        x = torch.flip(x, dims=(-3,))
    if fx:
        x = torch.flip(x, dims=(-1,))
    if k:
        x = torch.rot90(x, k, dims=(-2, -1))
    return x


def _inverse(x: torch.Tensor, k: int, fx: bool, fz: bool) -> torch.Tensor:
    if k:
        x = torch.rot90(x, -k, dims=(-2, -1))
    if fx:
        x = torch.flip(x, dims=(-1,))
    if fz:
        x = torch.flip(x, dims=(-3,))
    return x


def _transform_crop(crop, k: int, fx: bool, fz: bool):
    """The crop of a transformed tile (tracks which end each margin moves to)."""
    (z0, z1), (y0, y1), (x0, x1) = crop
    if fz:
        z0, z1 = z1, z0
    if fx:
        x0, x1 = x1, x0
    for _ in range(k % 4):
        # rot90 over (y, x), torch convention: new y = reversed old x, new x = old y
        (y0, y1), (x0, x1) = (x1, x0), (y0, y1)
    return ((z0, z1), (y0, y1), (x0, x1))


# --------------------------------------------------------------------------------------------
# prediction on the model grid


def prepare_network(net: UNet3D, device: torch.device, precision: str) -> UNet3D:
    """An inference copy: BatchNorm folded, on ``device``; on the CPU channels-last-3d, and bf16
    weights for bf16 (12 % faster than autocast there), each convolution fused with its ReLU
    (:func:`fuse_conv_relu`, with the decoder's in-place join ~14 % less time per tile in bf16, the
    same numbers)."""
    fused = fused_inference_copy(net).to(device)
    if device.type == "cpu":
        fused = fused.to(memory_format=torch.channels_last_3d)
        if precision == "bf16":
            fused = fused.to(torch.bfloat16)
        fused = fuse_conv_relu(fused)
    return fused


def _batches(tiles: list[Tile], batch_size: int) -> Iterator[list[Tile]]:
    groups: dict[tuple, list[Tile]] = {}
    for t in tiles:
        groups.setdefault((t.shape, t.crop), []).append(t)
    for group in groups.values():
        for i in range(0, len(group), batch_size):
            yield group[i : i + batch_size]


def predict_array(
    net: UNet3D,
    volume: Any,
    *,
    device: str | torch.device = "cpu",
    tile: int | None = None,
    context: int = DEFAULT_CONTEXT,
    batch_size: int | None = None,
    precision: str = "fp32",
    tta: int = 1,
    out: np.ndarray | None = None,
    progress: bool = True,
    memory_budget: int | None = None,
    prepared: bool = False,
    stats: dict[str, Any] | None = None,
) -> np.ndarray:
    """Probabilities (float32, same shape) for a normalised (z, y, x) volume on the model grid
    (array-like, read as float32, or a torch tensor, read in its dtype: e.g. bf16 for bf16 weights).

    ``tile``: tile side in voxels (multiple of 4; default: the largest that fits
    ``memory_budget``, itself by default min(512 MiB, ½ available memory)). ``tta``: number of
    in-plane test-time transforms (1–16), merged by the mean of logits. ``out``: array (e.g.
    ``np.memmap``) to write into block by block. Raises :class:`ResourceError` when the chosen
    tile cannot fit the available memory; on a CUDA out-of-memory error the tile is halved and
    the prediction restarted. ``prepared``: ``net`` already comes from :func:`prepare_network`.
    ``stats`` (a dict) receives tile, batch_size, tiles.
    """
    dev = choose_device(device)
    precision = choose_precision(precision, dev)
    if not 1 <= int(tta) <= len(TTA_TRANSFORMS):
        raise ParameterError(f"--tta must be between 1 and {len(TTA_TRANSFORMS)}, got {tta}")
    if dev.type == "cpu":
        use_all_cores()
    shape = tuple(int(s) for s in volume.shape)
    if len(shape) != 3:
        raise ParameterError(f"predict_array needs a 3-D volume, got shape {shape}")
    tile, batch_size = plan_tiles_memory(dev, precision, tile, batch_size, context, memory_budget, network_filters(net))
    if out is None:
        out = np.empty(shape, np.float32)
    elif tuple(out.shape) != shape:
        raise ParameterError(f"out has shape {tuple(out.shape)}, expected {shape}")
    fused = net if prepared else prepare_network(net, dev, precision)
    while True:
        try:
            n, sides = _run_tiles(fused, volume, out, dev, precision, tile, context, batch_size, int(tta), progress)
            if stats is not None:
                stats.update(tile=int(tile), tile_shape=list(sides), batch_size=int(batch_size), tiles=n,
                             context=int(context))
            return out
        except torch.cuda.OutOfMemoryError:
            if tile // 2 <= 2 * context:
                raise ResourceError(
                    f"CUDA out of memory even with tile {tile}; use --device cpu"
                ) from None
            tile = max(2 * context + 8, (tile // 2) // 4 * 4)
            batch_size = 1
            torch.cuda.empty_cache()
            log.warning("CUDA out of memory; retrying with tile %d", tile)


def _run_tiles(fused, volume, out, dev, precision, tile, context, batch_size, tta, progress) -> tuple[int, tuple]:
    from tqdm.auto import tqdm

    sides = tile_shape(volume.shape, tile, context)
    tiles = plan_tiles(volume.shape, sides, context)
    bar = tqdm(total=len(tiles), desc="predict", unit="tile", disable=not progress, leave=False)
    # each tile allocates and frees the same activations: keep them mapped (CPU memory only)
    keep = estimate_tile_memory(sides, min(batch_size, len(tiles)), precision, network_filters(fused)) if dev.type == "cpu" else 0
    with keep_freed_memory(keep):
        predict_tiles(fused, volume, tiles, out, dev, precision, tta, batch_size, on_batch=bar.update)
    bar.close()
    return len(tiles), sides


def predict_tiles(
    net: UNet3D,
    volume: Any,
    tiles: list[Any],
    out: Any,
    dev: torch.device,
    precision: str,
    tta: int,
    batch_size: int,
    on_batch: Callable[[int], Any] | None = None,
) -> None:
    """Predict ``tiles`` (from :func:`plan_tiles`) of the normalised model-grid ``volume`` into
    ``out`` (same coordinates): TTA merged by the mean of logits, only each tile's kept block.
    ``net`` comes from :func:`prepare_network`; ``on_batch(n)`` is called after each batch."""
    transforms = TTA_TRANSFORMS[:tta]
    channels_last = dev.type == "cpu"
    dtype = next(net.parameters()).dtype  # bf16 weights on the CPU: no autocast, bf16 input
    with torch.inference_mode(), autocast(dev, precision) if dtype == torch.float32 else contextlib.nullcontext():
        for batch in _batches(tiles, batch_size):
            x = torch.stack([_read_tile(volume, t) for t in batch])[:, None].to(dev, dtype)
            crop = batch[0].crop
            acc = None
            for k, fx, fz in transforms:
                xt = _transform(x, k, fx, fz)
                if channels_last:
                    xt = xt.contiguous(memory_format=torch.channels_last_3d)
                y = net.forward_logits(xt, _transform_crop(crop, k, fx, fz)).float()
                y = _inverse(y, k, fx, fz)
                acc = y if acc is None else acc.add_(y)
            assert acc is not None
            if len(transforms) > 1:
                acc.div_(len(transforms))
            prob = torch.sigmoid(acc)[:, 0].cpu().numpy()
            for t, p in zip(batch, prob, strict=True):
                kz, ky, kx = (k.stop - k.start for k in t.keep)
                out[t.keep] = p[:kz, :ky, :kx]
            if on_batch is not None:
                on_batch(len(batch))


# --------------------------------------------------------------------------------------------
# whole tomogram


@contextlib.contextmanager
def _scratch(
    folder: Path | None, shape: tuple[int, ...], dtype: Any = np.float32, suffix: str = ".f32"
) -> Iterator[np.ndarray]:
    """A work array: in memory, or a temporary memory map in ``folder`` (deleted after)."""
    if folder is None:
        yield np.empty(shape, dtype)
        return
    fd, name = tempfile.mkstemp(prefix=".cryoves-scratch.", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        mm = np.memmap(name, dtype=dtype, mode="w+", shape=shape)
        yield mm
        del mm
    finally:
        Path(name).unlink(missing_ok=True)


@contextlib.contextmanager
def _bf16_copy(src: Any, folder: Path | None, slab: int = 16) -> Iterator[torch.Tensor]:
    """``src`` (float32, z, y, x) as a bf16 tensor (in memory or a memory map in ``folder``, as
    :func:`_scratch`): half the bytes, and the same bits as converting each tile (round to nearest
    even either way)."""
    with _scratch(folder, tuple(int(n) for n in src.shape), np.int16, ".bf16") as bits:
        out = torch.from_numpy(bits).view(torch.bfloat16)
        for z in range(0, out.shape[0], slab):
            out[z : z + slab].copy_(torch.from_numpy(np.asarray(src[z : z + slab], dtype=np.float32)))
        del src  # the float32 volume may be freed while the copy is in use
        yield out


MRC_OUTPUT_SUFFIXES = (".mrc", ".rec", ".map")


@contextlib.contextmanager
def _output_array(out: Path, tomo: Tomogram) -> Iterator[np.ndarray]:
    """A float32 memory map for the result, written atomically to ``out`` (.mrc or .npy).

    MRC files get the tomogram's voxel size and origin; header statistics are computed slab by
    slab on close (no full-size temporary).
    """
    import mrcfile

    from cryoves.atomic import atomic_path

    suffix = out.suffix.lower()
    if suffix not in (*MRC_OUTPUT_SUFFIXES, ".npy"):
        raise ParameterError(f"cannot write a probability map as '{suffix}'; use .mrc or .npy")
    with atomic_path(out) as tmp:
        if suffix == ".npy":
            arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=tomo.shape)
            yield arr
            arr.flush()
            del arr
        else:
            with mrcfile.new_mmap(tmp, shape=tomo.shape, mrc_mode=2, overwrite=True) as mrc:
                reserve_space(tmp)
                yield mrc.data
                vz, vy, vx = tomo.voxel_size
                mrc.voxel_size = (vx, vy, vz)
                oz, oy, ox = tomo.origin
                mrc.header.origin.x, mrc.header.origin.y, mrc.header.origin.z = ox, oy, oz
                set_header_stats(mrc, mrc.data)


def _open_result(out: Path) -> np.ndarray:
    """The written result as a read-only float32 memory map."""
    if out.suffix.lower() == ".npy":
        return np.load(out, mmap_mode="r")
    import mrcfile

    return mrcfile.mmap(out, mode="r").data


def network_box(
    grid: Any, tomo_shape: Sequence[int], *, skip_vacuum: bool = True, region: Sequence[slice] | None = None
) -> tuple[slice, slice, slice]:
    """The box of the model-grid volume ``grid`` (normalised) the network runs on.

    ``region`` (slices on the tomogram grid of ``tomo_shape``): its box on the model grid plus the
    tiling context on each side, so that the map inside the region is the whole-volume map.
    ``skip_vacuum``: only the z-range of the specimen slab (:func:`cryoves.preprocess.specimen_slab`)
    plus the tiling context, so that the map inside the slab is the whole-volume map too (with half
    the context, the fit of a VLP at the slab's surface changed: radius SD of its tomogram 4.05 vs
    1.26 nm).
    """
    from cryoves.preprocess import specimen_slab

    mshape = tuple(int(n) for n in grid.shape)
    box = [slice(0, n) for n in mshape]
    if region is not None:
        for ax, (r, nt, nm) in enumerate(zip(region, tomo_shape, mshape, strict=True)):
            a, b, _ = r.indices(int(nt))
            f = nm / float(nt)
            box[ax] = (slice(max(0, math.floor(a * f) - DEFAULT_CONTEXT), min(nm, math.ceil(b * f) + DEFAULT_CONTEXT))
                       if b > a else slice(0, 0))  # an empty region: no network at all
    if skip_vacuum:
        zs = specimen_slab(grid, margin=DEFAULT_CONTEXT)
        if zs != slice(0, mshape[0]):
            log.info("specimen slab: model-grid slices %d-%d of %d (the rest is vacuum)", zs.start, zs.stop, mshape[0])
        start = max(box[0].start, zs.start)
        box[0] = slice(start, max(start, min(box[0].stop, zs.stop)))
    return tuple(box)  # type: ignore[return-value]


def zero_outside(arr: Any, box: Sequence[slice], slab: int = 32) -> None:
    """Before predicting ``box`` into ``arr``: set the rest of ``arr`` to 0, slab by slab (the box
    itself is left alone: the network writes every voxel of it; writing it twice cost 0.44 s of a
    128 MB map)."""
    zb, yb, xb = (slice(*s.indices(n)[:2]) for s, n in zip(box, arr.shape, strict=True))
    for z0 in range(0, arr.shape[0], slab):
        z1 = min(z0 + slab, arr.shape[0])
        for z in (slice(z0, min(z1, zb.start)), slice(max(z0, zb.stop), z1)):  # slices outside the box
            if z.stop > z.start:
                arr[z] = 0.0
        z = slice(max(z0, zb.start), min(z1, zb.stop))
        if z.stop > z.start:  # the rows and columns of the box's slices that lie outside it
            arr[z, : yb.start] = 0.0
            arr[z, yb.stop :] = 0.0
            arr[z, yb, : xb.start] = 0.0
            arr[z, yb, xb.stop :] = 0.0


def predict_tomogram(
    tomo: Tomogram,
    model: str | os.PathLike | LoadedModel = DEFAULT_MODEL,
    *,
    device: str = "auto",
    tta: int = 1,
    invert: bool | None = None,
    vesicle_radius_nm: float | None = None,
    tile: int | None = None,
    batch_size: int | None = None,
    precision: str = "auto",
    out: str | os.PathLike | None = None,
    force: bool = False,
    progress: bool = True,
    on_model_grid: bool = False,
    skip_vacuum: bool = True,
    region: Sequence[slice] | None = None,
    memory_budget: int | None = None,
) -> PredictionResult:
    """Vesicle probability map of a tomogram, on the tomogram's own grid (z, y, x), in [0, 1].

    Steps: resample to the model voxel size (× training radius / ``vesicle_radius_nm`` if
    given), detect the contrast polarity unless ``invert`` is given (True: negate the input,
    False: use as is), Gaussian prefilter and normalisation as the model's metadata says, tiled
    inference (:func:`predict_array`), resample back. With ``out`` (``.mrc``/``.rec``/``.map``
    with voxel size and origin, or ``.npy``) the map is written atomically (an existing file is
    kept unless ``force``) and returned as a read-only memory map; every full-size intermediate
    is then a temporary memory map beside it, so tomograms larger than RAM work.
    With ``on_model_grid`` the map stays on the model grid (not resampled back; ``out`` not
    allowed) and the result also holds the network input (``image``), e.g. for a coarse search.
    The network runs only on :func:`network_box`: with ``skip_vacuum`` the z-range that holds
    the specimen, and within ``region`` (a box on the tomogram grid, e.g. the bounding box of a
    cytoplasm mask); everything else gets probability 0. ``memory_budget``: activation memory for
    choosing the tile (see :func:`predict_array`).
    """
    from cryoves.atomic import check_file_output, make_dir
    from cryoves.preprocess import _target_shape, model_grid_scale

    t0 = time.perf_counter()
    out_path = Path(out) if out is not None else None
    if on_model_grid and out_path is not None:
        raise ParameterError("a map kept on the model grid cannot be written to a file; drop out= or on_model_grid")
    if out_path is not None:
        check_file_output(out_path, force=force)
        make_dir(out_path.parent)
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    info = loaded.info
    dev = choose_device(device)
    prec = choose_precision(precision, dev)
    if tile is not None:  # fail before resampling a large tomogram, not after
        plan_tiles_memory(dev, prec, tile, batch_size, filters=network_filters(loaded.net))
    scratch_dir = out_path.parent if out_path is not None else None
    nominal = model_grid_scale(tomo.voxel_size, info.voxel_size_a, vesicle_radius_nm, info.vesicle_radius_nm)
    mshape = _target_shape(tomo.shape, nominal)
    stats: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        grid = stack.enter_context(_scratch(scratch_dir, mshape))
        grid, prepared = prepare_input(tomo, info, invert=invert, vesicle_radius_nm=vesicle_radius_nm, out=grid)
        tomo.release_pages()
        if on_model_grid:
            final = np.empty(mshape, np.float32)
        elif out_path is not None:
            final = stack.enter_context(_output_array(out_path, tomo))
        else:
            final = np.empty(tomo.shape, np.float32)
        same_grid = tuple(mshape) == tuple(final.shape)
        prob_m = final if same_grid else stack.enter_context(_scratch(scratch_dir, mshape))
        fused = prepare_network(loaded.net, dev, prec)
        box = network_box(grid, tomo.shape, skip_vacuum=skip_vacuum, region=region)
        zero_outside(prob_m, box)
        if all(s.stop > s.start for s in box):
            net_in = grid[box]
            if not on_model_grid and next(fused.parameters()).dtype == torch.bfloat16:
                # the network reads bf16 anyway: the float32 input is not kept during the tiles
                net_in = stack.enter_context(_bf16_copy(net_in, scratch_dir))
                grid = None
            predict_array(fused, net_in, device=dev, tile=tile, batch_size=batch_size, precision=prec,
                          tta=tta, out=prob_m[box], progress=progress, prepared=True, stats=stats,
                          memory_budget=memory_budget)
        else:
            stats.update(tiles=0)
        stats["network_box"] = [[int(s.start), int(s.stop)] for s in box]
        if not same_grid:
            from_model_grid(prob_m, tomo.shape, out=final)
            for z0 in range(0, final.shape[0], 32):  # trilinear cannot overshoot; guard rounding
                np.clip(final[z0 : z0 + 32], 0.0, 1.0, out=final[z0 : z0 + 32])
    if out_path is not None:
        final = _open_result(out_path)
    meta = dict(
        model=info.name, sha256=info.sha256, model_voxel_size_a=info.voxel_size_a,
        **prepared, model_grid_shape=list(mshape), tta=int(tta), precision=prec, device=str(dev),
        vesicle_radius_nm=vesicle_radius_nm, **stats, seconds=round(time.perf_counter() - t0, 3),
    )
    return PredictionResult(prob=final, info=meta, image=np.asarray(grid) if on_model_grid else None)


def predict_file(
    tomogram: str | os.PathLike,
    out: str | os.PathLike,
    *,
    voxel_size: float | None = None,
    model: str | os.PathLike | LoadedModel = DEFAULT_MODEL,
    force: bool = False,
    **kwargs: Any,
) -> PredictionResult:
    """Read a tomogram (MRC/REC, TIFF, OME-Zarr; ``voxel_size`` Å overrides the header) and
    write its probability map to ``out`` (.mrc with voxel size and origin, or .npy), and beside
    it the map's description (:func:`map_info_path`; read by ``segment --from-probability``).

    Other keyword arguments are those of :func:`predict_tomogram`.
    """
    from cryoves.atomic import check_file_output, removing_new_dirs
    from cryoves.io import read_tomogram

    check_file_output(out, force=force)
    tomo = read_tomogram(tomogram, voxel_size=voxel_size)
    with removing_new_dirs(Path(out).parent):
        loaded = model if isinstance(model, LoadedModel) else load_model(model)
        res = predict_tomogram(tomo, loaded, out=out, force=force, **kwargs)
        try:
            write_map_info(out, res, tomo, loaded.info.threshold_range)
        except BaseException:
            Path(out).unlink(missing_ok=True)  # a map without its description would be misread
            raise
    return res


def map_info_path(prob_path: str | os.PathLike) -> Path:
    """Where the description of a probability map is: ``prob.mrc`` → ``prob.mrc.json``."""
    p = Path(prob_path)
    return p.with_name(p.name + ".json")


def write_map_info(
    prob_path: str | os.PathLike, res: PredictionResult, tomo: Tomogram, threshold_range: Sequence[float] | None
) -> Path:
    """Write the JSON beside a probability map: which model made it (name, sha256, its threshold
    range), on which grid (voxel size), with which contrast (inverted, polarity), by which cryoves."""
    from cryoves import __version__
    from cryoves.atomic import write_json_atomic

    i = res.info
    return write_json_atomic(map_info_path(prob_path), {
        "kind": "probability_map",
        "cryoves_version": __version__,
        "model": i["model"],
        "model_sha256": i["sha256"],
        "threshold_range": [float(v) for v in (threshold_range or DEFAULT_THRESHOLD_RANGE)],
        "inverted": bool(i["inverted"]),
        "polarity": i["polarity"],
        "voxel_size_a": [float(v) for v in tomo.voxel_size],
        "shape": list(tomo.shape),
        "vesicle_radius_nm": i.get("vesicle_radius_nm"),
        "tta": i.get("tta"),
        "precision": i.get("precision"),
    })


def read_map_info(prob_path: str | os.PathLike) -> dict[str, Any] | None:
    """The description written beside a probability map by ``cryoves predict``; None when absent."""
    import json

    path = map_info_path(prob_path)
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FormatError(f"{path} is not readable JSON ({exc}); delete it or predict the map again") from exc
    if not isinstance(info, dict) or "model" not in info:
        raise FormatError(f"{path} does not describe a probability map; delete it or predict the map again")
    return info

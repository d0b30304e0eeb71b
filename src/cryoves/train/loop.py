"""The training loop: ``train(config)`` is the Python API behind ``cryoves train``.

Loss = ``bce_weight``·BCE + ``dice_weight``·(1 − soft Dice), both over the voxels the weight mask
keeps; AdamW with linear warm-up and cosine decay; validation on held-out volumes with Dice and
vesicle F1 after post-processing (global threshold + adaptive labelling, centre protocol of
:mod:`cryoves.evaluate`); checkpoints with metadata; resume; bf16 autocast on CPUs that have it;
CUDA when present. A run folder holds::

    config.yaml            the resolved configuration
    history.csv            one row per logged step (loss, lr, validation metrics)
    training_curve.png     loss and validation metrics against steps
    checkpoints/last.pt    everything needed to resume (weights, optimiser, RNG states)
    checkpoints/best.safetensors + best.json   the best model so far (load_model-compatible)
    manifest.json          written last, when the run is complete
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.nn import functional as F

from cryoves import __version__
from cryoves.atomic import atomic_path, write_json_atomic, write_text_atomic
from cryoves.device import choose_device, choose_precision
from cryoves.errors import InputError, ModelError, OutputExistsError, ParameterError
from cryoves.postprocess.threshold import threshold_grid
from cryoves.results import MANIFEST_NAME, prepare_output_dir
from cryoves.train.augment import augment_batch
from cryoves.train.config import TrainConfig
from cryoves.train.data import (
    PatchSampler,
    SimulatedPool,
    TrainingVolume,
    _components_to_table,
    load_tomogram_source,
    model_grid,
)

log = logging.getLogger(__name__)

LAST = "last.pt"
BEST = "best.safetensors"


@dataclass
class TrainResult:
    """What :func:`train` returns: the run folder, the best checkpoint and the logged history."""

    outdir: Path
    best_checkpoint: Path | None
    last_checkpoint: Path
    history: pd.DataFrame
    best_metric: float
    steps: int
    seconds: float


# ---------------------------------------------------------------------- devices and precision
def adapt_threads() -> int:
    """Choose torch's CPU thread count from the machine's load (``num_threads: null``).

    On a CPU shared with other jobs, OpenMP threads that wait for each other at every layer
    make a 2-thread step 5–20× *slower* than a 1-thread step (measured on the 2-core dev machine
    at load ≈ 10). So: all cores when the 1-minute load average leaves them free, else one thread.
    """
    import os

    n = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    threads = n if load < n + 0.5 else 1
    if threads != torch.get_num_threads():
        log.info("load average %.1f on %d CPUs: using %d thread(s)", load, n, threads)
        torch.set_num_threads(threads)
    return threads


# ---------------------------------------------------------------------- loss
def segmentation_loss(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, bce_weight: float = 1.0,
    dice_weight: float = 1.0, smooth: float = 1.0,
) -> torch.Tensor:
    """``bce_weight``·BCE + ``dice_weight``·(1 − soft Dice) over the voxels with weight > 0.

    Soft Dice is computed over the whole batch (as one volume) with additive smoothing ``smooth``.
    Ignored voxels (weight 0) contribute nothing to either term.
    """
    logits = logits.float()
    n = weight.sum().clamp(min=1.0)
    loss = logits.new_zeros(())
    if bce_weight > 0:
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        loss = loss + bce_weight * (bce * weight).sum() / n
    if dice_weight > 0:
        p = torch.sigmoid(logits) * weight
        t = target * weight
        dice = (2 * (p * t).sum() + smooth) / (p.sum() + t.sum() + smooth)
        loss = loss + dice_weight * (1 - dice)
    return loss


def lr_at(step: int, cfg: TrainConfig, time_fraction: float | None = None) -> float:
    """Learning rate at ``step`` (0-based): linear warm-up, then cosine to lr·final_lr_fraction.

    With a time budget (``time_limit_min``) the cosine follows whichever is further along, the
    steps or the elapsed fraction ``time_fraction`` of the budget, so a run cut short by the clock
    still ends with a decayed learning rate.
    """
    o = cfg.optim
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    span = max(1, o.steps - o.warmup_steps)
    t = min(1.0, max((step - o.warmup_steps) / span, time_fraction or 0.0))
    lo = o.lr * o.final_lr_fraction
    return lo + 0.5 * (o.lr - lo) * (1 + math.cos(math.pi * t))


# ---------------------------------------------------------------------- validation
@torch.inference_mode()
def predict_volume(net: torch.nn.Module, image: np.ndarray, device: torch.device, bf16: bool,
                   max_voxels: int = 1 << 22) -> np.ndarray:
    """Probability map (float32, same shape) of a normalised model-grid volume.

    Small volumes go through the network in one piece (padded by reflection to a multiple of
    ``2**depth``); larger ones are tiled by :func:`cryoves.predict.predict_array`.
    """
    was_training = net.training
    net.eval()
    try:
        div = net.divisor if hasattr(net, "divisor") else 4
        if image.size > max_voxels:
            from cryoves.predict import predict_array

            return np.asarray(predict_array(net, image, device=str(device),
                                            precision="bf16" if bf16 else "fp32", progress=False),
                              dtype=np.float32)
        pads = [(0, (-s) % div) for s in image.shape]
        x = np.pad(image, pads, mode="reflect") if any(b for _, b in pads) else image
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None, None].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = net.forward_logits(t)
        p = torch.sigmoid(logits.float())[0, 0].cpu().numpy()
        return np.ascontiguousarray(p[: image.shape[0], : image.shape[1], : image.shape[2]])
    finally:
        net.train(was_training)


def detect_vesicles(prob: np.ndarray, image: np.ndarray, voxel_size_a: float, min_radius_nm: float = 12.0,
                    table_voxel_size_a: float | None = None, thresholds: np.ndarray | None = None):
    """Post-process a model-grid probability map into spheres (equal-volume radius at the centroid).

    Uses the project's global threshold (darkest mask shell) and adaptive labelling
    (:mod:`cryoves.postprocess`) on the normalised image; sphere fitting is left out to keep
    validation fast. ``voxel_size_a`` sets the minimum size (``min_radius_nm``); the table gets
    ``table_voxel_size_a`` (default the same), e.g. the ground truth's when a size hint rescaled it.
    ``thresholds``: global threshold candidates (default 0.80-0.99).
    """
    from cryoves.postprocess.adaptive import label_vesicles
    from cryoves.postprocess.threshold import global_threshold

    th = global_threshold(prob, image, thresholds).threshold
    labels, _ = label_vesicles(prob, float(th), voxel_size_a, min_radius_nm=min_radius_nm)
    return _components_to_table(labels, table_voxel_size_a or voxel_size_a)


def validate(net: torch.nn.Module, volumes: list[TrainingVolume], device: torch.device, bf16: bool,
             model_voxel_size_a: float, thresholds: np.ndarray | None = None) -> dict[str, float]:
    """Mean metrics over ``volumes``: ``loss``, soft and hard (p > 0.5) ``dice``, vesicle ``f1``
    (centre protocol, after post-processing with global threshold candidates ``thresholds``),
    ``precision``, ``recall``."""
    from cryoves.evaluate import dice, evaluate, soft_dice

    rows = []
    for vol in volumes:
        prob = predict_volume(net, vol.image, device, bf16)
        w = vol.weight > 0
        t = vol.target > 0
        row = {
            "dice_soft": soft_dice(prob[w], t[w]),
            "dice": dice(prob[w] > 0.5, t[w]),
        }
        p = torch.from_numpy(np.clip(prob, 1e-6, 1 - 1e-6))
        bce = F.binary_cross_entropy(p, torch.from_numpy(t.astype(np.float32)), reduction="none")
        row["loss"] = float(bce[torch.from_numpy(w)].mean())
        if vol.vesicles is not None:
            # both tables in the same voxels: the GT grid may be a size-hint rescaled one
            pred = detect_vesicles(prob * w, vol.image, model_voxel_size_a,
                                   table_voxel_size_a=vol.vesicles.voxel_size, thresholds=thresholds)
            m = evaluate(pred, vol.vesicles).metrics
            row.update(f1=m["f1_centre"], precision=m["precision_centre"], recall=m["recall_centre"])
        rows.append(row)
    df = pd.DataFrame(rows)
    return {k: float(df[k].mean()) for k in df.columns}


# ---------------------------------------------------------------------- metadata
def git_version() -> str:
    """``git describe`` of the source tree, or the package version when not in a git checkout."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=Path(__file__).parent, capture_output=True,
            text=True, timeout=5, check=False,
        )
        if out.returncode == 0 and out.stdout.strip():
            return f"{__version__}+git.{out.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    return __version__


def _model_info(cfg: TrainConfig, base_info: Any, data_summary: dict[str, Any], step: int,
                metrics: dict[str, float]):
    from cryoves.model import ModelInfo

    notes = (
        f"trained with cryoves train ({git_version()}) for {step} steps; "
        f"validation {', '.join(f'{k}={v:.3f}' for k, v in metrics.items())}"
    )
    common = dict(name=cfg.name, voxel_size_a=cfg.voxel_size_a, normalisation=cfg.normalisation,
                  prefilter_sigma=cfg.prefilter_sigma, polarity="dense_dark",
                  source=f"cryoves train: {cfg.name}", notes=notes, threshold_range=list(cfg.threshold_range))
    if base_info is not None:
        return dataclasses.replace(base_info, url=None, sha256=None, licence=base_info.licence, **common)
    from cryoves.train.data import TRAINING_RADIUS_NM

    return ModelInfo(vesicle_radius_nm=TRAINING_RADIUS_NM, licence="BSD-3-Clause", **common)


def save_model(path: Path, net: torch.nn.Module, info: Any, training: dict[str, Any]) -> Path:
    """Save a loadable checkpoint (``.safetensors`` + ``.json``) and add a ``training`` block
    (configuration, data summary, metrics, git version) to the JSON metadata."""
    from cryoves.model import save_checkpoint

    was_training = net.training
    net.eval()
    save_checkpoint(path, net, info)
    net.train(was_training)
    meta_path = path.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta["training"] = training
    write_json_atomic(meta_path, meta)
    return path


# ---------------------------------------------------------------------- the loop
def _build_net(cfg: TrainConfig, device: torch.device):
    """(net in train mode, metadata of the starting model or None)."""
    from cryoves.model import UNet3D, load_model

    if cfg.init:
        loaded = load_model(cfg.init)
        net = loaded.net
        info = loaded.info
        if abs(info.voxel_size_a - cfg.voxel_size_a) > 1e-6 or info.normalisation != cfg.normalisation:
            log.info("fine-tuning %s: using its voxel size %.4g Å and normalisation %s",
                     info.name, info.voxel_size_a, info.normalisation)
        cfg.voxel_size_a = float(info.voxel_size_a)
        cfg.normalisation = info.normalisation
        cfg.prefilter_sigma = float(getattr(info, "prefilter_sigma", 0.0) or 0.0)
        if info.polarity != "dense_dark":
            raise ModelError(f"cannot fine-tune {info.name}: polarity {info.polarity} is not supported")
    else:
        a = cfg.architecture
        net = UNet3D(depth=a.depth, base_filters=a.base_filters, convs_per_level=a.convs_per_level,
                     batch_norm=a.batch_norm, dropout=a.dropout)
        info = None
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = cfg.optim.bn_momentum
    if cfg.optim.patch_size % net.divisor:
        raise ParameterError(f"optim.patch_size must be a multiple of {net.divisor} for this network")
    return net.to(device).train(), info


def _load_data(cfg: TrainConfig, outdir: Path, progress: bool):
    grid = model_grid(cfg.voxel_size_a, cfg.normalisation, cfg.prefilter_sigma, name=cfg.name)
    real = [load_tomogram_source(s, grid) for s in cfg.data.train]
    val = [load_tomogram_source(s, grid) for s in cfg.data.val]
    pool = None
    s = cfg.data.simulated
    if s.fraction > 0 or (not cfg.data.val and s.val_count > 0):
        cache = Path(s.cache) if s.cache else outdir / "sim-cache"
        pool = SimulatedPool(s, grid, cfg.seed, cache)
        if s.fraction > 0:
            pool.fill(progress=progress)
        if not cfg.data.val:
            val = pool.validation_volumes()
    if not val:
        raise InputError("no validation volumes; add data.val tomograms or simulated.val_count")
    return real, val, pool


def _data_summary(real: list[TrainingVolume], val: list[TrainingVolume], pool: SimulatedPool | None,
                  cfg: TrainConfig) -> dict[str, Any]:
    return {
        "real_train": [v.summary() for v in real],
        "validation": [v.summary() for v in val],
        "simulated": (pool.summary() | {"fraction": cfg.data.simulated.fraction}) if pool is not None else None,
    }


def _plot_history(history: pd.DataFrame, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    a1.plot(history["step"], history["loss"], color="0.4", lw=0.8, label="train loss (BCE + 1 − Dice)")
    v = history.dropna(subset=["val_loss"]) if "val_loss" in history else history.iloc[:0]
    if len(v):
        a1.plot(v["step"], v["val_loss"], "o-", color="C3", label="validation BCE")
    a1.set_xlabel("step")
    a1.set_yscale("log")
    a1.legend(fontsize=8)
    for key, c in (("val_dice", "C0"), ("val_f1", "C2"), ("val_dice_soft", "C1")):
        if key in v and v[key].notna().any():
            a2.plot(v["step"], v[key], "o-", color=c, label=key.replace("val_", "validation "))
    a2.set_xlabel("step")
    a2.set_ylim(0, 1)
    a2.legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def _import_everything_now() -> None:
    """Import the modules used later in the run up front, so that a long run does not fail hours
    in on an import (e.g. the package was upgraded or edited while it was running)."""
    import matplotlib.pyplot  # noqa: F401

    import cryoves.evaluate
    import cryoves.postprocess.adaptive
    import cryoves.postprocess.threshold
    import cryoves.predict
    import cryoves.simulate  # noqa: F401


def train(cfg: TrainConfig, *, resume: bool = False, force: bool = False, progress: bool = True) -> TrainResult:
    """Train (or fine-tune, with ``cfg.init``) a U-Net; see the module docstring for the outputs.

    ``resume`` continues from ``<output>/checkpoints/last.pt`` (same configuration); otherwise an
    output folder that already holds a run is refused unless ``force``. Deterministic for a given
    ``cfg.seed`` on the same machine and thread count.
    """
    from tqdm.auto import tqdm

    cfg = TrainConfig.from_dict(cfg.to_dict())  # private copy (fine-tuning adjusts fields)
    _import_everything_now()
    outdir = Path(cfg.output)
    ckdir = outdir / "checkpoints"
    last_path = ckdir / LAST
    if resume:
        if not last_path.exists():
            raise InputError(f"nothing to resume: {last_path} does not exist; start without --resume")
    else:
        if (outdir / MANIFEST_NAME).exists() or last_path.exists():
            if not force:
                raise OutputExistsError(
                    f"{outdir} already holds a training run; pass --force to start over, --resume to continue, "
                    "or choose another --output"
                )
        prepare_output_dir(outdir, force=True)
        (outdir / MANIFEST_NAME).unlink(missing_ok=True)
    threads_before = torch.get_num_threads()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    else:
        adapt_threads()
    device = choose_device(cfg.device)
    bf16 = choose_precision(cfg.precision, device, training=True) == "bf16"
    torch.manual_seed(cfg.seed)
    net, base_info = _build_net(cfg, device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    history: list[dict[str, Any]] = []
    step0, best = 0, -math.inf
    pool_generation = None
    if resume:
        state = torch.load(last_path, map_location="cpu", weights_only=True)
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step0, best = int(state["step"]), float(state["best"])
        gen.set_state(state["augment_rng"])
        torch.set_rng_state(state["torch_rng"])
        rng.bit_generator.state = json.loads(state["sampler_rng"])
        history = json.loads(state["history"])
        pool_generation = json.loads(state["pool_generation"])
        log.info("resuming %s at step %d", outdir, step0)
    write_text_atomic(outdir / "config.yaml", cfg.to_yaml())

    real, val, pool = _load_data(cfg, outdir, progress)
    if pool is not None and pool_generation is not None and cfg.data.simulated.fraction > 0:
        for k, g in enumerate(pool_generation):
            if g:
                pool.generation[k] = g
                pool.volumes[k] = pool._make(pool.seed_of(k, g))
    sampler = PatchSampler(real, pool, cfg.data.simulated.fraction, cfg.optim.patch_size,
                           cfg.optim.foreground_fraction, rng)
    summary = _data_summary(real, val, pool, cfg)
    log.info("training on %d real volume(s), %s simulated; validating on %d; %s, bf16=%s",
             len(real), pool.src.pool_size if pool and cfg.data.simulated.fraction > 0 else 0, len(val), device, bf16)

    t_start = time.perf_counter()
    best_path = ckdir / BEST
    o = cfg.optim
    losses: list[float] = []

    candidates = threshold_grid(cfg.threshold_range)

    def checkpoint(step: int) -> None:
        state = {
            "model": net.state_dict(), "optimizer": opt.state_dict(), "step": step, "best": best,
            "augment_rng": gen.get_state(), "torch_rng": torch.get_rng_state(),
            "sampler_rng": json.dumps(rng.bit_generator.state), "history": json.dumps(history),
            "pool_generation": json.dumps(pool.generation if pool is not None else []),
            "config": cfg.to_yaml(),
        }
        with atomic_path(last_path) as tmp:
            torch.save(state, tmp)

    def log_row(step: int, metrics: dict[str, float] | None) -> None:
        row = {"step": step, "loss": float(np.mean(losses)) if losses else float("nan"),
               "lr": opt.param_groups[0]["lr"], "seconds": round(time.perf_counter() - t_start, 1)}
        if metrics:
            row.update({f"val_{k}": v for k, v in metrics.items()})
        history.append(row)
        losses.clear()

    bar = tqdm(total=o.steps, initial=step0, desc="training", disable=not progress, dynamic_ncols=True)
    step = step0
    last_metrics: dict[str, float] = {}
    stop_early = False
    try:
        while step < o.steps and not stop_early:
            if pool is not None and cfg.data.simulated.fraction > 0:
                pool.refresh(step)
            img, tgt, wgt = (torch.from_numpy(a) for a in sampler.sample(o.batch_size))
            img, tgt, wgt = augment_batch(img, tgt, wgt, cfg.augment, gen)
            img, tgt, wgt = img.to(device), tgt.to(device), wgt.to(device)
            time_fraction = None
            if cfg.time_limit_min:
                time_fraction = (time.perf_counter() - t_start) / 60 / cfg.time_limit_min
            lr = lr_at(step, cfg, time_fraction)
            for group in opt.param_groups:
                group["lr"] = lr
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = net.forward_logits(img)
            loss = segmentation_loss(logits, tgt, wgt, o.bce_weight, o.dice_weight)
            if not torch.isfinite(loss):
                raise ParameterError(f"training diverged (loss {float(loss)}) at step {step}; lower optim.lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if o.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(net.parameters(), o.grad_clip)
            opt.step()
            step += 1
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", **{k: f"{v:.3f}" for k, v in last_metrics.items()
                                                        if k in ("dice", "f1")})
            elapsed_min = (time.perf_counter() - t_start) / 60
            stop_early = cfg.time_limit_min is not None and elapsed_min >= cfg.time_limit_min
            is_last = step >= o.steps or stop_early
            if step % cfg.val_every == 0 or is_last:
                checkpoint(step)  # before validation, so a failure there loses no training
                last_metrics = validate(net, val, device, bf16, cfg.voxel_size_a, candidates)
                log_row(step, last_metrics)
                score = last_metrics.get(cfg.val_metric, last_metrics["dice"])
                if score > best:
                    best = score
                    info = _model_info(cfg, base_info, summary, step, last_metrics)
                    training = {"step": step, "metrics": last_metrics, "data": summary,
                                "config": cfg.to_dict(), "version": git_version(),
                                "bf16": bf16, "device": str(device)}
                    save_model(best_path, net, info, training)
                    if cfg.export:
                        save_model(Path(cfg.export).with_suffix(".safetensors"), net, info, training)
                    log.info("step %d: new best %s = %.4f", step, cfg.val_metric, score)
                _plot_history(pd.DataFrame(history), outdir / "training_curve.png", cfg.name)
                pd.DataFrame(history).to_csv(outdir / "history.csv", index=False)
            elif step % cfg.log_every == 0:
                log_row(step, None)
            if step % cfg.checkpoint_every == 0 or is_last:
                checkpoint(step)
            if not cfg.num_threads and step % 50 == 0:
                adapt_threads()
    finally:
        bar.close()
        torch.set_num_threads(threads_before)
    seconds = time.perf_counter() - t_start
    hist = pd.DataFrame(history)
    with atomic_path(outdir / "history.csv") as tmp:
        hist.to_csv(tmp, index=False)
    write_json_atomic(outdir / MANIFEST_NAME, {
        "command": "train", "version": git_version(), "name": cfg.name, "steps": step,
        "stopped_early": stop_early, "seconds": round(seconds, 1), "best": {cfg.val_metric: best},
        "device": str(device), "bf16": bf16, "data": summary,
        "files": {"best": str(best_path.relative_to(outdir)), "last": str(last_path.relative_to(outdir))},
    })
    return TrainResult(outdir=outdir, best_checkpoint=best_path if best_path.exists() else None,
                       last_checkpoint=last_path, history=hist, best_metric=best, steps=step, seconds=seconds)

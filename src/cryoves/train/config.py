"""Training configuration: nested dataclasses read from YAML (``cryoves train CONFIG.yaml``) or flags.

Every key of the YAML file maps to a field below; unknown keys are refused so that a typo does not
silently fall back to a default. Paths in a YAML file are relative to the file's folder.
Voxel sizes in Å, patch sizes in voxels of the model grid, (z, y, x) axis order.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from cryoves.errors import InputError, ParameterError


@dataclass
class ArchitectureConfig:
    """U-Net shape (see :class:`cryoves.model.UNet3D`); ignored when fine-tuning from ``init``."""

    depth: int = 2
    base_filters: int = 16
    convs_per_level: int = 2
    batch_norm: bool = True
    dropout: float = 0.0


@dataclass
class TomogramSource:
    """One real training or validation tomogram.

    ``labels`` is a label volume (.mrc/.tif, vesicles > 0), a vesicle table (.csv/.star or an IMOD
    .mod with sphere points), or a pyto label file (set ``labels_kind: pyto``: vesicles are the
    ids >= 10). ``mask`` (optional, same grid as the tomogram) marks where the labels are complete;
    the loss ignores everything outside it. ``voxel_size`` (Å) overrides the file header;
    ``invert`` is true for dense = bright data, false for dense = dark, null to detect it.
    """

    tomogram: str
    labels: str
    mask: str | None = None
    labels_kind: str = "auto"  # auto | labels | table | pyto
    voxel_size: float | None = None
    invert: bool | None = None


@dataclass
class SimulatedSource:
    """On-the-fly simulated tomograms from :func:`cryoves.simulate.randomize_config`.

    ``fraction`` is the share of training patches drawn from simulations (0 = real data only,
    1 = simulations only; the rest come from real tomograms). ``pool_size`` volumes are simulated
    once and cached as ``.npy`` under ``cache`` (default ``<output>/sim-cache``); with
    ``refresh_every`` > 0 one pool volume is replaced by a new simulation every that many steps
    (unlimited data). ``large_vesicle_fraction`` of the simulations use the ``large-vesicles``
    preset's vesicle sizes, so that the size-hint path of ``predict`` sees familiar images.
    ``shape`` is the volume shape on the model grid (z, y, x). ``preset`` ``randomize`` draws
    every simulation from :func:`cryoves.simulate.randomize_config`; a preset name (e.g.
    ``small``) simulates that preset (its own shape and voxel size) with a different seed each time.
    """

    fraction: float = 0.0
    preset: str = "randomize"
    pool_size: int = 16
    val_count: int = 2
    shape: tuple[int, int, int] = (64, 128, 128)
    refresh_every: int = 0
    large_vesicle_fraction: float = 0.0
    cache: str | None = None
    seed_offset: int = 1000


@dataclass
class DataConfig:
    train: list[TomogramSource] = field(default_factory=list)
    val: list[TomogramSource] = field(default_factory=list)
    simulated: SimulatedSource = field(default_factory=SimulatedSource)


@dataclass
class AugmentConfig:
    """Augmentations that keep the missing wedge along z: flips on every axis, rot90 in (y, x),
    isotropic zoom, intensity scale/shift, gamma, Gaussian noise and blur. ``p`` is the
    probability of each non-geometric augmentation per patch."""

    flip: bool = True
    rot90: bool = True
    p: float = 0.3
    scale_range: tuple[float, float] = (0.85, 1.15)
    intensity: float = 0.25
    gamma_range: tuple[float, float] = (0.7, 1.5)
    noise_sd: float = 0.3
    blur_sigma: float = 1.0


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine decay to ``lr * final_lr_fraction``.

    ``bn_momentum`` is the BatchNorm running-statistics update rate while training (PyTorch
    convention; Keras' default 0.99 corresponds to 0.01, too slow for short runs).
    """

    steps: int = 2000
    batch_size: int = 4
    patch_size: int = 48
    foreground_fraction: float = 0.5
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    final_lr_fraction: float = 0.02
    bce_weight: float = 1.0
    dice_weight: float = 1.0
    grad_clip: float = 5.0
    bn_momentum: float = 0.05


@dataclass
class TrainConfig:
    """Everything ``cryoves train`` needs.

    ``output`` is the run folder (checkpoints, history, curve, manifest); ``export`` (optional) is
    a weight-file stem (``…/name`` → ``name.safetensors`` + ``name.json``) rewritten whenever
    validation improves. ``voxel_size_a`` (Å), ``normalisation`` (see
    :func:`cryoves.preprocess.normalise`) and ``prefilter_sigma`` (Gaussian σ in model voxels applied
    after resampling) describe the model's input and are stored in its metadata; when fine-tuning
    (``init``) they are taken from the starting model. ``time_limit_min`` stops training early
    (after a final validation and checkpoint). ``threshold_range`` (low, high, step) is the global
    threshold search used for validation and stored with the model for ``segment``: our targets are
    exact balls, so the maps cross 0.5 at the vesicle edge and the membrane shell lies below 0.8.
    """

    name: str = "cryoves-custom"
    output: str = "train-run"
    seed: int = 0
    init: str | None = None
    voxel_size_a: float = 22.0
    normalisation: str = "robust_zscore"
    prefilter_sigma: float = 0.0
    architecture: ArchitectureConfig = field(default_factory=ArchitectureConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    val_every: int = 200
    checkpoint_every: int = 200
    log_every: int = 25
    val_metric: str = "f1"  # f1 | dice
    time_limit_min: float | None = None
    device: str = "auto"
    precision: str = "auto"  # auto | fp32 | bf16
    export: str | None = None
    num_threads: int | None = None
    threshold_range: tuple[float, float, float] = (0.30, 0.99, 0.01)

    # ------------------------------------------------------------------ I/O
    def to_dict(self) -> dict[str, Any]:
        return _plain(asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any], base: Path | None = None) -> TrainConfig:
        """Build from a (YAML) mapping; relative paths are taken relative to ``base``."""
        cfg = _build(cls, d or {}, "config")
        if base is not None:
            cfg = _resolve_paths(cfg, base)
        cfg.validate()
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        import yaml

        path = Path(path)
        if not path.exists():
            raise InputError(f"training config not found: {path}")
        try:
            d = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise InputError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from exc
        if d is not None and not isinstance(d, dict):
            raise InputError(f"{path} must hold a mapping of settings at the top level")
        return cls.from_dict(d or {}, base=path.parent)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with dotted-key overrides, e.g. ``replace(**{"optim.steps": 10})``."""
        d = self.to_dict()
        for key, value in changes.items():
            node = d
            parts = key.split(".")
            for p in parts[:-1]:
                node = node[p]
            if parts[-1] not in node:
                raise ParameterError(f"unknown training setting '{key}'")
            node[parts[-1]] = value
        cfg = _build(TrainConfig, d, "config")
        cfg.validate()
        return cfg

    def validate(self) -> None:
        o, s, a = self.optim, self.data.simulated, self.augment
        checks = [
            (o.steps >= 1, f"optim.steps must be >= 1, got {o.steps}"),
            (min(self.val_every, self.checkpoint_every, self.log_every) >= 1,
             "val_every, checkpoint_every and log_every must be >= 1"),
            (o.batch_size >= 1, f"optim.batch_size must be >= 1, got {o.batch_size}"),
            (o.lr > 0, f"optim.lr must be positive, got {o.lr}"),
            (0 <= o.foreground_fraction <= 1, "optim.foreground_fraction must be in [0, 1]"),
            (o.bce_weight >= 0 and o.dice_weight >= 0 and o.bce_weight + o.dice_weight > 0,
             "optim.bce_weight and optim.dice_weight must be >= 0 and not both 0"),
            (0 <= s.fraction <= 1, f"data.simulated.fraction must be in [0, 1], got {s.fraction}"),
            (0 <= s.large_vesicle_fraction <= 1, "data.simulated.large_vesicle_fraction must be in [0, 1]"),
            (0 < self.voxel_size_a <= 100, f"voxel_size_a must be in (0, 100] Å, got {self.voxel_size_a}"),
            (self.precision in ("auto", "fp32", "bf16"), "precision must be auto, fp32 or bf16"),
            (self.val_metric in ("f1", "dice"), "val_metric must be f1 or dice"),
            (a.scale_range[0] > 0 and a.scale_range[0] <= a.scale_range[1], "augment.scale_range must be 0 < lo <= hi"),
            (a.gamma_range[0] > 0 and a.gamma_range[0] <= a.gamma_range[1], "augment.gamma_range must be 0 < lo <= hi"),
            (0 <= a.p <= 1, "augment.p must be in [0, 1]"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ParameterError(msg)
        from cryoves.postprocess.threshold import threshold_grid

        threshold_grid(self.threshold_range)
        div = 2 ** self.architecture.depth
        if o.patch_size < div or o.patch_size % div:
            raise ParameterError(f"optim.patch_size must be a multiple of {div} (2**depth), got {o.patch_size}")
        if s.fraction < 1 and not self.data.train:
            raise ParameterError(
                "no real training tomograms given; set data.simulated.fraction: 1 (or --simulated 1) "
                "or add data.train entries (--tomogram/--labels)"
            )
        if s.fraction > 0 and s.pool_size < 1:
            raise ParameterError("data.simulated.pool_size must be >= 1 when simulations are used")
        if not self.data.val and (s.fraction == 0 or s.val_count < 1):
            raise ParameterError(
                "no validation data; add data.val tomograms or set data.simulated.val_count >= 1"
            )
        for src in [*self.data.train, *self.data.val]:
            if src.labels_kind not in ("auto", "labels", "table", "pyto"):
                raise ParameterError(f"labels_kind must be auto, labels, table or pyto, got {src.labels_kind!r}")


# ---------------------------------------------------------------------- helpers
def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _build(cls: type, d: Any, where: str) -> Any:
    """Recursively build dataclass ``cls`` from mapping ``d``, refusing unknown keys."""
    if isinstance(d, cls):
        return d
    if not isinstance(d, dict):
        raise ParameterError(f"{where} must be a mapping, got {type(d).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ParameterError(f"unknown setting(s) {', '.join(unknown)} in {where}; known: {', '.join(known)}")
    kwargs: dict[str, Any] = {}
    nested = {
        "architecture": ArchitectureConfig, "data": DataConfig, "augment": AugmentConfig,
        "optim": OptimConfig, "simulated": SimulatedSource,
    }
    for key, value in d.items():
        sub = f"{where}.{key}"
        if key in nested and cls in (TrainConfig, DataConfig):
            kwargs[key] = _build(nested[key], value or {}, sub)
        elif key in ("train", "val") and cls is DataConfig:
            if not isinstance(value or [], list):
                raise ParameterError(f"{sub} must be a list of tomogram entries")
            kwargs[key] = [_build(TomogramSource, v, f"{sub}[{i}]") for i, v in enumerate(value or [])]
        elif key in ("shape", "scale_range", "gamma_range", "threshold_range"):
            n = 3 if key in ("shape", "threshold_range") else 2
            if not isinstance(value, (list, tuple)) or len(value) != n:
                raise ParameterError(f"{sub} must be a list of {n} numbers, got {value!r}")
            kwargs[key] = tuple((int if key == "shape" else float)(v) for v in value)
        else:
            kwargs[key] = _coerce(known[key], value, sub)
    return cls(**kwargs)


def _coerce(f: dataclasses.Field, value: Any, where: str) -> Any:
    t = str(f.type)
    if value is None:
        if "None" in t:
            return None
        raise ParameterError(f"{where} must not be empty")
    try:
        if t.startswith("int"):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if t.startswith("float"):
            return float(value)
        if t.startswith("bool"):
            if not isinstance(value, bool):
                raise ValueError(value)
            return value
        if t.startswith("str"):
            return str(value)
    except (TypeError, ValueError) as exc:
        raise ParameterError(f"{where} has the wrong type: {value!r} (expected {t})") from exc
    return value


def _resolve_paths(cfg: TrainConfig, base: Path) -> TrainConfig:
    def res(p: str | None) -> str | None:
        if p is None:
            return None
        q = Path(p).expanduser()
        return str(q if q.is_absolute() else (base / q))

    for src in [*cfg.data.train, *cfg.data.val]:
        src.tomogram = res(src.tomogram)  # type: ignore[assignment]
        src.labels = res(src.labels)  # type: ignore[assignment]
        src.mask = res(src.mask)
    cfg.output = res(cfg.output)  # type: ignore[assignment]
    cfg.export = res(cfg.export)
    cfg.data.simulated.cache = res(cfg.data.simulated.cache)
    if cfg.init is not None and ("/" in cfg.init or cfg.init.endswith((".safetensors", ".h5", ".pt"))):
        cfg.init = res(cfg.init)
    return cfg


def build_config(
    config: str | Path | None = None,
    *,
    output: str | Path | None = None,
    tomograms: list[str] | None = None,
    labels: list[str] | None = None,
    masks: list[str] | None = None,
    val_tomograms: list[str] | None = None,
    val_labels: list[str] | None = None,
    voxel_size: float | None = None,
    invert: bool | None = None,
    simulated: float | None = None,
    **settings: Any,
) -> TrainConfig:
    """A :class:`TrainConfig` from an optional YAML file plus command-line style overrides.

    ``tomograms``/``labels``/``masks`` (parallel lists; masks optional) add real training data,
    ``val_tomograms``/``val_labels`` validation data; ``voxel_size`` (Å) and ``invert`` apply to all
    of them. ``simulated`` is the share of simulated patches (default: 1 when no real tomograms are
    given, else the file's value). Other keyword arguments are dotted settings, e.g.
    ``**{"optim.steps": 100}``, or the short names ``steps``, ``batch_size``, ``patch_size``, ``lr``,
    ``sim_pool``, ``sim_val``, ``sim_preset``, ``sim_cache`` (``data.simulated`` settings) and the
    top-level ``seed``, ``init``, ``name``, ``device``, ``precision``, ``time_limit_min``, ``export``,
    ``num_threads``; ``None`` values are ignored.
    """
    cfg = TrainConfig.from_yaml(config) if config is not None else TrainConfig()
    short = {"steps": "optim.steps", "batch_size": "optim.batch_size", "patch_size": "optim.patch_size",
             "lr": "optim.lr", "sim_pool": "data.simulated.pool_size", "sim_val": "data.simulated.val_count",
             "sim_preset": "data.simulated.preset", "sim_cache": "data.simulated.cache"}
    changes: dict[str, Any] = {}
    for key, value in settings.items():
        if value is not None:
            changes[short.get(key, key)] = value
    if output is not None:
        changes["output"] = str(output)
    elif config is None:
        raise ParameterError("give -o/--output (the run folder) or a config file with 'output'")

    def sources(tomos: list[str] | None, labs: list[str] | None, msks: list[str] | None, what: str):
        tomos, labs, msks = list(tomos or []), list(labs or []), list(msks or [])
        if len(tomos) != len(labs):
            raise ParameterError(f"{what}: {len(tomos)} tomogram(s) but {len(labs)} label file(s); give one --labels per --tomogram")
        if msks and len(msks) != len(tomos):
            raise ParameterError(f"{what}: give one --mask per --tomogram or none")
        return [
            {"tomogram": str(t), "labels": str(lab), "mask": str(msks[i]) if msks else None,
             "voxel_size": voxel_size, "invert": invert}
            for i, (t, lab) in enumerate(zip(tomos, labs, strict=True))
        ]

    train_src = sources(tomograms, labels, masks, "training data")
    val_src = sources(val_tomograms, val_labels, None, "validation data")
    if train_src:
        changes["data.train"] = cfg.to_dict()["data"]["train"] + train_src
    if val_src:
        changes["data.val"] = cfg.to_dict()["data"]["val"] + val_src
    if simulated is not None:
        changes["data.simulated.fraction"] = float(simulated)
    elif config is None and not train_src:
        changes["data.simulated.fraction"] = 1.0
    return cfg.replace(**changes) if changes else cfg

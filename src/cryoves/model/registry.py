"""Model metadata, the registry of named models, and loading/saving of weights.

Formats: Keras 2 ``.h5`` (imported with h5py), our checkpoints ``NAME.safetensors`` + ``NAME.json``
(metadata = :class:`ModelInfo`), and ``.pt`` files holding ``{"state_dict", "info"}``.
The CryoVesNet weights (GPL-3) are never shipped: they are downloaded on first use into a cache
(``$CRYOVES_CACHE``, default the platform cache dir) and checked by sha256.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryoves.errors import ModelError
from cryoves.model.unet import UNet3D, architecture_kwargs
from cryoves.postprocess.threshold import DEFAULT_THRESHOLD_RANGE, threshold_grid

log = logging.getLogger(__name__)

#: Environment variables (documented in docs/models.md).
ENV_CACHE = "CRYOVES_CACHE"
ENV_CRYOVESNET_WEIGHTS = "CRYOVES_CRYOVESNET_WEIGHTS"
ENV_OFFLINE = "CRYOVES_OFFLINE"

PACKAGED_DIR = Path(__file__).parent / "weights"

_DEFAULT_ARCH = dict(depth=2, base_filters=16, convs_per_level=2, batch_norm=True, dropout=0.0, bn_eps=1e-3)


@dataclass
class ModelInfo:
    """Everything needed to use a network correctly, stored as JSON beside its weights.

    Attributes:
        name: registry name or file stem.
        architecture: :class:`UNet3D` keyword arguments.
        voxel_size_a: voxel size (Å) the network was trained at; inputs are resampled to it.
        normalisation: ``"zscore"`` or ``"robust_zscore"`` (see :func:`cryoves.preprocess.normalise`).
        polarity: contrast the network expects; ``"dense_dark"`` (membranes dark, standard cryo-ET).
        vesicle_radius_nm: typical outer radius of the training vesicles (for --vesicle-radius scaling).
        prefilter_sigma: Gaussian σ (model voxels) applied after resampling, 0 = none.
        sha256: hash of the weight file.
        source: where the weights come from; url: download address (if any); licence of the weights.
        threshold_range: (low, high, step) of the global threshold search for this network's maps;
            None = the original (0.80, 0.99, 0.01). It depends on how wide the training target was:
            CryoVesNet's maps stay near 1 up to the membrane's outer side; networks trained by
            ``cryoves train`` on exact balls cross 0.5 at the vesicle's outer edge, so their membrane
            shell lies near p = 0.5 and below 0.8 (see docs/models.md).
    """

    name: str
    architecture: dict[str, Any] = field(default_factory=lambda: dict(_DEFAULT_ARCH))
    voxel_size_a: float = 22.0
    normalisation: str = "robust_zscore"
    polarity: str = "dense_dark"
    vesicle_radius_nm: float = 19.0
    prefilter_sigma: float = 0.0
    sha256: str | None = None
    source: str = ""
    url: str | None = None
    licence: str | None = None
    notes: str = ""
    threshold_range: list[float] | None = None

    def threshold_grid(self) -> np.ndarray:
        """The candidate global thresholds (ascending) for this network's probability maps."""
        return threshold_grid(self.threshold_range or DEFAULT_THRESHOLD_RANGE)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelInfo:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            log.debug("ignoring unknown model metadata keys %s", sorted(unknown))
        if "name" not in d:
            raise ModelError("model metadata has no 'name'")
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class LoadedModel:
    """A network in eval mode on its device, with its metadata and the file it came from."""

    net: UNet3D
    info: ModelInfo
    path: Path | None = None


CRYOVESNET = ModelInfo(
    name="cryovesnet",
    architecture=dict(_DEFAULT_ARCH),
    voxel_size_a=22.0,
    normalisation="robust_zscore",
    polarity="dense_dark",
    vesicle_radius_nm=19.0,
    prefilter_sigma=1.0,
    sha256="495748b7ad5daaa0f8895b49497798a9331a70ce84b3a227c7e387a930f15f37",
    source="CryoVesNet (Zuber group, Univ. Bern; JCB 2025, doi 10.1083/jcb.202402169), weights.h5",
    url=(
        "https://github.com/Zuber-group/CryoVesNet/raw/56c614066a6da7ded8771cf739cce5e3253af69e/"
        "cryovesnet/weights/weights.h5"
    ),
    licence="GPL-3.0 (CryoVesNet repository); downloaded at run time, never redistributed",
    notes="trained on NAD-filtered rat synaptosome tomograms at 21-24 Å/voxel; Gaussian σ=1 prefilter",
)

#: name → (metadata, file name). The packaged model appears when its files are present.
REGISTRY: dict[str, ModelInfo] = {"cryovesnet": CRYOVESNET}
PACKAGED_MODELS = ("cryoves-default",)


def available_models() -> list[str]:
    """Registry names (``cryoves-default`` only once its packaged files exist)."""
    names = list(REGISTRY)
    for n in PACKAGED_MODELS:
        if (PACKAGED_DIR / f"{n}.safetensors").exists():
            names.append(n)
    return names


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_dir() -> Path:
    """Download cache: ``$CRYOVES_CACHE`` or the platform cache folder (``pooch.os_cache``)."""
    env = os.environ.get(ENV_CACHE)
    if env:
        return Path(env).expanduser()
    import pooch

    return Path(pooch.os_cache("cryoves"))


def fetch_cryovesnet_weights() -> Path:
    """Local path of the CryoVesNet ``weights.h5``: env override, else cache, else download.

    Raises :class:`ModelError` when the file cannot be found or fetched (e.g. offline).
    """
    info = CRYOVESNET
    env = os.environ.get(ENV_CRYOVESNET_WEIGHTS)
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise ModelError(f"{ENV_CRYOVESNET_WEIGHTS}={env} does not point to a file; fix or unset it")
        return path
    fname = "cryovesnet-weights.h5"
    cached = cache_dir() / fname
    if cached.is_file():
        if sha256_file(cached) == info.sha256:
            return cached
        log.warning("cached %s has a wrong sha256; downloading it again", cached)
    hint = (
        f"download {info.url} by hand and set {ENV_CRYOVESNET_WEIGHTS}=/path/to/weights.h5 "
        f"(or put it at {cached})"
    )
    if os.environ.get(ENV_OFFLINE, "").strip() not in ("", "0"):
        raise ModelError(f"CryoVesNet weights not in the cache and {ENV_OFFLINE} is set; {hint}")
    import pooch

    try:
        log.info("downloading the CryoVesNet weights (3 MB, GPL-3) to %s", cached.parent)
        got = pooch.retrieve(info.url, known_hash=f"sha256:{info.sha256}", fname=fname,
                             path=cached.parent, progressbar=False)
    except Exception as exc:  # broad on purpose: network errors come in many types
        raise ModelError(f"cannot download the CryoVesNet weights ({type(exc).__name__}); {hint}") from exc
    return Path(got)


def model_info(name_or_path: str | os.PathLike | LoadedModel | Any) -> ModelInfo:
    """A model's metadata without loading (or downloading) its weights.

    Weight files without metadata (Keras ``.h5``) get CryoVesNet's, as :func:`load_model` gives them.
    """
    if isinstance(getattr(name_or_path, "info", None), ModelInfo):  # a LoadedModel or the like
        return name_or_path.info
    key = str(name_or_path)
    if key == "cryovesnet":
        return dataclasses.replace(CRYOVESNET)
    path = PACKAGED_DIR / f"{key}.safetensors" if key in PACKAGED_MODELS else Path(key).expanduser()
    suffix = path.suffix.lower()
    if suffix in (".h5", ".hdf5", ".keras"):
        return dataclasses.replace(CRYOVESNET, name=path.stem)
    if suffix == ".safetensors" and _metadata_path(path).exists():
        try:
            return ModelInfo.from_dict(json.loads(_metadata_path(path).read_text()))
        except (ValueError, OSError, TypeError) as exc:
            raise ModelError(f"cannot read the metadata of model {path}: {exc}") from exc
    return load_model(key).info


def load_model(name_or_path: str | os.PathLike | LoadedModel, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a registry model (``"cryovesnet"``, ``"cryoves-default"``) or a weight file.

    Files: ``.h5`` (Keras; metadata defaults to CryoVesNet's except name/sha256), ``.safetensors``
    (needs ``<stem>.json`` metadata beside it) or ``.pt``. Returns the net in eval mode on ``device``.
    """
    if isinstance(name_or_path, LoadedModel):
        name_or_path.net.to(device)
        return name_or_path
    key = str(name_or_path)
    if key == "cryovesnet":
        path = fetch_cryovesnet_weights()
        loaded = _load_h5(path, name="cryovesnet")
    elif key in PACKAGED_MODELS:
        path = PACKAGED_DIR / f"{key}.safetensors"
        if not path.exists():
            raise ModelError(
                f"the packaged model '{key}' is not available in this installation yet; "
                "use --model cryovesnet or a weight file path"
            )
        loaded = _load_safetensors(path)
    else:
        path = Path(key).expanduser()
        if not path.exists():
            raise ModelError(
                f"unknown model '{key}': not a file and not one of {', '.join(['cryovesnet', *PACKAGED_MODELS])}"
            )
        suffix = path.suffix.lower()
        if suffix in (".h5", ".hdf5", ".keras"):
            loaded = _load_h5(path, name=path.stem)
        elif suffix == ".safetensors":
            loaded = _load_safetensors(path)
        elif suffix in (".pt", ".pth"):
            loaded = _load_pt(path)
        else:
            raise ModelError(f"unknown weight file type '{suffix}' ({path}); use .h5, .safetensors or .pt")
    loaded.net.to(device).eval()
    return loaded


def _load_h5(path: Path, name: str) -> LoadedModel:
    from cryoves.model.keras import load_keras_h5

    net, arch = load_keras_h5(path)
    digest = sha256_file(path)
    if name == "cryovesnet":
        info = dataclasses.replace(CRYOVESNET)
        if digest != CRYOVESNET.sha256:
            log.warning("%s: sha256 differs from the published CryoVesNet weights", path)
            info.sha256 = digest
    else:
        info = dataclasses.replace(CRYOVESNET, name=name, sha256=digest, source=str(path), url=None,
                                   licence=None, notes="Keras import; CryoVesNet preprocessing assumed")
    info.architecture = {k: v for k, v in arch.items() if k != "matched_by"} | {"dropout": 0.0}
    return LoadedModel(net=net, info=info, path=path)


def _metadata_path(path: Path) -> Path:
    return path.with_suffix(".json")


def _load_safetensors(path: Path) -> LoadedModel:
    from safetensors.torch import load_file

    meta_path = _metadata_path(path)
    if not meta_path.exists():
        raise ModelError(f"{path} has no metadata file {meta_path.name} beside it; save with save_checkpoint()")
    try:
        info = ModelInfo.from_dict(json.loads(meta_path.read_text()))
    except (ValueError, OSError, TypeError) as exc:
        raise ModelError(f"cannot read the metadata of model {path}: {exc}") from exc
    try:
        state = load_file(str(path))
    except Exception as exc:  # broad on purpose: SafetensorError is no OSError/ValueError subclass
        raise ModelError(f"cannot read model {path}: {exc}") from exc
    return _build(state, info, path)


def _load_pt(path: Path) -> LoadedModel:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # broad on purpose: torch raises many types for corrupt files
        raise ModelError(f"cannot read {path}: {exc}") from exc
    if not isinstance(obj, dict) or "state_dict" not in obj or "info" not in obj:
        raise ModelError(f"{path} is not a cryoves checkpoint (expected keys 'state_dict' and 'info')")
    return _build(obj["state_dict"], ModelInfo.from_dict(obj["info"]), path)


def _build(state: dict[str, torch.Tensor], info: ModelInfo, path: Path) -> LoadedModel:
    try:
        net = UNet3D(**architecture_kwargs(info.architecture))
        net.load_state_dict(state)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ModelError(f"weights in {path} do not fit the architecture in its metadata: {exc}") from exc
    return LoadedModel(net=net.eval(), info=info, path=path)


def save_checkpoint(path: str | os.PathLike, net: UNet3D, info: ModelInfo) -> Path:
    """Save ``net`` with its metadata: ``.safetensors`` (+ ``.json`` beside it) or ``.pt``.

    The stored ``info.sha256`` is the hash of the written weight file; ``info.architecture`` is
    taken from the network. Files are written atomically.
    """
    from cryoves.atomic import atomic_path, write_json_atomic

    path = Path(path)
    info = dataclasses.replace(info, architecture=dict(net.config))
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        with atomic_path(path) as tmp:
            save_file(state, str(tmp))
        info.sha256 = sha256_file(path)
        write_json_atomic(_metadata_path(path), info.to_dict())
    elif suffix in (".pt", ".pth"):
        with atomic_path(path) as tmp:
            torch.save({"state_dict": state, "info": info.to_dict()}, tmp)
        info.sha256 = None  # the hash of a file cannot be stored inside it
    else:
        raise ModelError(f"cannot save a checkpoint as '{suffix}'; use .safetensors or .pt")
    return path

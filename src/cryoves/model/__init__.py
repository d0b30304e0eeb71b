"""The U-Net, its weight registry, and loaders (Keras ``.h5``, safetensors + JSON, ``.pt``)."""

from __future__ import annotations

from cryoves.model.registry import (
    CRYOVESNET,
    ENV_CACHE,
    ENV_CRYOVESNET_WEIGHTS,
    ENV_OFFLINE,
    LoadedModel,
    ModelInfo,
    available_models,
    cache_dir,
    fetch_cryovesnet_weights,
    load_model,
    model_info,
    save_checkpoint,
    sha256_file,
)
from cryoves.model.unet import UNet3D, fused_inference_copy

__all__ = [
    "CRYOVESNET",
    "ENV_CACHE",
    "ENV_CRYOVESNET_WEIGHTS",
    "ENV_OFFLINE",
    "LoadedModel",
    "ModelInfo",
    "UNet3D",
    "available_models",
    "cache_dir",
    "fetch_cryovesnet_weights",
    "fused_inference_copy",
    "load_model",
    "model_info",
    "save_checkpoint",
    "sha256_file",
]

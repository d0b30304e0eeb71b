"""Training and fine-tuning of the vesicle U-Net (``cryoves train``).

``train(TrainConfig.from_yaml("recipe.yaml"))`` is the Python API; see :mod:`cryoves.train.loop`
for the run-folder layout, :mod:`cryoves.train.data` for the data sources and
:mod:`cryoves.train.augment` for the augmentations.
"""

from cryoves.train.config import (
    ArchitectureConfig,
    AugmentConfig,
    DataConfig,
    OptimConfig,
    SimulatedSource,
    TomogramSource,
    TrainConfig,
    build_config,
)
from cryoves.train.loop import TrainResult, segmentation_loss, train, validate

__all__ = [
    "ArchitectureConfig",
    "AugmentConfig",
    "DataConfig",
    "OptimConfig",
    "SimulatedSource",
    "TomogramSource",
    "TrainConfig",
    "TrainResult",
    "build_config",
    "segmentation_loss",
    "train",
    "validate",
]

"""Networks (MONAI's DiffusionModelUNet), their EMA, and code-free weight files."""

from medidiff.models.checkpoint import (
    load_checkpoint,
    load_weights,
    save_checkpoint,
    save_weights,
    sha256_file,
)
from medidiff.models.ema import EMA
from medidiff.models.unet import build_unet, count_parameters, spatial_multiple

__all__ = [
    "EMA",
    "build_unet",
    "count_parameters",
    "load_checkpoint",
    "load_weights",
    "save_checkpoint",
    "save_weights",
    "sha256_file",
    "spatial_multiple",
]

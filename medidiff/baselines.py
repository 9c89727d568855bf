"""Simple anomaly baselines, computed on the same scans and grid as the diffusion method.

- Voxel-wise z-score against healthy training scans (Saase et al. 2021, "simpleBAD"): the mean and
  standard deviation of every voxel of the model grid over the preprocessed training scans.
- Intensity thresholding (Meissen et al. 2021, "Challenging current semi-supervised anomaly
  segmentation methods for brain MRI"): the map is the histogram-equalised intensity inside the
  foreground, so bright voxels score high.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from monai.transforms import ResizeWithPadOrCrop
from skimage import exposure

from medidiff.data.io import atomic_write_bytes
from medidiff.errors import ModelFolderError

ZSCORE_FILE = "baseline_zscore.safetensors"


def fit_zscore(volumes: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Voxel-wise mean and std over healthy volumes already on the model grid."""
    stack = np.stack([np.asarray(v, np.float32) for v in volumes])
    return {"mean": stack.mean(axis=0), "std": stack.std(axis=0)}


def zscore_map(volume: np.ndarray, stats: dict[str, np.ndarray], floor: float = 0.02) -> np.ndarray:
    """|x - mean| / max(std, floor): the std floor keeps empty background voxels from exploding.

    A scan whose grid differs from the training grid along the free slice axis gets the
    statistics centre-cropped or padded to its shape, as the preprocessing pads and crops.
    """
    mean, std = (_fit_shape(stats[k], volume.shape) for k in ("mean", "std"))
    return (np.abs(volume - mean) / np.maximum(std, floor)).astype(np.float32)


def _fit_shape(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if array.shape == tuple(shape):
        return array
    resize = ResizeWithPadOrCrop(spatial_size=shape)
    return np.asarray(resize(torch.from_numpy(np.ascontiguousarray(array))[None]))[0]


def threshold_map(volume: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """Histogram-equalised intensity inside the foreground (Meissen et al. 2021)."""
    out = np.zeros_like(volume, dtype=np.float32)
    fg = foreground.astype(bool)
    if fg.any():
        out[fg] = exposure.equalize_hist(volume[fg].astype(np.float32), nbins=256)
    return out


def save_zscore(stats: dict[str, np.ndarray], folder: Path) -> str:
    from safetensors.torch import save

    data = save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in stats.items()})
    atomic_write_bytes(folder / ZSCORE_FILE, data)
    return ZSCORE_FILE


def load_zscore(folder: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = folder / ZSCORE_FILE
    if not path.is_file():
        raise ModelFolderError(folder, "has no z-score statistics; run 'medidiff anomaly calibrate'")
    try:
        tensors = load(path.read_bytes())
    except (SafetensorError, ValueError):
        raise ModelFolderError(path, "is not a readable safetensors file") from None
    return {k: v.numpy() for k, v in tensors.items()}

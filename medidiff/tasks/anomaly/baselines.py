"""Simple anomaly baselines, computed on the same scans and grid as the diffusion method.

- Voxel-wise z-score against healthy training scans (Saase et al. 2021, "simpleBAD"): the mean and
  standard deviation of every voxel of the model grid over the preprocessed training scans.
- Intensity thresholding (Meissen et al. 2021, "Challenging current semi-supervised anomaly
  segmentation methods for brain MRI"): the map is the histogram-equalised intensity inside the
  foreground, so bright voxels score high.

The voxel-wise statistics are also what the diffusion method standardises its residual maps with
(``medidiff.api``): the same fit, stored the same way, fitted on healthy residual maps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from monai.transforms import ResizeWithPadOrCrop
from scipy import ndimage
from skimage import exposure

from medidiff.errors import ModelFolderError
from medidiff.io.write import atomic_write_bytes

ZSCORE_FILE = "baseline_zscore.safetensors"


def fit_zscore(volumes: list[np.ndarray], smooth: float = 0.0) -> dict[str, np.ndarray]:
    """Voxel-wise mean and std over healthy volumes already on the model grid.

    ``smooth``: sigma (voxels) of a Gaussian applied to both, which steadies estimates from a
    handful of scans.
    """
    stack = np.stack([np.asarray(v, np.float32) for v in volumes])
    stats = {"mean": stack.mean(axis=0), "std": stack.std(axis=0)}
    if smooth > 0:
        stats = {k: ndimage.gaussian_filter(v, smooth).astype(np.float32) for k, v in stats.items()}
    return stats


def zscore_map(volume: np.ndarray, stats: dict[str, np.ndarray], floor: float = 0.02,
               one_sided: bool = False) -> np.ndarray:
    """|x - mean| / max(std, floor): the std floor keeps empty background voxels from exploding.

    ``one_sided`` keeps only excesses, max(x - mean, 0): a residual smaller than the healthy
    scans' is no anomaly. A scan whose grid differs from the training grid along the free slice
    axis gets the statistics centre-cropped or padded to its shape, as the preprocessing does.
    """
    mean, std = (fit_shape(stats[k], volume.shape) for k in ("mean", "std"))
    excess = np.maximum(volume - mean, 0.0) if one_sided else np.abs(volume - mean)
    return (excess / np.maximum(std, floor)).astype(np.float32)


def channels_of(volume: np.ndarray) -> np.ndarray:
    """A (C, *S) volume as the z-score fits it: (*S) for one channel (as models of one
    contrast always stored their statistics), (C, *S) for several."""
    volume = np.asarray(volume, np.float32)
    return volume[0] if volume.shape[0] == 1 else volume


def zscore_channels(volume: np.ndarray, stats: dict[str, np.ndarray]) -> np.ndarray:
    """The z-score map of a (C, *S) volume: of each channel against its own statistics, then
    their mean over channels (*S)."""
    data = channels_of(volume)
    out = zscore_map(data, stats)
    return out if data.ndim == volume.ndim - 1 else out.mean(axis=0)


BRIGHT_LESION_ORDER = ("flair", "t2", "pd", "t1ce", "t1")
"""Contrasts by how bright they show lesions (oedema, MS plaques, stroke): thresholding runs on
the first of them a model takes."""


def threshold_channel(contrasts) -> int:
    """The channel intensity thresholding runs on (``BRIGHT_LESION_ORDER``)."""
    rank = {c: i for i, c in enumerate(BRIGHT_LESION_ORDER)}
    return min(range(len(contrasts)), key=lambda k: rank.get(contrasts[k], len(rank)))


def fit_shape(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
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


def save_stats(stats: dict[str, np.ndarray], folder: Path, name: str = ZSCORE_FILE) -> str:
    """Write voxel-wise statistics into the model folder (safetensors, atomically)."""
    from safetensors.torch import save

    data = save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in stats.items()})
    atomic_write_bytes(folder / name, data)
    return name


def load_stats(folder: Path, name: str = ZSCORE_FILE) -> dict[str, np.ndarray]:
    """Read voxel-wise statistics from the model folder (never unpickles)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    if "/" in name or "\\" in name or name.startswith("."):
        raise ModelFolderError(folder, f"names a statistics file outside the folder: {name!r}")
    path = folder / name
    if not path.is_file():
        raise ModelFolderError(folder, f"has no {name}; run 'medidiff anomaly calibrate'")
    try:
        tensors = load(path.read_bytes())
    except (SafetensorError, ValueError):
        raise ModelFolderError(path, "is not a readable safetensors file") from None
    if set(tensors) != {"mean", "std"} or tensors["mean"].shape != tensors["std"].shape:
        raise ModelFolderError(path, "does not hold voxel-wise 'mean' and 'std' of one shape")
    return {k: v.numpy() for k, v in tensors.items()}

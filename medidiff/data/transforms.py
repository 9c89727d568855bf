"""Preprocessing as a composition of MONAI transforms, invertible back to the scan's own space.

Every scan goes through the same chain in training and inference: load, channel first, RAS
orientation, resampling to the model's spacing, robust percentile scaling to [0, 1] and padding or
cropping to the model's grid. Because each spatial step is a MONAI invertible transform, maps
computed on the model grid go back to the input's space with ``Invertd``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    Invertd,
    LoadImage,
    LoadImaged,
    MapTransform,
    Orientationd,
    Resized,
    ResizeWithPadOrCropd,
    ScaleIntensityRangePercentilesd,
    Spacingd,
)
from scipy import ndimage

from medidiff.config import DataConfig
from medidiff.errors import InputError
from medidiff.io.validate import check_resampled_size, same_grid


class Chain(Compose):
    """A MONAI Compose from which an InputError raised by a step comes out as itself.

    MONAI wraps every failure of a transform in ``RuntimeError("applying transform ...")``;
    callers catch InputError to report the scan's problem in one line.
    """

    def __call__(self, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        except RuntimeError as err:
            cause = err.__cause__
            while cause is not None and not isinstance(cause, InputError):
                cause = cause.__cause__
            if cause is None:
                raise
            raise cause from None


class CheckResampledSized(MapTransform):
    """Before ``Spacingd``: refuse a scan whose grid at ``pixdim`` would exceed the voxel limit."""

    def __init__(self, keys, pixdim: Sequence[float]):
        super().__init__(keys)
        self.pixdim = [float(p) for p in pixdim]

    def __call__(self, data):
        for key in self.key_iterator(data):
            image = data[key]  # a channel-first MetaTensor
            shape = image.shape[1:]
            spacing = [float(s) for s in image.pixdim][: len(shape)]
            check_resampled_size(image.meta.get("filename_or_obj", key), shape, spacing,
                                 self.pixdim)
        return data


class LoadChannelsd(LoadImaged):
    """``LoadImaged`` whose image may be a list of files, one per contrast, stacked as
    channels: they must share one grid (unregistered contrasts cannot be stacked voxel by
    voxel), else an InputError names the file that differs."""

    def __init__(self, keys, reader=None, **kwargs):
        super().__init__(keys, reader=reader, **kwargs)
        self.reader_of_channels = reader

    def __call__(self, data, reader=None):
        for key in self.key_iterator(dict(data)):
            files = data[key]
            if isinstance(files, list | tuple) and len(files) > 1:
                grids = [LoadImage(reader=self.reader_of_channels, image_only=True)(f)
                         for f in files]
                for path, image in zip(files[1:], grids[1:], strict=True):
                    if not same_grid(image.shape, image.affine, grids[0].shape,
                                     grids[0].affine):
                        raise InputError(path, f"is on another grid {tuple(image.shape)} than "
                                               f"{Path(files[0]).name} {tuple(grids[0].shape)}; "
                                               "the contrasts of a scan must share one grid, "
                                               "or be registered (preprocess.registration)")
        return super().__call__(data, reader)


def grid_size(cfg: DataConfig) -> list[int]:
    """The model grid as a 3D spatial size; -1 keeps the scan's extent along the slice axis."""
    if cfg.spatial_dims == 3:
        return list(cfg.size)
    size = list(cfg.size)
    size.insert(cfg.slice_axis, -1)
    return size


def volume_transforms(
    cfg: DataConfig,
    image_key: str = "image",
    label_keys: Sequence[str] = (),
    reader=None,
) -> Compose:
    """Deterministic chain from a 3D scan file to the model grid, intensities in [0, 1].

    Labels (tissue classes, lesion masks) follow the image with nearest-neighbour resampling.
    """
    keys = [image_key, *label_keys]
    modes = ["bilinear"] + ["nearest"] * len(label_keys)
    chain = [
        LoadChannelsd(keys=keys, reader=reader, image_only=True),
        EnsureChannelFirstd(keys=keys),
        EnsureTyped(keys=keys, dtype=torch.float32),
        Orientationd(keys=keys, axcodes="RAS"),
    ]
    if cfg.spacing is not None:
        chain.append(CheckResampledSized(keys=image_key, pixdim=cfg.spacing))
        chain.append(Spacingd(keys=keys, pixdim=cfg.spacing, mode=modes))
    chain += [
        *scale_intensity(cfg, image_key),
        ResizeWithPadOrCropd(keys=keys, spatial_size=grid_size(cfg)),
    ]
    return Chain(chain)


def scale_intensity(cfg: DataConfig, image_key: str = "image") -> list:
    """The intensity percentiles to [0, 1], clipped to [0, ``cfg.intensity_ceiling``]; without
    percentiles (the preprocessing normalised the scan) the clip alone."""
    if cfg.intensity_percentiles is None:
        return [Clampd(keys=image_key, high=cfg.intensity_ceiling)]
    low, high = cfg.intensity_percentiles
    scale = ScaleIntensityRangePercentilesd(keys=image_key, lower=low, upper=high, b_min=0.0,
                                            b_max=1.0, clip=cfg.intensity_ceiling == 1.0)
    if cfg.intensity_ceiling == 1.0:
        return [scale]
    return [scale, Clampd(keys=image_key, high=cfg.intensity_ceiling)]


class Clampd(MapTransform):
    """Clip intensities to [``low``, ``high``]; NaN stays NaN, for the input checks to refuse."""

    def __init__(self, keys, low: float = 0.0, high: float = 1.0):
        super().__init__(keys)
        self.low, self.high = low, high

    def __call__(self, data):
        data = dict(data)
        for key in self.key_iterator(data):
            data[key] = torch.clamp(data[key], self.low, self.high)
        return data


def image_transforms(cfg: DataConfig, image_key: str = "image", reader=None) -> Compose:
    """Chain for a 2D image (PNG, 2D NIfTI) and a 2D model: no physical spacing to honour, so
    the image is scaled to [0, 1] and resized to the model's in-plane grid (invertibly)."""
    return Chain([
        LoadImaged(keys=image_key, reader=reader, image_only=True),
        EnsureChannelFirstd(keys=image_key),
        EnsureTyped(keys=image_key, dtype=torch.float32),
        *scale_intensity(cfg, image_key),
        Resized(keys=image_key, spatial_size=list(cfg.size), mode="bilinear"),
    ])


def invert_to_input(pipeline: Compose, data: dict, key: str, image_key: str = "image",
                    nearest: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Map ``data[key]`` (a tensor on the model grid) back to the input scan's voxel grid.

    ``data[key]`` must carry the image's metadata; ``Invertd`` replays the image's recorded
    spatial transforms in reverse. Returns the array (without channel) and the input's affine.
    """
    inverter = Invertd(
        keys=key,
        transform=pipeline,
        orig_keys=image_key,
        nearest_interp=nearest,
        to_tensor=True,
    )
    out = inverter(data)[key]
    meta = data[image_key].meta
    # readers without a physical affine (PNG) record none; the inverted tensor then has its own
    affine = meta.get("original_affine", getattr(out, "affine", np.eye(4)))
    affine = np.asarray(affine, dtype=np.float64)
    return np.asarray(out.detach().cpu().numpy()[0], dtype=np.float32), affine


def foreground_mask(volume: np.ndarray, threshold: float) -> np.ndarray:
    """Head/brain foreground of a [0, 1] scan: smoothed intensity above a threshold, holes filled.

    Smoothing first keeps background noise (Rician floor) out of the mask.
    """
    smooth = ndimage.gaussian_filter(volume.astype(np.float32), sigma=1.0)
    mask = smooth > threshold
    if mask.ndim == 3:
        for axis_slice in range(mask.shape[-1]):
            mask[..., axis_slice] = ndimage.binary_fill_holes(mask[..., axis_slice])
    else:
        mask = ndimage.binary_fill_holes(mask)
    return mask

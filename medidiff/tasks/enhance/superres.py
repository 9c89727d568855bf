"""Conditional super-resolution, SR3 style (Saharia et al. 2021).

The low-resolution scan, interpolated back onto the target grid, is the condition, concatenated
after the noisy target; the model generates the residual from it (SRDiff, Li et al. 2022), in
units that give it about unit variance, so an untrained model returns the interpolation. Training pairs come from clean scans averaged ``scale``-fold along the
super-resolved axes (``medidiff.data.degrade.downsample``: thick slices, large voxels) and
interpolated back with ``degrade.upsample_to``; the scale reaches the network as a class label.
2D models super-resolve in-plane, 3D models through-plane (thick slices), unless
``superres.axes`` says otherwise.
"""

from __future__ import annotations

import numpy as np
import torch

from medidiff.config import Config
from medidiff.data import degrade
from medidiff.tasks.base import Task, TrainingInputs
from medidiff.tasks.enhance.denoise import crop_batch, jitter_intensity


class SuperResTask(Task):
    """Conditional super-resolution: target the fine slice, condition the interpolated coarse one."""

    name = "superres"

    def condition_channels(self, cfg: Config) -> int:
        return 2 * self.slice_context(cfg) + 1

    def num_class_embeds(self, cfg: Config) -> int:
        return len(cfg.superres.scales)

    def slice_context(self, cfg: Config) -> int:
        return cfg.superres.context if cfg.data.spatial_dims == 2 else 0

    def training_inputs(self, batch: dict, cfg: Config, generator: torch.Generator) -> TrainingInputs:
        image = jitter_intensity(crop_batch(batch["image"], cfg, generator),
                                 cfg.superres.intensity_jitter, generator)
        scales = cfg.superres.scales
        choice = torch.randint(len(scales), (image.shape[0],), generator=generator)
        dims = example_dims(cfg)
        condition = torch.empty_like(image)
        for index, scale in enumerate(scales):
            rows = choice == index
            if rows.any():
                condition[rows] = degrade_and_interpolate(image[rows], scale, dims)
        context = self.slice_context(cfg)
        unit = residual_unit(torch.tensor(scales)[choice]).reshape(-1, *[1] * (image.ndim - 1))
        residual = (image[:, context] - condition[:, context])[:, None] / unit
        return TrainingInputs(target=residual, condition=condition * 2.0 - 1.0,
                              class_labels=choice)


def residual_unit(scale):
    """The unit of the generated residual (fine - interpolated): 0.05 per unit of scale, which
    gives the target a standard deviation near 0.5 on brain MRI at x2 and x4."""
    return 0.05 * scale


def volume_axes(cfg: Config) -> tuple[int, ...]:
    """The volume axes (0..2, RAS) a model super-resolves."""
    if cfg.superres.axes is not None:
        return tuple(sorted(cfg.superres.axes))
    if cfg.data.spatial_dims == 3:
        return (cfg.data.slice_axis,)
    return tuple(a for a in range(3) if a != cfg.data.slice_axis)


def example_dims(cfg: Config) -> tuple[int, ...]:
    """The same axes counted in a training example's spatial dims (a 2D slice drops one)."""
    axes = volume_axes(cfg)
    if cfg.data.spatial_dims == 3:
        return axes
    kept = [a for a in range(3) if a != cfg.data.slice_axis]
    return tuple(kept.index(a) for a in axes if a in kept)


def degrade_and_interpolate(image: torch.Tensor, scale: int, dims) -> torch.Tensor:
    """Average ``scale``-fold along ``dims``, then interpolate back to the grid (the condition)."""
    low = degrade.downsample(image, scale, dims)
    factor = [scale if d in dims else 1 for d in range(image.ndim - 2)]
    return degrade.upsample_to(low, image.shape[2:], factor=factor)


def scale_label(factor: int, cfg: Config) -> int:
    """Class label for a factor: the nearest trained scale (the larger one on a tie)."""
    scales = cfg.superres.scales
    return min(range(len(scales)), key=lambda i: (abs(scales[i] - factor), -scales[i]))


def fine_affine(coarse_affine: np.ndarray, factors) -> np.ndarray:
    """Affine of the grid ``factors``-fold finer than a coarse one, aligned as
    ``degrade.downsample`` aligns them (coarse voxel i covers fine voxels f*i .. f*i + f - 1)."""
    step = np.eye(4)
    for axis, f in enumerate(factors):
        step[axis, axis] = 1.0 / f
        step[axis, 3] = -(f - 1) / (2.0 * f)
    return np.asarray(coarse_affine, np.float64) @ step

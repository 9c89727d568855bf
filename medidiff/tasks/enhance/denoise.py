"""Conditional denoising (the SR3 recipe applied to noise) and zero-shot SDEdit denoising.

Conditional: a DDPM of the clean scan given the noisy one, concatenated after the noisy target
as extra channels (Saharia et al. 2021, "SR3"; as in CoreDiff, Gao et al. 2023, a 2D model also
sees the neighbouring noisy slices). What it generates is the residual clean - noisy in units of
twice the noise sigma (residual learning as in DnCNN, Zhang et al. 2017, and SRDiff, Li et al.
2022): an untrained model returns its input, and training only has to learn the correction.
Training pairs come from clean scans degraded on the fly with Rician or Gaussian noise
(``medidiff.data.degrade``); the noise level reaches the network as a class label, so one model
covers a range of levels.

Zero-shot: an unconditional (normative) model denoises by SDEdit (Meng et al. 2022): the noisy
scan, scaled by sqrt(alpha_bar_t), *is* a sample of the forward process at the step t whose
noise matches its own, sqrt((1 - alpha_bar_t) / alpha_bar_t) = 2 sigma (the model sees 2x - 1),
the matching step of DDM2 (Xiang et al. 2023); the reverse process runs from there.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import ndimage

from medidiff.config import Config
from medidiff.data import degrade
from medidiff.diffusion.schedule import NoiseSchedule
from medidiff.tasks.base import Task, TrainingInputs

_MAD_TO_SIGMA = 0.6745  # median |N(0, 1)|


class DenoiseTask(Task):
    """Conditional denoiser: target the clean slice, condition the noisy slice and neighbours."""

    name = "denoise"

    def condition_channels(self, cfg: Config) -> int:
        return 2 * self.slice_context(cfg) + 1

    def num_class_embeds(self, cfg: Config) -> int:
        return cfg.denoise.noise_bins

    def slice_context(self, cfg: Config) -> int:
        return cfg.denoise.context if cfg.data.spatial_dims == 2 else 0

    def training_inputs(self, batch: dict, cfg: Config, generator: torch.Generator) -> TrainingInputs:
        section = cfg.denoise
        image = jitter_intensity(batch["image"], section.intensity_jitter, generator)
        middle = image[:, self.slice_context(cfg)][:, None]
        reference = degrade.reference_intensity(middle, middle > 0)  # before a crop may lose the head
        image = crop_batch(image, cfg, generator)
        centre = image[:, self.slice_context(cfg)][:, None]
        low, high = section.sigma_range
        fraction = low + (high - low) * torch.rand(image.shape[0], generator=generator)
        sigma = fraction * torch.where(reference > 0, reference, torch.ones_like(reference))
        noisy = add_noise(image, sigma, section.noise, generator)
        head_only = torch.rand(image.shape[0], generator=generator) < section.foreground_only
        head_only = head_only.reshape(-1, *[1] * (image.ndim - 1))
        noisy = torch.where(head_only & (image <= 0), torch.zeros_like(noisy), noisy)
        middle = noisy[:, self.slice_context(cfg)][:, None]
        unit = residual_unit(sigma).reshape(-1, *[1] * (image.ndim - 1))
        return TrainingInputs(target=(centre - middle) / unit, condition=noisy * 2.0 - 1.0,
                              class_labels=noise_label(sigma, cfg))


def residual_unit(sigma):
    """The unit of the generated residual (clean - noisy): twice the noise sigma, so that the
    target has a standard deviation near 0.5 at every noise level (residual learning, DnCNN)."""
    return 2.0 * sigma


def add_noise(image: torch.Tensor, sigma: torch.Tensor, kinds, generator) -> torch.Tensor:
    """Rician or Gaussian noise of per-example ``sigma``, the kind drawn per example."""
    choice = torch.randint(len(kinds), (image.shape[0],), generator=generator)
    noisy = torch.empty_like(image)
    for index, kind in enumerate(kinds):
        rows = choice == index
        if rows.any():
            add = degrade.add_rician_noise if kind == "rician" else degrade.add_gaussian_noise
            noisy[rows] = add(image[rows], sigma[rows], generator)
    return noisy


def crop_batch(image: torch.Tensor, cfg: Config, generator: torch.Generator) -> torch.Tensor:
    """2D: a random ``data.patch`` crop of each slice (3D patches are cut by the data set)."""
    patch = cfg.data.patch
    if cfg.data.spatial_dims != 2 or not patch:
        return image
    size = image.shape[2:]
    if any(p > s for p, s in zip(patch, size, strict=True)):
        return image
    out = []
    for item in image:
        y, x = (int(torch.randint(s - p + 1, (1,), generator=generator))
                for s, p in zip(size, patch, strict=True))
        out.append(item[:, y:y + patch[0], x:x + patch[1]])
    return torch.stack(out)


def jitter_intensity(image: torch.Tensor, jitter: float, generator: torch.Generator) -> torch.Tensor:
    """Scale each example by a factor in [1 - jitter, 1 + jitter].

    Percentile scaling of a noisy or low-resolution scan is off by a few percent (the noise
    moves the percentile); a network trained on jittered pairs keeps its output on the scale
    of its input, which the inverse scaling then maps back to the scan's units.
    """
    if jitter <= 0:
        return image
    factor = 1.0 + jitter * (2.0 * torch.rand(image.shape[0], generator=generator) - 1.0)
    return image * factor.reshape(-1, *[1] * (image.ndim - 1)).to(image.dtype)


def noise_label(sigma: torch.Tensor | float, cfg: Config) -> torch.Tensor:
    """Class label of a noise sigma (model intensity units): ``noise_bins`` even bins from 0 to
    the top of ``sigma_range``; levels beyond it get the last bin."""
    bins = cfg.denoise.noise_bins
    top = cfg.denoise.sigma_range[1]
    scaled = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1) / top * (bins - 1)
    return scaled.round().clamp(0, bins - 1).long()


def estimate_sigma(volume: np.ndarray, foreground: np.ndarray, axis: int = 2) -> float:
    """Noise sigma of a 3D scan from the median absolute diagonal wavelet detail in the head.

    Donoho and Johnstone's (1994) MAD estimator, as in scikit-image's ``estimate_sigma``, but
    on Haar detail coefficients of each slice whose 2x2 blocks lie inside the eroded
    foreground, so that a zero background does not pull the estimate down.
    """
    image = np.moveaxis(np.asarray(volume, np.float64), axis, 0)
    mask = ndimage.binary_erosion(np.moveaxis(foreground, axis, 0), iterations=1)
    h, w = (image.shape[1] // 2) * 2, (image.shape[2] // 2) * 2
    image, mask = image[:, :h, :w], mask[:, :h, :w]
    detail = (image[:, 0::2, 0::2] - image[:, 1::2, 0::2] - image[:, 0::2, 1::2]
              + image[:, 1::2, 1::2]) / 2.0
    inside = mask[:, 0::2, 0::2] & mask[:, 1::2, 0::2] & mask[:, 0::2, 1::2] & mask[:, 1::2, 1::2]
    values = detail[inside] if inside.sum() >= 64 else detail.ravel()
    return float(np.median(np.abs(values)) / _MAD_TO_SIGMA)


def sdedit_timestep(schedule: NoiseSchedule, sigma: float) -> int:
    """The step whose forward noise matches noise ``sigma`` ([0, 1] units) of a scan:
    sqrt((1 - alpha_bar_t) / alpha_bar_t) = 2 sigma (model space is 2x - 1); at least 1."""
    ab = schedule.alphas_cumprod
    ratio = torch.sqrt((1.0 - ab) / ab)
    t = int(torch.argmin((ratio - 2.0 * max(float(sigma), 0.0)).abs()))
    return max(1, min(t, schedule.num_train_timesteps - 1))


def sdedit_start(image: torch.Tensor, schedule: NoiseSchedule, t: int) -> torch.Tensor:
    """x_t for SDEdit from a noisy image in [0, 1]: its own noise plays the forward noise."""
    return math.sqrt(float(schedule.alphas_cumprod[t])) * (image * 2.0 - 1.0)

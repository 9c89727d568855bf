"""Reconstruction-based anomaly scoring with a normative diffusion model.

The AnoDDPM family (Wyatt et al. 2022; Behrendt et al. 2023; Bercea et al. 2024): noise a scan to
a partial level t, run the reverse process back with a few-step sampler, and take the residual
against the input. Averaging the residuals of several noise draws and levels (as ensembles over
draws in Behrendt's follow-up and over levels in THOR and ANDi) removes most of the sampling
noise; a 3D median filter and the foreground mask finish the map (pDDPM's post-processing).

Settings are the model's ``anomaly`` config section (``AnomalyConfig``) plus a method name.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from medidiff.config import AnomalyConfig
from medidiff.diffusion.noise import StackedGenerator, sample_seed
from medidiff.diffusion.samplers import get_sampler, nfe, timestep_schedule
from medidiff.diffusion.schedule import NoiseSchedule
from medidiff.errors import ConfigError
from medidiff.names import ANOMALY_METHODS
from medidiff.tasks.base import model_fn

# what a calibration depends on (the map's scale changes with these)
CALIBRATION_KEYS = ("method", "sampler", "noise_levels", "steps", "draws", "eta", "median_kernel",
                    "standardise")
BASELINE_CALIBRATION_KEYS = ("method", "median_kernel")


def check_settings(settings: AnomalyConfig, method: str, trained_timesteps: int) -> None:
    """Refuse an unknown method and noise levels the model never learnt."""
    if method not in ANOMALY_METHODS:
        raise ConfigError(f"method: unknown method {method!r} (valid: {', '.join(ANOMALY_METHODS)})")
    get_sampler(settings.sampler)
    for level in settings.noise_levels:
        timestep_schedule(level, min(settings.steps, level), trained_timesteps)


def nfe_per_slice(settings: AnomalyConfig, method: str) -> int:
    if method != "diffusion":
        return 0
    return len(settings.noise_levels) * settings.draws * nfe(settings.sampler, settings.steps)


def describe(settings: AnomalyConfig, method: str) -> dict:
    return {"method": method, **settings.model_dump(mode="json"),
            "nfe_per_slice": nfe_per_slice(settings, method)}


def calibration_key(settings: AnomalyConfig, method: str) -> dict:
    keys = CALIBRATION_KEYS if method == "diffusion" else BASELINE_CALIBRATION_KEYS
    return {k: v for k, v in describe(settings, method).items() if k in keys}


@torch.no_grad()
def reconstruct(net, images: torch.Tensor, ids: list[tuple[int, ...]], schedule: NoiseSchedule,
                settings: AnomalyConfig, device: torch.device) -> torch.Tensor:
    """(B, 2, *S): mean |x - x_hat| over draws, levels and channels (the contrasts of a model
    of several), and the mean reconstruction of channel 0.

    ``images`` is a batch (B, C, *S) in [0, 1]; ``ids`` names each row (its slice, its window),
    and every (row, draw, level) draws its own seeded noise. The draws are folded into the batch.
    """
    sampler = get_sampler(settings.sampler)
    options = {"eta": settings.eta} if settings.sampler == "ddim" else {}
    draws = settings.draws
    x = images.to(device) * 2.0 - 1.0
    repeated = x.repeat_interleave(draws, dim=0)
    model = model_fn(net)
    residual = torch.zeros_like(x[:, :1])
    recon = torch.zeros_like(x[:, :1])
    for index, level in enumerate(settings.noise_levels):
        generator = StackedGenerator([sample_seed(settings.seed, index, draw, *row)
                                      for row in ids for draw in range(draws)])
        noise = generator.randn(repeated.shape).to(device)
        t = torch.full((repeated.shape[0],), level, dtype=torch.long, device=device)
        x_t = schedule.add_noise(repeated, noise, t)
        steps = timestep_schedule(level, min(settings.steps, level), schedule.num_train_timesteps)
        x_hat = sampler(model, x_t, steps, schedule, generator=generator, clip=True, **options)
        drawn = ((x_hat + 1.0) / 2.0).reshape(x.shape[0], draws, *x.shape[1:])
        residual += (images.to(device)[:, None] - drawn).abs().mean(dim=(1, 2))[:, None]
        recon += drawn[:, :, :1].mean(dim=1)
    count = len(settings.noise_levels)
    return torch.cat([residual, recon], dim=1).cpu() / count


def postprocess(raw: np.ndarray, foreground: np.ndarray, median_kernel: int) -> np.ndarray:
    """Median filter (pDDPM uses k=5 in 3D), then zero outside the foreground.

    The filter runs on the foreground's bounding box grown by the kernel's radius, which gives
    the same values inside the foreground as filtering the whole grid, at a fraction of the
    cost (the head fills about half of its grid)."""
    out = np.zeros(raw.shape, np.float32)
    fg = np.asarray(foreground, bool)
    if not fg.any():
        return out
    if median_kernel <= 1:
        out[fg] = raw[fg]
        return out
    radius = median_kernel // 2
    box = tuple(slice(max(0, int(i.min()) - radius), int(i.max()) + 1 + radius)
                for i in np.nonzero(fg))
    smooth = ndimage.median_filter(np.asarray(raw[box], np.float32), size=median_kernel)
    out[box] = np.where(fg[box], smooth, 0.0)
    return out


def scan_score(anomaly_map: np.ndarray, foreground: np.ndarray, top_fraction: float) -> float:
    """Per-scan score: the mean of the top ``top_fraction`` of foreground voxels of the map."""
    values = anomaly_map[foreground.astype(bool)]
    if values.size == 0:
        return 0.0
    k = max(1, int(round(top_fraction * values.size)))
    return float(np.partition(values, values.size - k)[-k:].mean())

"""Reconstruction-based anomaly scoring with a normative diffusion model.

The AnoDDPM family (Wyatt et al. 2022; Behrendt et al. 2023; Bercea et al. 2024): noise a scan to
a partial level t, run the reverse process back with a few-step sampler, and take the residual
against the input. Averaging the residuals of several noise draws and levels (as ensembles over
draws in Behrendt's follow-up and over levels in THOR and ANDi) removes most of the sampling
noise; a 3D median filter and the foreground mask finish the map (pDDPM's post-processing).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch
from scipy import ndimage

from medidiff.config import AnomalyConfig, Config
from medidiff.diffusion.samplers import get_sampler, nfe, timestep_schedule
from medidiff.diffusion.schedule import NoiseSchedule
from medidiff.errors import ConfigError
from medidiff.tasks.base import Task, model_fn

METHODS = ("diffusion", "zscore", "threshold")


class AnomalyTask(Task):
    """The normative model: an unconditional DDPM of healthy scans (the base behaviour)."""

    name = "anomaly"


@dataclass(frozen=True)
class ScoreSettings:
    """How a scan is scored; ``from_config`` takes the defaults from the model's ``anomaly``
    config section (``AnomalyConfig`` holds them, in one place)."""

    sampler: str
    noise_levels: tuple[int, ...]
    steps: int
    draws: int
    eta: float
    median_kernel: int
    standardise: bool
    score_top_fraction: float
    batch_size: int
    seed: int
    method: str = "diffusion"
    extra: dict = field(default_factory=dict, compare=False)

    @classmethod
    def from_config(cls, cfg: AnomalyConfig, **overrides) -> ScoreSettings:
        base = cls(sampler=cfg.sampler, noise_levels=tuple(cfg.noise_levels), steps=cfg.steps,
                   draws=cfg.draws, eta=cfg.eta, median_kernel=cfg.median_kernel,
                   standardise=cfg.standardise,
                   score_top_fraction=cfg.score_top_fraction, batch_size=cfg.batch_size,
                   seed=cfg.seed)
        given = {k: v for k, v in overrides.items() if v is not None}
        if "noise_levels" in given:
            given["noise_levels"] = tuple(int(t) for t in given["noise_levels"])
        settings = replace(base, **given)
        settings.validate()
        return settings

    def validate(self, num_train_timesteps: int = 1000) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method: unknown method {self.method!r} (valid: {', '.join(METHODS)})")
        get_sampler(self.sampler)
        for level in self.noise_levels:
            timestep_schedule(level, min(self.steps, level), num_train_timesteps)

    def nfe_per_slice(self) -> int:
        if self.method != "diffusion":
            return 0
        return len(self.noise_levels) * self.draws * nfe(self.sampler, self.steps)

    def describe(self) -> dict:
        return {"method": self.method, "sampler": self.sampler,
                "noise_levels": list(self.noise_levels), "steps": self.steps, "draws": self.draws,
                "eta": self.eta, "median_kernel": self.median_kernel,
                "standardise": self.standardise,
                "nfe_per_slice": self.nfe_per_slice()}


@torch.no_grad()
def reconstruct_residual(net, images: torch.Tensor, schedule: NoiseSchedule,
                         settings: ScoreSettings, generator: torch.Generator,
                         device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean |x - x_hat| over draws and noise levels, and the mean reconstruction ([0, 1] units).

    ``images`` is a batch (B, C, *spatial) in [0, 1]; the ``draws`` reconstructions per level
    are folded into the batch.
    """
    sampler = get_sampler(settings.sampler)
    options = {"eta": settings.eta} if settings.sampler == "ddim" else {}
    x = images.to(device) * 2.0 - 1.0
    repeated = x.repeat_interleave(settings.draws, dim=0)
    model = model_fn(net)
    residual = torch.zeros_like(x)
    recon = torch.zeros_like(x)
    for level in settings.noise_levels:
        noise = torch.randn(repeated.shape, generator=generator).to(device)
        t = torch.full((repeated.shape[0],), level, dtype=torch.long, device=device)
        x_t = schedule.add_noise(repeated, noise, t)
        steps = timestep_schedule(level, min(settings.steps, level), schedule.num_train_timesteps)
        x_hat = sampler(model, x_t, steps, schedule, generator=generator, clip=True, **options)
        draws = ((x_hat + 1.0) / 2.0).reshape(x.shape[0], settings.draws, *x.shape[1:])
        residual += (images.to(device)[:, None] - draws).abs().mean(dim=1)
        recon += draws.mean(dim=1)
    count = len(settings.noise_levels)
    return (residual / count).cpu(), (recon / count).cpu()


def slice_residuals(net, volume: torch.Tensor, foreground: np.ndarray, cfg: Config,
                    schedule: NoiseSchedule, settings: ScoreSettings, device: torch.device,
                    progress=None) -> tuple[np.ndarray, np.ndarray]:
    """A 2D model applied slice by slice (in batches) to a (C, H, W, D) volume on the model grid.

    Slices without foreground are skipped (their residual is 0, their reconstruction the input).
    """
    axis = cfg.data.slice_axis + 1
    slices = volume.movedim(axis, 0)  # (S, C, h, w)
    fg_per_slice = torch.as_tensor(foreground).movedim(axis - 1, 0).flatten(1).any(dim=1)
    todo = torch.nonzero(fg_per_slice).flatten().tolist()
    residual = torch.zeros_like(slices)
    recon = slices.clone()
    generator = torch.Generator().manual_seed(settings.seed)
    per_batch = max(1, settings.batch_size // settings.draws)
    for start in range(0, len(todo), per_batch):
        index = todo[start:start + per_batch]
        res, rec = reconstruct_residual(net, slices[index], schedule, settings, generator, device)
        residual[index], recon[index] = res, rec
        if progress:
            progress(min(start + per_batch, len(todo)), len(todo))
    return (residual.movedim(0, axis).numpy()[0], recon.movedim(0, axis).numpy()[0])


def volume_residuals(net, volume: torch.Tensor, schedule: NoiseSchedule,
                     settings: ScoreSettings, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """A 3D model applied to the whole (C, H, W, D) volume on the model grid."""
    generator = torch.Generator().manual_seed(settings.seed)
    res, rec = reconstruct_residual(net, volume[None], schedule, settings, generator, device)
    return res.numpy()[0, 0], rec.numpy()[0, 0]


def postprocess(raw: np.ndarray, foreground: np.ndarray, median_kernel: int) -> np.ndarray:
    """Median filter (pDDPM uses k=5 in 3D), then zero outside the foreground."""
    smooth = ndimage.median_filter(raw, size=median_kernel) if median_kernel > 1 else raw
    return (smooth * foreground).astype(np.float32)


def scan_score(anomaly_map: np.ndarray, foreground: np.ndarray, top_fraction: float) -> float:
    """Per-scan score: the mean of the top ``top_fraction`` of foreground voxels of the map."""
    values = anomaly_map[foreground.astype(bool)]
    if values.size == 0:
        return 0.0
    k = max(1, int(round(top_fraction * values.size)))
    return float(np.partition(values, values.size - k)[-k:].mean())

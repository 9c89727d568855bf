"""What enhancement runs on each batch of the grid runner, and its intensity bookkeeping.

A conditional model (SR3) samples from pure noise given the condition channels and a class
label; a normative model denoises zero-shot by SDEdit. Every (row, sample) draws its own seeded
noise (``medidiff.diffusion.noise``), so results do not depend on batch size. The network is
only ever driven through the shared samplers.
"""

from __future__ import annotations

import numpy as np
import torch

from medidiff.config import Config
from medidiff.data import degrade
from medidiff.diffusion.noise import StackedGenerator, sample_seed
from medidiff.diffusion.samplers import get_sampler, timestep_schedule
from medidiff.diffusion.schedule import NoiseSchedule
from medidiff.inference.grid import ItemFn
from medidiff.tasks.base import model_fn
from medidiff.tasks.enhance.denoise import sdedit_start


def _generator(settings, ids) -> StackedGenerator:
    return StackedGenerator([sample_seed(settings.seed, sample, *row)
                             for row in ids for sample in range(settings.samples)])


def _sample(model, x, t_start: int, settings, schedule: NoiseSchedule, generator, eta: float,
            clip: bool = True):
    steps = timestep_schedule(t_start, min(settings.steps, t_start), schedule.num_train_timesteps)
    options = {"eta": eta} if settings.sampler == "ddim" else {}
    return get_sampler(settings.sampler)(model, x, steps, schedule, generator=generator,
                                         clip=clip, **options)


def conditional_draws(net, schedule: NoiseSchedule, settings, label: int, context: int,
                      unit: float, device: torch.device) -> ItemFn:
    """(B, C, *S) condition in [0, 1] -> (B, samples, *S), each sampled from pure noise given
    the condition channels and the class label (SR3). The model generates the residual from
    the condition's middle channel in units of ``unit`` (SRDiff), so the result is that channel
    plus ``unit`` times the sample (no clipping: residuals exceed [-1, 1])."""
    t_start = schedule.num_train_timesteps - 1

    def draw(condition: torch.Tensor, ids) -> torch.Tensor:
        n = settings.samples
        generator = _generator(settings, ids)
        cond = (condition * 2.0 - 1.0).repeat_interleave(n, dim=0).to(device)
        labels = torch.full((cond.shape[0],), label, dtype=torch.long, device=device)
        noise = schedule.draw_noise((cond.shape[0], 1, *cond.shape[2:]), generator, device=device)
        residual = _sample(model_fn(net, cond, labels), noise, t_start, settings, schedule,
                           generator, settings.eta, clip=False)
        middle = condition[:, context:context + 1].repeat_interleave(n, dim=0)
        return (middle + unit * residual.float().cpu()).reshape(-1, n, *condition.shape[2:])

    return draw


def sdedit_draws(net, schedule: NoiseSchedule, settings, t_start: int,
                 device: torch.device) -> ItemFn:
    """(B, 1, *S) noisy image in [0, 1] -> (B, samples, *S), reversed from the step whose noise
    matches its own (SDEdit). Several samples only differ with a stochastic sampler, so DDIM
    then runs with eta = 1 unless a positive eta was asked for."""
    eta = settings.eta if settings.samples == 1 or settings.eta > 0 else 1.0

    def draw(image: torch.Tensor, ids) -> torch.Tensor:
        n = settings.samples
        x = sdedit_start(image, schedule, t_start).repeat_interleave(n, dim=0).to(device)
        x0 = _sample(model_fn(net), x, t_start, settings, schedule, _generator(settings, ids), eta)
        return ((x0.float().cpu() + 1.0) / 2.0).reshape(-1, n, *x0.shape[2:])

    return draw


def keep_input(samples: int):
    """The runner's fill: slices that are not run keep the input."""

    def fill(slices: torch.Tensor) -> torch.Tensor:
        return slices[:, :1].repeat(1, samples, *[1] * (slices.ndim - 2)).float()

    return fill


def resample(volume: torch.Tensor, factors, cfg: Config, mode: str | None = None) -> torch.Tensor:
    """A coarse (1, h, w, d) volume interpolated ``factors``-fold finer per axis, as the
    training condition was (``degrade.upsample_to``: bicubic per slice for 2D models)."""
    factors = [int(f) for f in factors]
    axis = cfg.data.slice_axis
    if cfg.data.spatial_dims == 2 and factors[axis] == 1:
        slices = volume.movedim(axis + 1, 0)  # (D, 1, h, w)
        per_slice = [f for a, f in enumerate(factors) if a != axis]
        size = [s * f for s, f in zip(slices.shape[2:], per_slice, strict=True)]
        return degrade.upsample_to(slices, size, mode=mode, factor=per_slice).movedim(0, axis + 1)
    size = [s * f for s, f in zip(volume.shape[1:], factors, strict=True)]
    return degrade.upsample_to(volume[None], size, mode=mode, factor=factors)[0]


def percentile_range(volume: torch.Tensor, percentiles) -> tuple[float, float]:
    """The intensities the model's percentiles fall on (the max when they coincide)."""
    low, high = (float(v) for v in np.percentile(volume.numpy(), percentiles))
    return (low, high) if high > low else (low, float(volume.max()))


def unscale(array, low: float, high: float, offset: bool = True) -> np.ndarray:
    """[0, 1] model units back to the scan's units (``offset=False`` for a spread)."""
    out = np.asarray(array, np.float32) * np.float32(high - low)
    return out + np.float32(low) if offset else out

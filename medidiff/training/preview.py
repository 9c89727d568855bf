"""The training preview: a grid of few-step samples from the EMA weights, logged with its step."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from medidiff.diffusion.samplers import get_sampler, timestep_schedule
from medidiff.diffusion.schedule import NoiseSchedule
from medidiff.report import display, montage


@torch.no_grad()
def preview_grid(net: torch.nn.Module, inputs: Any, schedule: NoiseSchedule, t_start: int,
                 generator: torch.Generator, steps: int = 20) -> np.ndarray:
    """Real examples (top row) and samples of ``net`` given their condition (bottom row).

    ``inputs`` are a task's training inputs of a 2D batch (on the CPU); sampling starts at
    ``t_start`` (from partial noise of the real example when below the last timestep).
    DPM-Solver++(2M) on log-SNR spaced steps: accurate in few steps, so the grid shows what the
    model has learnt rather than the sampler's blur.
    """
    device = next(net.parameters()).device
    condition = None if inputs.condition is None else inputs.condition.to(device)
    labels = None if inputs.class_labels is None else inputs.class_labels.to(device)
    shape = inputs.target.shape
    x = schedule.draw_noise(shape, generator)
    if t_start < schedule.num_train_timesteps - 1:  # reconstruct from partial noise
        start = torch.full((shape[0],), t_start, dtype=torch.long)
        x = schedule.add_noise(inputs.target, x, start)
    x = x.to(device)
    timesteps = timestep_schedule(t_start, steps, spacing="logsnr", schedule=schedule)
    sample = get_sampler("dpmpp2m")(_conditioned(net, condition, labels), x, timesteps,
                                    schedule, generator=generator, clip=True)
    tiles = [display((s[0].float().cpu().numpy() + 1) / 2) for s in sample]
    reals = [display((r[0].float().numpy() + 1) / 2) for r in inputs.target]
    return montage([reals, tiles])


def _conditioned(net, condition: torch.Tensor | None, labels: torch.Tensor | None):
    """``net`` as the samplers call a model, ``model(x_t, t)``: condition channels after x_t."""

    def call(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x = x_t if condition is None else torch.cat([x_t, condition.to(x_t.dtype)], dim=1)
        return net(x, timesteps=t, class_labels=labels)

    return call

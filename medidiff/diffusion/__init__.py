"""Noise schedule and samplers: one sampler signature for every task."""

from medidiff.diffusion.samplers import (
    SAMPLERS,
    ddim,
    ddpm,
    dpmpp_2m,
    get_sampler,
    nfe,
    timestep_schedule,
    x0,
)
from medidiff.diffusion.schedule import PREDICTION_TYPES, NoiseSchedule

__all__ = [
    "PREDICTION_TYPES",
    "SAMPLERS",
    "NoiseSchedule",
    "ddim",
    "ddpm",
    "dpmpp_2m",
    "get_sampler",
    "nfe",
    "timestep_schedule",
    "x0",
]

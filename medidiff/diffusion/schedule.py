"""The forward (noising) process: MONAI's beta schedules and ``add_noise``, the noise itself
(Gaussian, or AnoDDPM's simplex noise; optionally confined to one patch, as pDDPM's), plus the
conversions between what a network predicts (eps, v or x0) that every sampler and the training
loss share."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from monai.networks.schedulers import DDPMScheduler, NoiseSchedules

from medidiff.diffusion.noise import NOISES, draw
from medidiff.errors import ConfigError
from medidiff.names import PREDICTION_TYPES

_BETA_KEYS = ("beta_start", "beta_end")


def _schedule_args(schedule: str, beta_start: float, beta_end: float, extra: dict) -> dict:
    """The keyword arguments MONAI's schedule function accepts (``cosine`` takes no betas)."""
    if schedule not in NoiseSchedules:
        valid = ", ".join(NoiseSchedules.names)
        raise ConfigError(f"schedule: unknown noise schedule {schedule!r} (valid: {valid})")
    accepted = set(inspect.signature(NoiseSchedules[schedule]).parameters) - {"num_train_timesteps"}
    unknown = sorted(set(extra) - accepted)
    if unknown:
        raise ConfigError(f"{unknown[0]}: not an argument of the {schedule!r} schedule")
    args = {"beta_start": beta_start, "beta_end": beta_end, **extra}
    return {k: v for k, v in args.items() if k in accepted}


class NoiseSchedule:
    """Variance-preserving diffusion x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps (Ho et al. 2020).

    Timestep ``t`` indexes ``alphas_cumprod`` (0 .. T-1, all noisy); the clean sample sits
    "at t = -1" with ab = 1. The betas are MONAI's; ``alphas_cumprod`` is their cumulative
    product in float64, used both by ``add_noise`` (rounded to the sample's dtype) and the
    samplers, so training and sampling see the same process.
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        schedule: str = "linear_beta",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        prediction_type: str = "epsilon",
        noise: str = "gaussian",
        noise_patch: int | None = None,
        **schedule_args: Any,
    ) -> None:
        if int(num_train_timesteps) < 2:
            raise ConfigError(f"num_train_timesteps: must be at least 2, got {num_train_timesteps}")
        if prediction_type not in PREDICTION_TYPES:
            raise ConfigError(
                f"prediction_type: {prediction_type!r} is not one of {', '.join(PREDICTION_TYPES)}"
            )
        if noise not in NOISES:
            raise ConfigError(f"noise: {noise!r} is not one of {', '.join(NOISES)}")
        if noise_patch is not None and int(noise_patch) < 4:
            raise ConfigError(f"noise_patch: must be at least 4 voxels, got {noise_patch}")
        self.num_train_timesteps = int(num_train_timesteps)
        self.schedule = schedule
        self.noise = noise
        self.noise_patch = None if noise_patch is None else int(noise_patch)
        self.prediction_type = prediction_type
        self.schedule_args = _schedule_args(schedule, beta_start, beta_end, schedule_args)
        self._monai = self.to_monai()
        # MONAI multiplies out its float32 betas in float32; the float64 product keeps
        # ab_t / ab_s == prod(1 - beta) exact to ~1e-16, which strided posteriors divide by.
        self.alphas_cumprod = torch.cumprod(1.0 - self._monai.betas.double(), dim=0)
        self._monai.alphas_cumprod = self.alphas_cumprod.clone()  # add_noise casts to x's dtype

    def to_monai(self, **kwargs: Any) -> DDPMScheduler:
        """A fresh MONAI ``DDPMScheduler`` with this schedule (``clip_sample=False`` unless given)."""
        kwargs.setdefault("clip_sample", False)
        return DDPMScheduler(
            num_train_timesteps=self.num_train_timesteps,
            schedule=self.schedule,
            prediction_type=self.prediction_type,
            **self.schedule_args,
            **kwargs,
        )

    def to_config(self) -> dict:
        """Plain dict that :meth:`from_config` turns back into an equal schedule."""
        return {
            "num_train_timesteps": self.num_train_timesteps,
            "schedule": self.schedule,
            "prediction_type": self.prediction_type,
            "noise": self.noise,
            "noise_patch": self.noise_patch,
            **self.schedule_args,
        }

    @classmethod
    def from_config(cls, config: dict) -> NoiseSchedule:
        return cls(**config)

    def abar(self, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
        """alpha_cumprod at ``t`` (int or (B,) tensor), shaped to broadcast against ``like``."""
        t = torch.as_tensor(t, dtype=torch.long).reshape(-1).cpu()
        ab = self.alphas_cumprod[t]
        return ab.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))

    def draw_noise(self, shape, generator=None, *, dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None) -> torch.Tensor:
        """The process's noise (standard normal, or standardised simplex as AnoDDPM's) of
        ``shape``, from a ``torch.Generator`` or a ``StackedGenerator``."""
        return draw(self.noise, shape, generator, dtype=dtype, device=device)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t from x0 (MONAI's ``add_noise``; ``t`` is a (B,) LongTensor)."""
        return self._monai.add_noise(x0, noise, t)

    def training_target(
        self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """What the network learns to output: eps, v = sqrt(ab) eps - sqrt(1-ab) x0, or x0."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            return x0
        return self._monai.get_velocity(x0, noise, t)

    def split(
        self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps, x0) implied by a raw network output at ``x_t``, whatever the prediction type."""
        ab = self.abar(t, x_t)
        a, s = ab.sqrt(), (1 - ab).sqrt()
        if self.prediction_type == "epsilon":
            return model_output, (x_t - s * model_output) / a
        if self.prediction_type == "sample":
            return (x_t - a * model_output) / s, model_output
        return s * x_t + a * model_output, a * x_t - s * model_output

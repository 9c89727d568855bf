"""Reverse-process samplers, all with one signature (as in k-diffusion)::

    sampler(model, x, timesteps, schedule, *, generator=None, callback=None, extra_args=None,
            **options) -> Tensor

``model(x_t, t, **extra_args)`` returns the raw network output (eps, v or x0, as ``schedule``
says) for a (B,) LongTensor ``t``. ``x`` is the sample at ``timesteps[0]``; ``timesteps`` is a
strictly decreasing sequence of training timesteps (indices into ``schedule.alphas_cumprod``).
After the last one every sampler steps to the clean sample (alpha_cumprod = 1) and returns it.
``callback(dict(i=, t=, x=, x0=))`` runs after each step. All noise is drawn from ``generator``
(a ``torch.Generator``, or a ``StackedGenerator`` with one generator per batch row).
Option ``clip=True`` clamps each x0 estimate to [-1, 1]. Samplers run under ``torch.no_grad()``
(a model that needs gradients, e.g. for guidance, can enable them inside its call).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from medidiff import names
from medidiff.diffusion.schedule import NoiseSchedule
from medidiff.errors import ConfigError


def timestep_schedule(
    t_start: int,
    steps: int,
    num_train_timesteps: int = 1000,
    *,
    spacing: str = "linear",
    schedule: NoiseSchedule | None = None,
) -> list[int]:
    """``steps`` strictly decreasing timesteps from ``t_start`` down to >= 1.

    ``spacing="linear"``: evenly spaced in t, t_start, ..., t_start/steps (250, 225, ..., 25).
    ``spacing="logsnr"``: evenly spaced in log-SNR between t_start and t=0 (needs ``schedule``);
    the spacing DPM-Solver is designed for (Lu et al. 2022), far more accurate in few steps
    because it puts steps where the low-noise detail is decided.
    """
    if schedule is not None:
        num_train_timesteps = schedule.num_train_timesteps
    if not 1 <= t_start < num_train_timesteps:
        raise ConfigError(f"noise_level: must be in 1..{num_train_timesteps - 1}, got {t_start}")
    if not 1 <= steps <= t_start:
        raise ConfigError(f"steps: must be in 1..{t_start} (the noise level), got {steps}")
    if spacing == "linear":
        # round half up in integers so the list is exact and strictly decreasing (spacing >= 1)
        return [(2 * t_start * (steps - k) + steps) // (2 * steps) for k in range(steps)]
    if spacing != "logsnr":
        raise ConfigError(f"spacing: {spacing!r} is not one of linear, logsnr")
    if schedule is None:
        raise ValueError("spacing='logsnr' needs the noise schedule")
    return _logsnr_timesteps(t_start, steps, schedule)


def _logsnr_timesteps(t_start: int, steps: int, schedule: NoiseSchedule) -> list[int]:
    ab = schedule.alphas_cumprod[: t_start + 1]
    lam = 0.5 * torch.log(ab / (1.0 - ab))  # decreasing in t
    targets = torch.linspace(float(lam[t_start]), float(lam[0]), steps + 1)[:-1]
    nearest = (lam[None, :] - targets[:, None].to(lam)).abs().argmin(dim=1).tolist()
    ts = [t_start]
    for k, t in enumerate(nearest[1:], start=1):
        # the integer grid is coarse in log-SNR near t=0: keep the list strictly decreasing
        ts.append(max(min(int(t), ts[-1] - 1), steps - k))
    return ts


def _check_timesteps(timesteps: Sequence[int] | torch.Tensor, schedule: NoiseSchedule) -> list[int]:
    ts = [int(t) for t in (timesteps.tolist() if torch.is_tensor(timesteps) else timesteps)]
    if not ts:
        raise ValueError("timesteps is empty")
    if any(b >= a for a, b in zip(ts, ts[1:], strict=False)):
        raise ValueError(f"timesteps must be strictly decreasing, got {ts}")
    if ts[-1] < 0 or ts[0] >= schedule.num_train_timesteps:
        raise ValueError(f"timesteps must lie in 0..{schedule.num_train_timesteps - 1}, got {ts}")
    return ts


def _ab(schedule: NoiseSchedule, t: int) -> float:
    """alpha_cumprod at t as a Python float; t = -1 is the clean sample (1.0)."""
    return 1.0 if t < 0 else float(schedule.alphas_cumprod[t])


def _denoise(model, x, t, schedule, extra_args, clip) -> tuple[torch.Tensor, torch.Tensor]:
    """(eps, x0) from one network call; with ``clip`` eps is recomputed from the clamped x0."""
    t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
    eps, x0 = schedule.split(model(x, t_batch, **extra_args), x, t)
    if clip:
        x0 = x0.clamp(-1.0, 1.0)
        ab = _ab(schedule, t)
        eps = (x - math.sqrt(ab) * x0) / math.sqrt(1.0 - ab)
    return eps, x0


def _randn(x: torch.Tensor, generator, schedule: NoiseSchedule) -> torch.Tensor:
    """The schedule's noise like ``x`` from a ``torch.Generator``, or one per row from a
    ``StackedGenerator``."""
    return schedule.draw_noise(x.shape, generator, dtype=x.dtype, device=x.device)


def _pairs(ts: list[int]) -> list[tuple[int, int, int]]:
    """(i, t, s): step i goes from level t to level s, the last one to s = -1 (clean)."""
    return [(i, t, ts[i + 1] if i + 1 < len(ts) else -1) for i, t in enumerate(ts)]


@torch.no_grad()
def ddpm(
    model, x, timesteps, schedule, *, generator=None, callback=None, extra_args=None, clip=False
):
    """Ancestral sampling from the exact posterior q(x_s | x_t, x0_hat) for any gap s < t (Ho et al. 2020)."""
    extra_args = extra_args or {}
    for i, t, s in _pairs(_check_timesteps(timesteps, schedule)):
        _, x0 = _denoise(model, x, t, schedule, extra_args, clip)
        ab_t, ab_s = _ab(schedule, t), _ab(schedule, s)
        a_ts = ab_t / ab_s  # alpha from level s to level t
        c0 = math.sqrt(ab_s) * (1.0 - a_ts) / (1.0 - ab_t)
        ct = math.sqrt(a_ts) * (1.0 - ab_s) / (1.0 - ab_t)
        x = c0 * x0 + ct * x
        if s >= 0:
            var = max((1.0 - ab_s) / (1.0 - ab_t) * (1.0 - a_ts), 1e-20)
            x = x + math.sqrt(var) * _randn(x, generator, schedule)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0": x0})
    return x


@torch.no_grad()
def ddim(
    model,
    x,
    timesteps,
    schedule,
    *,
    generator=None,
    callback=None,
    extra_args=None,
    eta=0.0,
    clip=False,
):
    """Denoising diffusion implicit models; eta=0 deterministic, eta=1 ancestral (Song et al. 2021)."""
    extra_args = extra_args or {}
    for i, t, s in _pairs(_check_timesteps(timesteps, schedule)):
        eps, x0 = _denoise(model, x, t, schedule, extra_args, clip)
        ab_t, ab_s = _ab(schedule, t), _ab(schedule, s)
        sigma = eta * math.sqrt((1.0 - ab_s) / (1.0 - ab_t) * (1.0 - ab_t / ab_s))
        x = math.sqrt(ab_s) * x0 + math.sqrt(max(1.0 - ab_s - sigma**2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * _randn(x, generator, schedule)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0": x0})
    return x


def _lambda(ab: float) -> float:
    """Half log-SNR, log(alpha / sigma); +inf for the clean sample."""
    return math.inf if ab >= 1.0 else 0.5 * math.log(ab / (1.0 - ab))


@torch.no_grad()
def dpmpp_2m(
    model, x, timesteps, schedule, *, generator=None, callback=None, extra_args=None, clip=False
):
    """DPM-Solver++(2M), multistep second order in data prediction (Lu et al. 2022)."""
    extra_args = extra_args or {}
    x0_prev, h_prev = None, None
    for i, t, s in _pairs(_check_timesteps(timesteps, schedule)):
        _, x0 = _denoise(model, x, t, schedule, extra_args, clip)
        ab_t, ab_s = _ab(schedule, t), _ab(schedule, s)
        h = _lambda(ab_s) - _lambda(ab_t)
        d = x0
        if x0_prev is not None and s >= 0:  # first and final (to clean) steps stay first order
            r = h_prev / h
            d = (1.0 + 0.5 / r) * x0 - (0.5 / r) * x0_prev
        ratio = math.sqrt((1.0 - ab_s) / (1.0 - ab_t))
        x = ratio * x + math.sqrt(ab_s) * (-math.expm1(-h)) * d
        x0_prev, h_prev = x0, h
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0": x0})
    return x


@torch.no_grad()
def x0(
    model, x, timesteps, schedule, *, generator=None, callback=None, extra_args=None, clip=False
):
    """One-step prediction x0_hat = E[x0 | x_t] at timesteps[0] only (Ho et al. 2020, eq. 15).

    The posterior mean, not a sample: later timesteps are ignored. It is the cheap (one network
    evaluation) reconstruction used for fast anomaly scoring.
    """
    t = _check_timesteps(timesteps, schedule)[0]
    _, x0_hat = _denoise(model, x, t, schedule, extra_args or {}, clip)
    if callback is not None:
        callback({"i": 0, "t": t, "x": x0_hat, "x0": x0_hat})
    return x0_hat


SAMPLERS = {"ddpm": ddpm, "ddim": ddim, "dpmpp2m": dpmpp_2m, "x0": x0}
if tuple(SAMPLERS) != names.SAMPLERS:  # one registry of names: medidiff.names
    raise AssertionError(f"medidiff.names.SAMPLERS {names.SAMPLERS} != samplers {tuple(SAMPLERS)}")


def get_sampler(name: str) -> Callable[..., torch.Tensor]:
    """The sampler function registered under ``name``."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ConfigError(
            f"sampler: unknown sampler {name!r} (valid: {', '.join(SAMPLERS)})"
        ) from None


def nfe(name: str, steps: int) -> int:
    """Number of network evaluations ``name`` makes for ``steps`` timesteps."""
    get_sampler(name)
    return 1 if name == "x0" else int(steps)

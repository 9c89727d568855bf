"""Running an enhancement model over a whole scan on the model grid (used by ``medidiff.enhance``).

Preprocessing is the model's MONAI chain without the final crop (an enhanced scan keeps its
whole field of view) and with the percentile scaling recorded, so that results go back to the
scan's units. A 2D model runs slice by slice in batches (with its neighbour slices as context),
a 3D model on the whole volume; where a slice or volume exceeds the region the network was
trained on, MONAI's ``sliding_window_inference`` tiles it with Gaussian-weighted overlaps.
The network is only ever driven through the shared samplers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from monai.transforms import (
    ResizeWithPadOrCropd,
    ScaleIntensityRange,
    ScaleIntensityRangePercentilesd,
    Spacingd,
)

from medidiff.config import Config
from medidiff.data import degrade
from medidiff.data.io import check_voxels, reader_for, validate_input
from medidiff.data.transforms import Chain, CheckResampledSized, volume_transforms
from medidiff.diffusion.samplers import get_sampler, timestep_schedule
from medidiff.diffusion.schedule import NoiseSchedule
from medidiff.errors import InputError
from medidiff.models.unet import spatial_multiple
from medidiff.tasks.base import model_fn
from medidiff.tasks.denoise import sdedit_start

Draw = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Prepared:
    """A preprocessed scan: the MONAI data dict, the chain to invert, the intensity scaling."""

    pipeline: Chain
    data: dict
    low: float
    high: float
    spacing: list[float]

    @property
    def volume(self) -> torch.Tensor:
        """The (1, H, W, D) scan on the model grid in [0, 1], as a plain tensor."""
        return self.data["image"].as_tensor().float()

    @property
    def original_affine(self) -> np.ndarray:
        return np.asarray(self.data["image"].meta["original_affine"], np.float64)


def prepare(path, cfg: Config, resample_to: Callable | None = None, context: int = 0) -> Prepared:
    """Load a scan through the model's chain (no final crop); scale [low, high] to [0, 1].

    ``resample_to(spacing)`` (super-resolution) replaces the model's resampling: it gets the
    scan's RAS spacing and returns the spacing to resample to first.
    """
    validate_input(path)
    drop = (ScaleIntensityRangePercentilesd, ResizeWithPadOrCropd) + ((Spacingd,) if resample_to else ())
    chain = [t for t in volume_transforms(cfg.data, reader=reader_for(path)).transforms
             if not isinstance(t, drop)]
    # NaN must be caught before resampling, which could step over it
    split = next((i for i, t in enumerate(chain) if isinstance(t, Spacingd)), len(chain))
    try:
        data = Chain(chain[:split])({"image": str(path)})
    except InputError:
        raise
    except Exception as err:  # MONAI wraps reader errors in RuntimeError
        raise InputError(path, f"could not be read ({type(err).__name__})") from None
    if data["image"].ndim != 4:
        raise InputError(path, f"has {data['image'].ndim - 1} spatial dimensions after loading; "
                               "expected a 3D scan")
    check_voxels(path, data["image"])
    spacing = [float(s) for s in data["image"].pixdim]
    data = Chain(chain[split:])(data)
    if resample_to is not None:
        pixdim = resample_to(spacing)
        if not np.allclose(pixdim, spacing, rtol=1e-3):
            data = Chain([CheckResampledSized("image", pixdim),
                          Spacingd(keys="image", pixdim=pixdim, mode="bilinear")])(data)
    _check_context(path, data["image"], cfg, context)
    low, high = (float(v) for v in np.percentile(data["image"].numpy(), cfg.data.intensity_percentiles))
    if high <= low:
        high = float(data["image"].max())
    data["image"] = ScaleIntensityRange(low, high, 0.0, 1.0, clip=True)(data["image"])
    return Prepared(Chain(chain), data, low, high, spacing)


def _check_context(path, image: torch.Tensor, cfg: Config, context: int) -> None:
    if cfg.data.spatial_dims != 2:
        return
    slices = image.shape[1 + cfg.data.slice_axis]
    if slices < 2 * context + 1:
        raise InputError(path, f"has {slices} slice(s) along axis {cfg.data.slice_axis}; the 2D "
                               f"model needs at least {2 * context + 1} (its context of {context} "
                               "neighbour slice(s) on each side)")


def unscale(array, prep: Prepared, offset: bool = True) -> np.ndarray:
    """[0, 1] model units back to the scan's units (``offset=False`` for a spread)."""
    out = np.asarray(array, np.float32) * np.float32(prep.high - prep.low)
    return out + np.float32(prep.low) if offset else out


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


def _sample(model, x, t_start: int, settings, schedule: NoiseSchedule, generator, eta: float,
            clip: bool = True):
    steps = timestep_schedule(t_start, min(settings.steps, t_start), schedule.num_train_timesteps)
    options = {"eta": eta} if settings.sampler == "ddim" else {}
    return get_sampler(settings.sampler)(model, x, steps, schedule, generator=generator,
                                         clip=clip, **options)


def _to_unit(x: torch.Tensor, samples: int) -> torch.Tensor:
    """(B * samples, 1, *S) in [-1, 1] -> (B, samples, *S) in [0, 1] on the CPU."""
    return ((x.float().cpu() + 1.0) / 2.0).reshape(-1, samples, *x.shape[2:])


def conditional_draws(net, schedule: NoiseSchedule, settings, label: int, context: int,
                      unit: float, generator: torch.Generator, device: torch.device) -> Draw:
    """``draw(condition)``: (B, C, *S) in [0, 1] -> (B, samples, *S), each sampled from pure
    noise given the condition channels and the class label (SR3). The model generates the
    residual from the condition's middle channel in units of ``unit`` (SRDiff), so the result
    is that channel plus ``unit`` times the sample (no clipping: residuals exceed [-1, 1])."""
    t_start = schedule.num_train_timesteps - 1

    def draw(condition: torch.Tensor) -> torch.Tensor:
        n = settings.samples
        cond = (condition * 2.0 - 1.0).repeat_interleave(n, dim=0).to(device)
        labels = torch.full((cond.shape[0],), label, dtype=torch.long, device=device)
        noise = torch.randn((cond.shape[0], 1, *cond.shape[2:]), generator=generator).to(device)
        residual = _sample(model_fn(net, cond, labels), noise, t_start, settings, schedule,
                           generator, settings.eta, clip=False)
        middle = condition[:, context:context + 1].repeat_interleave(n, dim=0)
        return (middle + unit * residual.float().cpu()).reshape(-1, n, *condition.shape[2:])

    return draw


def sdedit_draws(net, schedule: NoiseSchedule, settings, t_start: int,
                 generator: torch.Generator, device: torch.device) -> Draw:
    """``draw(image)``: (B, 1, *S) noisy image in [0, 1] -> (B, samples, *S), reversed from the
    step whose noise matches its own (SDEdit). Several samples only differ with a stochastic
    sampler, so DDIM then runs with eta = 1 unless a positive eta was asked for."""
    eta = settings.eta if settings.samples == 1 or settings.eta > 0 else 1.0

    def draw(image: torch.Tensor) -> torch.Tensor:
        n = settings.samples
        x = sdedit_start(image, schedule, t_start).repeat_interleave(n, dim=0).to(device)
        x0 = _sample(model_fn(net), x, t_start, settings, schedule, generator, eta)
        return _to_unit(x0, n)

    return draw


def _padded(draw: Draw, multiple: int) -> Draw:
    """Pad the spatial dims to a multiple of ``multiple`` with background (0), crop back."""

    def call(condition: torch.Tensor) -> torch.Tensor:
        size = condition.shape[2:]
        pad = []
        for s in reversed(size):
            pad += [0, -s % multiple]
        out = draw(F.pad(condition, pad) if any(pad) else condition)
        return out[(..., *(slice(0, s) for s in size))]

    return call


def _windowed(draw: Draw, roi, batch_size: int) -> Draw:
    """Tile inputs larger than ``roi`` (the trained region) with Gaussian-blended windows."""

    def call(condition: torch.Tensor) -> torch.Tensor:
        if all(s <= r for s, r in zip(condition.shape[2:], roi, strict=True)):
            return draw(condition)
        return sliding_window_inference(condition, list(roi), batch_size, draw, overlap=0.25,
                                        mode="gaussian")

    return call


def trained_region(cfg: Config) -> list[int]:
    """The spatial size the network saw in training: its patch, else the model grid.

    Beyond it the network meets group-norm statistics it was not trained on, and the global
    attention of its middle block grows with the square of the size.
    """
    return list(cfg.data.patch or cfg.data.size)


def apply_model(draw: Draw, volume: torch.Tensor, foreground: np.ndarray, cfg: Config, *,
                samples: int, context: int, batch_size: int, progress=None) -> torch.Tensor:
    """(samples, H, W, D) results for a (1, H, W, D) volume in [0, 1] on the model grid."""
    per_call = max(1, batch_size // samples)
    draw = _windowed(_padded(draw, spatial_multiple(cfg.model.channels)), trained_region(cfg),
                     per_call)
    if cfg.data.spatial_dims == 3:
        out = draw(volume[None])[0]
        if progress:
            progress(1, 1)
        return out
    axis = cfg.data.slice_axis
    slices = volume[0].movedim(axis, 0)  # (S, h, w)
    count = slices.shape[0]
    out = slices[:, None].repeat(1, samples, 1, 1).float()
    # slices without foreground are not run: they keep the input
    todo = np.flatnonzero(np.moveaxis(foreground, axis, 0).reshape(count, -1).any(axis=1))
    for start in range(0, len(todo), per_call):
        index = torch.as_tensor(todo[start:start + per_call])
        rows = (index[:, None] + torch.arange(-context, context + 1)).clamp(0, count - 1)
        out[index] = draw(slices[rows])  # each slice with its neighbours as channels
        if progress:
            progress(min(start + per_call, len(todo)), len(todo))
    return out.movedim(0, axis + 1)

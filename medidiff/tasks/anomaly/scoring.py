"""Reconstruction-based anomaly scoring with a normative diffusion model.

The AnoDDPM family (Wyatt et al. 2022; Behrendt et al. 2023; Bercea et al. 2024): noise a scan to
a partial level t, run the reverse process back with a few-step sampler, and take the residual
against the input. Averaging the residuals of several noise draws and levels (as ensembles over
draws in Behrendt's follow-up and over levels in THOR and ANDi) removes most of the sampling
noise; a 3D median filter and the foreground mask finish the map (pDDPM's post-processing).

Settings are the model's ``anomaly`` config section (``AnomalyConfig``) plus a method name.
"""

from __future__ import annotations

import itertools

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


def nfe_per_slice(settings: AnomalyConfig, method: str, tiles: int = 1) -> int:
    """Network evaluations per slice (or window); a patch-wise (pDDPM) model's ``tiles``
    multiply them."""
    if method != "diffusion":
        return 0
    return (len(settings.noise_levels) * settings.draws * tiles
            * nfe(settings.sampler, settings.steps))


def describe(settings: AnomalyConfig, method: str, tiles: int = 1) -> dict:
    return {"method": method, **settings.model_dump(mode="json"),
            "nfe_per_slice": nfe_per_slice(settings, method, tiles)}


def calibration_key(settings: AnomalyConfig, method: str) -> dict:
    keys = CALIBRATION_KEYS if method == "diffusion" else BASELINE_CALIBRATION_KEYS
    return {k: v for k, v in describe(settings, method).items() if k in keys}


def patch_tiles(size, patch: int | None) -> list[tuple[slice, ...]]:
    """The boxes pDDPM-style scoring noises one at a time: tiles of ``patch`` voxels per side
    covering a grid of ``size`` (the last tile along an axis moved back to end at the edge, so
    it overlaps its neighbour); one box over the whole grid when ``patch`` is None."""
    if patch is None:
        return [tuple(slice(0, int(n)) for n in size)]
    starts = []
    for n in size:
        n, side = int(n), min(int(patch), int(n))
        axis = list(range(0, n - side + 1, side))
        if axis[-1] + side < n:
            axis.append(n - side)
        starts.append([slice(a, a + side) for a in axis])
    return list(itertools.product(*starts))


def tiles_per_slice(size, patch: int | None, multiple: int = 1) -> int:
    """How many tiles a slice (or window) of ``size``, padded to ``multiple``, is scored in."""
    return len(patch_tiles([-(-int(n) // multiple) * multiple for n in size], patch))


def _context_model(net, clean: torch.Tensor, box: torch.Tensor):
    """The network seeing the sampler's state inside ``box`` only and the clean image
    elsewhere, as pDDPM trains it: at every step the context is the scan itself."""
    model = model_fn(net)

    def call(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return model(torch.where(box, x_t, clean), t)

    return call


@torch.no_grad()
def reconstruct(net, images: torch.Tensor, ids: list[tuple[int, ...]], schedule: NoiseSchedule,
                settings: AnomalyConfig, device: torch.device) -> torch.Tensor:
    """(B, 2, *S): mean |x - x_hat| over draws, levels and channels (the contrasts of a model
    of several), and the mean reconstruction of channel 0.

    ``images`` is a batch (B, C, *S) in [0, 1]; ``ids`` names each row (its slice, its window),
    and every (row, draw, level) draws its own seeded noise from the model's noise
    (``diffusion.noise``). The draws are folded into the batch. A model trained on noised
    patches (``diffusion.noise_patch``, pDDPM) is scored tile by tile: each tile is noised
    with the rest of the image as clean context and only its reconstruction is kept.
    """
    sampler = get_sampler(settings.sampler)
    options = {"eta": settings.eta} if settings.sampler == "ddim" else {}
    draws = settings.draws
    tiles = patch_tiles(images.shape[2:], schedule.noise_patch)
    x = images.to(device) * 2.0 - 1.0
    copies = draws * len(tiles)
    repeated = x.repeat_interleave(copies, dim=0)
    patched = schedule.noise_patch is not None
    model, weight = model_fn(net), 1.0
    if patched:  # row r of a scan's copies noises tile r % len(tiles)
        box = torch.zeros((copies, 1, *x.shape[2:]), dtype=torch.bool, device=device)
        for index, tile in enumerate(tiles):
            box[(slice(index, None, len(tiles)), slice(None), *tile)] = True
        box = box.repeat(x.shape[0], 1, *[1] * (x.ndim - 2))
        model = _context_model(net, repeated, box)
        weight = box.float().reshape(x.shape[0], draws, len(tiles), 1, *x.shape[2:]).sum(dim=2)
    residual = torch.zeros_like(x[:, :1])
    recon = torch.zeros_like(x[:, :1])
    for index, level in enumerate(settings.noise_levels):
        seeds = [sample_seed(settings.seed, index, draw, *([tile] if patched else []), *row)
                 for row in ids for draw in range(draws) for tile in range(len(tiles))]
        generator = StackedGenerator(seeds)
        noise = schedule.draw_noise(repeated.shape, generator, device=device)
        t = torch.full((repeated.shape[0],), level, dtype=torch.long, device=device)
        x_t = schedule.add_noise(repeated, noise, t)
        if patched:
            x_t = torch.where(box, x_t, repeated)
        steps = timestep_schedule(level, min(settings.steps, level), schedule.num_train_timesteps)
        x_hat = sampler(model, x_t, steps, schedule, generator=generator, clip=True, **options)
        if patched:  # each tile's reconstruction, averaged where the last tiles overlap
            x_hat = torch.where(box, x_hat, 0.0)
        x_hat = x_hat.reshape(x.shape[0], draws, len(tiles), *x.shape[1:]).sum(dim=2)
        drawn = (x_hat / weight + 1.0) / 2.0
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

"""The public Python API for denoising and super-resolution; the CLI is a thin layer over it.

    from medidiff.enhance import Denoiser, SuperResolver
    result = Denoiser.load("runs/denoise-model").denoise_file("noisy.nii.gz")
    result.image, result.std, result.affine, result.info     # in the input's space
    result = SuperResolver.load("runs/sr-model", scale=2).super_resolve_file("thick.nii.gz")
    result.image, result.affine                               # on the finer grid

A ``denoise`` model is conditional (SR3 style, ``medidiff.tasks.denoise``); any unconditional
(normative) model, such as an ``anomaly`` model, denoises zero-shot by SDEdit. Intensities come
back in the scan's own units: the percentile scaling of the preprocessing is undone.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Orientation

from medidiff.data import degrade
from medidiff.data.io import check_resampled_size, save_nifti
from medidiff.data.transforms import foreground_mask, invert_to_input
from medidiff.diffusion.samplers import get_sampler, nfe
from medidiff.diffusion.schedule import NoiseSchedule
from medidiff.enhance_grid import (
    Prepared,
    apply_model,
    conditional_draws,
    prepare,
    resample,
    sdedit_draws,
    unscale,
)
from medidiff.errors import InputError, ModelFolderError
from medidiff.models.folder import LoadedModel, load_model
from medidiff.tasks import get_task
from medidiff.tasks.denoise import estimate_sigma, noise_label, residual_unit, sdedit_timestep
from medidiff.tasks.superres import fine_affine, scale_label, volume_axes
from medidiff.tasks.superres import residual_unit as sr_residual_unit
from medidiff.train import select_device


@dataclass(frozen=True)
class EnhanceSettings:
    """How a scan is sampled; defaults come from the model's ``denoise``/``superres`` section."""

    sampler: str
    steps: int
    eta: float
    samples: int
    batch_size: int
    seed: int

    @classmethod
    def from_section(cls, section, **overrides) -> EnhanceSettings:
        base = cls(sampler=section.sampler, steps=section.steps, eta=section.eta,
                   samples=section.samples, batch_size=section.batch_size, seed=section.seed)
        settings = replace(base, **{k: v for k, v in overrides.items() if v is not None})
        get_sampler(settings.sampler)
        return settings

    def nfe_per_slice(self, t_start: int) -> int:
        """Network evaluations per slice (or per window position in 3D), samples included."""
        return self.samples * nfe(self.sampler, min(self.steps, t_start))

    def describe(self) -> dict:
        return {"sampler": self.sampler, "steps": self.steps, "eta": self.eta,
                "samples": self.samples, "batch_size": self.batch_size, "seed": self.seed}


@dataclass
class EnhanceResult:
    """An enhanced scan: ``image`` (and ``std`` over samples) with ``affine``, in scan units.

    ``before`` and ``after`` are the input and the result on the model grid in [0, 1], for
    pictures; ``info`` says what was estimated and done (noise level, scale, NFE, ...).
    """

    image: np.ndarray
    std: np.ndarray | None
    affine: np.ndarray
    before: np.ndarray
    after: np.ndarray
    info: dict = field(default_factory=dict)


class _Enhancer:
    """What both enhancers share: a loaded model, settings, the noise schedule, a device."""

    task = ""

    def __init__(self, model: LoadedModel, settings: EnhanceSettings, device: torch.device):
        self.model, self.settings, self.device = model, settings, device
        self.cfg = model.config
        self.schedule = NoiseSchedule(**self.cfg.diffusion.model_dump())
        self.context = get_task(self.cfg.task).slice_context(self.cfg)

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.settings.seed)

    def _from_array(self, method, array: np.ndarray, affine: np.ndarray, **kwargs):
        """Run ``method`` (a ``*_file`` method) on an array with its affine, via a temporary NIfTI."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "array.nii.gz"
            nib.save(nib.Nifti1Image(np.asarray(array, np.float32), np.asarray(affine, float)), path)
            return method(path, **kwargs)


class Denoiser(_Enhancer):
    """Denoises scans with a conditional ``denoise`` model, or zero-shot with a normative one."""

    task = "denoise"

    def __init__(self, model: LoadedModel, settings: EnhanceSettings, device: torch.device,
                 sigma: float | None = None):
        super().__init__(model, settings, device)
        self.sigma = sigma

    @classmethod
    def load(cls, model_dir: str | Path, device: str = "auto", sigma: float | None = None,
             **overrides) -> Denoiser:
        """Load a model folder. ``sigma``: the noise level as a fraction of the scan's
        99th-percentile head intensity (default: estimated per scan); ``overrides`` are
        EnhanceSettings fields (steps, samples, ...)."""
        dev = select_device(device)
        model = load_model(model_dir, device=str(dev))
        if model.task != "denoise" and get_task(model.task).condition_channels(model.config):
            raise ModelFolderError(model_dir, f"holds a '{model.task}' model; denoising needs a "
                                              "'denoise' model or an unconditional one (such "
                                              "as an 'anomaly' model) for zero-shot SDEdit")
        if sigma is not None and not 0 <= sigma < 1:
            raise InputError(None, f"sigma must be a fraction in [0, 1), got {sigma}")
        settings = EnhanceSettings.from_section(model.config.denoise, **overrides)
        return cls(model, settings, dev, sigma)

    @property
    def zero_shot(self) -> bool:
        return self.model.task != "denoise"

    def denoise_file(self, path: str | Path, progress=None) -> EnhanceResult:
        """Denoise one scan file (NIfTI or DICOM series); the result is in its space."""
        path = Path(path)
        prep = prepare(path, self.cfg, context=self.context)
        mean, std, info = self.denoise_grid(prep.volume, progress)
        image = unscale(self._invert(prep, mean), prep)
        spread = None if std is None else unscale(self._invert(prep, std), prep, offset=False)
        return EnhanceResult(image, spread, prep.original_affine, prep.volume[0].numpy(),
                             mean.numpy(), info)

    def denoise_array(self, array: np.ndarray, affine: np.ndarray, progress=None) -> EnhanceResult:
        """Denoise a 3D array with its voxel-to-world affine."""
        return self._from_array(self.denoise_file, array, affine, progress=progress)

    def denoise_grid(self, volume: torch.Tensor, progress=None):
        """Denoise a (1, H, W, D) volume in [0, 1] on the model grid: (mean, std or None, info)."""
        image = volume[0].numpy()
        foreground = foreground_mask(image, self.cfg.data.foreground_threshold)
        reference = float(degrade.reference_intensity(volume[None], torch.from_numpy(foreground)[None, None])[0])
        if self.sigma is None:
            sigma = estimate_sigma(image, foreground, self.cfg.data.slice_axis)
        else:
            sigma = self.sigma * reference
        info = {"sigma": sigma, "sigma_fraction": sigma / max(reference, 1e-8),
                "sigma_estimated": self.sigma is None, "zero_shot": self.zero_shot}
        generator = self._generator()
        if self.zero_shot:
            t_start = min(sdedit_timestep(self.schedule, sigma), self.cfg.trained_timesteps() - 1)
            draw = sdedit_draws(self.model.net, self.schedule, self.settings, t_start,
                                generator, self.device)
            info["t_start"] = t_start
        else:
            t_start = self.schedule.num_train_timesteps - 1
            label = int(noise_label(sigma, self.cfg)[0])
            unit = residual_unit(sigma)
            draw = conditional_draws(self.model.net, self.schedule, self.settings, label,
                                     self.context, unit, generator, self.device)
            info["class_label"] = label
        info["nfe_per_slice"] = self.settings.nfe_per_slice(t_start)
        draws = apply_model(draw, volume, foreground, self.cfg, samples=self.settings.samples,
                            context=self.context, batch_size=self.settings.batch_size,
                            progress=progress)
        return _mean_std(draws) + (info,)

    def _invert(self, prep: Prepared, grid: torch.Tensor) -> np.ndarray:
        prep.data["result"] = MetaTensor(grid[None], meta=prep.data["image"].meta,
                                         applied_operations=prep.data["image"].applied_operations)
        return invert_to_input(prep.pipeline, prep.data, "result")[0]


class SuperResolver(_Enhancer):
    """Super-resolves scans with a conditional ``superres`` model (SR3)."""

    task = "superres"

    def __init__(self, model: LoadedModel, settings: EnhanceSettings, device: torch.device,
                 scale: int | None = None):
        super().__init__(model, settings, device)
        if scale is not None and scale < 2:
            raise InputError(None, f"scale must be an integer of at least 2, got {scale}")
        self.scale = scale

    @classmethod
    def load(cls, model_dir: str | Path, device: str = "auto", scale: int | None = None,
             **overrides) -> SuperResolver:
        """Load a ``superres`` model folder. ``scale``: the factor to refine the super-resolved
        axes by (default: from the scan's spacing and the model's target spacing)."""
        dev = select_device(device)
        model = load_model(model_dir, task="superres", device=str(dev))
        settings = EnhanceSettings.from_section(model.config.superres, **overrides)
        return cls(model, settings, dev, scale)

    def plan(self, spacing, path: Path | str | None = None) -> tuple[list[int], list[float]]:
        """Per-axis factors and the spacing (mm) to resample the coarse scan to first (RAS)."""
        spacing = [float(s) for s in spacing]
        target = self.cfg.data.spacing
        axes = volume_axes(self.cfg)
        if target is None and self.scale is None:
            raise InputError(path, "the model has no target spacing (data.spacing); pass a scale")
        if target is not None and all(spacing[a] <= 1.01 * target[a] for a in axes):
            shown = ", ".join(f"{spacing[a]:g}" for a in axes)
            raise InputError(path, f"spacing along the super-resolved axes ({shown} mm) is already "
                                   f"at the model's target {target[axes[0]]:g} mm: nothing to "
                                   "super-resolve")
        if self.scale is not None:
            factors = [self.scale if a in axes else 1 for a in range(3)]
            pixdim = [spacing[a] if a in axes or target is None else target[a] for a in range(3)]
        else:
            factors = [max(1, round(spacing[a] / target[a])) if a in axes else 1 for a in range(3)]
            if max(factors) < 2:
                raise InputError(path, f"spacing {spacing} mm is less than 1.5 times the model's "
                                       f"target {target} mm: nothing to super-resolve")
            pixdim = [target[a] * factors[a] for a in range(3)]
        if self.cfg.data.spatial_dims == 2 and self.cfg.data.slice_axis not in axes:
            pixdim[self.cfg.data.slice_axis] = spacing[self.cfg.data.slice_axis]
        return factors, pixdim

    def super_resolve_file(self, path: str | Path, progress=None) -> EnhanceResult:
        """Super-resolve one scan file; the result is on the finer grid, in its orientation."""
        path = Path(path)
        prep = prepare(path, self.cfg, resample_to=lambda spacing: self.plan(spacing, path)[1],
                       context=self.context)
        factors, pixdim = self.plan(prep.spacing, path)
        # the finer grid must stay within the voxel limit (a huge scale or spacing would not)
        check_resampled_size(path, prep.volume.shape[1:], pixdim,
                             [p / f for p, f in zip(pixdim, factors, strict=True)])
        mean, std, info = self.super_resolve_grid(prep.volume, factors, progress)
        affine = fine_affine(np.asarray(prep.data["image"].affine), factors)
        image, out_affine = _reorient(unscale(mean.numpy(), prep), affine, prep.original_affine)
        spread = None
        if std is not None:
            spread = _reorient(unscale(std.numpy(), prep, offset=False), affine,
                               prep.original_affine)[0]
        before = resample(prep.volume, factors, self.cfg, mode="nearest")[0].numpy()
        info["output_spacing"] = [round(float(s), 6) for s in np.linalg.norm(out_affine[:3, :3], axis=0)]
        return EnhanceResult(image, spread, out_affine, before, mean.numpy(), info)

    def super_resolve_array(self, array: np.ndarray, affine: np.ndarray,
                            progress=None) -> EnhanceResult:
        """Super-resolve a 3D array with its voxel-to-world affine."""
        return self._from_array(self.super_resolve_file, array, affine, progress=progress)

    def super_resolve_grid(self, volume: torch.Tensor, factors, progress=None):
        """Super-resolve a coarse (1, h, w, d) volume in [0, 1] by per-axis ``factors``."""
        condition = resample(volume, factors, self.cfg)
        foreground = foreground_mask(condition[0].numpy(), self.cfg.data.foreground_threshold)
        label = scale_label(max(factors), self.cfg)
        draw = conditional_draws(self.model.net, self.schedule, self.settings, label,
                                 self.context, sr_residual_unit(max(factors)), self._generator(),
                                 self.device)
        draws = apply_model(draw, condition, foreground, self.cfg, samples=self.settings.samples,
                            context=self.context, batch_size=self.settings.batch_size,
                            progress=progress)
        info = {"factors": list(factors), "class_label": label,
                "trained_scale": self.cfg.superres.scales[label],
                "nfe_per_slice": self.settings.nfe_per_slice(self.schedule.num_train_timesteps - 1)}
        return _mean_std(draws) + (info,)


def _mean_std(draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mean and (for several samples) standard deviation over the samples of (N, H, W, D)."""
    mean = draws.mean(dim=0)
    std = draws.std(dim=0, unbiased=True) if draws.shape[0] > 1 else None
    return mean, std


def _reorient(array: np.ndarray, affine: np.ndarray, original_affine: np.ndarray):
    """A RAS array with its affine, turned back to the axis order of the input scan."""
    codes = "".join(nib.orientations.aff2axcodes(original_affine))
    image = Orientation(axcodes=codes)(MetaTensor(torch.from_numpy(np.asarray(array))[None],
                                                  affine=torch.as_tensor(affine)))
    return image[0].numpy().astype(np.float32), np.asarray(image.affine, np.float64)


def write_result(result: EnhanceResult, out_dir: Path, case: str, suffix: str) -> list[Path]:
    """Write ``case_<suffix>.nii.gz`` (and ``case_<suffix>_std.nii.gz``) atomically."""
    written = [save_nifti(result.image.astype(np.float32), result.affine,
                          out_dir / f"{case}_{suffix}.nii.gz")]
    if result.std is not None:
        written.append(save_nifti(result.std.astype(np.float32), result.affine,
                                  out_dir / f"{case}_{suffix}_std.nii.gz"))
    return written


def enhance_figure(result: EnhanceResult, axis: int = 2, count: int = 3) -> np.ndarray:
    """A before/after montage: ``count`` slices spread over the head, input left, result right."""
    from medidiff.report import display, montage

    extent = np.flatnonzero(np.moveaxis(result.before > 0.05, axis, 0).reshape(
        result.before.shape[axis], -1).any(axis=1))
    low, high = (int(extent[0]), int(extent[-1])) if extent.size else (0, result.before.shape[axis] - 1)
    picks = np.linspace(low, high, count + 2)[1:-1].round().astype(int)
    rows = [[display(np.take(result.before, i, axis=axis)), display(np.take(result.after, i, axis=axis))]
            for i in picks]
    return montage(rows)

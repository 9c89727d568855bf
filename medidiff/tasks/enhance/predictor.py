"""``Denoiser`` and ``SuperResolver``: enhanced scans in the scan's own units and space.

    result = Denoiser.load("runs/denoise-model").predict_file("noisy.nii.gz")
    result.image, result.std, result.affine, result.info     # in the input's space
    result = SuperResolver.load("runs/sr-model", scale=2).predict_file("thick.nii.gz")
    result.image, result.affine                               # on the finer grid

A ``denoise`` model is conditional (SR3 style, ``medidiff.tasks.enhance.denoise``); any
unconditional (normative) model, such as an ``anomaly`` model, denoises zero-shot by SDEdit.
Preprocessing is the model's MONAI chain without the final crop (an enhanced scan keeps its
whole field of view) and with the percentile scaling recorded, so that results go back to the
scan's units.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Orientation,
    ResizeWithPadOrCropd,
    ScaleIntensityRange,
    ScaleIntensityRangePercentilesd,
    Spacingd,
)

from medidiff.data import degrade
from medidiff.data.transforms import Chain, CheckResampledSized, foreground_mask
from medidiff.diffusion.samplers import nfe
from medidiff.diffusion.schedule import NoiseSchedule
from medidiff.errors import ConfigError, InputError, ModelFolderError
from medidiff.inference.grid import GridRunner
from medidiff.inference.predictor import Predictor, Prepared
from medidiff.io.validate import check_resampled_size
from medidiff.io.write import save_nifti
from medidiff.models.folder import LoadedModel
from medidiff.tasks.enhance.denoise import (
    DenoiseTask,
    estimate_sigma,
    noise_label,
    residual_unit,
    sdedit_timestep,
)
from medidiff.tasks.enhance.figures import enhance_figure
from medidiff.tasks.enhance.sampling import (
    conditional_draws,
    keep_input,
    percentile_range,
    resample,
    sdedit_draws,
    unscale,
)
from medidiff.tasks.enhance.superres import (
    SuperResTask,
    fine_affine,
    scale_label,
    volume_axes,
)
from medidiff.tasks.enhance.superres import residual_unit as sr_residual_unit
from medidiff.tasks.registry import get_task
from medidiff.tasks.registry import load_model as load_any_model


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


class _Enhancer(Predictor):
    """What both enhancers share: the chain without the crop, sampling, outputs."""

    suffix = ""  # CASE_<suffix>.nii.gz
    verb = "enhanced"
    figure_key = "montage"

    def __init__(self, model: LoadedModel, settings, device: torch.device, *,
                 repair_nonfinite: bool = False, backend: str | None = None):
        super().__init__(model, settings, device, repair_nonfinite=repair_nonfinite,
                         backend=backend)
        self.schedule = NoiseSchedule(**self.cfg.diffusion.model_dump())
        self.context = get_task(self.cfg.task).slice_context(self.cfg)
        self.started = 0.0

    def describe(self) -> dict:
        return {**super().describe(), "settings_section": self.section}

    def transforms(self, ndim: int, reader) -> list:
        drop = (ScaleIntensityRangePercentilesd, ResizeWithPadOrCropd)
        return [t for t in super().transforms(ndim, reader) if not isinstance(t, drop)]

    def check_context(self, path, image: torch.Tensor) -> None:
        if self.cfg.data.spatial_dims != 2:
            return
        slices = image.shape[1 + self.cfg.data.slice_axis]
        if slices < 2 * self.context + 1:
            raise InputError(path, f"has {slices} slice(s) along axis {self.cfg.data.slice_axis}; "
                                   f"the 2D model needs at least {2 * self.context + 1} (its "
                                   f"context of {self.context} neighbour slice(s) on each side)")

    def scaled(self, prep: Prepared) -> tuple[torch.Tensor, float, float]:
        """The prepared scan scaled from its percentile range to [0, 1] (and that range)."""
        self.check_context(prep.source, prep.image)
        low, high = percentile_range(prep.image.as_tensor(), self.cfg.data.intensity_percentiles)
        prep.data["image"] = ScaleIntensityRange(low, high, 0.0, 1.0, clip=True)(prep.image)
        return prep.volume, low, high

    def sample(self, draw, volume: torch.Tensor, foreground: np.ndarray, progress=None,
               finish=None):
        """(mean, std or None) over the samples of ``draw`` run on a (1, *spatial) volume;
        ``finish`` maps the (samples, *spatial) draws first (data consistency)."""
        samples = self.settings.samples
        runner = GridRunner.for_model(self.cfg, self.settings.batch_size // samples, self.context)
        draws = runner.run(draw, volume, foreground, keep_input(samples), progress)
        if finish is not None:
            draws = finish(draws)
        mean = draws.mean(dim=0)
        std = draws.std(dim=0, unbiased=True) if draws.shape[0] > 1 else None
        return mean, std

    def nfe_per_slice(self, t_start: int) -> int:
        """Network evaluations per slice (or per window in 3D), samples included."""
        return self.settings.samples * nfe(self.settings.sampler, min(self.settings.steps,
                                                                      t_start))

    def prepare_file(self, path) -> Prepared:
        self.started = time.perf_counter()  # the row's seconds count preprocessing too
        return super().prepare_file(path)

    def output_names(self, case: str) -> list[str]:
        std = [f"{case}_{self.suffix}_std.nii.gz"] if self.settings.samples > 1 else []
        return [f"{case}_{self.suffix}.nii.gz", *std, f"{case}.png"]

    def write(self, result: EnhanceResult, out_dir: Path, case: str) -> list[Path]:
        """``case_<suffix>.nii.gz`` (and ``case_<suffix>_std.nii.gz``), atomically."""
        written = [save_nifti(result.image.astype(np.float32), result.affine,
                              out_dir / f"{case}_{self.suffix}.nii.gz")]
        if result.std is not None:
            written.append(save_nifti(result.std.astype(np.float32), result.affine,
                                      out_dir / f"{case}_{self.suffix}_std.nii.gz"))
        return written

    def figure(self, result: EnhanceResult, case: str) -> np.ndarray:
        # the super-resolved grid is finer than the model's spacing: positions as indices only
        spacing = self.cfg.data.spacing if self.stage == "denoise" else None
        return enhance_figure(result, self.cfg.data.slice_axis, case=case, task=self.stage,
                              spacing=spacing)

    def row(self, result: EnhanceResult, case: str) -> dict:
        return {"case": case, "seconds": round(time.perf_counter() - self.started, 2),
                **{k: _cell(v) for k, v in result.info.items()}}


class Denoiser(_Enhancer):
    """Denoises scans with a conditional ``denoise`` model, or zero-shot with a normative one.

    ``sigma``: the noise level as a fraction of the scan's 99th-percentile head intensity
    (default: estimated per scan).
    """

    task = DenoiseTask()
    section = "denoise"
    stage = "denoise"
    table = "denoised.csv"
    suffix = "denoised"

    def __init__(self, model: LoadedModel, settings, device: torch.device, *,
                 sigma: float | None = None, repair_nonfinite: bool = False, backend: str | None = None):
        super().__init__(model, settings, device, repair_nonfinite=repair_nonfinite,
                         backend=backend)
        if sigma is not None and not 0 <= sigma < 1:
            raise InputError(None, f"sigma must be a fraction in [0, 1), got {sigma}")
        self.sigma = sigma

    @classmethod
    def open_model(cls, folder, device: torch.device) -> LoadedModel:
        model = load_any_model(folder, device=str(device))
        if model.task != "denoise" and get_task(model.task).condition_channels(model.config):
            raise ModelFolderError(folder, f"holds a '{model.task}' model; denoising needs a "
                                           "'denoise' model or an unconditional one (such as "
                                           "an 'anomaly' model) for zero-shot SDEdit")
        diffusion = model.config.diffusion
        if model.task != "denoise" and (diffusion.noise != "gaussian"
                                        or diffusion.noise_patch is not None):
            raise ModelFolderError(folder, "was trained with simplex noise or noised patches; "
                                           "zero-shot SDEdit takes the scan's own noise for the "
                                           "model's, so it needs Gaussian noise on the whole image")
        return model

    @property
    def zero_shot(self) -> bool:
        return self.model.task != "denoise"

    def describe(self) -> dict:
        return {**super().describe(), "sigma": self.sigma, "zero_shot": self.zero_shot}

    def predict(self, prep: Prepared, progress=None) -> EnhanceResult:
        volume, low, high = self.scaled(prep)
        mean, std, info = self.denoise_grid(volume, progress)
        image = unscale(prep.to_input(mean)[0], low, high)
        spread = None if std is None else unscale(prep.to_input(std)[0], low, high, offset=False)
        return EnhanceResult(image, spread, prep.original_affine, volume[0].numpy(),
                             mean.numpy(), info)

    def denoise_grid(self, volume: torch.Tensor, progress=None):
        """Denoise a (1, H, W, D) volume in [0, 1] on the model grid: (mean, std or None, info)."""
        image = volume[0].numpy()
        foreground = foreground_mask(image, self.cfg.data.foreground_threshold)
        reference = float(degrade.reference_intensity(
            volume[None], torch.from_numpy(foreground)[None, None])[0])
        sigma = (estimate_sigma(image, foreground, self.cfg.data.slice_axis)
                 if self.sigma is None else self.sigma * reference)
        info = {"sigma": sigma, "sigma_fraction": sigma / max(reference, 1e-8),
                "sigma_estimated": self.sigma is None, "zero_shot": self.zero_shot}
        if self.zero_shot:
            t_start = min(sdedit_timestep(self.schedule, sigma), self.cfg.trained_timesteps() - 1)
            draw = sdedit_draws(self.net, self.schedule, self.settings, t_start, self.device)
            info["t_start"] = t_start
        else:
            t_start = self.schedule.num_train_timesteps - 1
            label = int(noise_label(sigma, self.cfg)[0])
            draw = conditional_draws(self.net, self.schedule, self.settings, label,
                                     self.context, residual_unit(sigma), self.device)
            info["class_label"] = label
        info["nfe_per_slice"] = self.nfe_per_slice(t_start)
        return self.sample(draw, volume, foreground, progress) + (info,)


class SuperResolver(_Enhancer):
    """Super-resolves scans with a conditional ``superres`` model (SR3).

    ``scale``: the factor to refine the super-resolved axes by (default: from the scan's
    spacing and the model's target spacing).
    """

    task = SuperResTask()
    section = "superres"
    stage = "super-resolve"
    table = "sr.csv"
    suffix = "sr"

    def __init__(self, model: LoadedModel, settings, device: torch.device, *,
                 scale: int | None = None, repair_nonfinite: bool = False, backend: str | None = None):
        super().__init__(model, settings, device, repair_nonfinite=repair_nonfinite,
                         backend=backend)
        if self.cfg.preprocess.registration != "none":
            raise ConfigError("preprocess.registration: super-resolution refines the scan's own "
                              "grid, so its model must not register (bias correction is fine)")
        if scale is not None and scale < 2:
            raise InputError(None, f"scale must be an integer of at least 2, got {scale}")
        self.scale = scale

    def describe(self) -> dict:
        return {**super().describe(), "scale": self.scale}

    def transforms(self, ndim: int, reader) -> list:
        """The chain without its resampling: the scan's own spacing decides the grid."""
        return [t for t in super().transforms(ndim, reader) if not isinstance(t, Spacingd)]

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

    def predict(self, prep: Prepared, progress=None) -> EnhanceResult:
        """The result is on the finer grid, in the input's orientation."""
        path = prep.source
        spacing = [float(s) for s in prep.image.pixdim]
        factors, pixdim = self.plan(spacing, path)
        if not np.allclose(pixdim, spacing, rtol=1e-3):
            prep.data = Chain([CheckResampledSized("image", pixdim),
                               Spacingd(keys="image", pixdim=pixdim, mode="bilinear")])(prep.data)
        measured = prep.image.as_tensor().float().clone()
        volume, low, high = self.scaled(prep)
        # the finer grid must stay within the voxel limit (a huge scale or spacing would not)
        check_resampled_size(path if path is not None else "array", volume.shape[1:], pixdim,
                             [p / f for p, f in zip(pixdim, factors, strict=True)])
        # consistency with the scan as measured: unclipped, in the same [0, 1] units
        measured = (measured - low) / max(high - low, 1e-12)
        mean, std, info = self.super_resolve_grid(volume, factors, progress, measured)
        affine = fine_affine(np.asarray(prep.image.affine), factors)
        image, out_affine = _reorient(unscale(mean.numpy(), low, high), affine,
                                      prep.original_affine)
        spread = None
        if std is not None:
            spread = _reorient(unscale(std.numpy(), low, high, offset=False), affine,
                               prep.original_affine)[0]
        before = resample(volume, factors, self.cfg, mode="nearest")[0].numpy()
        info["output_spacing"] = [round(float(s), 6)
                                  for s in np.linalg.norm(out_affine[:3, :3], axis=0)]
        return EnhanceResult(image, spread, out_affine, before, mean.numpy(), info)

    def super_resolve_grid(self, volume: torch.Tensor, factors, progress=None,
                           measured: torch.Tensor | None = None):
        """Super-resolve a coarse (1, h, w, d) volume in [0, 1] by per-axis ``factors``; with
        ``superres.consistency`` each sample is made consistent with ``measured`` (the same
        volume before clipping to [0, 1]; default ``volume``)."""
        condition = resample(volume, factors, self.cfg)
        foreground = foreground_mask(condition[0].numpy(), self.cfg.data.foreground_threshold)
        label = scale_label(max(factors), self.cfg)
        draw = conditional_draws(self.net, self.schedule, self.settings, label,
                                 self.context, sr_residual_unit(max(factors)), self.device)
        info = {"factors": list(factors), "class_label": label,
                "trained_scale": self.cfg.superres.scales[label],
                "consistency": self.settings.consistency,
                "nfe_per_slice": self.nfe_per_slice(self.schedule.num_train_timesteps - 1)}
        finish = None
        if self.settings.consistency:
            def finish(draws: torch.Tensor) -> torch.Tensor:
                coarse = volume if measured is None else measured
                coarse = coarse[None].expand(draws.shape[0], *coarse.shape).to(draws)
                return degrade.project_consistent(draws[:, None], coarse, factors)[:, 0]
        return self.sample(draw, condition, foreground, progress, finish) + (info,)


def _reorient(array: np.ndarray, affine: np.ndarray, original_affine: np.ndarray):
    """A RAS array with its affine, turned back to the axis order of the input scan."""
    codes = "".join(nib.orientations.aff2axcodes(original_affine))
    image = Orientation(axcodes=codes)(MetaTensor(torch.from_numpy(np.asarray(array))[None],
                                                  affine=torch.as_tensor(affine)))
    return image[0].numpy().astype(np.float32), np.asarray(image.affine, np.float64)


def _cell(value):
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    return value

"""The public Python API for diffusion segmentation; the CLI is a thin layer over it.

    from medidiff.segment import Segmenter
    segmenter = Segmenter.load("runs/segment-model", samples=5)
    result = segmenter.segment_file("scan.nii.gz")   # or segmenter.segment_array(volume, affine)
    result.labels, result.uncertainty, result.probabilities, result.affine
    metrics = evaluate_labels(result.labels, "scan_labels.nii.gz", num_classes=4)

An ensemble of samples (Wolleb et al. 2022) is drawn on the model grid, fused (mean of the
decoded soft maps, then argmax; or a majority vote) and mapped back to the input's space with
MONAI's ``Invertd``: labels by nearest neighbour (or the probabilities linearly, then argmax,
with ``resample="linear"``), the uncertainty and probabilities linearly.
"""

from __future__ import annotations

import contextlib
import gzip
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor

from medidiff import metrics
from medidiff.data.io import (
    atomic_write_bytes,
    check_voxels,
    load_image,
    reader_for,
    save_nifti,
    validate_input,
)
from medidiff.data.transforms import foreground_mask, invert_to_input, volume_transforms
from medidiff.diffusion.schedule import NoiseSchedule
from medidiff.errors import InputError
from medidiff.models.folder import LoadedModel, load_model
from medidiff.report import display, montage, overlay, to_uint8
from medidiff.tasks.segment import SegmentSettings, entropy, fuse, volume_samples
from medidiff.train import select_device


@dataclass
class SegmentGrid:
    """The ensemble on the model grid (for pictures and benchmarks)."""

    image: np.ndarray  # (H, W, D) first image channel in [0, 1]
    samples: torch.Tensor  # (N, K, H, W, D) class probabilities of each sample
    probabilities: torch.Tensor  # (K, H, W, D) fused
    labels: np.ndarray  # (H, W, D) uint8, argmax of the fused probabilities
    uncertainty: np.ndarray  # (H, W, D) normalised entropy of the fused probabilities, [0, 1]


@dataclass
class SegmentResult:
    """A segmented scan in the input's own space."""

    labels: np.ndarray  # uint8
    uncertainty: np.ndarray  # float32 in [0, 1]
    probabilities: np.ndarray  # (K, *input shape) float32, sums to 1 per voxel
    affine: np.ndarray
    grid: SegmentGrid


class Segmenter:
    """A loaded segmentation model plus sampling settings."""

    def __init__(self, model: LoadedModel, settings: SegmentSettings, device: torch.device):
        self.model, self.settings, self.device = model, settings, device
        self.cfg = model.config
        self.schedule = NoiseSchedule(**self.cfg.diffusion.model_dump())
        self.settings.validate(self.schedule.num_train_timesteps)

    @classmethod
    def load(cls, model_dir: str | Path, device: str = "auto", **overrides) -> Segmenter:
        """Load a model folder; ``overrides`` are SegmentSettings fields (samples, steps, ...)."""
        dev = select_device(device)
        model = load_model(model_dir, task="segment", device=str(dev))
        return cls(model, SegmentSettings.from_config(model.config.segment, **overrides), dev)

    @property
    def num_classes(self) -> int:
        return self.cfg.segment.num_classes

    def preprocess(self, path: Path):
        """The scan on the model grid (MONAI chain, invertible); checks its channel count."""
        validate_input(path)
        pipeline = volume_transforms(self.cfg.data, reader=reader_for(path))
        with _reading(path):
            data = pipeline({"image": str(path)})
        image, expected = data["image"], self.cfg.segment.image_channels
        if image.ndim != 4:
            raise InputError(path, f"has {image.ndim - 1} spatial dimensions; expected 3")
        if image.shape[0] != expected:
            raise InputError(path, f"has {image.shape[0]} channels; the model was trained on "
                                   f"images with {expected}")
        check_voxels(path, image)
        return pipeline, data

    def segment_grid(self, volume: torch.Tensor, progress=None) -> SegmentGrid:
        """Sample, fuse and measure the disagreement for a (C, H, W, D) volume on the grid."""
        image = np.asarray(volume[0], dtype=np.float32)
        foreground = foreground_mask(image, self.cfg.data.foreground_threshold)
        samples = volume_samples(self.model.net, volume, foreground, self.cfg, self.schedule,
                                 self.settings, self.device, progress)
        fused = fuse(samples, self.settings.fusion)
        labels = fused.argmax(dim=0).numpy().astype(np.uint8)
        return SegmentGrid(image, samples, fused, labels, entropy(fused).numpy())

    def segment_file(self, path: str | Path, progress=None) -> SegmentResult:
        """Segment one scan file (NIfTI, DICOM series or PNG); results in its own space."""
        path = Path(path)
        pipeline, data = self.preprocess(path)
        grid = self.segment_grid(data["image"].as_tensor(), progress)
        labels, probs, affine = to_input_space(pipeline, data, grid.probabilities,
                                               self.settings.resample)
        uncertainty, _ = invert_to_input(pipeline, _on_grid(data, grid.uncertainty), "grid")
        return SegmentResult(labels, np.clip(uncertainty, 0.0, 1.0), probs, affine, grid)

    def segment_array(self, array: np.ndarray, affine: np.ndarray, progress=None) -> SegmentResult:
        """Segment a 3D array with its voxel-to-world affine (written to a temporary NIfTI)."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "array.nii.gz"
            nib.save(nib.Nifti1Image(np.asarray(array, np.float32), np.asarray(affine, float)), path)
            return self.segment_file(path, progress)


@contextlib.contextmanager
def _reading(path: Path):
    """Reader failures inside a MONAI chain (which wraps them in RuntimeError) as InputError."""
    try:
        yield
    except InputError:
        raise
    except Exception as err:
        raise InputError(path, f"could not be read ({type(err).__name__})") from None


def _on_grid(data: dict, array) -> dict:
    """``data`` with ``array`` (model grid, channel first or not) under key ``grid``, carrying
    the image's metadata and transform history so that ``Invertd`` can replay it."""
    image = data["image"]
    tensor = torch.as_tensor(np.asarray(array, dtype=np.float32))
    tensor = tensor if tensor.ndim == image.ndim else tensor[None]
    return {**data, "grid": MetaTensor(tensor, meta=image.meta,
                                       applied_operations=image.applied_operations)}


def to_input_space(pipeline, data: dict, probabilities: torch.Tensor,
                   resample: str = "nearest") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels uint8, probabilities (K, ...), affine) in the input's space.

    ``nearest``: the argmax on the model grid, resampled by nearest neighbour. ``linear``: each
    class probability resampled linearly, then the argmax (as nnU-Net does). Voxels outside the
    model grid (padding) are background with certainty.
    """
    channels = []
    for channel in probabilities.numpy():
        out, affine = invert_to_input(pipeline, _on_grid(data, channel), "grid")
        channels.append(out)
    probs = np.clip(np.stack(channels), 0.0, None)
    total = probs.sum(axis=0)
    probs[0] = np.where(total <= 1e-6, 1.0, probs[0])
    probs = (probs / probs.sum(axis=0, keepdims=True)).astype(np.float32)
    if resample == "linear":
        return probs.argmax(axis=0).astype(np.uint8), probs, affine
    grid_labels = probabilities.argmax(dim=0).numpy()
    labels, affine = invert_to_input(pipeline, _on_grid(data, grid_labels), "grid", nearest=True)
    return np.rint(labels).astype(np.uint8), probs, affine


def write_result(result: SegmentResult, out_dir: Path, case: str,
                 save_probabilities: bool = False) -> list[Path]:
    """``case_seg.nii.gz`` (uint8), ``case_seg_uncertainty.nii.gz`` (float32) and, if asked,
    ``case_seg_prob.nii.gz`` (float32, one volume per class along the 4th axis)."""
    written = [save_nifti(result.labels.astype(np.uint8), result.affine,
                          out_dir / f"{case}_seg.nii.gz"),
               save_nifti(result.uncertainty.astype(np.float32), result.affine,
                          out_dir / f"{case}_seg_uncertainty.nii.gz")]
    if save_probabilities:
        image = nib.Nifti1Image(np.moveaxis(result.probabilities, 0, -1), result.affine)
        image.set_qform(result.affine, code=1)
        image.set_sform(result.affine, code=1)
        raw = gzip.compress(image.to_bytes(), compresslevel=6, mtime=0)
        written.append(atomic_write_bytes(out_dir / f"{case}_seg_prob.nii.gz", raw))
    return written


def load_reference(path: str | Path, shape: tuple[int, ...]) -> np.ndarray:
    """A reference label map as integers; its shape must be the image's (``shape``)."""
    path = Path(path)
    array, _ = load_image(path)
    labels = np.rint(array[0]).astype(np.int64)
    if labels.shape != tuple(shape):
        raise InputError(path, f"has shape {labels.shape}, but its image has shape {tuple(shape)}")
    return labels


def evaluate_labels(pred: np.ndarray, reference: np.ndarray, num_classes: int,
                    spacing=None, uncertainty: np.ndarray | None = None) -> dict[str, float]:
    """Dice and HD95 (mm with ``spacing``) per foreground class and their means; with an
    uncertainty map, the AUROC of it for the misclassified voxels inside the reference's
    foreground (``uncertainty_auroc``, Hendrycks & Gimpel 2017)."""
    classes = list(range(1, num_classes))
    dice = metrics.dice_per_class(pred, reference, classes)
    out = {f"dice_{c}": dice[c] for c in classes}
    out["dice_mean"] = float(np.mean(list(dice.values())))
    hd = [metrics.hd95(pred == c, reference == c, spacing=spacing) for c in classes]
    out.update({f"hd95_{c}": h for c, h in zip(classes, hd, strict=True)})
    out["hd95_mean"] = float(np.nanmean(hd)) if not np.all(np.isnan(hd)) else float("nan")
    if uncertainty is not None:
        out["uncertainty_auroc"] = metrics.uncertainty_error_auroc(
            uncertainty, pred != reference, mask=reference > 0)
    return out


def voxel_spacing(affine: np.ndarray) -> list[float]:
    """Voxel size (mm) along each array axis, from the affine's column norms."""
    return [float(s) for s in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))]


# a distinct colour per class (background transparent), repeated beyond eight classes
PALETTE = np.array([(0, 0, 0), (60, 140, 255), (80, 220, 80), (255, 210, 60), (230, 60, 60),
                    (200, 90, 255), (60, 230, 230), (255, 140, 40)], dtype=np.float32)


def label_overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Grey image with each foreground class tinted in its palette colour (RGB uint8)."""
    grey = np.repeat(to_uint8(image).astype(np.float32)[..., None], 3, axis=-1)
    index = np.asarray(labels, dtype=np.int64)
    colour = PALETTE[np.where(index > 0, (index - 1) % (len(PALETTE) - 1) + 1, 0)]
    weight = np.where(index > 0, alpha, 0.0)[..., None]
    return (grey * (1 - weight) + colour * weight).round().astype(np.uint8)


def segment_figure(grid: SegmentGrid, axis: int = 2, count: int = 3) -> np.ndarray:
    """Rows of slices through the segmented region: input | labels | uncertainty."""
    inside = np.nonzero(np.moveaxis(grid.labels, axis, 0).reshape(grid.labels.shape[axis], -1)
                        .any(axis=1))[0]
    low, high = (inside.min(), inside.max()) if inside.size else (0, grid.labels.shape[axis] - 1)
    picks = np.linspace(low, high, count + 2)[1:-1].round().astype(int)
    inside_labels = grid.uncertainty[grid.labels > 0]
    vmax = float(max(np.percentile(inside_labels, 99) if inside_labels.size else 0.0, 1e-6))
    rows = []
    for index in picks:
        image = np.take(grid.image, index, axis=axis)
        rows.append([display(image),
                     display(label_overlay(image, np.take(grid.labels, index, axis=axis))),
                     display(overlay(image, np.take(grid.uncertainty, index, axis=axis), vmax))])
    return montage(rows)

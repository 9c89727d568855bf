"""``Segmenter``: label maps and their uncertainty from a diffusion ensemble.

    segmenter = Segmenter.load("runs/segment-model", samples=5)
    result = segmenter.predict_file("scan.nii.gz")   # or segmenter.predict_array(volume, affine)
    result.labels, result.uncertainty, result.probabilities, result.affine

An ensemble of samples (Wolleb et al. 2022) is drawn on the model grid, fused (mean of the
decoded soft maps, then argmax; or a majority vote) and mapped back to the input's space with
MONAI's ``Invertd``: labels by nearest neighbour (or the probabilities linearly, then argmax,
with ``resample="linear"``), the uncertainty and probabilities linearly.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from medidiff.config import Config, SegmentConfig
from medidiff.data.transforms import foreground_mask
from medidiff.diffusion.schedule import NoiseSchedule
from medidiff.errors import InputError
from medidiff.inference.grid import GridRunner
from medidiff.inference.predictor import Predictor, Prepared
from medidiff.io.discover import case_name
from medidiff.io.read import load_image
from medidiff.io.write import atomic_write_bytes, save_nifti
from medidiff.models.folder import LoadedModel
from medidiff.tasks.segment.evaluation import evaluate_labels, load_reference, voxel_spacing
from medidiff.tasks.segment.figures import segment_figure
from medidiff.tasks.segment.task import (
    SegmentTask,
    certain_background,
    entropy,
    fuse,
    nfe_per_slice,
    sample_probabilities,
    timesteps,
)


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
    reference: np.ndarray | None = None  # the reference labels, when a label folder is given


def foreground_grid(run, volume: torch.Tensor, runner: GridRunner, cfg: Config, samples: int,
                    fusion: str = "mean", progress=None) -> SegmentGrid:
    """The one way a segmentation network meets a (C, H, W, D) volume on the model grid: ``run``
    (rows -> ``samples`` x K class probabilities each) only on the slices holding foreground
    (``data.foreground_threshold``), the others background with certainty; the samples fused,
    the argmax the labels, the normalised entropy of the fused probabilities the uncertainty."""
    image = np.asarray(volume[0], dtype=np.float32)
    foreground = foreground_mask(image, cfg.data.foreground_threshold)
    k = cfg.segment.num_classes
    out = runner.run(run, volume.float(), foreground, certain_background(samples, k), progress)
    per_sample = out.reshape(samples, k, *out.shape[1:])
    fused = fuse(per_sample, fusion)
    labels = fused.argmax(dim=0).numpy().astype(np.uint8)
    return SegmentGrid(image, per_sample, fused, labels, entropy(fused).numpy())


class Segmenter(Predictor):
    """A loaded segmentation model plus sampling settings (the model's ``segment`` section).

    ``label_dir``: reference label maps named like the scans (``CASE.nii.gz``), for metrics in
    the table; ``save_probabilities``: also write ``CASE_seg_prob.nii.gz``.
    """

    task = SegmentTask()
    section = "segment"
    stage = "segment"
    table = "segment.csv"
    verb = "segmented"

    def __init__(self, model: LoadedModel, settings: SegmentConfig, device: torch.device, *,
                 label_dir: str | Path | None = None, save_probabilities: bool = False,
                 repair_nonfinite: bool = False, backend: str | None = None):
        super().__init__(model, settings, device, repair_nonfinite=repair_nonfinite,
                         backend=backend)
        self.schedule = NoiseSchedule(**self.cfg.diffusion.model_dump())
        timesteps(settings, self.schedule.num_train_timesteps)  # refuse steps it cannot take
        self.label_dir = Path(label_dir) if label_dir else None
        self.save_probabilities = save_probabilities

    @property
    def num_classes(self) -> int:
        return self.cfg.segment.num_classes

    def describe(self) -> dict:
        return {**super().describe(), "nfe_per_slice": nfe_per_slice(self.settings),
                "labels": str(self.label_dir or ""), "save_prob": self.save_probabilities}

    def check_image(self, path, image) -> None:
        if image.ndim != 4:
            raise InputError(path, f"has {image.ndim - 1} spatial dimensions; expected 3")
        expected = self.cfg.segment.image_channels
        if image.shape[0] != expected:
            raise InputError(path, f"has {image.shape[0]} channels; the model was trained on "
                                   f"images with {expected}")

    def segment_grid(self, volume: torch.Tensor, progress=None) -> SegmentGrid:
        """Sample, fuse and measure the disagreement for a (C, H, W, D) volume on the grid."""
        n = self.settings.samples
        runner = GridRunner.for_model(self.cfg, self.settings.batch_size // n)

        def run(batch: torch.Tensor, ids) -> torch.Tensor:
            return sample_probabilities(self.net, batch, ids, self.cfg, self.schedule,
                                        self.settings, self.device)

        return foreground_grid(run, volume, runner, self.cfg, n, self.settings.fusion, progress)

    def predict(self, prep: Prepared, progress=None) -> SegmentResult:
        reference = self.reference_for(prep)  # checked before sampling
        return self.finish(prep, self.segment_grid(prep.volume, progress), reference)

    def reference_for(self, prep: Prepared) -> np.ndarray | None:
        """The reference labels of a scan read from a file, when a label folder is given."""
        if self.label_dir is None or prep.source is None:
            return None
        return load_reference(self.label_dir / f"{case_name(prep.source)}.nii.gz",
                              load_image(prep.source)[0].shape[1:])

    def finish(self, prep: Prepared, grid: SegmentGrid,
               reference: np.ndarray | None = None) -> SegmentResult:
        """A grid's labels, probabilities and uncertainty mapped to the input's space (the one
        post-processing of every segmenter, diffusion or supervised)."""
        labels, probs, affine = self.to_input_space(prep, grid.probabilities)
        uncertainty, _ = prep.to_input(grid.uncertainty)
        return SegmentResult(labels, np.clip(uncertainty, 0.0, 1.0), probs, affine, grid,
                             reference)

    def to_input_space(self, prep: Prepared, probabilities: torch.Tensor):
        """(labels uint8, probabilities (K, ...), affine) in the input's space.

        ``nearest``: the argmax on the model grid, resampled by nearest neighbour. ``linear``:
        each class probability resampled linearly, then the argmax (as nnU-Net does). Voxels
        outside the model grid (padding) are background with certainty.
        """
        channels = []
        for channel in probabilities.numpy():
            out, affine = prep.to_input(channel)
            channels.append(out)
        probs = np.clip(np.stack(channels), 0.0, None)
        total = probs.sum(axis=0)
        probs[0] = np.where(total <= 1e-6, 1.0, probs[0])
        probs = (probs / probs.sum(axis=0, keepdims=True)).astype(np.float32)
        if self.settings.resample == "linear":
            return probs.argmax(axis=0).astype(np.uint8), probs, affine
        labels, affine = prep.to_input(probabilities.argmax(dim=0).numpy(), nearest=True)
        return np.rint(labels).astype(np.uint8), probs, affine

    def output_names(self, case: str) -> list[str]:
        names = [f"{case}_seg.nii.gz", f"{case}_seg_uncertainty.nii.gz", f"{case}.png"]
        return names + ([f"{case}_seg_prob.nii.gz"] if self.save_probabilities else [])

    def write(self, result: SegmentResult, out_dir: Path, case: str) -> list[Path]:
        """``case_seg.nii.gz`` (uint8), ``case_seg_uncertainty.nii.gz`` (float32) and, if asked,
        ``case_seg_prob.nii.gz`` (float32, one volume per class along the 4th axis)."""
        written = [save_nifti(result.labels.astype(np.uint8), result.affine,
                              out_dir / f"{case}_seg.nii.gz"),
                   save_nifti(result.uncertainty.astype(np.float32), result.affine,
                              out_dir / f"{case}_seg_uncertainty.nii.gz")]
        if self.save_probabilities:
            image = nib.Nifti1Image(np.moveaxis(result.probabilities, 0, -1), result.affine)
            image.set_qform(result.affine, code=1)
            image.set_sform(result.affine, code=1)
            raw = gzip.compress(image.to_bytes(), compresslevel=6, mtime=0)
            written.append(atomic_write_bytes(out_dir / f"{case}_seg_prob.nii.gz", raw))
        return written

    def figure(self, result: SegmentResult, case: str) -> np.ndarray:
        grid = result.grid
        reference = result.reference  # outlined when it lies on the model grid
        if reference is not None and np.shape(reference) != np.shape(grid.labels):
            reference = None
        return segment_figure(grid, self.cfg.data.slice_axis, case=case,
                              mean_uncertainty=float(result.uncertainty.mean()),
                              spacing=self.cfg.data.spacing, reference=reference)

    def row(self, result: SegmentResult, case: str) -> dict:
        """Class volumes (ml) and mean uncertainty; Dice, HD95, AUROC against a reference."""
        spacing = voxel_spacing(result.affine)
        voxel_ml = float(np.prod(spacing)) / 1000.0
        row = {"case": case, "mean_uncertainty": f"{float(result.uncertainty.mean()):.6g}"}
        for c in range(1, self.num_classes):
            row[f"volume_ml_{c}"] = f"{np.count_nonzero(result.labels == c) * voxel_ml:.4g}"
        if result.reference is not None:
            scores = evaluate_labels(result.labels, result.reference, self.num_classes, spacing,
                                     result.uncertainty)
            row.update({k: f"{v:.6g}" for k, v in scores.items()})
        return row

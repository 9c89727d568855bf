"""``AnomalyDetector``: scores scans with a normative model (or a baseline) into maps, masks at
the calibrated threshold and a per-scan score, in each input's own space.

    detector = AnomalyDetector.load("runs/anomaly-model")
    result = detector.predict_file("scan.nii.gz")      # or detector.predict_array(volume, affine)
    result.anomaly_map, result.mask, result.score, result.flagged
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from medidiff.config import AnomalyConfig
from medidiff.data.transforms import foreground_mask
from medidiff.diffusion.schedule import NoiseSchedule
from medidiff.errors import ModelFolderError
from medidiff.inference.grid import GridRunner
from medidiff.inference.predictor import Predictor, Prepared
from medidiff.io.write import save_nifti
from medidiff.models.folder import LoadedModel
from medidiff.models.unet import spatial_multiple
from medidiff.tasks.anomaly import baselines
from medidiff.tasks.anomaly.figures import anomaly_figure
from medidiff.tasks.anomaly.presets import preset_settings
from medidiff.tasks.anomaly.scoring import (
    calibration_key,
    check_settings,
    describe,
    postprocess,
    reconstruct,
    scan_score,
    tiles_per_slice,
)
from medidiff.tasks.anomaly.task import AnomalyTask

RESIDUAL_FLOOR = 0.02  # residual std floor ([0, 1] intensity units), as the z-score baseline's


@dataclass
class GridResult:
    """Arrays on the model grid (for pictures and for calibration)."""

    image: np.ndarray
    recon: np.ndarray | None
    anomaly_map: np.ndarray
    foreground: np.ndarray
    score: float
    stats: dict[str, float] = field(default_factory=dict)
    residual: np.ndarray | None = None  # the diffusion residual before standardisation


@dataclass
class AnomalyResult:
    """A scored scan, in the input's own space."""

    anomaly_map: np.ndarray
    mask: np.ndarray
    affine: np.ndarray
    score: float
    flagged: bool
    ood: bool
    ood_reasons: list[str]
    grid: GridResult
    threshold: float | None = None


class AnomalyDetector(Predictor):
    """A loaded normative model plus scoring settings (the model's ``anomaly`` section)."""

    task = AnomalyTask()
    section = "anomaly"
    stage = "score"
    table = "scores.csv"
    verb = "scored"
    images_2d = True

    def __init__(self, model: LoadedModel, settings: AnomalyConfig, device: torch.device, *,
                 method: str = "diffusion", calibration: dict | None = None,
                 repair_nonfinite: bool = False, backend: str | None = None):
        super().__init__(model, settings, device, repair_nonfinite=repair_nonfinite,
                         backend=backend)
        self.method = method
        self.schedule = NoiseSchedule(**self.cfg.diffusion.model_dump())
        check_settings(settings, method, self.cfg.trained_timesteps())  # levels it never learnt
        self.entry = calibration if calibration is not None else self.calibration()
        self._zscore = None
        self._residual_stats: dict[str, np.ndarray] | None = None  # None: from the calibration

    @classmethod
    def from_model(cls, model: LoadedModel, device: torch.device, preset: str | None = None,
                   **options) -> AnomalyDetector:
        """As ``Predictor.from_model``; ``preset`` names settings along the quality-per-NFE
        frontier (``medidiff.tasks.anomaly.presets``), which options given here override."""
        given = {k: v for k, v in options.items() if v is not None}
        return super().from_model(model, device, **{**preset_settings(preset), **given})

    @property
    def tiles(self) -> int:
        """Tiles per slice (or window) of a patch-wise (pDDPM) model; 1 otherwise."""
        return tiles_per_slice(self.cfg.data.patch or self.cfg.data.size,
                               self.schedule.noise_patch, spatial_multiple(self.cfg.model.channels))

    def describe(self) -> dict:
        entry = self.entry or {}
        return {**super().describe(), **describe(self.settings, self.method, self.tiles),
                "calibrated": self.entry is not None,
                "voxel_threshold": entry.get("voxel_threshold"),
                "scan_threshold": entry.get("scan_threshold")}

    # -- calibration lookup -----------------------------------------------------------------
    def calibration_key(self) -> dict:
        """What a calibration entry depends on (the map's scale changes with these)."""
        return calibration_key(self.settings, self.method)

    def calibration(self) -> dict | None:
        """The stored calibration entry for these settings, if any."""
        key = self.calibration_key()
        for entry in self.model.calibration.get("entries", []):
            if entry.get("settings") == key:
                return entry
        return None

    def closest_calibration(self) -> dict | None:
        """An entry of the same method, one that standardises as these settings do first."""
        entries = [e for e in self.model.calibration.get("entries", [])
                   if e["settings"].get("method") == self.method]
        entries.sort(key=lambda e: e["settings"].get("standardise") != self.settings.standardise)
        return entries[0] if entries else None

    def require_calibration(self) -> dict:
        if self.entry is None:
            raise ModelFolderError(self.model.folder,
                                   "has no calibration for these settings; run 'medidiff anomaly "
                                   "calibrate' with the same options")
        return self.entry

    # -- scoring on the model grid -------------------------------------------------------------
    def score_grid(self, volume: torch.Tensor, progress=None) -> GridResult:
        """Score a preprocessed (C, H, W, D) volume, or a (C, H, W) image, on the model grid.

        A diffusion residual is standardised with the statistics of the calibration entry in use
        when it has them.
        """
        if volume.ndim == 3:  # a 2D image: one slice along the model's slice axis
            axis = self.cfg.data.slice_axis
            result = self.score_grid(volume.unsqueeze(axis + 1), progress)
            for name in ("image", "recon", "anomaly_map", "foreground", "residual"):
                value = getattr(result, name)
                if value is not None:
                    setattr(result, name, np.take(value, 0, axis=axis))
            return result
        image = np.asarray(volume[0], dtype=np.float32)
        fg = foreground_mask(image, self.cfg.data.foreground_threshold)
        if self.cfg.preprocess.skull_strip != "none":  # the brain mask, not its smoothed halo
            fg &= image > 0
        recon = residual = None
        if self.method == "diffusion":
            residual, recon = self.reconstruct(volume, fg, progress)
            raw = residual
        elif self.method == "zscore":
            raw = baselines.zscore_channels(np.asarray(volume, np.float32), self.zscore_stats())
        else:  # on the contrast that shows lesions brightest (FLAIR, as Meissen et al. do)
            channel = baselines.threshold_channel(self.cfg.data.contrasts or ["t1"])
            raw = baselines.threshold_map(np.asarray(volume[channel], np.float32), fg)
        grid = GridResult(image, recon, raw, fg, 0.0, residual=residual)
        return self.finish_grid(grid, self.residual_stats())

    def reconstruct(self, volume: torch.Tensor, foreground: np.ndarray,
                    progress=None) -> tuple[np.ndarray, np.ndarray]:
        """Residual and reconstruction of a (C, H, W, D) volume (slices without foreground:
        residual 0, reconstruction the input)."""
        runner = GridRunner.for_model(self.cfg, self.settings.batch_size
                                      // (self.settings.draws * self.tiles))

        def run(batch: torch.Tensor, ids) -> torch.Tensor:
            return reconstruct(self.net, batch, ids, self.schedule, self.settings,
                               self.device)

        def fill(slices: torch.Tensor) -> torch.Tensor:
            return torch.cat([torch.zeros_like(slices[:, :1]), slices[:, :1]], dim=1)

        out = runner.run(run, volume.float(), foreground, fill, progress).numpy()
        return out[0], out[1]

    def finish_grid(self, grid: GridResult, residual_stats: dict | None) -> GridResult:
        """Standardise the residual (when stats are given), filter, mask, score; in place."""
        raw = grid.anomaly_map
        if grid.residual is not None:
            raw = grid.residual
            if residual_stats:
                raw = baselines.zscore_map(raw, residual_stats, floor=RESIDUAL_FLOOR,
                                           one_sided=True)
        fg, image = grid.foreground, grid.image
        grid.anomaly_map = postprocess(raw, fg, self.settings.median_kernel)
        grid.stats = {"foreground_fraction": float(fg.mean()),
                      "mean_intensity": float(image[fg].mean()) if fg.any() else 0.0,
                      # the median, not the mean: a large lesion raises a map's mean far
                      # beyond the healthy range, but only a scan unlike the healthy ones as a
                      # whole (another sequence, an artefact) raises its median
                      "median_map": float(np.median(grid.anomaly_map[fg])) if fg.any() else 0.0}
        grid.score = scan_score(grid.anomaly_map, fg, self.settings.score_top_fraction)
        return grid

    def zscore_stats(self) -> dict[str, np.ndarray]:
        if self._zscore is None:
            self._zscore = baselines.load_stats(self.model.folder)
        return self._zscore

    def residual_stats(self) -> dict[str, np.ndarray] | None:
        """The healthy residual statistics the calibration entry in use stored, if any."""
        if self.method != "diffusion" or not self.settings.standardise:
            return None
        if self._residual_stats is None:
            name = (self.entry or {}).get("residual_stats")
            self._residual_stats = baselines.load_stats(self.model.folder, name) if name else {}
        return self._residual_stats

    # -- in the input's space ------------------------------------------------------------------
    def predict(self, prep: Prepared, progress=None) -> AnomalyResult:
        """Score a prepared scan; map, mask and flag in its space, at the calibration in use."""
        grid = self.score_grid(prep.volume, progress)
        amap, affine = prep.to_input(grid.anomaly_map)
        amap = np.clip(amap, 0, None)
        entry = self.entry or {}
        threshold = entry.get("voxel_threshold")
        mask = (amap >= threshold if threshold is not None else np.zeros(amap.shape, bool))
        scan_threshold = entry.get("scan_threshold")
        flagged = bool(scan_threshold is not None and grid.score >= scan_threshold)
        reasons = self.ood_reasons(grid, prep)
        return AnomalyResult(amap, mask.astype(np.uint8), affine, grid.score, flagged,
                             bool(reasons), reasons, grid, threshold)

    def ood_reasons(self, grid: GridResult, prep: Prepared) -> list[str]:
        """Why a scan looks unlike the healthy calibration scans (empty when it does not)."""
        reasons = []
        ranges = self.model.calibration.get("ood", {})
        for name, value in grid.stats.items():
            if name == "median_map" and self.method != "diffusion":
                continue
            if name in ranges:
                low, high = ranges[name]
                if not low <= value <= high:
                    reasons.append(f"{name} {value:.3g} outside [{low:.3g}, {high:.3g}]")
        if prep.native is not None:  # registration quality against the healthy scans
            for name, value in prep.native.qc.items():
                low = ranges.get(f"qc_{name}", (-np.inf, np.inf))[0]
                if value < low:  # a registration better than the healthy scans' is no problem
                    reasons.append(f"registration {name} {value:.3g} below the healthy "
                                   f"range (from {low:.3g})")
        spacing = np.sqrt((prep.original_affine[:3, :3] ** 2).sum(0))
        want = self.cfg.data.spacing
        if want is not None and np.any(spacing > 2.5 * np.asarray(want)):
            reasons.append(f"voxel spacing {np.round(spacing, 2).tolist()} mm is much coarser "
                           f"than the model's {want}")
        return reasons

    # -- outputs -------------------------------------------------------------------------------
    def output_names(self, case: str) -> list[str]:
        return [f"{case}_anomaly.nii.gz", f"{case}_anomaly_mask.nii.gz", f"{case}.png"]

    def write(self, result: AnomalyResult, out_dir: Path, case: str) -> list[Path]:
        """The map (float32) and mask (uint8) NIfTI files, written atomically."""
        return [save_nifti(result.anomaly_map.astype(np.float32), result.affine,
                           out_dir / f"{case}_anomaly.nii.gz"),
                save_nifti(result.mask.astype(np.uint8), result.affine,
                           out_dir / f"{case}_anomaly_mask.nii.gz")]

    def figure(self, result: AnomalyResult, case: str) -> np.ndarray:
        return anomaly_figure(result.grid, threshold=result.threshold,
                              axis=self.cfg.data.slice_axis, case=case, score=result.score,
                              flagged=result.flagged,
                              scan_threshold=(self.entry or {}).get("scan_threshold"),
                              method=self.method, ood=result.ood_reasons,
                              spacing=self.cfg.data.spacing)

    def row(self, result: AnomalyResult, case: str) -> dict:
        return {"case": case, "score": f"{result.score:.6g}", "flagged": int(result.flagged),
                "ood": int(result.ood), "ood_reason": "; ".join(result.ood_reasons),
                "method": self.method}

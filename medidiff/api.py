"""The public Python API for anomaly detection; the CLI is a thin layer over it.

    from medidiff.api import AnomalyDetector
    detector = AnomalyDetector.load("runs/anomaly-model")
    result = detector.score_file("scan.nii.gz")        # or detector.score_array(volume, affine)
    result.anomaly_map, result.mask, result.score, result.flagged
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from scipy.stats import norm

from medidiff import baselines, metrics
from medidiff.data.datasets import cached_volumes, read_split
from medidiff.data.io import check_voxels, reader_for, save_nifti, spatial_ndim, validate_input
from medidiff.data.transforms import (
    foreground_mask,
    image_transforms,
    invert_to_input,
    volume_transforms,
)
from medidiff.diffusion.schedule import NoiseSchedule
from medidiff.errors import InputError, ModelFolderError
from medidiff.models.folder import LoadedModel, load_model, update_calibration
from medidiff.tasks.anomaly import (
    ScoreSettings,
    postprocess,
    scan_score,
    slice_residuals,
    volume_residuals,
)
from medidiff.train import select_device

log = logging.getLogger("medidiff")

RESIDUAL_FLOOR = 0.02  # residual std floor ([0, 1] intensity units), as the z-score baseline's
RESIDUAL_SMOOTH = 1.0  # voxels: steadies voxel statistics from a handful of healthy scans
MIN_STANDARDISE_SCANS = 3


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


def settings_key(settings: ScoreSettings) -> dict:
    """What a calibration depends on (the map's scale changes with these)."""
    keep = ("method", "sampler", "noise_levels", "steps", "draws", "eta", "median_kernel",
            "standardise")
    if settings.method != "diffusion":
        keep = ("method", "median_kernel")
    return {k: v for k, v in settings.describe().items() if k in keep}


class AnomalyDetector:
    """A loaded normative model plus scoring settings."""

    def __init__(self, model: LoadedModel, settings: ScoreSettings, device: torch.device):
        self.model, self.settings, self.device = model, settings, device
        self.cfg = model.config
        self.schedule = NoiseSchedule(**self.cfg.diffusion.model_dump())
        self.settings.validate(self.cfg.trained_timesteps())  # refuse levels it never learnt
        self._zscore = None
        self._residual_stats: dict[str, np.ndarray] | None = None  # None: from the calibration

    @classmethod
    def load(cls, model_dir: str | Path, device: str = "auto", **overrides) -> AnomalyDetector:
        """Load a model folder; ``overrides`` are ScoreSettings fields (method, draws, ...)."""
        dev = select_device(device)
        model = load_model(model_dir, task="anomaly", device=str(dev))
        settings = ScoreSettings.from_config(model.config.anomaly, **overrides)
        return cls(model, settings, dev)

    # -- calibration lookup -----------------------------------------------------------------
    def calibration(self) -> dict | None:
        """The stored calibration entry for these settings, if any."""
        key = settings_key(self.settings)
        for entry in self.model.calibration.get("entries", []):
            if entry.get("settings") == key:
                return entry
        return None

    # -- scoring ------------------------------------------------------------------------------
    def score_grid(self, volume: torch.Tensor, progress=None,
                   calibration: dict | None = None) -> GridResult:
        """Score a preprocessed (C, H, W, D) volume, or a (C, H, W) image, on the model grid.

        A diffusion residual is standardised with the statistics of ``calibration`` (default:
        the model's calibration entry for these settings) when it has them.
        """
        if volume.ndim == 3:  # a 2D image: one slice along the model's slice axis
            result = self.score_grid(volume.unsqueeze(self.cfg.data.slice_axis + 1), progress,
                                     calibration)
            axis = self.cfg.data.slice_axis
            for name in ("image", "recon", "anomaly_map", "foreground"):
                value = getattr(result, name)
                if value is not None:
                    setattr(result, name, np.take(value, 0, axis=axis))
            return result
        image = np.asarray(volume[0], dtype=np.float32)
        fg = foreground_mask(image, self.cfg.data.foreground_threshold)
        recon = residual = None
        method = self.settings.method
        if method == "diffusion":
            if self.cfg.data.spatial_dims == 2:
                residual, recon = slice_residuals(self.model.net, volume, fg, self.cfg,
                                                  self.schedule, self.settings, self.device,
                                                  progress)
            else:
                residual, recon = volume_residuals(self.model.net, volume, self.schedule,
                                                   self.settings, self.device)
            raw = residual
        elif method == "zscore":
            raw = baselines.zscore_map(image, self.zscore_stats())
        else:
            raw = baselines.threshold_map(image, fg)
        grid = GridResult(image, recon, raw, fg, 0.0, residual=residual)
        return self.finish_grid(grid, self.residual_stats(calibration))

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
                      "mean_map": float(grid.anomaly_map[fg].mean()) if fg.any() else 0.0}
        grid.score = scan_score(grid.anomaly_map, fg, self.settings.score_top_fraction)
        return grid

    def zscore_stats(self) -> dict[str, np.ndarray]:
        if self._zscore is None:
            self._zscore = baselines.load_stats(self.model.folder)
        return self._zscore

    def residual_stats(self, calibration: dict | None = None) -> dict[str, np.ndarray] | None:
        """The healthy residual statistics a calibration entry stored, if any."""
        if self.settings.method != "diffusion" or not self.settings.standardise:
            return None
        if self._residual_stats is None:
            name = (calibration or self.calibration() or {}).get("residual_stats")
            self._residual_stats = baselines.load_stats(self.model.folder, name) if name else {}
        return self._residual_stats

    def preprocess(self, path: Path):
        validate_input(path)
        ndim = spatial_ndim(path)
        if ndim == 2 and self.cfg.data.spatial_dims != 2:
            raise InputError(path, "is a 2D image; this model works on 3D volumes")
        build = image_transforms if ndim == 2 else volume_transforms
        pipeline = build(self.cfg.data, reader=reader_for(path))
        try:
            data = pipeline({"image": str(path)})
        except InputError:
            raise
        except Exception as err:  # MONAI wraps reader errors in RuntimeError
            raise InputError(path, f"could not be read ({type(err).__name__})") from None
        volume = data["image"]
        if volume.ndim != ndim + 1:
            raise InputError(path, f"has {volume.ndim - 1} spatial dimensions after loading; "
                                   f"expected {ndim}")
        check_voxels(path, volume)
        return pipeline, data

    def score_file(self, path: str | Path, progress=None,
                   calibration: dict | None = None) -> AnomalyResult:
        """Score one scan file (NIfTI or DICOM series); the map comes back in its space.

        Mask and flag use ``calibration`` if given, else the model's entry for these settings.
        """
        path = Path(path)
        pipeline, data = self.preprocess(path)
        volume = data["image"]
        grid = self.score_grid(volume.as_tensor(), progress, calibration)
        data["anomaly"] = MetaTensor(torch.from_numpy(grid.anomaly_map[None]), meta=volume.meta,
                                     applied_operations=volume.applied_operations)
        amap, affine = invert_to_input(pipeline, data, "anomaly")
        amap = np.clip(amap, 0, None)
        entry = calibration if calibration is not None else (self.calibration() or {})
        threshold = entry.get("voxel_threshold")
        mask = (amap >= threshold).astype(np.uint8) if threshold is not None else np.zeros_like(amap, np.uint8)
        scan_threshold = entry.get("scan_threshold")
        flagged = bool(scan_threshold is not None and grid.score >= scan_threshold)
        reasons = self.ood_reasons(grid, volume)
        return AnomalyResult(amap, mask, affine, grid.score, flagged, bool(reasons), reasons, grid)

    def score_array(self, array: np.ndarray, affine: np.ndarray, progress=None,
                    calibration: dict | None = None) -> AnomalyResult:
        """Score a 3D array with its voxel-to-world affine (written to a temporary NIfTI)."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "array.nii.gz"
            nib.save(nib.Nifti1Image(np.asarray(array, np.float32), np.asarray(affine, float)), path)
            return self.score_file(path, progress, calibration)

    def ood_reasons(self, grid: GridResult, volume) -> list[str]:
        """Why a scan looks unlike the healthy calibration scans (empty when it does not)."""
        reasons = []
        ranges = self.model.calibration.get("ood", {})
        for name, value in grid.stats.items():
            if name == "mean_map" and self.settings.method != "diffusion":
                continue
            if name in ranges:
                low, high = ranges[name]
                if not low <= value <= high:
                    reasons.append(f"{name} {value:.3g} outside [{low:.3g}, {high:.3g}]")
        affine = np.asarray(volume.meta.get("original_affine", np.eye(4)), dtype=float)
        spacing = np.sqrt((affine[:3, :3] ** 2).sum(0))
        want = self.cfg.data.spacing
        if want is not None and np.any(spacing > 2.5 * np.asarray(want)):
            reasons.append(f"voxel spacing {np.round(spacing, 2).tolist()} mm is much coarser "
                           f"than the model's {want}")
        return reasons


# -- calibration ---------------------------------------------------------------------------------
def calibrate(model_dir: str | Path, data_dir: str | Path, device: str = "auto",
              methods: tuple[str, ...] = ("diffusion", "zscore", "threshold"), progress=None,
              **overrides) -> dict:
    """Thresholds from healthy validation scans (never from test labels), stored in model.yaml.

    Voxel threshold: the (1 - target_fpr) quantile of the map over the healthy scans' foreground
    voxels. Scan threshold: mean + z * std of the healthy scans' scores for ``scan_fpr``.
    Also fits the z-score baseline on the training scans and records the healthy range of simple
    scan statistics, used to flag out-of-distribution scans.
    """
    folder = Path(model_dir)
    model = load_model(folder, task="anomaly", device=str(select_device(device)))
    cfg = model.config
    val = read_split(data_dir, "validation")
    if not val:
        raise InputError(data_dir, "has no 'validation' scans (healthy scans to calibrate on)")
    stats = fit_zscore_baseline(model, data_dir)
    val_volumes = cached_volumes(cfg.data, [{"image": e["image"]} for e in val])
    entries, ood = [], {}
    for method in methods:
        settings = ScoreSettings.from_config(cfg.anomaly, method=method,
                                             **(overrides if method == "diffusion" else {}))
        detector = AnomalyDetector(model, settings, select_device(device))
        detector._zscore = stats
        detector._residual_stats = {}  # raw residuals: the statistics are fitted below
        grids = []
        for i, item in enumerate(val_volumes):
            grids.append(detector.score_grid(torch.as_tensor(item["image"]).as_subclass(torch.Tensor)))
            if progress:
                progress(method, i + 1, len(val_volumes))
        residual_stats = standardise_healthy(detector, grids)
        entry = _calibration_entry(settings, grids, cfg.anomaly)
        if residual_stats is not None:
            entry["residual_stats"] = baselines.save_stats(
                residual_stats, folder, f"residual_stats_{_key_digest(entry['settings'])}"
                                        ".safetensors")
        entries.append(entry)
        if method == "diffusion":
            ood = _ood_ranges(grids)
    calibration = {"target_fpr": cfg.anomaly.target_fpr, "scan_fpr": cfg.anomaly.scan_fpr,
                   "validation_scans": len(val), "entries": entries, "ood": ood}
    update_calibration(folder, calibration)
    return calibration


def fit_zscore_baseline(model: LoadedModel, data_dir: str | Path) -> dict[str, np.ndarray]:
    """Voxel-wise mean and std of the preprocessed training scans, saved in the model folder."""
    train = read_split(data_dir, "training")
    volumes = cached_volumes(model.config.data, [{"image": e["image"]} for e in train])
    stats = baselines.fit_zscore([np.asarray(v["image"][0]) for v in volumes])
    baselines.save_stats(stats, model.folder)
    return stats


def standardise_healthy(detector: AnomalyDetector, grids: list[GridResult]) -> dict | None:
    """Fit the residual statistics on healthy scans' grids (returned, for new scans) and finish
    each grid with the statistics of the *other* scans (leave one out), so that thresholds are
    chosen on maps made exactly as a new scan's map is. None when the settings do not
    standardise or there are too few scans (the maps then stay raw residuals)."""
    residuals = [g.residual for g in grids]
    if not detector.settings.standardise or any(r is None for r in residuals):
        return None
    if len(residuals) < MIN_STANDARDISE_SCANS:
        log.warning("residual standardisation needs at least %d healthy validation scans, got "
                    "%d: the maps stay raw residuals", MIN_STANDARDISE_SCANS, len(residuals))
        return None
    # scans may differ in depth along a 2D model's free slice axis: centre-pad or crop to one
    residuals = [baselines.fit_shape(r, residuals[0].shape) for r in residuals]
    for i, grid in enumerate(grids):
        others = residuals[:i] + residuals[i + 1:]
        detector.finish_grid(grid, baselines.fit_zscore(others, smooth=RESIDUAL_SMOOTH))
    return baselines.fit_zscore(residuals, smooth=RESIDUAL_SMOOTH)


def _key_digest(key: dict) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def _calibration_entry(settings: ScoreSettings, grids: list[GridResult], acfg) -> dict:
    maps = [g.anomaly_map for g in grids]
    masks = [g.foreground for g in grids]
    voxel = metrics.threshold_at_fpr(maps, fpr=acfg.target_fpr, masks=masks)
    scores = np.array([g.score for g in grids])
    spread = scores.std(ddof=1) if len(scores) > 1 else abs(scores.mean()) * 0.1
    scan = float(scores.mean() + norm.ppf(1 - acfg.scan_fpr) * spread)
    return {"settings": settings_key(settings), "voxel_threshold": float(voxel),
            "scan_threshold": scan, "validation_scores": [round(float(s), 6) for s in scores]}


def _ood_ranges(grids: list[GridResult]) -> dict[str, list[float]]:
    ranges = {}
    for name in grids[0].stats:
        values = np.array([g.stats[name] for g in grids])
        spread = max(values.std(ddof=1) if len(values) > 1 else 0.0, 0.1 * abs(values.mean()))
        ranges[name] = [float(values.min() - 4 * spread), float(values.max() + 4 * spread)]
    return ranges


def require_calibration(detector: AnomalyDetector) -> dict:
    entry = detector.calibration()
    if entry is None:
        raise ModelFolderError(detector.model.folder,
                               "has no calibration for these settings; run 'medidiff anomaly "
                               "calibrate' with the same options")
    return entry


def write_maps(result: AnomalyResult, out_dir: Path, case: str) -> list[Path]:
    """Write the map and mask NIfTI files (atomically) for one case."""
    return [save_nifti(result.anomaly_map.astype(np.float32), result.affine,
                       out_dir / f"{case}_anomaly.nii.gz"),
            save_nifti(result.mask.astype(np.uint8), result.affine,
                       out_dir / f"{case}_anomaly_mask.nii.gz")]

"""Thresholds from healthy validation scans, never from test labels; stored in model.yaml.

Voxel threshold: the (1 - target_fpr) quantile of the map over the healthy scans' foreground
voxels. Scan threshold: mean + z * std of the healthy scans' scores for ``scan_fpr``. Residual
standardisation statistics and the z-score baseline are fitted here too, and the healthy range
of simple scan statistics that flags out-of-distribution scans.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from scipy.stats import norm

from medidiff import metrics
from medidiff.data.datasets import cached_volumes, fingerprint, read_split
from medidiff.errors import InputError
from medidiff.models.folder import LoadedModel, load_model, read_model_config, update_calibration
from medidiff.names import ANOMALY_METHODS
from medidiff.preprocess.cache import preprocess_entries
from medidiff.runtime import select_device
from medidiff.tasks.anomaly import baselines
from medidiff.tasks.anomaly.predictor import AnomalyDetector, GridResult
from medidiff.tasks.anomaly.task import AnomalyTask

log = logging.getLogger("medidiff")

RESIDUAL_SMOOTH = 1.0  # voxels: steadies voxel statistics from a handful of healthy scans
MIN_STANDARDISE_SCANS = 3

Progress = Callable[[str, int, int], None]


def calibrate(model_dir: str | Path, data_dir: str | Path, device: str = "auto",
              methods: Sequence[str] = ANOMALY_METHODS, progress: Progress | None = None,
              tracker=None, nested: bool = False, **overrides) -> dict:
    """Calibrate ``methods`` (the diffusion method with ``overrides`` of the model's anomaly
    settings) on the healthy validation scans of ``data_dir``; returns the stored calibration.

    Entries of other methods or other settings already in the model folder are kept, so that
    several settings can be calibrated side by side. With ``tracker``, one MLflow run records
    the thresholds.
    """
    if tracker is None:
        return _calibrate(model_dir, data_dir, device, methods, progress, overrides)
    with tracker.run("calibrate", nested=nested, tags={"stage": "calibrate"}):
        data = Path(data_dir).resolve()  # the validation scans as listed, before preprocessing
        contrasts = read_model_config(model_dir).data.contrasts
        tracker.log_dataset(data.name or "validation",
                            fingerprint(read_split(data, "validation", contrasts)), data,
                            "calibration")
        calibration = _calibrate(model_dir, data_dir, device, methods, progress, overrides)
        for entry in calibration["entries"][:len(methods)]:
            method = entry["settings"]["method"]
            tracker.log_metrics({f"{method}_voxel_threshold": entry["voxel_threshold"],
                                 f"{method}_scan_threshold": entry["scan_threshold"]})
        tracker.log_params({"target_fpr": calibration["target_fpr"],
                            "validation_scans": calibration["validation_scans"],
                            "methods": ",".join(methods),
                            **{k: v for k, v in overrides.items() if v is not None}})
    return calibration


def _calibrate(model_dir, data_dir, device, methods, progress, overrides) -> dict:
    folder = Path(model_dir)
    dev = select_device(device)
    model = load_model(folder, AnomalyTask(), device=str(dev))
    cfg = model.config
    val = read_split(data_dir, "validation", cfg.data.contrasts)
    if not val:
        raise InputError(data_dir, "has no 'validation' scans (healthy scans to calibrate on)")
    val = preprocess_entries(cfg.preprocess, val,  # as every scored scan is
                             contrasts=cfg.data.contrasts)
    stats = fit_zscore_baseline(model, data_dir) if "zscore" in methods else None
    volumes = [torch.as_tensor(item["image"]).as_subclass(torch.Tensor)
               for item in cached_volumes(cfg.data, [{"image": e["image"]} for e in val])]
    previous = dict(model.calibration)
    entries, ood = [], previous.get("ood", {})
    for method in methods:
        detector = AnomalyDetector.from_model(model, dev, method=method,
                                              **(overrides if method == "diffusion" else {}))
        detector._zscore = stats
        detector._residual_stats = {}  # raw residuals: the statistics are fitted below
        grids = []
        for i, volume in enumerate(volumes):
            grids.append(detector.score_grid(volume))
            if progress:
                progress(method, i + 1, len(volumes))
        entries.append(calibration_entry(detector, grids, folder))
        if method == "diffusion":
            ood = ood_ranges(grids, [e.get("qc", {}) for e in val],
                             map_floor=entries[-1]["voxel_threshold"])
    keys = [e["settings"] for e in entries]
    kept = [e for e in previous.get("entries", []) if e.get("settings") not in keys]
    calibration = {"target_fpr": cfg.anomaly.target_fpr, "scan_fpr": cfg.anomaly.scan_fpr,
                   "validation_scans": len(val), "entries": entries + kept, "ood": ood}
    update_calibration(folder, calibration)
    return calibration


def calibration_entry(detector: AnomalyDetector, grids: list[GridResult], folder: Path) -> dict:
    """Thresholds for one method and its settings (maps standardised leave-one-out first)."""
    residual_stats = standardise_healthy(detector, grids)
    acfg = detector.settings
    maps = [g.anomaly_map for g in grids]
    masks = [g.foreground for g in grids]
    voxel = metrics.threshold_at_fpr(maps, fpr=acfg.target_fpr, masks=masks)
    scores = np.array([g.score for g in grids])
    spread = scores.std(ddof=1) if len(scores) > 1 else abs(scores.mean()) * 0.1
    scan = float(scores.mean() + norm.ppf(1 - acfg.scan_fpr) * spread)
    key = detector.calibration_key()
    entry = {"settings": key, "voxel_threshold": float(voxel), "scan_threshold": scan,
             "validation_scores": [round(float(s), 6) for s in scores]}
    if residual_stats is not None:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
        entry["residual_stats"] = baselines.save_stats(residual_stats, folder,
                                                       f"residual_stats_{digest}.safetensors")
    return entry


def fit_zscore_baseline(model: LoadedModel, data_dir: str | Path) -> dict[str, np.ndarray]:
    """Voxel-wise mean and std of the preprocessed training scans, saved in the model folder."""
    contrasts = model.config.data.contrasts
    train = preprocess_entries(model.config.preprocess,
                               read_split(data_dir, "training", contrasts), contrasts=contrasts)
    volumes = cached_volumes(model.config.data, [{"image": e["image"]} for e in train])
    stats = baselines.fit_zscore([baselines.channels_of(v["image"]) for v in volumes])
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


def ood_ranges(grids: list[GridResult], qc: list[dict] | None = None,
               map_floor: float = 0.0) -> dict[str, list[float]]:
    """A wide healthy range of each scan statistic and registration quality number (min/max
    of the healthy scans -+ 4 spreads). The map's median may reach at least ``map_floor`` (the
    voxel threshold): below it less than half of the brain is flagged, which a lesion can do;
    healthy medians are often all zero, which would leave no room at all."""
    stats = [{**g.stats, **{f"qc_{k}": v for k, v in (q or {}).items()}}
             for g, q in zip(grids, qc or [{}] * len(grids), strict=True)]
    ranges = {}
    for name in stats[0]:
        values = np.array([s[name] for s in stats])
        spread = max(values.std(ddof=1) if len(values) > 1 else 0.0, 0.1 * abs(values.mean()))
        ranges[name] = [float(values.min() - 4 * spread), float(values.max() + 4 * spread)]
    if "median_map" in ranges:
        ranges["median_map"][1] = max(ranges["median_map"][1], float(map_floor))
    return ranges

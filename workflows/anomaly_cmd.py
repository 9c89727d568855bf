"""``medidiff anomaly``: score scans, calibrate thresholds, evaluate against labels."""

from __future__ import annotations

import json
import os

import click
from medidiff.workflows.common import (
    backend_option,
    echo,
    make_tracker,
    model_io_options,
    predict_files,
    preprocess_split,
    progress_bar,
    sharding_options,
    terminate_as_interrupt,
    tracking_options,
)

from medidiff.config import MAX_DRAWS
from medidiff.names import ANOMALY_METHODS, SAMPLERS, SCORING_PRESETS


@click.group()
def anomaly() -> None:
    """Anomaly detection with a normative diffusion model."""


def _levels(ctx, param, value):
    return tuple(value) or None


def settings_options(func):
    """Scoring settings (fields of the model's anomaly section); unset keeps the model's."""
    options = [
        click.option("--preset", type=click.Choice(SCORING_PRESETS), default=None,
                     help="Named settings: fast (one x0 jump from t=350, 2 draws: 2 network "
                          "evaluations per slice), default (the model's), reference (AnoDDPM's "
                          "250 DDPM steps); the options below override it. Each preset is "
                          "calibrated on its own."),
        click.option("--sampler", type=click.Choice(SAMPLERS), default=None,
                     help="Reverse sampler [default: the model's, ddim]."),
        click.option("--steps", type=click.IntRange(min=1), default=None,
                     help="Sampler steps from each noise level [default: the model's]."),
        click.option("--noise-level", "noise_levels", type=click.IntRange(min=1),
                     multiple=True, callback=_levels,
                     help="Partial noise level(s) in training timesteps (repeatable) "
                          "[default: the model's, 250]."),
        click.option("--draws", type=click.IntRange(1, MAX_DRAWS), default=None,
                     help="Noise draws averaged per level [default: the model's]."),
        click.option("--eta", type=click.FloatRange(0, 1), default=None,
                     help="DDIM stochasticity (ddim sampler only)."),
        click.option("--batch-size", type=click.IntRange(min=1), default=None,
                     help="Slices per network batch (draws included); results do not "
                          "depend on it."),
        click.option("--standardise/--no-standardise", default=None,
                     help="Divide the residual voxel-wise by its spread over the healthy "
                          "validation scans (needs scans in a common space) [default: the "
                          "model's, on]."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@anomaly.command("score")
@model_io_options
@click.option("--method", type=click.Choice(ANOMALY_METHODS), default="diffusion",
              show_default=True,
              help="diffusion (the model), or a baseline: voxel-wise z-score against the "
                   "healthy training scans, or intensity thresholding.")
@settings_options
@sharding_options
@tracking_options
def score(model_dir, out_dir, inputs, method, part_id, num_parts, overwrite, device,
          repair_nonfinite, experiment, tracking_uri, no_tracking, **settings) -> None:
    """Score INPUT scans (NIfTI, DICOM series folders, PNG, or folders of them).

    Writes CASE_anomaly.nii.gz, CASE_anomaly_mask.nii.gz and CASE.png per scan, in the scan's
    own space, scores.csv (case, score, flagged, ood) and score_settings.json.
    """
    from medidiff.api import AnomalyDetector

    detector = AnomalyDetector.load(model_dir, device=device, method=method,
                                    repair_nonfinite=repair_nonfinite, **settings)
    use_closest_calibration(detector)
    tracker = make_tracker(experiment, tracking_uri, no_tracking)
    predict_files(detector, inputs, out_dir, part_id, num_parts, overwrite, tracker,
                  run_name=f"score-{method}")


def use_closest_calibration(detector) -> None:
    """Without a calibration for these settings, masks and flags use the closest one."""
    if detector.entry is None:
        echo(f"warning: {detector.model.folder} has no calibration for these settings; masks "
             "and flags use the closest calibration of the same method "
             "(run 'medidiff anomaly calibrate' with the same options)")
        detector.entry = detector.closest_calibration()


def run_calibration(model_dir, data_dir, tracker, device: str = "auto", nested: bool = False,
                    methods=ANOMALY_METHODS, overrides: dict | None = None) -> dict:
    """Calibrate with one progress bar per stage (method), under one MLflow run."""
    from medidiff.api import calibrate
    from medidiff.models.folder import read_model_config

    terminate_as_interrupt()
    cfg = read_model_config(model_dir)
    for split in ("validation", "training") if "zscore" in methods else ("validation",):
        preprocess_split(cfg, data_dir, split)
    bars: dict = {}

    def progress(method: str, done: int, total: int) -> None:
        if method not in bars:
            for bar in bars.values():
                bar.close()
            bars[method] = progress_bar(total, f"calibrate {method}", unit="scan")
        bars[method].update(done - bars[method].n)

    try:
        calibration = calibrate(model_dir, data_dir, device=device, methods=methods,
                                progress=progress, tracker=tracker, nested=nested,
                                **(overrides or {}))
    finally:
        for bar in bars.values():
            bar.close()
    summary = (f"calibrated {', '.join(methods)} on {calibration['validation_scans']} healthy "
               f"validation scans (voxel false-positive rate {calibration['target_fpr']})")
    echo(summary)
    if tracker.last_run_id:  # the calibrate run, closed by now
        tracker.set_description(summary, run_id=tracker.last_run_id)
    return calibration


@anomaly.command("calibrate")
@click.option("--model", "model_dir", required=True, type=click.Path(), help="Model folder.")
@click.option("--data", "data_dir", required=True, type=click.Path(),
              help="Data folder whose dataset.json lists healthy 'validation' scans.")
@click.option("--device", default="auto", show_default=True)
@click.option("--method", "methods", type=click.Choice(ANOMALY_METHODS), multiple=True,
              help="Calibrate only this method (repeatable) [default: all]; other methods' "
                   "calibrations are kept.")
@settings_options
@backend_option
@tracking_options
def calibrate_cmd(model_dir, data_dir, device, methods, experiment, tracking_uri, no_tracking,
                  **settings) -> None:
    """Choose the voxel and scan thresholds on healthy validation scans (never on test labels).

    Calibrates the diffusion method with the given settings and the baselines; the thresholds
    are stored in the model folder's model.yaml.
    """
    tracker = make_tracker(experiment, tracking_uri, no_tracking)
    run_calibration(model_dir, data_dir, tracker, device=device,
                    methods=tuple(methods) or ANOMALY_METHODS, overrides=settings)


@anomaly.command("evaluate")
@click.option("--pred", "pred_dir", required=True, type=click.Path(),
              help="Folder written by 'medidiff anomaly score'.")
@click.option("--labels", "label_dir", required=True, type=click.Path(),
              help="Folder of lesion masks named like the scans (CASE.nii.gz).")
@click.option("--out", "out_json", type=click.Path(dir_okay=False), default=None,
              help="Write the metrics to this JSON file.")
@tracking_options
def evaluate_cmd(pred_dir, label_dir, out_json, experiment, tracking_uri, no_tracking) -> None:
    """Pooled voxel AP and AUROC, Dice at the calibrated threshold, best Dice (oracle), and
    per-scan AUROC/AP."""
    from medidiff.io.write import atomic_write_text
    from medidiff.report import save_png
    from medidiff.tasks.anomaly.evaluation import (
        evaluate_folder,
        format_metrics,
        method_of,
        summary_picture,
    )

    tracker = make_tracker(experiment, tracking_uri, no_tracking)
    with tracker.run("evaluate", tags={"stage": "evaluate"}):
        result = evaluate_folder(pred_dir, label_dir)
        tracker.log_metrics(evaluation_metrics(result))
        tracker.log_dict(result, "metrics.json")
        tracker.set_description(evaluation_summary(result))
        method = method_of(pred_dir)
        summary = summary_picture({method: pred_dir}, label_dir, f"anomaly evaluation: {method}")
        save_png(summary, os.path.join(pred_dir, "summary.png"))
        tracker.log_image(summary, key="summary")
    click.echo(format_metrics(result))
    if out_json:
        atomic_write_text(out_json, json.dumps(result, indent=2) + "\n")


def evaluation_metrics(result: dict) -> dict:
    """The numbers of an evaluation as MLflow metrics: `eval/pooled_ap`, `eval/scan_auroc`, ...
    (one prefix, so the runs table lists and sorts them together; metrics.json keeps the
    plain keys)."""
    return {f"eval/{k}": v for k, v in result.items() if isinstance(v, (int, float))}


def evaluation_summary(result: dict) -> str:
    """One line for the run's description: pooled AP and scan AUROC."""

    def number(key: str) -> str:
        value = result.get(key)
        return f"{value:.4f}" if isinstance(value, (int, float)) else "n/a"

    return (f"pooled AP {number('pooled_ap')}, scan AUROC {number('scan_auroc')} "
            f"on {result.get('n_cases', '?')} scans")

"""``medidiff anomaly``: score scans, calibrate thresholds, evaluate against labels."""

from __future__ import annotations

import json
from pathlib import Path

import click
from medidiff.workflows.common import (
    echo,
    make_tracker,
    progress_bar,
    report_outcomes,
    sharding_options,
    terminate_as_interrupt,
    tracking_options,
)

from medidiff.config import MAX_DRAWS


@click.group()
def anomaly() -> None:
    """Anomaly detection with a normative diffusion model."""


def settings_options(func):
    """Scoring settings; unset options keep the model's defaults (its anomaly config)."""
    options = [
        click.option("--method", type=click.Choice(["diffusion", "zscore", "threshold"]),
                     default="diffusion", show_default=True,
                     help="diffusion (the model), or a baseline: voxel-wise z-score against the "
                          "healthy training scans, or intensity thresholding."),
        click.option("--sampler", type=click.Choice(["ddpm", "ddim", "dpmpp2m", "x0"]),
                     default=None, help="Reverse sampler [default: the model's, ddim]."),
        click.option("--steps", type=click.IntRange(min=1), default=None,
                     help="Sampler steps from each noise level [default: the model's]."),
        click.option("--noise-level", "noise_levels", type=click.IntRange(min=1),
                     multiple=True, help="Partial noise level(s) in training timesteps "
                                         "(repeatable) [default: the model's, 250]."),
        click.option("--draws", type=click.IntRange(1, MAX_DRAWS), default=None,
                     help="Noise draws averaged per level [default: the model's]."),
        click.option("--eta", type=click.FloatRange(0, 1), default=None,
                     help="DDIM stochasticity (ddim sampler only)."),
        click.option("--batch-size", type=click.IntRange(min=1), default=None,
                     help="Slices per network batch (draws included)."),
        click.option("--standardise/--no-standardise", default=None,
                     help="Divide the residual voxel-wise by its spread over the healthy "
                          "validation scans (needs scans in a common space) [default: the "
                          "model's, on]."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def overrides_from(sampler, steps, noise_levels, draws, eta, batch_size, standardise) -> dict:
    return {"sampler": sampler, "steps": steps, "noise_levels": noise_levels or None,
            "draws": draws, "eta": eta, "batch_size": batch_size, "standardise": standardise}


@anomaly.command("score")
@click.option("--model", "model_dir", required=True, type=click.Path(), help="Model folder.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output folder.")
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@settings_options
@sharding_options
@tracking_options
def score(model_dir, out_dir, inputs, method, sampler, steps, noise_levels, draws, eta,
          batch_size, standardise, part_id, num_parts, overwrite, device, experiment, tracking_uri,
          no_tracking) -> None:
    """Score INPUT scans (NIfTI, DICOM series folders, or folders of them).

    Writes CASE_anomaly.nii.gz, CASE_anomaly_mask.nii.gz and CASE.png per scan, in the scan's
    own space, and scores.csv (case, score, flagged, ood).
    """
    from medidiff.api import AnomalyDetector
    from medidiff.inference import collect_inputs, shard

    detector = AnomalyDetector.load(
        model_dir, device=device, method=method,
        **overrides_from(sampler, steps, noise_levels, draws, eta, batch_size, standardise))
    paths, failed = collect_inputs(inputs)
    paths = shard(paths, part_id, num_parts)
    tracker = make_tracker(experiment, tracking_uri, no_tracking)
    terminate_as_interrupt()
    outcomes = score_cases(detector, paths, Path(out_dir), overwrite, tracker,
                           run_name=f"score-{method}")
    report_outcomes(failed + outcomes)


def score_cases(detector, paths, out_dir: Path, overwrite: bool, tracker, run_name: str,
                nested: bool = False):
    """Score files into ``out_dir`` under one MLflow run; returns the per-case outcomes."""
    from medidiff.api import write_maps
    from medidiff.inference import run_cases
    from medidiff.report import anomaly_figure, save_png

    entry = detector.calibration()
    if entry is None:
        echo(f"warning: {detector.model.folder} has no calibration for these settings; masks "
             "and flags use the closest calibration of the same method "
             "(run 'medidiff anomaly calibrate' with the same options)")
        entry = fallback_calibration(detector)
    out_dir.mkdir(parents=True, exist_ok=True)

    def outputs(case: str) -> list[str]:
        return [f"{case}_anomaly.nii.gz", f"{case}_anomaly_mask.nii.gz", f"{case}.png"]

    with tracker.run(run_name, nested=nested, tags={"stage": "score"}) as _, \
            progress_bar(len(paths), "scans", unit="scan") as bar:
        tracker.log_params({**detector.settings.describe(), "model": str(detector.model.folder),
                            "inputs": len(paths), "calibrated": entry is not None})

        def process(path: Path, case: str) -> dict:
            result = detector.score_file(path, calibration=entry)
            write_maps(result, out_dir, case)
            figure = anomaly_figure(result.grid, threshold=(entry or {}).get("voxel_threshold"))
            save_png(figure, out_dir / f"{case}.png")
            tracker.log_image(figure, key=f"overlay/{case}")
            row = {"case": case, "score": f"{result.score:.6g}", "flagged": int(result.flagged),
                   "ood": int(result.ood), "ood_reason": "; ".join(result.ood_reasons),
                   "method": detector.settings.method}
            if result.ood:
                echo(f"warning: {path.name}: looks out of distribution ({row['ood_reason']})")
            return row

        def on_case(outcome) -> None:
            bar.update(1)

        outcomes = run_cases(paths, out_dir, outputs, process, overwrite, on_case,
                             table="scores.csv")
        done = [o for o in outcomes if o.status == "done"]
        tracker.log_metrics({"scored": len(done),
                             "failed": sum(o.status == "failed" for o in outcomes)})
        if (out_dir / "scores.csv").is_file():
            tracker.log_artifact(out_dir / "scores.csv")
    return outcomes


def fallback_calibration(detector) -> dict | None:
    """An entry of the same method, one that standardises as these settings do first."""
    entries = [e for e in detector.model.calibration.get("entries", [])
               if e["settings"].get("method") == detector.settings.method]
    entries.sort(key=lambda e: e["settings"].get("standardise") != detector.settings.standardise)
    return entries[0] if entries else None


def run_calibration(model_dir, data_dir, tracker, device: str = "auto", nested: bool = False,
                    overrides: dict | None = None) -> dict:
    from medidiff.api import calibrate

    with tracker.run("calibrate", nested=nested, tags={"stage": "calibrate"}), \
            progress_bar(0, "calibrate", unit="scan") as bar:
        stage = None

        def progress(method: str, done: int, total: int) -> None:
            nonlocal stage
            if stage != method:  # a new stage: its own count, rate and ETA
                stage = method
                bar.reset(total=total)
                bar.set_description(f"calibrate {method}", refresh=False)
            bar.update(done - bar.n)

        calibration = calibrate(model_dir, data_dir, device=device, progress=progress,
                                **(overrides or {}))
        for entry in calibration["entries"]:
            method = entry["settings"]["method"]
            tracker.log_metrics({f"{method}_voxel_threshold": entry["voxel_threshold"],
                                 f"{method}_scan_threshold": entry["scan_threshold"]})
        tracker.log_params({"target_fpr": calibration["target_fpr"],
                            "validation_scans": calibration["validation_scans"]})
    echo(f"calibrated on {calibration['validation_scans']} healthy validation scans "
         f"(voxel false-positive rate {calibration['target_fpr']})")
    return calibration


@anomaly.command("calibrate")
@click.option("--model", "model_dir", required=True, type=click.Path(), help="Model folder.")
@click.option("--data", "data_dir", required=True, type=click.Path(),
              help="Data folder whose dataset.json lists healthy 'validation' scans.")
@click.option("--device", default="auto", show_default=True)
@settings_options
@tracking_options
def calibrate_cmd(model_dir, data_dir, device, method, sampler, steps, noise_levels, draws, eta,
                  batch_size, standardise, experiment, tracking_uri, no_tracking) -> None:
    """Choose the voxel and scan thresholds on healthy validation scans (never on test labels).

    Calibrates the diffusion method with the given settings and both baselines; the
    thresholds are stored in the model folder's model.yaml.
    """
    tracker = make_tracker(experiment, tracking_uri, no_tracking)
    terminate_as_interrupt()
    run_calibration(model_dir, data_dir, tracker, device=device,
                    overrides=overrides_from(sampler, steps, noise_levels, draws, eta, batch_size,
                                             standardise))


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
    from medidiff.data.io import atomic_write_text
    from medidiff.evaluation import evaluate_folder, format_metrics

    tracker = make_tracker(experiment, tracking_uri, no_tracking)
    with tracker.run("evaluate", tags={"stage": "evaluate"}):
        result = evaluate_folder(pred_dir, label_dir)
        tracker.log_metrics({k: v for k, v in result.items() if isinstance(v, (int, float))})
        tracker.log_dict(result, "metrics.json")
    if out_json:
        atomic_write_text(Path(out_json), json.dumps(result, indent=2) + "\n")
    click.echo(format_metrics(result))

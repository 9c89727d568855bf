"""``medidiff segment``: label maps and their uncertainty from a diffusion ensemble."""

from __future__ import annotations

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


@click.command("segment")
@click.option("--model", "model_dir", required=True, type=click.Path(), help="Model folder.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output folder.")
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("--samples", type=click.IntRange(1, MAX_DRAWS), default=None,
              help="Samples per scan, fused into the labels [default: the model's, 5].")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Sampler steps from pure noise [default: the model's].")
@click.option("--sampler", type=click.Choice(["ddpm", "ddim", "dpmpp2m", "x0"]), default=None,
              help="Reverse sampler [default: the model's, ddim].")
@click.option("--eta", type=click.FloatRange(0, 1), default=None,
              help="DDIM stochasticity (ddim sampler only).")
@click.option("--fusion", type=click.Choice(["mean", "vote"]), default=None,
              help="mean: argmax of the mean class probabilities; vote: majority vote of the "
                   "samples' labels [default: the model's, mean].")
@click.option("--resample", type=click.Choice(["nearest", "linear"]), default=None,
              help="Back to the input's space: nearest-neighbour labels, or linear "
                   "probabilities then argmax [default: the model's, nearest].")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Slices per network batch, samples included.")
@click.option("--seed", type=click.IntRange(min=0), default=None,
              help="Seed of the sampling noise [default: the model's, 0].")
@click.option("--save-prob", is_flag=True,
              help="Also write CASE_seg_prob.nii.gz (class probabilities along the 4th axis).")
@click.option("--labels", "label_dir", type=click.Path(file_okay=False), default=None,
              help="Folder of reference label maps named like the scans (CASE.nii.gz): adds "
                   "Dice, HD95 and the uncertainty's error AUROC to segment.csv and MLflow.")
@sharding_options
@tracking_options
def segment(model_dir, out_dir, inputs, samples, steps, sampler, eta, fusion, resample,
            batch_size, seed, save_prob, label_dir, part_id, num_parts, overwrite, device,
            experiment, tracking_uri, no_tracking) -> None:
    """Segment INPUT scans (NIfTI, DICOM series folders, PNG, or folders of them).

    Writes CASE_seg.nii.gz (uint8 labels), CASE_seg_uncertainty.nii.gz (normalised entropy of
    the fused class probabilities, 0 to 1) and CASE.png in the scan's own space, and
    segment.csv (class volumes, mean uncertainty, metrics against --labels).
    """
    from medidiff.inference import collect_inputs, shard
    from medidiff.segment import Segmenter

    segmenter = Segmenter.load(model_dir, device=device, samples=samples, steps=steps,
                               sampler=sampler, eta=eta, fusion=fusion, resample=resample,
                               batch_size=batch_size, seed=seed)
    paths, failed = collect_inputs(inputs)
    paths = shard(paths, part_id, num_parts)
    tracker = make_tracker(experiment, tracking_uri, no_tracking)
    terminate_as_interrupt()
    outcomes = segment_cases(segmenter, paths, Path(out_dir), overwrite, tracker, save_prob,
                             Path(label_dir) if label_dir else None)
    report_outcomes(failed + outcomes, "segmented", show_failures=False)


def segment_cases(segmenter, paths, out_dir: Path, overwrite: bool, tracker, save_prob: bool,
                  label_dir: Path | None):
    """Segment files into ``out_dir`` under one MLflow run; returns the per-case outcomes."""
    from medidiff.inference import run_cases
    from medidiff.report import save_png
    from medidiff.segment import segment_figure, write_result

    def outputs(case: str) -> list[str]:
        names = [f"{case}_seg.nii.gz", f"{case}_seg_uncertainty.nii.gz", f"{case}.png"]
        return names + ([f"{case}_seg_prob.nii.gz"] if save_prob else [])

    out_dir.mkdir(parents=True, exist_ok=True)
    with tracker.run("segment", tags={"stage": "segment"}), \
            progress_bar(len(paths), "scans", unit="scan") as bar:
        tracker.log_params({**segmenter.settings.describe(), "model": str(segmenter.model.folder),
                            "inputs": len(paths), "save_prob": save_prob,
                            "labels": str(label_dir) if label_dir else ""})

        def process(path: Path, case: str) -> dict:
            reference = reference_for(path, case, label_dir)  # checked before sampling
            result = segmenter.segment_file(path)
            write_result(result, out_dir, case, save_prob)
            figure = segment_figure(result.grid)
            tracker.log_image(figure, key=f"overlay/{case}")
            save_png(figure, out_dir / f"{case}.png")
            return case_row(segmenter, case, result, reference)

        outcomes = run_cases(paths, out_dir, outputs, process, overwrite,
                             lambda outcome: show_outcome(bar, outcome), table="segment.csv")
        log_summary(tracker, outcomes, out_dir)
    return outcomes


def reference_for(path: Path, case: str, label_dir: Path | None):
    """The reference label map of a scan (``label_dir/CASE.nii.gz``), shape-checked, or None."""
    if label_dir is None:
        return None
    from medidiff.data.io import load_image
    from medidiff.segment import load_reference

    return load_reference(label_dir / f"{case}.nii.gz", load_image(path)[0].shape[1:])


def show_outcome(bar, outcome) -> None:
    bar.update(1)
    if outcome.status == "failed":
        echo(f"error: {outcome.message}")


def case_row(segmenter, case: str, result, reference) -> dict:
    """Class volumes (ml) and mean uncertainty; Dice, HD95, AUROC against a reference."""
    import numpy as np

    from medidiff.segment import evaluate_labels, voxel_spacing

    spacing = voxel_spacing(result.affine)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    row = {"case": case, "mean_uncertainty": f"{float(result.uncertainty.mean()):.6g}"}
    for c in range(1, segmenter.num_classes):
        row[f"volume_ml_{c}"] = f"{np.count_nonzero(result.labels == c) * voxel_ml:.4g}"
    if reference is not None:
        scores = evaluate_labels(result.labels, reference, segmenter.num_classes, spacing,
                                 result.uncertainty)
        row.update({k: f"{v:.6g}" for k, v in scores.items()})
    return row


def log_summary(tracker, outcomes, out_dir: Path) -> None:
    """Counts, the mean of each per-case metric, and segment.csv, to MLflow."""
    import numpy as np

    done = [o for o in outcomes if o.status == "done"]
    summary = {"segmented": len(done), "failed": sum(o.status == "failed" for o in outcomes)}
    keys = [k for k in (done[0].row if done else {}) if k.startswith(("dice", "hd95", "unc"))]
    for key in keys:
        summary[f"mean_{key}"] = float(np.nanmean([float(o.row[key]) for o in done]))
    tracker.log_metrics(summary)
    if (out_dir / "segment.csv").is_file():
        tracker.log_artifact(out_dir / "segment.csv")

"""``medidiff denoise`` and ``medidiff super-resolve``: enhance scans with a diffusion model."""

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


def sampling_options(func):
    """Sampling settings; unset options keep the model's defaults (its denoise/superres config)."""
    options = [
        click.option("--samples", type=click.IntRange(1, MAX_DRAWS), default=None,
                     help="Samples per scan: the output is their mean, and with more than one "
                          "CASE_*_std.nii.gz their standard deviation [default: the model's, 1]."),
        click.option("--steps", type=click.IntRange(min=1), default=None,
                     help="Sampler steps [default: the model's, 10]."),
        click.option("--sampler", type=click.Choice(["ddpm", "ddim", "dpmpp2m", "x0"]),
                     default=None, help="Reverse sampler [default: the model's, ddim]."),
        click.option("--eta", type=click.FloatRange(0, 1), default=None,
                     help="DDIM stochasticity (ddim sampler only)."),
        click.option("--batch-size", type=click.IntRange(min=1), default=None,
                     help="Slices (or windows) per network batch, samples included."),
        click.option("--seed", type=click.IntRange(min=0), default=None,
                     help="Seed of the sampling noise [default: the model's, 0]."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def common_arguments(func):
    func = click.argument("inputs", nargs=-1, required=True, type=click.Path())(func)
    func = click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
                        help="Output folder.")(func)
    func = click.option("--model", "model_dir", required=True, type=click.Path(),
                        help="Model folder.")(func)
    return func


@click.command("denoise")
@common_arguments
@click.option("--sigma", type=click.FloatRange(0, 1, max_open=True), default=None,
              help="Noise sigma as a fraction of the scan's 99th-percentile head intensity "
                   "[default: estimated from each scan].")
@sampling_options
@sharding_options
@tracking_options
def denoise(model_dir, out_dir, inputs, sigma, samples, steps, sampler, eta, batch_size, seed,
            part_id, num_parts, overwrite, device, experiment, tracking_uri, no_tracking) -> None:
    """Denoise INPUT scans (NIfTI, DICOM series folders, or folders of them).

    With a 'denoise' model, conditional sampling; with an unconditional model (such as an
    'anomaly' model), zero-shot SDEdit from the noise level that matches each scan's. Writes
    CASE_denoised.nii.gz in the scan's own space and CASE.png (before and after).
    """
    from medidiff.enhance import Denoiser

    enhancer = Denoiser.load(model_dir, device=device, sigma=sigma,
                             **overrides(samples, steps, sampler, eta, batch_size, seed))
    run_command(enhancer, inputs, Path(out_dir), "denoised", part_id, num_parts, overwrite,
                make_tracker(experiment, tracking_uri, no_tracking),
                lambda path: enhancer.denoise_file(path), {"sigma": sigma})


@click.command("super-resolve")
@common_arguments
@click.option("--scale", type=click.IntRange(min=2), default=None,
              help="Refine the super-resolved axes by this factor (trained: 2 and 4) "
                   "[default: the scan's spacing over the model's target spacing].")
@sampling_options
@sharding_options
@tracking_options
def super_resolve(model_dir, out_dir, inputs, scale, samples, steps, sampler, eta, batch_size,
                  seed, part_id, num_parts, overwrite, device, experiment, tracking_uri,
                  no_tracking) -> None:
    """Super-resolve INPUT scans (NIfTI, DICOM series folders, or folders of them).

    Writes CASE_sr.nii.gz on the finer grid (its affine carries the new spacing) and CASE.png
    (before and after).
    """
    from medidiff.enhance import SuperResolver

    enhancer = SuperResolver.load(model_dir, device=device, scale=scale,
                                  **overrides(samples, steps, sampler, eta, batch_size, seed))
    run_command(enhancer, inputs, Path(out_dir), "sr", part_id, num_parts, overwrite,
                make_tracker(experiment, tracking_uri, no_tracking),
                lambda path: enhancer.super_resolve_file(path), {"scale": scale})


def overrides(samples, steps, sampler, eta, batch_size, seed) -> dict:
    return {"samples": samples, "steps": steps, "sampler": sampler, "eta": eta,
            "batch_size": batch_size, "seed": seed}


def run_command(enhancer, inputs, out_dir: Path, suffix: str, part_id: int, num_parts: int,
                overwrite: bool, tracker, enhance, extra: dict) -> None:
    """Enhance the inputs into ``out_dir`` under one MLflow run; exit 2 if any case failed."""
    from medidiff.inference import collect_inputs, shard

    paths, failed = collect_inputs(inputs)
    paths = shard(paths, part_id, num_parts)
    terminate_as_interrupt()
    outcomes = enhance_cases(enhancer, paths, out_dir, suffix, overwrite, tracker, enhance, extra)
    report_outcomes(failed + outcomes, "enhanced")


def enhance_cases(enhancer, paths, out_dir: Path, suffix: str, overwrite: bool, tracker,
                  enhance, extra: dict):
    """Write ``case_<suffix>.nii.gz`` (+ std) and ``case.png`` per scan; a row per case in
    ``<suffix>.csv``; returns the per-case outcomes."""
    import time

    from medidiff.data.io import atomic_write_text
    from medidiff.enhance import enhance_figure, write_result
    from medidiff.inference import run_cases
    from medidiff.report import save_png

    samples = enhancer.settings.samples
    config = {**enhancer.settings.describe(), **extra, "model": str(enhancer.model.folder),
              "task": enhancer.model.task}
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / f"{suffix}_settings.json", json.dumps(config, indent=2) + "\n")

    def outputs(case: str) -> list[str]:
        std = [f"{case}_{suffix}_std.nii.gz"] if samples > 1 else []
        return [f"{case}_{suffix}.nii.gz", *std, f"{case}.png"]

    with tracker.run(suffix, tags={"stage": enhancer.task, "model_task": enhancer.model.task}), \
            progress_bar(len(paths), suffix, unit="scan") as bar:
        tracker.log_params({**config, "inputs": len(paths)})

        def process(path: Path, case: str) -> dict:
            started = time.perf_counter()
            result = enhance(path)
            write_result(result, out_dir, case, suffix)
            figure = enhance_figure(result, enhancer.cfg.data.slice_axis)
            save_png(figure, out_dir / f"{case}.png")
            tracker.log_image(figure, key=f"montage/{case}")
            return {"case": case, "seconds": round(time.perf_counter() - started, 2),
                    **{k: _cell(v) for k, v in result.info.items()}}

        def on_case(outcome) -> None:
            bar.update(1)
            if outcome.status == "failed":
                echo(f"error: {outcome.message}")

        outcomes = run_cases(paths, out_dir, outputs, process, overwrite, on_case,
                             table=f"{suffix}.csv")
        done = [o for o in outcomes if o.status == "done"]
        tracker.log_metrics({"done": len(done),
                             "failed": sum(o.status == "failed" for o in outcomes)})
        if done:
            tracker.log_metrics({"seconds_per_scan": sum(o.row["seconds"] for o in done) / len(done)})
        if (out_dir / f"{suffix}.csv").is_file():
            tracker.log_artifact(out_dir / f"{suffix}.csv")
    return outcomes


def _cell(value):
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    return value

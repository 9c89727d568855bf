"""``medidiff denoise`` and ``medidiff super-resolve``: enhance scans with a diffusion model."""

from __future__ import annotations

import click
from medidiff.workflows.common import (
    make_tracker,
    model_io_options,
    predict_files,
    sharding_options,
    tracking_options,
)

from medidiff.config import MAX_DRAWS
from medidiff.names import SAMPLERS


def sampling_options(func):
    """Sampling settings (fields of the model's denoise/superres section); unset keeps the model's."""
    options = [
        click.option("--samples", type=click.IntRange(1, MAX_DRAWS), default=None,
                     help="Samples per scan: the output is their mean, and with more than one "
                          "CASE_*_std.nii.gz their standard deviation [default: the model's, 1]."),
        click.option("--steps", type=click.IntRange(min=1), default=None,
                     help="Sampler steps [default: the model's, 10]."),
        click.option("--sampler", type=click.Choice(SAMPLERS), default=None,
                     help="Reverse sampler [default: the model's, ddim]."),
        click.option("--eta", type=click.FloatRange(0, 1), default=None,
                     help="DDIM stochasticity (ddim sampler only)."),
        click.option("--batch-size", type=click.IntRange(min=1), default=None,
                     help="Slices (or windows) per network batch, samples included; results "
                          "do not depend on it."),
        click.option("--seed", type=click.IntRange(min=0), default=None,
                     help="Seed of the sampling noise [default: the model's, 0]."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@click.command("denoise")
@model_io_options
@click.option("--sigma", type=click.FloatRange(0, 1, max_open=True), default=None,
              help="Noise sigma as a fraction of the scan's 99th-percentile head intensity "
                   "[default: estimated from each scan].")
@sampling_options
@sharding_options
@tracking_options
def denoise(model_dir, out_dir, inputs, part_id, num_parts, overwrite, device, repair_nonfinite,
            experiment, tracking_uri, no_tracking, **settings) -> None:
    """Denoise INPUT scans (NIfTI, DICOM series folders, or folders of them).

    With a 'denoise' model, conditional sampling; with an unconditional model (such as an
    'anomaly' model), zero-shot SDEdit from the noise level that matches each scan's. Writes
    CASE_denoised.nii.gz in the scan's own space, CASE.png (before and after), denoised.csv
    and denoise_settings.json.
    """
    from medidiff.api import Denoiser

    denoiser = Denoiser.load(model_dir, device=device, repair_nonfinite=repair_nonfinite,
                             **settings)
    predict_files(denoiser, inputs, out_dir, part_id, num_parts, overwrite,
                  make_tracker(experiment, tracking_uri, no_tracking))


@click.command("super-resolve")
@model_io_options
@click.option("--scale", type=click.IntRange(min=2), default=None,
              help="Refine the super-resolved axes by this factor (trained: 2 and 4) "
                   "[default: the scan's spacing over the model's target spacing].")
@click.option("--consistency/--no-consistency", default=None,
              help="Make each sample average to the input over every coarse voxel (data "
                   "consistency) [default: the model's, on].")
@sampling_options
@sharding_options
@tracking_options
def super_resolve(model_dir, out_dir, inputs, part_id, num_parts, overwrite, device,
                  repair_nonfinite, experiment, tracking_uri, no_tracking, **settings) -> None:
    """Super-resolve INPUT scans (NIfTI, DICOM series folders, or folders of them).

    Writes CASE_sr.nii.gz on the finer grid (its affine carries the new spacing), CASE.png
    (before and after), sr.csv and super-resolve_settings.json.
    """
    from medidiff.api import SuperResolver

    resolver = SuperResolver.load(model_dir, device=device, repair_nonfinite=repair_nonfinite,
                                  **settings)
    predict_files(resolver, inputs, out_dir, part_id, num_parts, overwrite,
                  make_tracker(experiment, tracking_uri, no_tracking))

"""``medidiff segment``: label maps and their uncertainty from a diffusion ensemble."""

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
from medidiff.names import FUSIONS, RESAMPLE_MODES, SAMPLERS


@click.command("segment")
@model_io_options
@click.option("--samples", type=click.IntRange(1, MAX_DRAWS), default=None,
              help="Samples per scan, fused into the labels [default: the model's, 5].")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Sampler steps from pure noise [default: the model's].")
@click.option("--sampler", type=click.Choice(SAMPLERS), default=None,
              help="Reverse sampler [default: the model's, ddim].")
@click.option("--eta", type=click.FloatRange(0, 1), default=None,
              help="DDIM stochasticity (ddim sampler only) [default: the model's, 0].")
@click.option("--fusion", type=click.Choice(FUSIONS), default=None,
              help="mean: argmax of the mean class probabilities; vote: majority vote of the "
                   "samples' labels [default: the model's, mean].")
@click.option("--resample", type=click.Choice(RESAMPLE_MODES), default=None,
              help="Back to the input's space: nearest-neighbour labels, or linear "
                   "probabilities then argmax [default: the model's, nearest].")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Slices per network batch, samples included; results do not depend on it.")
@click.option("--seed", type=click.IntRange(min=0), default=None,
              help="Seed of the sampling noise [default: the model's, 0].")
@click.option("--save-prob", "save_probabilities", is_flag=True,
              help="Also write CASE_seg_prob.nii.gz (class probabilities along the 4th axis).")
@click.option("--labels", "label_dir", type=click.Path(file_okay=False), default=None,
              help="Folder of reference label maps named like the scans (CASE.nii.gz): adds "
                   "Dice, HD95 and the uncertainty's error AUROC to segment.csv and MLflow.")
@sharding_options
@tracking_options
def segment(model_dir, out_dir, inputs, part_id, num_parts, overwrite, device, experiment,
            tracking_uri, no_tracking, **options) -> None:
    """Segment INPUT scans (NIfTI, DICOM series folders, or folders of them).

    Writes CASE_seg.nii.gz (uint8 labels), CASE_seg_uncertainty.nii.gz (normalised entropy of
    the fused class probabilities, 0 to 1) and CASE.png in the scan's own space, segment.csv
    (class volumes, mean uncertainty, metrics against --labels) and segment_settings.json.
    """
    from medidiff.api import Segmenter

    segmenter = Segmenter.load(model_dir, device=device, **options)
    predict_files(segmenter, inputs, out_dir, part_id, num_parts, overwrite,
                  make_tracker(experiment, tracking_uri, no_tracking))

"""``medidiff preprocess``: registration, skull stripping and bias correction on their own."""

from __future__ import annotations

import click
from medidiff.workflows.common import (
    echo,
    make_tracker,
    part_options,
    progress_bar,
    report_outcomes,
    terminate_as_interrupt,
    tracking_options,
)


@click.command("preprocess")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="A config whose preprocess section to run.")
@click.option("--model", "model_dir", type=click.Path(file_okay=False), default=None,
              help="A model folder whose recorded preprocessing to run.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output folder.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config value, e.g. --set preprocess.registration=rigid.")
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@part_options
@tracking_options
def preprocess(config_path, model_dir, out_dir, overrides, inputs, part_id, num_parts, overwrite,
               experiment, tracking_uri, no_tracking) -> None:
    """Preprocess INPUT scans as a model's pipeline does (NIfTI, DICOM series, or folders).

    Writes CASE_preprocessed.nii.gz (registered, skull-stripped, normalised), CASE_brain.nii.gz,
    CASE_transform.tfm, CASE_qc.png and preprocess.csv (quality numbers); fills the cache that
    training and calibration read, so the same scans are not registered twice.
    """
    from medidiff.config import apply_overrides, from_dict, load_config
    from medidiff.errors import InputError
    from medidiff.inference.preprocessing import preprocess_files
    from medidiff.models.folder import read_model_config

    if (config_path is None) == (model_dir is None):
        raise InputError(None, "give either --config CONFIG.yaml or --model MODEL_DIR")
    if config_path:
        cfg = load_config(config_path, list(overrides))
    else:
        cfg = from_dict(apply_overrides(read_model_config(model_dir).to_dict(), list(overrides)),
                        str(model_dir))
    tracker = make_tracker(experiment, tracking_uri, no_tracking)
    terminate_as_interrupt()
    with progress_bar(0, "preprocess", unit="scan") as bar:

        def on_case(outcome) -> None:
            bar.update(1)
            if outcome.status == "failed":
                bar.clear()
                echo(f"failed: error: {outcome.message}")

        outcomes = preprocess_files(cfg, inputs, out_dir, overwrite=overwrite, part_id=part_id,
                                    num_parts=num_parts, on_case=on_case, tracker=tracker)
    report_outcomes(outcomes, "preprocessed")

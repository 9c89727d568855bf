"""Pieces every command shares: tracking options, progress bars, device and sharding options."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import click

from medidiff.errors import InputError
from medidiff.names import INFERENCE_BACKENDS
from medidiff.tracking import Tracker, check_reachable, tracking_uri


def tracking_options(func: Callable) -> Callable:
    """--experiment, --tracking-uri, --no-tracking."""
    func = click.option("--no-tracking", is_flag=True, help="Do not log to MLflow.")(func)
    func = click.option("--tracking-uri", default=None, metavar="URI",
                        help="MLflow tracking URI [default: $MLFLOW_TRACKING_URI or "
                             "sqlite:///mlflow.db in the working directory].")(func)
    func = click.option("--experiment", default="medidiff", show_default=True,
                        help="MLflow experiment name.")(func)
    return func


def backend_option(func: Callable) -> Callable:
    """--backend: how the network runs (lands in the command's settings, None: the model's)."""
    return click.option("--backend", type=click.Choice(INFERENCE_BACKENDS), default=None,
                        help="How the network runs: eager PyTorch, torch.compile, or exported to "
                             "ONNX and run by ONNX Runtime (onnx) or OpenVINO [default: the "
                             "model's inference.backend; auto: on the CPU openvino, else onnx "
                             "when installed, else eager]."
                        )(func)


def sharding_options(func: Callable) -> Callable:
    """--part-id, --num-parts, --overwrite, --device, --repair-nonfinite, --backend for inference
    commands."""
    func = backend_option(func)
    func = click.option("--repair-nonfinite", is_flag=True,
                        help="Replace NaN/Inf voxels with the scan's lowest finite value (with a "
                             "warning) instead of refusing the scan.")(func)
    func = click.option("--device", default="auto", show_default=True,
                        help="cpu, cuda, cuda:N or auto.")(func)
    return part_options(func)


def part_options(func: Callable) -> Callable:
    """--part-id, --num-parts, --overwrite: split a folder of inputs over processes."""
    func = click.option("--overwrite", is_flag=True,
                        help="Recompute cases whose outputs already exist.")(func)
    func = click.option("--num-parts", type=int, default=1, show_default=True, metavar="N",
                        callback=_check_part,
                        help="Split the inputs into this many parts (one per process or node).")(func)
    func = click.option("--part-id", type=int, default=0, show_default=True, metavar="K",
                        callback=_check_part,
                        help="Which part of the inputs this process handles, in [0, N).")(func)
    return func


def model_io_options(func: Callable) -> Callable:
    """--model MODEL_DIR --out OUT_DIR INPUT... of every inference command."""
    func = click.argument("inputs", nargs=-1, required=True, type=click.Path())(func)
    func = click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
                        help="Output folder.")(func)
    func = click.option("--model", "model_dir", required=True, type=click.Path(),
                        help="Model folder.")(func)
    return func


def predict_files(predictor, inputs, out_dir, part_id: int, num_parts: int, overwrite: bool,
                  tracker, run_name: str | None = None, nested: bool = False,
                  params: dict | None = None, exit_on_failure: bool = True):
    """Run ``predictor`` over the inputs with a progress bar; print each failure once as it
    happens and a summary at the end; exit status 2 if any case failed."""
    terminate_as_interrupt()
    with progress_bar(0, predictor.stage, unit="scan") as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        def on_case(outcome) -> None:
            if outcome.status == "failed":
                bar.clear()
                echo(f"failed: error: {outcome.message}")
                return
            if outcome.row.get("repaired_voxels"):
                bar.clear()
                echo(f"warning: {outcome.case}: replaced {outcome.row['repaired_voxels']} "
                     "non-finite voxel(s) with the scan's lowest finite value")
            if outcome.row.get("ood") in (1, "1"):
                bar.clear()
                echo(f"warning: {outcome.case}: looks out of distribution "
                     f"({outcome.row.get('ood_reason', '')})")

        outcomes = predictor.predict_files(inputs, out_dir, overwrite=overwrite,
                                           part_id=part_id, num_parts=num_parts,
                                           tracker=tracker, on_case=on_case, progress=progress,
                                           run_name=run_name, nested=nested, params=params)
    if tracker is not None:  # the summary line is the run's description in the MLflow UI
        tracker.set_description(outcome_summary(outcomes, predictor.verb),
                                run_id=tracker.last_run_id)
    report_outcomes(outcomes, predictor.verb, exit_on_failure)
    return outcomes


def _check_part(ctx: click.Context, param: click.Parameter, value: int) -> int:
    """Refuse --part-id outside [0, --num-parts) in one line (exit 2), before a model loads.

    The same rule as `medidiff.inference.shard`, checked here without importing MONAI.
    """
    given = {**ctx.params, param.name: value}
    part, parts = given.get("part_id"), given.get("num_parts")
    if param.name == "num_parts" and value < 1:
        raise InputError(None, f"--num-parts must be at least 1, got {value}")
    if part is not None and parts is not None and not 0 <= part < parts:
        raise InputError(None, f"--part-id must be in [0, {parts}), got {part}")
    return value


def make_tracker(experiment: str, uri: str | None, disabled: bool, rank: int = 0) -> Tracker:
    """A tracker that fails fast when its server cannot be reached (before any long work)."""
    if disabled or rank != 0:
        return Tracker(experiment=experiment, enabled=False)
    resolved = tracking_uri(uri)
    check_reachable(resolved)
    return Tracker(experiment=experiment, uri=resolved)


def echo(message: str) -> None:
    click.echo(message, err=True)


def progress_bar(total: int, desc: str, unit: str = "it"):
    """A tqdm bar on stderr (quiet when stderr is not a terminal and MEDIDIFF_PROGRESS=0)."""
    from tqdm.auto import tqdm

    disable = os.environ.get("MEDIDIFF_PROGRESS", "1") == "0"
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=disable,
                dynamic_ncols=True, mininterval=1.0)


def terminate_as_interrupt() -> None:
    """SIGTERM (a killed cluster job) behaves like Ctrl-C, so work is saved before exiting."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def resolve_out(path: str) -> Path:
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def outcome_summary(outcomes, verb: str = "scored") -> str:
    """The line a command ends with, such as "6 scored, 0 skipped (outputs exist), 0 failed"."""
    done = sum(o.status == "done" for o in outcomes)
    skipped = sum(o.status == "skipped" for o in outcomes)
    failed = sum(o.status == "failed" for o in outcomes)
    return f"{done} {verb}, {skipped} skipped (outputs exist), {failed} failed"


def report_outcomes(outcomes, verb: str = "scored", exit_on_failure: bool = True) -> None:
    """One summary line (failures were printed as they happened); exit status 2 if any failed."""
    echo(outcome_summary(outcomes, verb))
    if any(o.status == "failed" for o in outcomes) and exit_on_failure:
        raise SystemExit(2)


def preprocess_split(cfg, data_dir, split: str, label_keys=()) -> None:
    """Fill the preprocessing cache for a split, with a progress bar (training and calibration
    then read it without registering again)."""
    if not cfg.preprocess.enabled:
        return
    from medidiff.data.datasets import data_contrasts, read_split
    from medidiff.preprocess.cache import preprocess_entries

    contrasts = cfg.data.contrasts or data_contrasts(data_dir)  # as training resolves them
    entries = read_split(data_dir, split, contrasts)
    with progress_bar(len(entries), f"preprocess {split}", unit="scan") as bar:
        preprocess_entries(cfg.preprocess, entries, label_keys,
                           progress=lambda done, total: bar.update(done - bar.n),
                           contrasts=contrasts)

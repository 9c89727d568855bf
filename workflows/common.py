"""Pieces every command shares: tracking options, progress bars, device and sharding options."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import click

from medidiff.errors import InputError
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


def sharding_options(func: Callable) -> Callable:
    """--part-id, --num-parts, --overwrite, --device for inference commands."""
    func = click.option("--device", default="auto", show_default=True,
                        help="cpu, cuda, cuda:N or auto.")(func)
    func = click.option("--overwrite", is_flag=True,
                        help="Recompute cases whose outputs already exist.")(func)
    func = click.option("--num-parts", type=int, default=1, show_default=True, metavar="N",
                        callback=_check_part,
                        help="Split the inputs into this many parts (one per process or node).")(func)
    func = click.option("--part-id", type=int, default=0, show_default=True, metavar="K",
                        callback=_check_part,
                        help="Which part of the inputs this process handles, in [0, N).")(func)
    return func


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


def report_outcomes(outcomes, verb: str = "scored", show_failures: bool = True) -> None:
    """One summary line (and each failure unless already shown); exit status 2 if any failed."""
    done = sum(o.status == "done" for o in outcomes)
    skipped = sum(o.status == "skipped" for o in outcomes)
    failed = [o for o in outcomes if o.status == "failed"]
    echo(f"{done} {verb}, {skipped} skipped (outputs exist), {len(failed)} failed")
    if show_failures:
        for outcome in failed:
            echo(f"failed: {outcome.message}")
    if failed:
        raise SystemExit(2)

"""``medidiff runs``: compare tracked runs side by side."""

from __future__ import annotations

import click

from medidiff.names import RUN_FORMATS


@click.group()
def runs() -> None:
    """Look at tracked MLflow runs."""


@runs.command("compare")
@click.option("--experiment", default=None, help="Experiment name [default: medidiff].")
@click.option("--metric", "metrics", multiple=True, help="Metric to show (repeatable).")
@click.option("--format", "fmt", type=click.Choice(RUN_FORMATS),
              default="table", show_default=True)
@click.option("--max-runs", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--tracking-uri", default=None, metavar="URI", help="MLflow tracking URI.")
def compare(experiment, metrics, fmt, max_runs, tracking_uri) -> None:
    """Print runs side by side: the params that differ, key metrics, duration, device."""
    from medidiff.tracking import check_reachable, compare_runs
    from medidiff.tracking import tracking_uri as resolve

    uri = resolve(tracking_uri)
    check_reachable(uri)
    click.echo(compare_runs(experiment=experiment, metrics=list(metrics) or None, fmt=fmt,
                            uri=uri, max_runs=max_runs))

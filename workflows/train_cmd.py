"""``medidiff train``: one command trains a model of any task from a YAML config."""

from __future__ import annotations

import click
from medidiff.workflows.common import (
    echo,
    make_tracker,
    preprocess_split,
    progress_bar,
    terminate_as_interrupt,
    tracking_options,
)


@click.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--data", "data_dir", required=True, type=click.Path(),
              help="Data folder (with dataset.json, or a folder of NIfTI scans).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Model folder to write.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config value, e.g. --set train.steps=500 (repeatable).")
@click.option("--resume", is_flag=True, help="Continue from the model folder's last checkpoint.")
@click.option("--dry-run", is_flag=True, help="Print the resolved config and exit.")
@click.option("--calibrate/--no-calibrate", default=True, show_default=True,
              help="After training an anomaly model, calibrate it on the validation scans.")
@tracking_options
def train(config, data_dir, out_dir, overrides, resume, dry_run, calibrate, experiment,
          tracking_uri, no_tracking) -> None:
    """Train a diffusion model described by CONFIG on DATA, writing a model folder to OUT."""
    from medidiff.config import dump_config, load_config

    cfg = load_config(config, list(overrides))
    if dry_run:
        click.echo(dump_config(cfg), nl=False)
        return
    from medidiff.training.distributed import distributed_context

    with distributed_context(cfg.train.device) as dist:
        tracker = make_tracker(experiment, tracking_uri, no_tracking, rank=dist.rank)
        terminate_as_interrupt()
        train_and_calibrate(cfg, data_dir, out_dir, resume, tracker, calibrate, dist)


def train_and_calibrate(cfg, data_dir, out_dir, resume, tracker, calibrate, dist=None,
                        nested: bool = False):
    from medidiff.data.datasets import resolve_contrasts
    from medidiff.tasks.registry import get_task
    from medidiff.training.trainer import run_training

    cfg = resolve_contrasts(cfg, data_dir)
    rank = dist.rank if dist else 0
    if rank == 0:
        preprocess_split(cfg, data_dir, "training", get_task(cfg.task).label_keys)
    bar = progress_bar(cfg.train.steps, "train", unit="step") if rank == 0 else None

    def progress(info: dict) -> None:
        if bar is not None:
            bar.n = info["step"]
            bar.set_postfix(loss=f"{info['loss']:.4f}", img_s=f"{info['images_per_second']:.1f}",
                            refresh=False)
            bar.refresh()

    try:
        result = run_training(cfg, data_dir, out_dir, task=get_task(cfg.task), resume=resume,
                              tracker=tracker, progress=progress, nested=nested, rank=rank,
                              world_size=dist.world_size if dist else 1,
                              wrap=dist.wrap if dist else None)
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        echo(f"interrupted: checkpoint saved in {out_dir}; continue with --resume")
        raise
    if bar is not None:
        bar.close()
    if rank != 0:
        return result
    summary = (f"trained {result.steps} steps in {result.seconds:.0f} s "
               f"({result.images_per_second:.1f} images/s), final loss {result.final_loss:.4f}")
    echo(summary)
    if result.run_id:  # the run is closed by now: described by its id
        tracker.set_description(summary, run_id=result.run_id)
    if cfg.task == "anomaly" and calibrate:
        from medidiff.workflows.anomaly_cmd import run_calibration

        run_calibration(out_dir, data_dir, tracker, device=cfg.train.device, nested=True)
    echo(f"model folder: {out_dir}")
    return result


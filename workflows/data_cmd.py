"""``medidiff data``: make and inspect data sets."""

from __future__ import annotations

import time
from pathlib import Path

import click
from medidiff.workflows.common import echo, progress_bar

from medidiff import names


@click.group()
def data() -> None:
    """Make data sets."""


@data.command("example")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Random seed; the same seed gives byte-identical files.")
@click.option("--subjects", type=click.IntRange(min=4, max=500), default=40, show_default=True,
              help="Number of synthetic subjects (train, validation and test together); "
                   "24 by default with --raw.")
@click.option("--spacing", type=click.FloatRange(0.5, 10.0), default=2.0, show_default=True,
              help="Voxel spacing of the written scans (mm); not for --raw.")
@click.option("--raw", is_flag=True,
              help="Scans as a scanner writes them (skull on, random pose, native grids, int16, "
                   "some DICOM series), with ground truth for preprocessing.")
@click.option("--anatomy-variability", type=click.FloatRange(0.0, 4.0), default=1.0,
              show_default=True,
              help="With --raw: multiplies each subject's smooth displacement from the template "
                   "(1: at most 2-4 mm, about 1.2 mm on average).")
@click.option("--contrasts", default="t1", show_default=True,
              help="With --raw: comma-separated contrasts written for every subject, each on its "
                   "own grid (t1, t2, flair, pd; usual spellings such as T2w or t2f too).")
@click.pass_context
def example(ctx: click.Context, out_dir: str, seed: int, subjects: int, spacing: float,
            raw: bool, anatomy_variability: float, contrasts: str) -> None:
    """Build the example data set from the MNI152 template that nilearn ships.

    Healthy train/val scans, test scans with synthetic lesions and their masks, tissue labels,
    noisy and low-resolution copies, and a Decathlon-style dataset.json. With --raw: raw head
    scans on native grids, with brain masks, labels, poses and landmarks for evaluation.
    """
    from medidiff.data.example import make_example_dataset

    default = click.core.ParameterSource.DEFAULT
    if raw and ctx.get_parameter_source("spacing") is not default:
        raise click.UsageError("--spacing does not apply to --raw (each scan has its own grid)")
    if not raw and ctx.get_parameter_source("anatomy_variability") is not default:
        raise click.UsageError("--anatomy-variability applies to --raw only")
    if not raw and ctx.get_parameter_source("contrasts") is not default:
        raise click.UsageError("--contrasts applies to --raw only")
    if raw and ctx.get_parameter_source("subjects") is default:
        subjects = 24
    chosen = _contrasts(contrasts) if raw else ("t1",)

    started = time.monotonic()
    with progress_bar(subjects, "subjects") as bar:
        def advance(done: int, total: int, message: str) -> None:
            bar.n = done
            bar.set_postfix_str(message, refresh=False)
            bar.refresh()

        if raw:
            from medidiff.data.raw import make_raw_dataset

            make_raw_dataset(out_dir, seed=seed, subjects=subjects, progress=advance,
                             anatomy_variability=anatomy_variability, contrasts=chosen)
            manifest = Path(out_dir) / "dataset.json"
        else:
            manifest = make_example_dataset(out_dir, seed=seed, subjects=subjects,
                                            spacing_mm=spacing, progress=advance)
    echo(f"wrote {manifest} ({subjects} subjects, {time.monotonic() - started:.0f} s)")


def _contrasts(text: str) -> tuple[str, ...]:
    """``--contrasts``: medidiff's names, in order, each once (an unknown one: one-line error)."""
    from medidiff.data.raw import check_contrasts

    return check_contrasts([part for part in text.split(",") if part.strip()] or [text])


@data.command("import")
@click.argument("fmt", metavar="FORMAT",
                type=click.Choice(names.IMPORT_FORMATS + tuple(names.IMPORT_ALIASES),
                                  case_sensitive=False))
@click.argument("src", type=click.Path(file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--validation-fraction", type=click.FloatRange(0.0, 1.0, max_open=True),
              default=0.15, show_default=True,
              help="Share of the healthy training cases (ixi, bids) held out, seeded, as "
                   "validation scans.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the validation split.")
@click.option("--copy", is_flag=True,
              help="Copy the source files instead of linking them (symbolic links by default).")
def import_(fmt: str, src: str, out: str, validation_fraction: float, seed: int,
            copy: bool) -> None:
    """Import a public data set in its own layout (FORMAT) from SRC into OUT.

    FORMAT: ixi, brats (brats2021 or brats2023 for one edition), atlas, bids, decathlon,
    nnunet (docs/data.md says what each expects).
    OUT gets links to SRC's scans (images/CASE_CONTRAST.nii.gz, masks/, labels/) and a
    dataset.json with training, validation and test lists. SRC is never modified.
    """
    from medidiff.data.importers import import_dataset, summary

    manifest = import_dataset(fmt, src, out, validation_fraction=validation_fraction,
                              seed=seed, copy=copy)
    echo(summary(manifest))

"""The ``medidiff`` command: stage-named subcommands over the library.

Bad usage or bad input exits with status 2 and one line on stderr; ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

import click

from medidiff import __version__
from medidiff.errors import MedidiffError


class _State:
    debug = False


def _quiet_libraries() -> None:
    """Keep third-party warnings and log chatter off a user's terminal (shown with --debug)."""
    warnings.filterwarnings("ignore")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    for name in ("monai", "mlflow", "alembic", "urllib3", "nibabel", "PIL", "matplotlib"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # MONAI announces a missing optional GPU DICOM decoder every time a loader is built
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").disabled = True


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="medidiff")
@click.option("--debug", is_flag=True, help="Show full tracebacks and library warnings.")
def cli(debug: bool) -> None:
    """medidiff: diffusion models for medical imaging (anomaly detection, denoising,
    super-resolution, segmentation), tracked in MLflow."""
    _State.debug = debug
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="medidiff: %(levelname)s: %(message)s", stream=sys.stderr)
    if not debug:
        _quiet_libraries()


def _register() -> None:
    from medidiff.workflows import (
        anomaly_cmd,
        data_cmd,
        demo_cmd,
        enhance_cmd,
        preprocess_cmd,
        runs_cmd,
        segment_cmd,
        train_cmd,
    )

    for command in (data_cmd.data, preprocess_cmd.preprocess, train_cmd.train, anomaly_cmd.anomaly, enhance_cmd.denoise,
                    enhance_cmd.super_resolve, segment_cmd.segment, runs_cmd.runs, demo_cmd.demo):
        cli.add_command(command)


_register()


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs the CLI and maps errors to exit codes (0 ok, 2 bad input, 130 Ctrl-C)."""
    # scans may be clinical: no usage telemetry leaves the machine unless the user opts in
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    if "--debug" not in (argv if argv is not None else sys.argv[1:]):
        _quiet_libraries()
    try:
        cli.main(args=argv, prog_name="medidiff", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        hint = " (see --help)" if isinstance(exc, click.UsageError) else ""
        click.echo(f"medidiff: error: {_one_line(exc.format_message())}{hint}", err=True)
        return 2
    except click.exceptions.Abort:
        click.echo("medidiff: interrupted", err=True)
        return 130
    except MedidiffError as exc:
        if _State.debug:
            raise
        click.echo(f"medidiff: error: {_one_line(str(exc))}", err=True)
        return 2
    except KeyboardInterrupt:
        click.echo("medidiff: interrupted", err=True)
        return 130
    return 0


def _one_line(text: str) -> str:
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())

"""Shared fixtures: a small example data set, a tiny trained anomaly model, an isolated MLflow store."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "anomaly" / "cpu-tiny.yaml"


@pytest.fixture(scope="session", autouse=True)
def isolated_mlflow(tmp_path_factory):
    """Every test logs to a throw-away SQLite store, never to the working directory's."""
    store = tmp_path_factory.mktemp("mlflow")
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store}/mlflow.db"
    os.environ["MEDIDIFF_PROGRESS"] = "0"
    yield os.environ["MLFLOW_TRACKING_URI"]
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


@pytest.fixture(scope="session")
def example_data(tmp_path_factory) -> Path:
    """8 subjects at 2 mm: 5 train, 1 validation, 2 test (one with lesions, one healthy)."""
    from medidiff.data.example import make_example_dataset

    out = tmp_path_factory.mktemp("example") / "data"
    make_example_dataset(out, seed=0, subjects=8)
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, example_data) -> Path:
    """The cpu-tiny anomaly model trained and calibrated on the example data."""
    from medidiff.api import calibrate
    from medidiff.config import load_config
    from medidiff.tracking import Tracker
    from medidiff.train import run_training

    out = tmp_path_factory.mktemp("models") / "tiny"
    run_training(load_config(TINY), example_data, out, tracker=Tracker())
    calibrate(out, example_data, device="cpu")
    return out


def run_cli(*args: str) -> tuple[int, str, str]:
    """Run the medidiff CLI in-process; returns (exit code, stdout, stderr)."""
    import contextlib
    import io

    from medidiff.workflows.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue(), err.getvalue()

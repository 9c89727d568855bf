"""Shared fixtures: a small example data set, a tiny trained anomaly model, an isolated MLflow
store, and a real `mlflow server` on loopback."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.request import urlopen

import pytest

from tests.helpers import REPO, TINY, free_port, run_cli, stop_server  # noqa: F401 (re-exported)


@pytest.fixture(scope="session", autouse=True)
def isolated_mlflow(tmp_path_factory):
    """Every test logs to a throw-away SQLite store, never to the working directory's."""
    store = tmp_path_factory.mktemp("mlflow")
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store}/mlflow.db"
    os.environ["MEDIDIFF_PROGRESS"] = "0"
    os.environ["MEDIDIFF_CACHE"] = str(tmp_path_factory.mktemp("cache"))  # preprocessed scans
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
    from medidiff.tasks.registry import get_task
    from medidiff.tracking import Tracker
    from medidiff.training.trainer import run_training

    out = tmp_path_factory.mktemp("models") / "tiny"
    cfg = load_config(TINY)
    run_training(cfg, example_data, out, task=get_task(cfg.task), tracker=Tracker())
    calibrate(out, example_data, device="cpu")
    return out


@pytest.fixture
def mlflow_server(tmp_path):
    """`mlflow server` on loopback with a SQLite backend and proxied artifacts."""
    port = free_port()
    artifacts = tmp_path / "artifacts"
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
               "--port", str(port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{tmp_path / 'db.sqlite'}",
               "--artifacts-destination", str(artifacts)]
    # The job runner starts a dozen huey workers this test does not need.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(tmp_path / "server.log", "wb") as log_file:
        server = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT,
                                  cwd=tmp_path, env=env, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_for_health(url, server, tmp_path / "server.log")
        yield url, artifacts, server
    finally:
        stop_server(server)


def _wait_for_health(url: str, server: subprocess.Popen, log_path: Path, limit: float = 90):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"mlflow server exited:\n{log_path.read_text()[-2000:]}")
        try:
            with urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"mlflow server not healthy after {limit} s:\n{log_path.read_text()[-2000:]}")

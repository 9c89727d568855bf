"""Shared fixtures: a small example data set, a tiny trained anomaly model, an isolated MLflow
store, and a real `mlflow server` on loopback."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.request import urlopen

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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


def stop_server(server: subprocess.Popen) -> None:
    """Stop the server and the uvicorn worker it started (their own process group)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGKILL)  # whatever outlived the polite request
    server.wait(timeout=5)

"""medidiff.tracking.compare: the params that differ, key metrics, duration and device."""

from __future__ import annotations

import ast
import csv
import io
import json
from pathlib import Path

import pytest

import medidiff.tracking.compare
from medidiff.errors import InputError
from medidiff.tracking import Tracker
from medidiff.tracking.compare import common_metrics, compare_runs, differing_params

EXPERIMENT = "compare"


@pytest.fixture(autouse=True)
def _no_tracking_in_cwd(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def uri(tmp_path_factory) -> str:
    """Two finished runs: lr and seed differ, epochs and model.channels do not."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('compare') / 'mlflow.db'}"
    tracker = Tracker(EXPERIMENT, uri=uri)
    runs = [("small-lr", {"lr": 0.0001, "seed": 1}, {"loss": 0.4, "psnr": 31.0, "dice": 0.8}),
            ("big-lr", {"lr": 0.001}, {"loss": 0.5, "psnr": 30.0})]
    for name, params, metrics in runs:
        with tracker.run(name, tags={"medidiff.device": "Test GPU"}):
            tracker.log_params({"epochs": 10, "model": {"channels": [32, 64]}, **params})
            tracker.log_metrics({**metrics, "system/cpu_utilization_percentage": 10.0}, step=1)
    return uri


def test_table_shows_only_differing_params_and_metrics(uri):
    lines = compare_runs(EXPERIMENT, uri=uri).splitlines()
    header = lines[0].split()
    assert header[:6] == ["run", "id", "status", "start", "duration", "device"]
    assert header[6:] == ["lr", "seed", "loss", "psnr", "dice"]  # metrics most common first
    assert set(lines[1]) == {"-", " "}
    assert len(lines) == 4
    rows = {line.split()[0]: line for line in lines[2:]}
    column = lines[0].index("lr")
    assert rows["big-lr"][column:].startswith("0.001 ")
    assert rows["small-lr"][column:].startswith("0.0001")
    assert "FINISHED" in rows["big-lr"] and "Test GPU" in rows["big-lr"]
    assert "epochs" not in lines[0] and "system/" not in lines[0]


def test_csv_has_full_ids_and_the_same_columns(uri):
    rows = list(csv.DictReader(io.StringIO(compare_runs(EXPERIMENT, fmt="csv", uri=uri))))
    assert [row["run"] for row in rows] == ["big-lr", "small-lr"]  # newest first
    assert all(len(row["id"]) == 32 for row in rows)
    assert rows[0]["lr"] == "0.001" and rows[0]["seed"] == "" and rows[1]["seed"] == "1"
    assert float(rows[1]["loss"]) == 0.4 and rows[0]["dice"] == ""
    assert float(rows[0]["duration"]) >= 0
    assert "epochs" not in rows[0]


def test_json_lists_runs_with_params_and_metrics(uri):
    runs = json.loads(compare_runs(EXPERIMENT, fmt="json", uri=uri))
    assert [run["name"] for run in runs] == ["big-lr", "small-lr"]
    assert runs[1]["params"] == {"lr": "0.0001", "seed": "1"}
    assert runs[1]["metrics"] == {"loss": 0.4, "psnr": 31.0, "dice": 0.8}
    assert runs[0]["metrics"]["dice"] is None
    assert runs[0]["device"] == "Test GPU" and runs[0]["status"] == "FINISHED"


def test_markdown_is_a_pipe_table(uri):
    lines = compare_runs(EXPERIMENT, fmt="markdown", uri=uri).splitlines()
    assert len(lines) == 4 and all(line.startswith("| ") for line in lines if "---" not in line)
    assert lines[1].startswith("|---|") and lines[1].endswith("---:|")
    assert "| lr | seed |" in lines[0]


def test_requested_metrics_replace_the_default(uri):
    header = compare_runs(EXPERIMENT, metrics=["psnr", "system/cpu_utilization_percentage"],
                          uri=uri).splitlines()[0].split()
    assert header[-2:] == ["psnr", "system/cpu_utilization_percentage"]
    assert "loss" not in header


def test_unknown_experiment_is_an_input_error(uri):
    with pytest.raises(InputError, match="no MLflow experiment named 'nope'"):
        compare_runs("nope", uri=uri)


def test_missing_database_is_an_input_error_and_not_created(tmp_path):
    db = tmp_path / "none" / "mlflow.db"
    db.parent.mkdir()
    with pytest.raises(InputError, match="no MLflow experiment named"):
        compare_runs(uri=f"sqlite:///{db}")
    assert not db.exists()


def test_unknown_format_is_refused(uri):
    with pytest.raises(ValueError, match="markdown"):
        compare_runs(EXPERIMENT, fmt="xml", uri=uri)


def test_differing_params_counts_a_missing_param_as_different():
    runs = [{"params": {"a": "1", "b": "2"}}, {"params": {"a": "1", "b": "3", "c": "x"}}]
    assert differing_params(runs) == ["b", "c"]
    assert differing_params(runs[:1]) == []


def test_default_metrics_are_the_eight_most_common_without_system_metrics():
    many = {f"m{i}": 1.0 for i in range(10)}
    runs = [{"metrics": {**many, "system/gpu": 1.0}}, {"metrics": {"m9": 1.0, "m8": 1.0}}]
    assert common_metrics(runs) == ["m8", "m9", "m0", "m1", "m2", "m3", "m4", "m5"]


def test_runs_module_does_not_import_mlflow():
    tree = ast.parse(Path(medidiff.tracking.compare.__file__).read_text())
    names = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
             for alias in node.names]
    names += [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert not any(name.split(".")[0] == "mlflow" for name in names)

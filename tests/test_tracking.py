"""medidiff.tracking: runs, params, metrics, images, models, faults, and a real MLflow server."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import urlopen

import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from medidiff.errors import TrackingError
from medidiff.tracking import Tracker, check_reachable, tracking_uri
from medidiff.tracking.tracker import PARAM_VALUE_LIMIT, flatten_params, image_uint8
from tests.helpers import free_port, stop_server


@pytest.fixture(autouse=True)
def _no_tracking_in_cwd(monkeypatch, tmp_path):
    """No test may reach the real working directory's mlflow.db."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def db_uri(tmp_path_factory) -> str:
    # One database for the module: creating MLflow's tables costs seconds.
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def client(db_uri) -> MlflowClient:
    return MlflowClient(tracking_uri=db_uri)


@pytest.fixture
def tracker(db_uri, request) -> Tracker:
    return Tracker(experiment=request.node.name, uri=db_uri, retry_interval=0)


@pytest.fixture
def model_dir(tmp_path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    (folder / "model.yaml").write_text("task: anomaly\n")
    (folder / "README.md").write_text("# model card\n")
    (folder / ".model.safetensors.123.tmp").write_bytes(b"half-written")
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "last.pt").write_bytes(b"optimizer state")
    return folder


# -- tracking URI ---------------------------------------------------------------------------


def test_default_uri_is_sqlite_in_the_working_directory(tmp_path):
    assert tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"


def test_environment_then_explicit_uri_win(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert tracking_uri() == "http://tracking.example:5000"
    assert tracking_uri("sqlite:///x.db") == "sqlite:///x.db"


@pytest.mark.parametrize("uri", ["file:///tmp/mlruns", "./mlruns", "/tmp/mlruns", "mlruns"])
def test_file_store_uri_is_refused(uri, monkeypatch):
    with pytest.raises(TrackingError, match="sqlite"):
        tracking_uri(uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(TrackingError, match="file store"):
        Tracker()


def test_sqlite_in_a_missing_folder_is_refused(tmp_path):
    with pytest.raises(TrackingError, match="does not exist"):
        check_reachable(f"sqlite:///{tmp_path / 'nowhere' / 'mlflow.db'}")


def test_unreachable_server_fails_fast_before_the_run_starts():
    tracker = Tracker(uri=f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    with pytest.raises(TrackingError, match="cannot reach the MLflow tracking server.*--no-tracking"):
        with tracker.run("never"):
            pytest.fail("the run body must not start")
    assert time.monotonic() - started < 10


def test_typo_in_server_host_fails_fast():
    started = time.monotonic()
    with pytest.raises(TrackingError, match="cannot reach"):
        check_reachable("http://mlflow-sever.invalid:5000")
    assert time.monotonic() - started < 10


# -- params and images ----------------------------------------------------------------------


def test_params_are_flattened_to_dotted_string_keys():
    flat = flatten_params({"model": {"channels": [32, 64], "attention": {"levels": (False, True)}},
                           "lr": 1e-4, "note": "x" * (PARAM_VALUE_LIMIT + 10), "bad(key)": 1})
    assert flat["model.channels"] == "[32, 64]"
    assert flat["model.attention.levels"] == "[false, true]"
    assert flat["lr"] == "0.0001"
    assert len(flat["note"]) == PARAM_VALUE_LIMIT
    assert flat["bad_key_"] == "1"


def test_images_become_uint8():
    ramp = np.linspace(-0.5, 1.5, 12).reshape(3, 4)
    assert image_uint8(ramp).dtype == np.uint8
    assert image_uint8(ramp).min() == 0 and image_uint8(ramp).max() == 255
    assert image_uint8(np.zeros((3, 8, 9))).shape == (8, 9, 3)
    assert image_uint8(np.zeros((1, 8, 9))).shape == (8, 9)
    with pytest.raises(ValueError, match="shape"):
        image_uint8(np.zeros((2, 3, 4, 5)))


# -- runs -----------------------------------------------------------------------------------


def test_run_logs_params_metrics_and_default_tags(tracker, client):
    with tracker.run("train", tags={"task": "anomaly"}) as run_id:
        tracker.log_params({"model": {"channels": [32, 64]}, "lr": 0.001})
        for step in range(3):
            tracker.log_metrics({"loss": 1.0 / (step + 1), "skipped": None}, step=step)
        tracker.set_tags({"stage": "done"})
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "train"
    assert run.data.params == {"model.channels": "[32, 64]", "lr": "0.001"}
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [0, 1, 2]
    assert "skipped" not in run.data.metrics
    tags = run.data.tags
    assert tags["task"] == "anomaly" and tags["stage"] == "done"
    assert tags["medidiff.version"] and tags["medidiff.device"] and tags["medidiff.torch_version"]
    assert not any("host" in key for key in tags)


def test_image_is_logged_for_the_image_grid(tracker, client):
    with tracker.run("images") as run_id:
        tracker.log_image(np.random.default_rng(0).random((16, 16)), "samples", step=3)
        tracker.log_image(np.zeros((8, 8, 3), dtype=np.uint8), "overlay")
    names = [a.path for a in client.list_artifacts(run_id, "images")]
    assert any(n.startswith("images/samples+step+3+") and n.endswith(".png") for n in names)
    assert any(n.startswith("images/overlay+step+0+") for n in names)
    assert client.get_run(run_id).data.tags["mlflow.loggedImages"] == "True"


def test_text_dict_and_artifacts_are_logged(tracker, client, model_dir):
    with tracker.run("files") as run_id:
        tracker.log_dict({"a": 1}, "config.json")
        tracker.log_text("hello", "notes/readme.txt")
        tracker.log_artifact(model_dir / "model.yaml", "yaml")
        with pytest.raises(FileNotFoundError):
            tracker.log_artifact(model_dir / "missing.txt")
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.json", "notes", "yaml"} <= names
    assert not tracker.degraded


def test_nested_run_carries_its_parent_tag(tracker, client):
    with tracker.run("sweep") as parent:
        with tracker.run("trial-1", nested=True) as child:
            tracker.log_metrics({"dice": 0.5})
        tracker.log_metrics({"best_dice": 0.5})
    assert client.get_run(child).data.tags["mlflow.parentRunId"] == parent
    assert "dice" in client.get_run(child).data.metrics
    assert "best_dice" in client.get_run(parent).data.metrics


def test_resume_by_run_id_appends_to_the_same_run(tracker, client, caplog):
    with tracker.run("train") as run_id:
        tracker.log_params({"epochs": 2, "lr": 0.1})
        tracker.log_metrics({"loss": 1.0}, step=0)
    with caplog.at_level(logging.WARNING, logger="medidiff.tracking"):
        with tracker.run("train", run_id=run_id, tags={"resumed": "yes"}) as resumed:
            tracker.log_params({"epochs": 4, "lr": 0.1, "resumed": True})
            tracker.log_metrics({"loss": 0.5}, step=1)
    assert resumed == run_id
    assert "epochs" in caplog.text
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"epochs": "2", "lr": "0.1", "resumed": "True"}
    assert run.data.tags["resumed"] == "yes"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [0, 1]
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_failed_and_interrupted_runs_are_marked_and_reraised(tracker, client):
    with pytest.raises(ValueError, match="boom"):
        with tracker.run("fails") as failed:
            raise ValueError("boom")
    with pytest.raises(KeyboardInterrupt):
        with tracker.run("interrupted") as killed:
            raise KeyboardInterrupt
    assert client.get_run(failed).info.status == "FAILED"
    assert client.get_run(killed).info.status == "KILLED"


def test_model_folder_is_in_run_artifacts_and_logged_models(tracker, client, model_dir,
                                                             db_uri, monkeypatch):
    with tracker.run("train") as run_id:
        model_id = tracker.log_model_folder(model_dir)
    run_artifacts = Path(urlsplit(client.get_run(run_id).info.artifact_uri).path)
    assert {p.name for p in (run_artifacts / "model").iterdir()} == {
        "model.safetensors", "model.yaml", "README.md"}
    # MLflow resolves runs:/RUN/model to the LoggedModel through the global tracking URI.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", db_uri)
    names = {a.path for a in client.list_artifacts(run_id, "model")}
    assert names == {"model/model.safetensors", "model/model.yaml", "model/README.md"}
    assert model_id is not None
    model = client.get_logged_model(model_id)
    assert model.source_run_id == run_id and model.name == "model"
    assert str(model.status).endswith("READY")
    files = {a.path for a in client.list_logged_model_artifacts(model_id)}
    assert files == {"model.safetensors", "model.yaml", "README.md"}
    outputs = client.get_run(run_id).outputs.model_outputs
    assert [o.model_id for o in outputs] == [model_id]


def test_dataset_input_and_description_land_in_the_store(tracker, client, tmp_path):
    data = tmp_path / "data"
    with tracker.run("train") as run_id:
        tracker.log_dataset("data", "0123456789abcdef", data, "training")
        tracker.set_description("trained 3 steps in 1 s, final loss 0.5")
    inputs = client.get_run(run_id).inputs.dataset_inputs
    assert len(inputs) == 1
    dataset = inputs[0].dataset
    assert (dataset.name, dataset.digest, dataset.source_type) == (
        "data", "0123456789abcdef", "local")
    assert json.loads(dataset.source) == {"uri": str(data)}
    assert {t.key: t.value for t in inputs[0].tags} == {"mlflow.data.context": "training"}
    tags = client.get_run(run_id).data.tags
    assert tags["mlflow.note.content"] == "trained 3 steps in 1 s, final loss 0.5"
    # a run closed already is described by its id (commands print their summary at the end)
    assert tracker.last_run_id == run_id
    tracker.set_description("6 scored, 0 skipped (outputs exist), 0 failed", run_id=run_id)
    assert client.get_run(run_id).data.tags["mlflow.note.content"].startswith("6 scored")


def test_model_is_linked_to_a_parent_run(tracker, client, model_dir):
    with tracker.run("demo") as parent:
        with tracker.run("train", nested=True):
            model_id = tracker.log_model_folder(model_dir)
        tracker.link_model(model_id)
    assert [o.model_id for o in client.get_run(parent).outputs.model_outputs] == [model_id]


def test_system_metrics_are_logged_with_the_node_id(tracker, client, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    monkeypatch.delenv("MLFLOW_SYSTEM_METRICS_NODE_ID", raising=False)
    with tracker.run("system", system_metrics=True, node_id="node0") as run_id:
        time.sleep(1.0)
    monkeypatch.delenv("MLFLOW_SYSTEM_METRICS_NODE_ID", raising=False)
    keys = client.get_run(run_id).data.metrics
    assert any(k.startswith("system/node0/cpu_utilization") for k in keys), sorted(keys)


def test_disabled_tracker_is_a_noop(tmp_path, model_dir):
    tracker = Tracker(uri="file:///refused/because/disabled", enabled=False)
    with tracker.run("nothing", nested=True, system_metrics=True) as run_id:
        tracker.log_params({"a": {"b": 1}})
        tracker.log_metrics({"loss": 1.0}, step=1)
        tracker.set_tags({"x": "y"})
        tracker.log_image(np.zeros((4, 4)), "img")
        tracker.log_artifacts(model_dir)
        tracker.log_dict({"a": 1}, "a.json")
        tracker.log_text("t", "t.txt")
        tracker.log_dataset("data", "0" * 16, tmp_path, "training")
        tracker.set_description("nothing")
        tracker.link_model("m-123")
        assert tracker.log_model_folder(model_dir) is None
    assert run_id is None and tracker.uri is None and not tracker.degraded
    assert list(tmp_path.iterdir()) == [model_dir]


def test_logging_outside_a_run_is_a_programming_error(tracker):
    with pytest.raises(RuntimeError, match="no active MLflow run"):
        tracker.log_metrics({"loss": 1.0})


# -- faults ---------------------------------------------------------------------------------


def _server_down(*args, **kwargs):
    raise ConnectionError("the tracking server went away")


def test_lost_server_warns_once_buffers_and_flushes_after_recovery(tracker, client, caplog,
                                                                   monkeypatch):
    with tracker.run("train") as run_id:
        tracker.log_metrics({"loss": 1.0}, step=0)
        with monkeypatch.context() as outage, caplog.at_level(logging.WARNING):
            outage.setattr(MlflowClient, "log_batch", _server_down)
            outage.setattr(MlflowClient, "log_image", _server_down)
            for step in range(1, 6):
                tracker.log_metrics({"loss": 1.0 / step}, step=step)
            tracker.log_params({"late": 1})
            tracker.log_image(np.zeros((4, 4)), "samples", step=5)
            assert tracker.degraded and tracker.pending_metrics == 5
        warnings = [r for r in caplog.records if r.name == "medidiff.tracking"]
        assert len(warnings) == 1 and "went away" in warnings[0].getMessage()
        tracker.log_metrics({"loss": 0.1}, step=6)
        assert not tracker.degraded and tracker.pending_metrics == 0
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == list(range(7))
    assert client.get_run(run_id).info.status == "FINISHED"


def test_lost_server_while_logging_a_dataset_does_not_break_the_run(tracker, client, caplog,
                                                                   monkeypatch, tmp_path):
    with tracker.run("score") as run_id:
        with monkeypatch.context() as outage, caplog.at_level(logging.WARNING):
            outage.setattr(MlflowClient, "log_inputs", _server_down)
            outage.setattr(MlflowClient, "set_tag", _server_down)
            tracker.log_dataset("inputs", "0123456789abcdef", tmp_path, "scoring")
            tracker.set_description("1 scored, 0 skipped (outputs exist), 0 failed")
            assert tracker.degraded
        assert "failed to log a dataset" in caplog.text
        tracker.log_metrics({"done": 1.0})
        assert not tracker.degraded
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["done"] == 1.0
    assert not run.inputs.dataset_inputs


def test_a_refused_request_is_dropped_without_degrading(tracker, client, monkeypatch, caplog):
    def refuse(*args, **kwargs):
        raise MlflowException("bad value", error_code=INVALID_PARAMETER_VALUE)

    with tracker.run("train") as run_id:
        with monkeypatch.context() as refusing:
            refusing.setattr(MlflowClient, "log_batch", refuse)
            tracker.log_metrics({"loss": 1.0}, step=0)
        assert not tracker.degraded and tracker.pending_metrics == 0
        tracker.log_metrics({"loss": 0.5}, step=1)
    assert "MLflow refused to log metrics" in caplog.text
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1]


def test_metric_buffer_is_bounded_and_keeps_the_newest(db_uri, client, monkeypatch):
    tracker = Tracker("bounded-buffer", uri=db_uri, retry_interval=0, buffer_size=3)
    with tracker.run("train") as run_id:
        with monkeypatch.context() as outage:
            outage.setattr(MlflowClient, "log_batch", _server_down)
            for step in range(6):
                tracker.log_metrics({"loss": float(step)}, step=step)
            assert tracker.pending_metrics == 3
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [3, 4, 5]


def test_lost_server_at_run_end_does_not_raise(tracker, client, monkeypatch, caplog):
    with tracker.run("train") as run_id:
        monkeypatch.setattr(MlflowClient, "set_terminated", _server_down)
        monkeypatch.setattr(MlflowClient, "log_batch", _server_down)
        tracker.log_metrics({"loss": 1.0}, step=0)
    assert "1 metric points could not be sent" in caplog.text
    monkeypatch.undo()
    assert client.get_run(run_id).info.status == "RUNNING"


# -- a real MLflow server -------------------------------------------------------------------


def _get(url: str) -> dict:
    with urlopen(url, timeout=10) as response:
        return json.load(response)


def test_real_server_round_trip_then_outage(mlflow_server, model_dir):
    """Params, metrics, an image and a model arrive and read back through the REST API; then
    the server dies mid-run and the work goes on."""
    url, artifacts, server = mlflow_server
    run_id, model_id = _log_everything(Tracker(experiment="server-test", uri=url), model_dir)
    run = _get(f"{url}/api/2.0/mlflow/runs/get?run_id={run_id}")["run"]
    assert run["info"]["status"] == "FINISHED"
    assert {"key": "model.channels", "value": "[8, 16]"} in run["data"]["params"]
    assert [(m["key"], m["value"], m["step"]) for m in run["data"]["metrics"]] == [("loss", 0.5, 1)]
    listed = _get(f"{url}/api/2.0/mlflow/artifacts/list?run_id={run_id}&path=model")
    assert {f["path"] for f in listed["files"]} == {
        "model/model.safetensors", "model/model.yaml", "model/README.md"}
    images = _get(f"{url}/api/2.0/mlflow/artifacts/list?run_id={run_id}&path=images")
    assert any(f["path"].endswith(".png") for f in images["files"])
    logged = _get(f"{url}/api/2.0/mlflow/logged-models/{model_id}")["model"]
    assert logged["info"]["source_run_id"] == run_id
    assert len(list(artifacts.rglob("model.safetensors"))) == 2  # run artifacts + LoggedModel
    assert not list(artifacts.rglob("last.pt"))  # training checkpoints stay local

    tracker = Tracker(experiment="server-test", uri=url, retry_interval=0)
    with tracker.run("outage"):
        tracker.log_metrics({"loss": 1.0}, step=0)
        stop_server(server)
        started = time.monotonic()
        for step in range(1, 4):
            tracker.log_metrics({"loss": 1.0 / step}, step=step)
        tracker.log_image(np.zeros((4, 4)), "samples", step=3)
        assert tracker.degraded and tracker.pending_metrics == 3
        assert time.monotonic() - started < 20  # MLflow's own retries would take minutes


def _log_everything(tracker: Tracker, model_dir: Path) -> tuple[str, str | None]:
    with tracker.run("train") as run_id:
        assert tracker.run_url().endswith(f"/runs/{run_id}")
        tracker.log_params({"model": {"channels": [8, 16]}})
        tracker.log_metrics({"loss": 0.5}, step=1)
        tracker.log_image(np.ones((8, 8)), "samples", step=1)
        model_id = tracker.log_model_folder(model_dir)
    assert not tracker.degraded
    return run_id, model_id

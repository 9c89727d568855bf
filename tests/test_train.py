"""The shared training loop: model folder, MLflow run, exact resume, 3D."""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from medidiff.config import load_config
from medidiff.errors import InputError
from medidiff.models.checkpoint import load_weights
from medidiff.tasks.registry import get_task
from medidiff.training.trainer import Trainer, draw_batch, run_training
from tests.helpers import REPO, TINY

TINY3D = REPO / "configs" / "anomaly" / "cpu-tiny-3d.yaml"
ANOMALY = get_task("anomaly")


def test_training_writes_a_complete_model_folder(tiny_model):
    meta = yaml.safe_load((tiny_model / "model.yaml").read_text())
    assert meta["task"] == "anomaly"
    assert meta["info"]["steps"] == 30
    assert len(meta["info"]["data_fingerprint"]) == 16
    assert meta["config"]["data"]["spacing"] == [4.0, 4.0, 4.0]
    state = load_weights(tiny_model / meta["weights"]["file"], meta["weights"]["sha256"])
    assert any(k.endswith("weight") for k in state)
    assert (tiny_model / "model_card.md").read_text().startswith("# medidiff model: anomaly")
    assert (tiny_model / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (tiny_model / "config.yaml").is_file()


def test_training_run_is_tracked(tiny_model, isolated_mlflow):
    from medidiff.tracking import search_runs

    run_id = yaml.safe_load((tiny_model / "model.yaml").read_text())["info"]["mlflow_run_id"]
    runs = [r for r in search_runs("medidiff", uri=isolated_mlflow, max_runs=1000)
            if r["run_id"] == run_id]
    assert runs, "the model folder's training run is not in MLflow"
    run = runs[0]
    assert run["name"].startswith("train-anomaly-cpu-tiny")
    assert run["params"]["train.steps"] == "30"
    assert "train/loss" in run["metrics"]  # train/...: sorted together in the runs table


def _weights(folder: Path) -> dict:
    meta = yaml.safe_load((folder / "model.yaml").read_text())
    return load_weights(folder / meta["weights"]["file"])


def test_resume_continues_exactly(tmp_path, example_data):
    cfg = load_config(TINY, ["train.steps=12", "train.checkpoint_every=6",
                             "train.sample_every=1000"])
    straight = tmp_path / "straight"
    run_training(cfg, example_data, straight, task=ANOMALY)
    # an interrupted run: killed right after its checkpoint at step 6, then resumed to 12
    half = tmp_path / "half"
    trainer = Trainer(cfg, example_data, half, task=ANOMALY)

    def kill(step: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        trainer.run(on_checkpoint=kill)
    assert not (half / "model.yaml").exists()
    result = run_training(cfg, example_data, half, task=ANOMALY, resume=True)
    assert result.steps == 12
    a, b = _weights(straight), _weights(half)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_existing_model_is_not_overwritten(tmp_path, tiny_model, example_data):
    with pytest.raises(InputError, match="already holds a model"):
        run_training(load_config(TINY), example_data, tiny_model, task=ANOMALY)


def test_3d_tiny_trains(tmp_path, example_data):
    out = tmp_path / "tiny3d"
    result = run_training(load_config(TINY3D), example_data, out, task=ANOMALY)
    assert result.steps == 10 and np.isfinite(result.final_loss)
    meta = yaml.safe_load((out / "model.yaml").read_text())
    assert meta["config"]["data"]["spatial_dims"] == 3


def test_max_timestep_limits_the_training_noise_and_the_scoring_levels(tmp_path, example_data,
                                                                       tiny_model):
    from medidiff.api import AnomalyDetector
    from medidiff.errors import ConfigError
    from medidiff.tasks.registry import load_model

    cfg = load_config(TINY, ["train.steps=3", "train.max_timestep=40", "train.sample_every=3",
                             "anomaly.noise_levels=[30]"])
    trainer = Trainer(cfg, example_data, tmp_path / "limited", task=ANOMALY)
    seen = []
    trainer.net.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["timesteps"].clone()), with_kwargs=True)
    trainer.run()
    drawn = torch.cat(seen[:3])  # the training steps (the preview runs afterwards)
    assert drawn.max() < 40 and drawn.numel() == 3 * cfg.train.batch_size

    model = load_model(tiny_model, task="anomaly")
    model.config.train.max_timestep = 200
    with pytest.raises(ConfigError, match="noise_level"):
        AnomalyDetector.from_model(model, torch.device("cpu"), noise_levels=[250])
    AnomalyDetector.from_model(model, torch.device("cpu"), noise_levels=[150])


def test_a_non_finite_loss_stops_training_before_the_weights_change(tmp_path, example_data):
    trainer = Trainer(load_config(TINY, ["train.steps=2"]), example_data, tmp_path / "nan",
                      task=ANOMALY)
    trainer.load_data()
    batch = draw_batch(trainer.dataset, 2, torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in trainer.unwrapped().state_dict().items()}
    ema_before = {k: v.clone() for k, v in trainer.ema.shadow.items()}
    trainer.loss_on = lambda batch: sum(p.sum() for p in trainer.net.parameters()) * float("nan")
    with pytest.raises(FloatingPointError, match="step 0"):
        trainer.train_step(batch)
    after = trainer.unwrapped().state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(ema_before[k], trainer.ema.shadow[k]) for k in ema_before)


def test_checkpoint_minutes_checkpoints_between_the_step_checkpoints(tmp_path, example_data):
    from medidiff.errors import ConfigError
    from medidiff.models.checkpoint import load_checkpoint

    def checkpoints(minutes: str) -> list[int]:
        cfg = load_config(TINY, ["train.steps=5", "train.checkpoint_every=100",
                                 f"train.checkpoint_minutes={minutes}", "train.sample_every=1000"])
        out = tmp_path / f"timed-{minutes}"
        trainer = Trainer(cfg, example_data, out, task=ANOMALY)
        now = [0.0]
        trainer.clock = lambda: now[0]
        real_step = trainer.train_step

        def step_taking_25_seconds(batch):
            now[0] += 25
            return real_step(batch)

        trainer.train_step = step_taking_25_seconds
        saved = []
        trainer.run(on_checkpoint=lambda step: saved.append(
            (step, int(load_checkpoint(out / "checkpoints" / "last.pt")["step"]))))
        return saved

    # 75 s after the start (> 1 min) at step 3; 50 s later the run has ended (step 5)
    assert checkpoints("1") == [(3, 3)]
    assert checkpoints("0.4") == [(1, 1), (2, 2), (3, 3), (4, 4)]  # every 25 s > 24 s
    assert checkpoints("null") == []
    with pytest.raises(ConfigError, match="checkpoint_minutes"):
        load_config(TINY, ["train.checkpoint_minutes=0"])


def test_resume_after_a_kill_before_the_first_checkpoint_continues_the_same_run(
        tmp_path, example_data, monkeypatch):
    """No checkpoint yet, the MLflow run never told it ended (as after kill -9): --resume trains
    from step 0 in that same run, which ends FINISHED."""
    from mlflow import MlflowClient

    from medidiff.tracking import Tracker, search_runs

    class Killed(BaseException):
        pass

    cfg = load_config(TINY, ["train.steps=4", "train.checkpoint_every=100",
                             "train.sample_every=1000", "train.log_every=1"])
    uri, out = f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "model"
    real_step = Trainer.train_step

    def dies_at_step_2(self, batch):
        if self.step == 2:
            raise Killed
        return real_step(self, batch)

    monkeypatch.setattr(Trainer, "train_step", dies_at_step_2)
    monkeypatch.setattr(MlflowClient, "set_terminated", lambda *args, **kwargs: None)
    with pytest.raises(Killed):
        run_training(cfg, example_data, out, task=ANOMALY, tracker=Tracker("killed", uri=uri))
    monkeypatch.undo()
    assert not (out / "checkpoints" / "last.pt").exists()
    [first] = search_runs("killed", uri=uri)
    assert first["status"] == "RUNNING"

    result = run_training(cfg, example_data, out, task=ANOMALY, resume=True,
                          tracker=Tracker("killed", uri=uri))
    assert result.steps == 4 and result.run_id == first["run_id"]
    assert [(r["run_id"], r["status"]) for r in search_runs("killed", uri=uri)] == [
        (first["run_id"], "FINISHED")]
    meta = yaml.safe_load((out / "model.yaml").read_text())
    assert meta["info"]["mlflow_run_id"] == first["run_id"]


def test_training_imports_no_task():
    """Layering: the trainer is given its task object; medidiff.training never imports
    medidiff.tasks (not even inside a function)."""
    import ast

    for path in (REPO / "medidiff" / "training").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not [n for n in names if n.startswith("medidiff.tasks")], path.name


def test_auto_mixed_precision_on_the_cpu_follows_its_bf16_instructions(monkeypatch):
    from medidiff import runtime

    cfg = load_config(TINY)
    cpu = torch.device("cpu")
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    assert runtime.amp_dtype(cfg, cpu) == torch.bfloat16
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    assert runtime.amp_dtype(cfg, cpu) is None
    cfg.train.amp = "off"
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    assert runtime.amp_dtype(cfg, cpu) is None

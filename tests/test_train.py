"""The shared training loop: model folder, MLflow run, exact resume, 3D."""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from medidiff.config import load_config
from medidiff.errors import InputError
from medidiff.models.checkpoint import load_weights
from medidiff.train import Trainer, draw_batch, run_training

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "anomaly" / "cpu-tiny.yaml"
TINY3D = REPO / "configs" / "anomaly" / "cpu-tiny-3d.yaml"


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
    assert "loss" in run["metrics"]


def _weights(folder: Path) -> dict:
    meta = yaml.safe_load((folder / "model.yaml").read_text())
    return load_weights(folder / meta["weights"]["file"])


def test_resume_continues_exactly(tmp_path, example_data):
    cfg = load_config(TINY, ["train.steps=12", "train.checkpoint_every=6",
                             "train.sample_every=1000"])
    straight = tmp_path / "straight"
    run_training(cfg, example_data, straight)
    # an interrupted run: killed right after its checkpoint at step 6, then resumed to 12
    half = tmp_path / "half"
    trainer = Trainer(cfg, example_data, half)

    def kill(step: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        trainer.run(on_checkpoint=kill)
    assert not (half / "model.yaml").exists()
    result = run_training(cfg, example_data, half, resume=True)
    assert result.steps == 12
    a, b = _weights(straight), _weights(half)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_existing_model_is_not_overwritten(tmp_path, tiny_model, example_data):
    with pytest.raises(InputError, match="already holds a model"):
        run_training(load_config(TINY), example_data, tiny_model)


def test_3d_tiny_trains(tmp_path, example_data):
    out = tmp_path / "tiny3d"
    result = run_training(load_config(TINY3D), example_data, out)
    assert result.steps == 10 and np.isfinite(result.final_loss)
    meta = yaml.safe_load((out / "model.yaml").read_text())
    assert meta["config"]["data"]["spatial_dims"] == 3


def test_max_timestep_limits_the_training_noise_and_the_scoring_levels(tmp_path, example_data,
                                                                       tiny_model):
    from medidiff.api import AnomalyDetector
    from medidiff.errors import ConfigError
    from medidiff.models.folder import load_model
    from medidiff.tasks.anomaly import ScoreSettings

    cfg = load_config(TINY, ["train.steps=3", "train.max_timestep=40", "train.sample_every=3",
                             "anomaly.noise_levels=[30]"])
    trainer = Trainer(cfg, example_data, tmp_path / "limited")
    seen = []
    trainer.net.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["timesteps"].clone()), with_kwargs=True)
    trainer.run()
    drawn = torch.cat(seen[:3])  # the training steps (the preview runs afterwards)
    assert drawn.max() < 40 and drawn.numel() == 3 * cfg.train.batch_size

    model = load_model(tiny_model, task="anomaly")
    model.config.train.max_timestep = 200
    with pytest.raises(ConfigError, match="noise_level"):
        AnomalyDetector(model, ScoreSettings.from_config(model.config.anomaly, noise_levels=(250,)),
                        torch.device("cpu"))
    AnomalyDetector(model, ScoreSettings.from_config(model.config.anomaly, noise_levels=(150,)),
                    torch.device("cpu"))


def test_a_non_finite_loss_stops_training_before_the_weights_change(tmp_path, example_data):
    trainer = Trainer(load_config(TINY, ["train.steps=2"]), example_data, tmp_path / "nan")
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

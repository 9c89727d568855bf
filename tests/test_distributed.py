"""Beyond one process: torchrun/DDP training on CPU (gloo), sharded inference, fail-fast tracking.

Run as a script, this file is the torchrun worker of the DDP test: it runs the medidiff CLI
unchanged and records, per rank, the batches it drew, whether it wrote a checkpoint or a model
folder, its losses, and a hash of its final weights (the live network and the EMA copy).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, TINY, free_port, run_cli

PROBE = "MEDIDIFF_TEST_DDP_PROBE"  # the folder each worker writes rank{R}.json into
SHORT = ["train.checkpoint_every=3", "train.log_every=3", "train.sample_every=1000"]


def _sets(*overrides: str) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


# -- the torchrun worker ------------------------------------------------------------------------


def _digest(value, hasher=None) -> str:
    """A hash of a (nested) state dict: every tensor's bytes and every plain value, in key order."""
    import torch

    hasher = hasher or hashlib.sha256()
    if isinstance(value, dict):
        for key in sorted(value, key=str):
            hasher.update(str(key).encode())
            _digest(value[key], hasher)
    elif isinstance(value, torch.Tensor):
        hasher.update(value.detach().cpu().contiguous().numpy().tobytes())
    else:
        hasher.update(repr(value).encode())
    return hasher.hexdigest()


def _worker(argv: list[str]) -> int:
    from medidiff.workflows.cli import main

    from medidiff.training import trainer as train

    record = {"batches": [], "writes": 0}
    draw = train.draw_batch

    def noted_draw(dataset, batch_size, generator):
        batch = draw(dataset, batch_size, generator)
        record["batches"].append(hashlib.sha1(batch["image"].numpy().tobytes()).hexdigest())
        return batch

    def counted(original):
        def call(*args, **kwargs):
            record["writes"] += 1
            return original(*args, **kwargs)
        return call

    run = train.Trainer.run

    def hashed_run(self, *args, **kwargs):
        result = run(self, *args, **kwargs)
        record.update(step=self.step, losses=self.losses,
                      model=_digest(self.unwrapped().state_dict()),
                      ema=_digest(self.ema.state_dict()))
        return result

    train.draw_batch = noted_draw
    train.save_checkpoint = counted(train.save_checkpoint)
    train.save_model_folder = counted(train.save_model_folder)
    train.Trainer.run = hashed_run
    code = main(argv)
    Path(os.environ[PROBE], f"rank{os.environ['RANK']}.json").write_text(json.dumps(record))
    return code


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))


# -- DDP training -------------------------------------------------------------------------------


def _torchrun(tmp_path: Path, probe: str, uri: str, *args: str) -> list[dict]:
    """`torchrun --standalone --nproc_per_node=2` this file (the worker); returns both records."""
    folder = tmp_path / probe
    folder.mkdir()
    env = {**os.environ, PROBE: str(folder), "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1",
           "MEDIDIFF_PROGRESS": "0", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", __file__, *args]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((folder / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def _check_ranks(ranks: list[dict], steps: int) -> None:
    first, second = ranks
    assert first["step"] == second["step"] == steps
    assert first["model"] == second["model"], "the ranks' weights differ after training"
    assert first["ema"] == second["ema"], "the ranks' EMA weights differ after training"
    assert len(first["batches"]) == len(second["batches"]) > 0
    assert not set(first["batches"]) & set(second["batches"]), "the ranks drew the same batches"
    assert first["writes"] > 0 and second["writes"] == 0, "only rank 0 may write files"


def _window_loss(losses: list[float], last: int = 2) -> float:
    return sum(losses[-last:]) / last


def test_two_cpu_processes_train_like_one_with_the_same_global_batch(tmp_path, example_data):
    """torchrun + gloo: identical weights on both ranks, own batches per rank, rank 0 alone
    writes and logs one MLflow run (also across --resume), a loss trend like one process with
    the same global batch, and a checkpoint of world size 2 refused by a single process."""
    from mlflow import MlflowClient

    from medidiff.config import load_config
    from medidiff.tasks.registry import get_task
    from medidiff.training.trainer import run_training

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "ddp"
    train = ["train", str(TINY), "--data", str(example_data), "--out", str(out),
             "--no-calibrate", *_sets(*SHORT)]
    _check_ranks(_torchrun(tmp_path, "first", uri, *train, *_sets("train.steps=6")), 6)
    ranks = _torchrun(tmp_path, "resumed", uri, *train, *_sets("train.steps=12"), "--resume")
    _check_ranks(ranks, 12)
    assert (out / "model.yaml").is_file() and (out / "checkpoints" / "last.pt").is_file()

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("medidiff")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["resumed"] == "True"
    assert run.data.params["world_size"] == "2"
    assert run.data.params["effective_batch_size"] == "16"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == [3, 6, 9, 12]

    # One process, batch 16 (the same global batch), the same 6 + resume to 12 steps.
    single = tmp_path / "single"
    for steps, resume in ((6, False), (12, True)):
        cfg = load_config(TINY, [*SHORT, f"train.steps={steps}", "train.batch_size=16"])
        result = run_training(cfg, example_data, single, task=get_task(cfg.task), resume=resume)
    # Each rank's window loss is on its own 8 images; their mean is the global batch's loss.
    two = [(a + b) / 2 for a, b in zip(ranks[0]["losses"][-2:], ranks[1]["losses"][-2:],
                                       strict=True)]
    one = result.losses
    print(f"loss per window of 3 steps: 2 processes (rank mean) {two}, 1 process {one}")
    assert _window_loss(two) < 0.8 * ranks[0]["losses"][0] and _window_loss(one) < 0.8 * one[0]
    assert abs(_window_loss(two) - _window_loss(one)) < 0.35 * _window_loss(one), (two, one)

    code, _, err = run_cli(*train, *_sets("train.steps=14"), "--resume", "--no-tracking")
    assert code == 2 and err.strip().count("\n") == 0, err
    assert "world size 2" in err and "last.pt" in err


# -- sharded inference --------------------------------------------------------------------------


def _outputs(folder: Path) -> dict[str, object]:
    """Every output file: NIfTI by voxels, PNG by pixels, CSV by text (lock files left out)."""
    import nibabel as nib
    import numpy as np
    from PIL import Image

    found = {}
    for path in sorted(folder.iterdir()):
        if path.name.endswith(".nii.gz"):
            found[path.name] = np.asarray(nib.load(path).dataobj).tobytes()
        elif path.suffix == ".png":
            found[path.name] = np.asarray(Image.open(path)).tobytes()
        elif path.suffix == ".csv":
            found[path.name] = path.read_text()
        else:
            found[path.name] = path.read_bytes()
    return found


def test_two_concurrent_parts_write_what_one_process_writes(tiny_model, example_data, tmp_path):
    """4 scans: `--part-id 0/1 --num-parts 2` in two processes at once (sharing scores.csv
    under its lock) write exactly the files, voxels and table of one process."""
    scans = sorted(map(str, (example_data / "test" / "images").glob("*.nii.gz")))
    scans += sorted(map(str, (example_data / "val" / "images").glob("*.nii.gz")))[:1]
    scans += sorted(map(str, (example_data / "train" / "images").glob("*.nii.gz")))[:1]
    assert len(scans) == 4
    score = ["anomaly", "score", "--model", str(tiny_model), "--no-tracking"]
    code, _, err = run_cli(*score, "--out", str(tmp_path / "one"), *scans)
    assert code == 0, err
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEDIDIFF_PROGRESS": "0"}
    parts = [subprocess.Popen([sys.executable, "-m", "medidiff", *score, "--out",
                               str(tmp_path / "two"), "--part-id", str(part), "--num-parts", "2",
                               *scans], env=env, stderr=subprocess.PIPE, text=True)
             for part in (0, 1)]
    for part in parts:
        _, err = part.communicate(timeout=600)
        assert part.returncode == 0, err
        assert "2 scored" in err
    one, two = _outputs(tmp_path / "one"), _outputs(tmp_path / "two")
    # 3 files per scan, scores.csv and score_settings.json (the same for any split)
    assert sorted(one) == sorted(two) and len(one) == 4 * 3 + 2
    assert one == two
    assert one["scores.csv"].count("\n") == 5


@pytest.mark.parametrize("command", [["anomaly", "score"], ["denoise"], ["super-resolve"],
                                     ["segment"]])
@pytest.mark.parametrize("part_id", ["2", "-1"])
def test_part_id_outside_the_parts_is_one_line(command, part_id, tmp_path):
    if run_cli(*command, "--help")[0] != 0:
        pytest.skip(f"`medidiff {' '.join(command)}` is not in this build")
    out = tmp_path / "out"
    code, _, err = run_cli(*command, "--model", str(tmp_path / "no-model"), "--out", str(out),
                           "--part-id", part_id, "--num-parts", "2", "scan.nii.gz")
    assert code == 2 and err.strip().count("\n") == 0, err
    assert f"--part-id must be in [0, 2), got {part_id}" in err
    assert not out.exists()  # refused before a model is loaded or a folder made


# -- an MLflow server that cannot be reached ----------------------------------------------------


UNREACHABLE = {
    "nothing-listens": lambda: f"http://127.0.0.1:{free_port()}",
    "scheme-typo": lambda: "htp://127.0.0.1:5000",
    "unknown-host": lambda: "http://mlflow-sever.invalid:5000",
    "database-down": lambda: f"postgresql://medidiff@127.0.0.1:{free_port()}/mlflow",
}


@pytest.mark.parametrize("case", sorted(UNREACHABLE))
def test_unreachable_tracking_fails_train_and_score_at_once(case, tiny_model, example_data,
                                                            tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", UNREACHABLE[case]())
    commands = {
        "train": ["train", str(TINY), "--data", str(example_data), "--out", str(tmp_path / "m")],
        "score": ["anomaly", "score", "--model", str(tiny_model), "--out", str(tmp_path / "s"),
                  *map(str, (example_data / "test" / "images").glob("*.nii.gz"))],
    }
    for name, args in commands.items():
        started = time.monotonic()
        code, _, err = run_cli(*args)
        assert time.monotonic() - started < 10, f"{name} took too long to fail"
        assert code == 2 and err.strip().count("\n") == 0, (name, err)
        assert "--no-tracking" in err and "Traceback" not in err, (name, err)
    assert not (tmp_path / "m").exists() and not (tmp_path / "s").exists()

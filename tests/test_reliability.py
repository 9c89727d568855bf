"""Faults with real processes: kill -9 and SIGTERM during training and scoring, resume, two
processes writing into one folder, hostile paths, read-only inputs, untrusted model folders.

Every kill lands at a boundary the process has reached, seen from outside (a checkpoint file
replaced, a run record written, a case's row in the results table), never after a random sleep.
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from medidiff.inference.cases import run_cases
from tests.helpers import MEDIDIFF, TINY, head, mr_series, nifti_bytes, random_model, run_cli

OUTPUTS = ("_anomaly.nii.gz", "_anomaly_mask.nii.gz", ".png")
FAST = ("--draws", "1", "--noise-level", "150")  # a quarter of the tiny model's work per scan


# -- processes -----------------------------------------------------------------------------------


def start(args: list, folder: Path, name: str) -> subprocess.Popen:
    """Start a process with its stderr in `folder/name.err` (no pipe to fill up)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEDIDIFF_PROGRESS": "0"}
    err = open(folder / f"{name}.err", "wb")  # noqa: SIM115 - closed by finish()
    proc = subprocess.Popen([str(a) for a in args], stdout=subprocess.DEVNULL, stderr=err,
                            env=env, cwd=folder)
    proc.err_path, proc.err_file = folder / f"{name}.err", err
    return proc


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    finally:
        proc.err_file.close()
    return code, proc.err_path.read_text(errors="replace")


def wait_for(condition, proc: subprocess.Popen, timeout: float = 300, what: str = "") -> None:
    """Poll `condition()` until true; fail if the process ends first or time runs out."""
    ends = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"process ended ({proc.returncode}) before {what}:\n"
                                 f"{proc.err_path.read_text(errors='replace')}")
        if time.monotonic() > ends:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def visible_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


# -- training: kill -9, SIGTERM, resume ----------------------------------------------------------

STEPS = 20


def checkpoint_steps(path: Path):
    """A function giving the step of the checkpoint at `path` (0 before the first), which
    reads the file again only when it was replaced."""
    from medidiff.errors import ModelFolderError
    from medidiff.models.checkpoint import load_checkpoint

    seen = {"mtime": None, "step": 0}

    def step() -> int:
        try:
            mtime = path.stat().st_mtime_ns
            if mtime != seen["mtime"]:
                seen["mtime"], seen["step"] = mtime, int(load_checkpoint(path)["step"])
        except (FileNotFoundError, ModelFolderError):
            pass
        return seen["step"]

    return step


def assert_model_folder_sound(out: Path) -> int:
    """Every file under its real name is complete: the checkpoint loads, config.yaml parses,
    the model folder loads or is absent. Returns the checkpoint's step."""
    from medidiff.models.checkpoint import load_checkpoint
    from medidiff.tasks.registry import load_model

    state = load_checkpoint(out / "checkpoints" / "last.pt")  # raises if torn
    assert set(state) >= {"step", "model", "ema", "optimizer", "generator", "run_id"}
    assert yaml.safe_load((out / "config.yaml").read_text())["task"] == "anomaly"
    if (out / "model.yaml").exists():
        assert load_model(out).info["steps"] == int(state["step"])
    return int(state["step"])


def test_training_killed_then_terminated_resumes_to_the_end_in_one_run(example_data, tmp_path):
    from medidiff.tasks.registry import load_model
    from medidiff.tracking import search_runs

    out, uri = tmp_path / "model", f"sqlite:///{tmp_path}/mlflow.db"
    checkpoint = out / "checkpoints" / "last.pt"
    args = [MEDIDIFF, "train", TINY, "--data", example_data, "--out", out, "--no-calibrate",
            "--tracking-uri", uri, "--experiment", "kills",
            "--set", f"train.steps={STEPS}", "--set", "train.checkpoint_every=2",
            "--set", "train.batch_size=2", "--set", "train.sample_every=1000",
            "--set", "train.log_every=1"]

    # 1. kill -9 as soon as the checkpoint of step 4 is there
    proc = start(args, tmp_path, "first")
    step = checkpoint_steps(checkpoint)
    wait_for(lambda: step() >= 4, proc, what="the checkpoint of step 4")
    proc.kill()
    finish(proc)
    killed_at = assert_model_folder_sound(out)
    assert 4 <= killed_at < STEPS, f"killed after the checkpoint of step {killed_at}"

    # 2. resume; SIGTERM as soon as the resumed run has written its first checkpoint
    proc = start([*args, "--resume"], tmp_path, "second")
    step = checkpoint_steps(checkpoint)
    wait_for(lambda: step() > killed_at, proc, what="a checkpoint of the resumed run")
    signalled = time.time_ns()
    proc.send_signal(signal.SIGTERM)
    code, err = finish(proc, timeout=120)
    assert code == 130, err
    assert "Traceback" not in err and "checkpoint saved" in err, err
    assert checkpoint.stat().st_mtime_ns >= signalled - 20_000_000, "no checkpoint on SIGTERM"
    terminated_at = assert_model_folder_sound(out)
    assert killed_at < terminated_at < STEPS, (killed_at, terminated_at)

    # 3. resume to the end (in this process: one start-up less)
    old = signal.getsignal(signal.SIGTERM)
    try:
        code, _, err = run_cli(*map(str, args[1:]), "--resume")
    finally:
        signal.signal(signal.SIGTERM, old)
    assert code == 0, err
    assert load_model(out).info["steps"] == STEPS
    assert assert_model_folder_sound(out) == STEPS
    runs = [r for r in search_runs("kills", uri=uri) if r["name"].startswith("train-")]
    assert len(runs) == 1, [(r["name"], r["status"]) for r in runs]
    assert runs[0]["status"] == "FINISHED" and runs[0]["params"]["train.steps"] == str(STEPS)
    assert "final_loss" in runs[0]["metrics"]


def test_training_killed_before_its_first_checkpoint_resumes_in_the_same_run(example_data,
                                                                             tmp_path):
    """kill -9 once the MLflow run is open but before any checkpoint: `--resume` trains from
    step 0 in that same run, and no run is left RUNNING."""
    import json

    from medidiff.tracking import search_runs

    out, uri = tmp_path / "model", f"sqlite:///{tmp_path}/mlflow.db"
    args = [MEDIDIFF, "train", TINY, "--data", example_data, "--out", out, "--no-calibrate",
            "--tracking-uri", uri, "--experiment", "early",
            "--set", "train.steps=6", "--set", "train.checkpoint_every=1000",
            "--set", "train.batch_size=2", "--set", "train.sample_every=1000"]
    record = out / "checkpoints" / "run.json"
    proc = start(args, tmp_path, "early")
    wait_for(record.exists, proc, what="the run record")
    proc.kill()
    finish(proc)
    assert not (out / "checkpoints" / "last.pt").exists(), "the kill came after a checkpoint"
    run_id = json.loads(record.read_text())["mlflow_run_id"]
    assert [(r["run_id"], r["status"]) for r in search_runs("early", uri=uri)] == [
        (run_id, "RUNNING")]

    old = signal.getsignal(signal.SIGTERM)
    try:
        code, _, err = run_cli(*map(str, args[1:]), "--resume")
    finally:
        signal.signal(signal.SIGTERM, old)
    assert code == 0, err
    assert [(r["run_id"], r["status"]) for r in search_runs("early", uri=uri)] == [
        (run_id, "FINISHED")]
    assert yaml.safe_load((out / "model.yaml").read_text())["info"]["mlflow_run_id"] == run_id
    assert assert_model_folder_sound(out) == 6


def test_training_goes_on_when_tracking_fails_then_resume_closes_the_run(example_data, tmp_path,
                                                                         monkeypatch, caplog):
    """The tracking store goes away at the first checkpoint: training finishes, checkpoints and
    the model folder are written, one warning; `--resume` later closes the same run."""
    from mlflow import MlflowClient

    from medidiff.config import load_config
    from medidiff.tasks.registry import get_task, load_model
    from medidiff.tracking import Tracker, search_runs
    from medidiff.training.trainer import Trainer, run_training

    cfg = load_config(TINY, ["train.steps=6", "train.checkpoint_every=2", "train.batch_size=2",
                             "train.sample_every=1000", "train.log_every=1"])
    uri, out, saved = f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "model", []
    real_save = Trainer.save

    def gone(*args, **kwargs):
        raise ConnectionError("connection refused")

    def save_then_lose_tracking(self):
        real_save(self)
        saved.append(self.step)
        for name in ("log_batch", "log_image", "log_artifact", "set_terminated", "update_run"):
            monkeypatch.setattr(MlflowClient, name, gone)

    monkeypatch.setattr(Trainer, "save", save_then_lose_tracking)
    result = run_training(cfg, example_data, out, task=get_task(cfg.task),
                          tracker=Tracker("outage", uri=uri, retry_interval=0))
    monkeypatch.undo()  # the tracking store is back
    assert result.steps == 6 and saved == [2, 4, 6]
    assert load_model(out).info["steps"] == 6
    lost = [r for r in caplog.records if r.name == "medidiff.tracking"
            and "failed to" in r.getMessage()]
    assert len(lost) == 1, [r.getMessage() for r in lost]
    assert search_runs("outage", uri=uri)[0]["status"] == "RUNNING"  # never told it ended

    run_training(cfg, example_data, out, task=get_task(cfg.task), resume=True,
                 tracker=Tracker("outage", uri=uri))
    runs = search_runs("outage", uri=uri)
    assert [r["status"] for r in runs] == ["FINISHED"]


# -- scoring: kill -9 halfway, rerun finishes the rest -------------------------------------------


def _scans(example_data: Path, folder: Path, count: int = 4) -> list[Path]:
    """Copies of example scans (test, validation and training images) under distinct names."""
    folder.mkdir()
    found = sorted(example_data.glob("*/images/*.nii.gz"))[:count]
    assert len(found) == count
    return [Path(shutil.copy(scan, folder / f"case{i}.nii.gz")) for i, scan in enumerate(found)]


def _rows(out: Path) -> list[dict]:
    with (out / "scores.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def assert_outputs_complete(out: Path) -> set[str]:
    """Every visible output is whole; returns the cases with all outputs and a scores.csv row."""
    for path in visible_files(out):
        if path.name.endswith(".nii.gz"):
            data = np.asarray(nib.load(path).dataobj)  # a torn gzip raises here
            assert data.size and np.all(np.isfinite(data)), path.name
        elif path.suffix == ".png":
            with Image.open(path) as image:
                image.load()
    rows = _rows(out) if (out / "scores.csv").exists() else []
    assert len({r["case"] for r in rows}) == len(rows), "duplicate rows in scores.csv"
    complete = {r["case"] for r in rows}
    for case in complete:
        assert all((out / f"{case}{s}").is_file() for s in OUTPUTS), case
    return complete


def _listed(out: Path) -> set[str]:
    """The cases in scores.csv (replaced atomically, so never read half-written)."""
    try:
        return {row["case"] for row in _rows(out)}
    except FileNotFoundError:
        return set()


def test_scoring_killed_halfway_then_rerun_finishes_only_the_rest(tiny_model, example_data,
                                                                  tmp_path):
    """kill -9 as soon as the first case is finished (its row is in scores.csv): the rerun
    skips what was finished, redoes a case caught halfway, and scores the rest."""
    scans = _scans(example_data, tmp_path / "in", count=5)
    out = tmp_path / "out"
    args = [MEDIDIFF, "anomaly", "score", "--model", tiny_model, "--out", out, "--no-tracking",
            *FAST, tmp_path / "in"]
    proc = start(args, tmp_path, "score")
    wait_for(lambda: "case0" in _listed(out), proc, what="the first case's row in scores.csv")
    proc.kill()
    _, killed_err = finish(proc)
    context = (f"files {[p.name for p in out.iterdir()]}; "
               f"the killed process said: {killed_err[-1500:]}")
    finished = assert_outputs_complete(out)
    assert len(finished) < len(scans), f"the kill came too late to test anything; {context}"
    stamps = {p: p.stat().st_mtime_ns for p in visible_files(out)
              if p.name.split("_")[0].removesuffix(".png") in finished}

    code, _, err = run_cli(*map(str, args[1:]))
    context += f"; the rerun said: {err}"
    assert code == 0, context
    assert f"{len(finished)} skipped" in err, context
    assert f"{len(scans) - len(finished)} scored" in err, context
    assert assert_outputs_complete(out) == {f"case{i}" for i in range(len(scans))}, context
    assert all(p.stat().st_mtime_ns == stamp for p, stamp in stamps.items()), context


def test_case_whose_row_was_not_written_is_redone(tmp_path):
    """A kill between a case's last output and its row: the rerun redoes it (not 'skipped')."""
    out = tmp_path / "out"
    scan = tmp_path / "scan.nii.gz"
    scan.write_bytes(nifti_bytes(head()))

    def process(path, case):
        for suffix in OUTPUTS:
            (out / f"{case}{suffix}").write_text("data")
        return {"case": case, "score": "1"}

    outputs = lambda case: [f"{case}{s}" for s in OUTPUTS]  # noqa: E731
    first = run_cases([scan], out, outputs, process, table="scores.csv")
    assert [o.status for o in first] == ["done"] and len(_rows(out)) == 1
    (out / "scores.csv").write_text("case,score\n")  # as a kill before the row leaves it
    again = run_cases([scan], out, outputs, process, table="scores.csv")
    assert [o.status for o in again] == ["done"] and [r["case"] for r in _rows(out)] == ["scan"]
    skipped = run_cases([scan], out, outputs, process, table="scores.csv")
    assert [o.status for o in skipped] == ["skipped"]


def test_interrupted_case_leaves_no_outputs_and_no_row(tmp_path):
    out = tmp_path / "out"
    scan = tmp_path / "scan.nii.gz"
    scan.write_bytes(nifti_bytes(head()))

    def process(path, case):
        (out / f"{case}_anomaly.nii.gz").write_text("half of the outputs")
        raise KeyboardInterrupt  # SIGTERM, as turned into KeyboardInterrupt by the CLI

    with pytest.raises(KeyboardInterrupt):
        run_cases([scan], out, lambda c: [f"{c}{s}" for s in OUTPUTS], process,
                  table="scores.csv")
    assert visible_files(out) == []


# -- concurrency ---------------------------------------------------------------------------------


def test_two_processes_scoring_the_same_inputs_into_one_folder(tiny_model, example_data,
                                                                tmp_path):
    scans = _scans(example_data, tmp_path / "in", count=3)
    out = tmp_path / "out"
    args = [MEDIDIFF, "anomaly", "score", "--model", tiny_model, "--out", out, "--no-tracking",
            *FAST, *scans]
    procs = [start(args, tmp_path, f"p{i}") for i in range(2)]
    results = [finish(proc, timeout=600) for proc in procs]
    for code, err in results:
        assert code == 0 and "Traceback" not in err, err
    assert assert_outputs_complete(out) == {f"case{i}" for i in range(3)}
    assert len(_rows(out)) == 3
    lines = (out / "scores.csv").read_text().splitlines()
    assert lines[0].startswith("case,") and len(lines) == 4
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


# -- paths ---------------------------------------------------------------------------------------

_WATCHED: list | None = None


def _audit(event: str, args: tuple) -> None:
    """Record every write this process attempts while `_WATCHED` is a list."""
    if _WATCHED is None:
        return
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        mode, flags = args[1], args[2]
        writes = (mode is not None and any(c in str(mode) for c in "wax+")) or (
            mode is None and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND))
        if writes:
            _WATCHED.append((event, os.fsdecode(args[0])))
    elif event in ("os.rename", "os.remove", "os.mkdir", "os.rmdir", "os.symlink",
                   "os.chmod", "os.truncate", "os.link"):
        for arg in args[:2]:
            if isinstance(arg, (str, bytes, os.PathLike)):
                _WATCHED.append((event, os.fsdecode(arg)))


sys.addaudithook(_audit)


def writes_during(*args: str) -> tuple[int, str, list[str]]:
    """Run the CLI in this process; also return the absolute paths it wrote to."""
    global _WATCHED
    _WATCHED = []
    try:
        code, _, err = run_cli(*args)
    finally:
        written, _WATCHED = _WATCHED, None
    return code, err, sorted({os.path.realpath(path) for _, path in written})


ODD_NAMES = ["a b;rm -rf*.nii.gz", "tab\there.nii.gz", "new\nline.nii.gz", "ünï çødé.nii.gz",
             "-dash.nii.gz", "..nii.gz", "esc\x1b[31m.nii.gz", "$(touch pwned).nii.gz"]


def test_odd_input_names_never_write_outside_out(tmp_path, tmp_path_factory):
    model = random_model(tmp_path_factory.mktemp("model") / "m", "anomaly")
    inputs = tmp_path / "in" / "sub"
    inputs.mkdir(parents=True)
    data = nifti_bytes(head())
    for name in ODD_NAMES:
        (inputs / name).write_bytes(data)
    given = [str(inputs / ".." / "sub" / name) for name in ODD_NAMES]  # '..' in every path
    (inputs / "victim.nii.gz").write_bytes(data)
    outside = tmp_path / "outside.txt"
    outside.write_text("must stay")
    out = tmp_path / "out"
    out.mkdir()
    (out / "victim_anomaly.nii.gz").symlink_to(outside)  # planted to redirect a write
    code, err, written = writes_during("anomaly", "score", "--model", str(model), "--out",
                                       str(out), "--no-tracking", *given,
                                       str(inputs / "victim.nii.gz"))
    assert code == 2 and "Traceback" not in err
    assert "victim_anomaly.nii.gz: would be written outside the output folder" in err
    assert outside.read_text() == "must stay"
    real_out = os.path.realpath(out)
    exports = os.path.realpath(model / "exports")  # the exported network's cache, by design
    assert written and all(Path(p).is_relative_to(real_out) or Path(p).is_relative_to(exports)
                           for p in written), written
    assert any(Path(p).is_relative_to(real_out) for p in written)
    cases = sorted(p.name for p in out.glob("*_anomaly.nii.gz") if not p.is_symlink())
    assert len(cases) == len(ODD_NAMES)
    assert all(name.isprintable() and "/" not in name for name in cases)
    for line in err.splitlines():  # a newline in a name never splits a message
        assert line.startswith(("warning:", "error:", "failed:", "0 ", "1 ", "8 ")), line


def test_read_only_input_folder_is_scored_without_writing_to_it(tmp_path, tmp_path_factory):
    model = random_model(tmp_path_factory.mktemp("model") / "m", "anomaly")
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "scan.nii.gz").write_bytes(nifti_bytes(head()))
    mr_series(inputs / "series", 4)
    before = {p: p.stat().st_mtime_ns for p in inputs.rglob("*")}
    modes = [(p, p.stat().st_mode) for p in [inputs, *inputs.rglob("*")]]
    for path, mode in modes:
        path.chmod(mode & ~0o222)
    try:
        code, err, written = writes_during("anomaly", "score", "--model", str(model), "--out",
                                           str(tmp_path / "out"), "--no-tracking", str(inputs))
    finally:
        for path, mode in modes:
            path.chmod(mode)
    assert code == 0, err
    assert not [p for p in written if Path(p).is_relative_to(os.path.realpath(inputs))]
    assert {p: p.stat().st_mtime_ns for p in inputs.rglob("*")} == before
    assert {p.name for p in (tmp_path / "out").glob("*_anomaly.nii.gz")} == {
        "scan_anomaly.nii.gz", "series_anomaly.nii.gz"}


# -- untrusted model folders ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def trusted(tmp_path_factory) -> Path:
    return random_model(tmp_path_factory.mktemp("trusted") / "model", "anomaly")


@pytest.fixture(scope="module")
def scan(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("scan") / "scan.nii.gz"
    path.write_bytes(nifti_bytes(head()))
    return path


def _copy_model(trusted: Path, folder: Path) -> Path:
    return Path(shutil.copytree(trusted, folder))


def _edit(folder: Path, change) -> Path:
    meta = yaml.safe_load((folder / "model.yaml").read_text())
    change(meta)
    (folder / "model.yaml").write_text(yaml.safe_dump(meta))
    return folder


def score_with(model: Path, scan: Path, out: Path) -> tuple[int, str]:
    code, _, err = run_cli("anomaly", "score", "--model", str(model), "--out", str(out),
                           "--no-tracking", str(scan))
    return code, err


def assert_refused_in_one_line(code: int, err: str, *words: str) -> None:
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("medidiff: error: "), err
    for word in words:
        assert word in err, err


@pytest.mark.parametrize("where", ["top", "config", "weights"])
def test_python_object_tag_in_model_yaml_runs_nothing(trusted, scan, tmp_path, where):
    model = _copy_model(trusted, tmp_path / "model")
    marker = tmp_path / "pwned"
    tag = f'!!python/object/apply:os.system ["touch {marker}"]'
    text = (model / "model.yaml").read_text()
    text = {"top": f"evil: {tag}\n{text}",
            "config": text.replace("config:\n", f"config:\n  evil: {tag}\n", 1),
            "weights": text.replace("  file: weights.safetensors", f"  file: {tag}", 1)}[where]
    (model / "model.yaml").write_text(text)
    code, err = score_with(model, scan, tmp_path / "out")
    assert_refused_in_one_line(code, err, "model.yaml", "not valid YAML")
    assert not marker.exists()


def _set(key: str, value):
    def change(meta):
        node = meta
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    return change


@pytest.mark.parametrize("key, value, words", [
    ("config.model.network", "torch.nn.Module", ["unknown key 'model.network'"]),
    ("config.model.class", "os.system", ["unknown key 'model.class'"]),
    ("weights.file", "../x.safetensors", ["leaves the model folder"]),
    ("weights.file", "/etc/passwd", ["leaves the model folder"]),
    ("weights.sha256", None, ["weights.sha256"]),
    ("calibration", {"entries": "not a list"}, ["calibration.entries"]),
    ("config.model.channels", [4096, 4096], ["do not fit the network"]),
    ("config.data.size", [100000, 100000], ["data.size", "voxels"]),
    ("config.anomaly.draws", 10**9, ["anomaly.draws"]),
    ("calibration", {"entries": [{"settings": {}, "residual_stats": "../../etc/passwd"}]},
     ["calibration.entries.0.residual_stats"]),
])
def test_model_yaml_that_points_or_asks_elsewhere_is_refused(trusted, scan, tmp_path, key,
                                                              value, words):
    model = _copy_model(trusted, tmp_path / "model")
    shutil.copy(model / "weights.safetensors", tmp_path / "x.safetensors")  # bait outside
    if value is None:
        _edit(model, lambda meta: meta["weights"].pop("sha256"))
    else:
        _edit(model, _set(key, value))
    started = time.monotonic()
    code, err = score_with(model, scan, tmp_path / "out")
    assert_refused_in_one_line(code, err, *words)
    assert time.monotonic() - started < 30  # a 4096-channel network is never built
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_weights_symlinked_outside_the_folder_are_refused(trusted, scan, tmp_path):
    model = _copy_model(trusted, tmp_path / "model")
    shutil.move(model / "weights.safetensors", tmp_path / "elsewhere.safetensors")
    (model / "weights.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    code, err = score_with(model, scan, tmp_path / "out")
    assert_refused_in_one_line(code, err, "leaves the model folder")


@pytest.mark.parametrize("damage", ["swapped", "truncated", "pickle"])
def test_swapped_truncated_or_pickled_weights_fail_the_hash(trusted, scan, tmp_path, damage):
    model = _copy_model(trusted, tmp_path / "model")
    weights = model / "weights.safetensors"
    marker = tmp_path / "pwned"
    if damage == "swapped":  # another network of the same shapes
        other = random_model(tmp_path / "other", "anomaly")
        shutil.copy(other / "weights.safetensors", weights)
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-1000])
    else:
        weights.write_bytes(_malicious_pickle(marker))
    code, err = score_with(model, scan, tmp_path / "out")
    assert_refused_in_one_line(code, err, "do not match the hash")
    assert not marker.exists()


def _malicious_pickle(marker: Path) -> bytes:
    import pickle

    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    return pickle.dumps({"weight": Boom()})


def test_pickled_weights_with_a_matching_hash_are_not_unpickled(trusted, scan, tmp_path):
    """Whoever can write model.yaml can record the pickle's own hash: still only data is read."""
    from medidiff.models.checkpoint import sha256_file

    model = _copy_model(trusted, tmp_path / "model")
    marker = tmp_path / "pwned"
    (model / "weights.safetensors").write_bytes(_malicious_pickle(marker))
    _edit(model, _set("weights.sha256", sha256_file(model / "weights.safetensors")))
    code, err = score_with(model, scan, tmp_path / "out")
    assert_refused_in_one_line(code, err, "not a readable safetensors file")
    assert not marker.exists()


def test_malicious_checkpoint_on_resume_is_refused_and_never_runs(example_data, tmp_path):
    out = tmp_path / "model"
    (out / "checkpoints").mkdir(parents=True)
    marker = tmp_path / "pwned"
    (out / "checkpoints" / "last.pt").write_bytes(_malicious_pickle(marker))
    code, _, err = run_cli("train", str(TINY), "--data", str(example_data), "--out", str(out),
                           "--resume", "--no-tracking")
    assert_refused_in_one_line(code, err, "not a safe checkpoint")
    assert not marker.exists()


_yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                 max_size=3),
    max_leaves=6,
)
_META_KEYS = ["weights", "weights.file", "weights.sha256", "calibration",
              "calibration.entries", "calibration.ood", "calibration.ood.median_map", "info",
              "task", "format", "config", "config.model", "config.data", "config.anomaly"]


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(_META_KEYS), value=_yaml_values)
def test_fuzzed_model_yaml_is_refused_in_one_line_or_works(trusted, scan, tmp_path_factory,
                                                           key, value):
    folder = tmp_path_factory.mktemp("fuzz")
    model = _copy_model(trusted, folder / "model")
    meta = yaml.safe_load((model / "model.yaml").read_text())
    meta.setdefault("calibration", {}).setdefault("ood", {})
    _set(key, value)(meta)
    (model / "model.yaml").write_text(yaml.safe_dump(meta))
    code, err = score_with(model, scan, folder / "out")
    assert "Traceback" not in err
    if code == 2:
        assert err.count("\n") == 1 and err.startswith("medidiff: error: "), err
    else:
        assert code == 0 and (folder / "out" / "scan_anomaly.nii.gz").is_file(), err


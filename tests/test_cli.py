"""The command-line contract: commands exist, bad input gives one line and exit status 2."""

import subprocess
import sys

import nibabel as nib
import numpy as np

from tests.helpers import TINY, run_cli

COMMANDS = ["data", "train", "anomaly", "runs", "demo"]


def test_help_lists_the_commands():
    code, out, _ = run_cli("--help")
    assert code == 0
    for name in COMMANDS:
        assert name in out
    code, out, _ = run_cli("anomaly", "--help")
    assert all(sub in out for sub in ("score", "calibrate", "evaluate"))


def test_python_dash_m_is_the_same_command():
    proc = subprocess.run([sys.executable, "-m", "medidiff", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "anomaly" in proc.stdout


def test_unknown_config_key_is_one_line(tmp_path):
    code, _, err = run_cli("train", str(TINY), "--data", str(tmp_path), "--out",
                           str(tmp_path / "m"), "--set", "train.stpes=3", "--dry-run")
    assert code == 2
    assert err.strip().count("\n") == 0 and "train.stpes" in err


def test_dry_run_prints_resolved_config(tmp_path):
    code, out, _ = run_cli("train", str(TINY), "--data", str(tmp_path), "--out",
                           str(tmp_path / "m"), "--set", "train.steps=7", "--dry-run")
    assert code == 0 and "steps: 7" in out
    assert not (tmp_path / "m").exists()


def test_missing_data_folder_is_one_line(tmp_path):
    code, _, err = run_cli("train", str(TINY), "--data", str(tmp_path / "absent"), "--out",
                           str(tmp_path / "m"), "--no-tracking")
    assert code == 2 and "absent" in err and "Traceback" not in err
    assert err.strip().count("\n") == 0


def test_empty_data_folder_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli("train", str(TINY), "--data", str(tmp_path / "empty"), "--out",
                           str(tmp_path / "m"), "--no-tracking")
    assert code == 2 and "empty" in err and err.strip().count("\n") == 0


def test_bad_inputs_to_score_are_one_line_each(tiny_model, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 3), np.float32), np.eye(4)), bad / "four_d.nii.gz")
    nan = np.ones((20, 20, 20), np.float32)
    nan[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), bad / "nan.nii.gz")
    nib.save(nib.Nifti1Image(np.ones(10, np.float32), np.eye(4)), bad / "one_d.nii.gz")
    code, _, err = run_cli("anomaly", "score", "--model", str(tiny_model), "--out",
                           str(tmp_path / "o"), "--no-tracking", str(bad),
                           str(tmp_path / "missing.nii.gz"))
    assert code == 2 and "Traceback" not in err
    for name in ("four_d.nii.gz", "nan.nii.gz", "one_d.nii.gz", "missing.nii.gz"):
        assert sum(name in line for line in err.splitlines() if line.startswith("failed:")) == 1
    assert not list((tmp_path / "o").glob("*.nii.gz"))


def test_example_data_cli_is_deterministic(tmp_path):
    for name in ("a", "b"):
        code, _, err = run_cli("data", "example", str(tmp_path / name), "--subjects", "4",
                               "--spacing", "6")
        assert code == 0, err
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b and files_a
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()

"""Every command on raw tiny cases: scans with skull, a head pose, native grids, DICOM series;
the model's preprocessing recorded and replayed, results back on each scan's own grid."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from tests.helpers import TINY, run_cli

REGISTER = ["--set", "preprocess.registration=affine", "--set", "preprocess.skull_strip=template",
            "--set", "preprocess.bias_correction=n4"]


@pytest.fixture(scope="module")
def raw_data(tmp_path_factory) -> Path:
    from medidiff.data.raw import make_raw_dataset

    out = tmp_path_factory.mktemp("raw") / "data"
    make_raw_dataset(out, seed=3, subjects=6)
    return out


@pytest.fixture(scope="module")
def raw_model(tmp_path_factory, raw_data) -> Path:
    model = tmp_path_factory.mktemp("raw-model") / "tiny"
    code, _, err = run_cli("train", str(TINY), "--data", str(raw_data), "--out", str(model),
                           "--no-tracking", "--set", "train.steps=6", *REGISTER)
    assert code == 0, err
    return model


def _grid(path: Path):
    from medidiff.io.read import load_image

    array, affine = load_image(path)
    return array.shape[1:], affine


def test_the_preprocessing_is_recorded_in_the_model_folder(raw_model):
    config = yaml.safe_load((raw_model / "model.yaml").read_text())["config"]
    assert config["preprocess"]["registration"] == "affine"
    assert config["preprocess"]["skull_strip"] == "template"


def test_raw_scans_are_scored_on_their_own_grids(raw_model, raw_data, tmp_path):
    listing = json.loads((raw_data / "dataset.json").read_text())
    tests = listing["test"]
    assert {e["format"] for e in listing["training"] + tests + listing["validation"]} >= {"dicom"}
    code, _, err = run_cli("anomaly", "score", "--model", str(raw_model), "--out",
                           str(tmp_path / "o"), "--no-tracking", "--draws", "1",
                           *[str(raw_data / e["image"]) for e in tests])
    assert code == 0, err
    rows = {r["case"]: r for r in csv.DictReader((tmp_path / "o" / "scores.csv").open())}
    for entry in tests:
        scan = raw_data / entry["image"]
        case = scan.name.removesuffix(".nii.gz")
        shape, affine = _grid(scan)
        amap = nib.load(tmp_path / "o" / f"{case}_anomaly.nii.gz")
        mask = nib.load(tmp_path / "o" / f"{case}_anomaly_mask.nii.gz")
        assert amap.shape == tuple(shape) and np.allclose(amap.affine, affine, atol=1e-4)
        assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
        assert (tmp_path / "o" / f"{case}_transform.tfm").is_file()
        assert float(rows[case]["qc_correlation"]) > 0.5
        # the map is zero outside the brain, and the brain is inside the scan's own head
        brain = np.asarray(nib.load(raw_data / entry["brain"]).dataobj) > 0
        outside = np.asarray(amap.dataobj)[~ndilate(brain)]
        assert np.count_nonzero(outside) < 0.01 * outside.size


def ndilate(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return ndimage.binary_dilation(mask, iterations=3)


def _ct_head() -> tuple[np.ndarray, np.ndarray]:
    """A CT-like head in Hounsfield units made from the T1 template: air -1000, bone (dark in
    T1 inside the head, outside the brain) 1000, scalp 40, brain 25-40 with grey matter brighter
    than white matter and CSF near 10, as CT shows them."""
    from medidiff.preprocess.template import load_template

    t1 = load_template("mni152-2009c-t1")
    ct = np.full(t1.head.shape, -1000.0, np.float32)
    head = t1.head_mask
    ct[head] = np.where(t1.head[head] < 0.25, 1000.0, 40.0)
    brain = t1.brain
    ct[brain] = 10.0 + 30.0 * np.clip(1.6 - 1.6 * t1.head[brain], 0, 1)  # WM ~25, GM ~35
    return ct, t1.affine


@pytest.mark.parametrize("kind", ["t2", "ct"])
def test_another_contrast_given_to_the_t1_model_is_an_ood_row_not_a_map(raw_model, tmp_path, kind):
    from medidiff.preprocess.template import load_template

    if kind == "t2":
        t2 = load_template("mni152-2009c-t2")
        volume, affine = t2.head * 1000, t2.affine
    else:
        volume, affine = _ct_head()
    scan = tmp_path / f"{kind}.nii.gz"
    nib.save(nib.Nifti1Image(volume.astype(np.int16), affine), scan)
    code, _, err = run_cli("anomaly", "score", "--model", str(raw_model), "--out",
                           str(tmp_path / "o"), "--no-tracking", "--draws", "1", str(scan))
    assert code == 2 and f"{kind}.nii.gz" in err and "registration failed" in err, err
    rows = list(csv.DictReader((tmp_path / "o" / "scores.csv").open()))
    assert rows[0]["case"] == kind and rows[0]["ood"] == "1"
    assert "correlation" in rows[0]["ood_reason"]
    assert not list((tmp_path / "o").glob(f"{kind}_*.nii.gz"))


def test_segment_and_denoise_commands_run_on_a_raw_dicom_case(raw_data, tmp_path):
    from medidiff.config import load_config
    from medidiff.models.folder import build_network, save_model_folder
    from medidiff.tasks.registry import get_task
    from tests.helpers import REPO

    listing = json.loads((raw_data / "dataset.json").read_text())
    dicom = next(e for e in listing["training"] + listing["test"] + listing["validation"]
                 if e["format"] == "dicom")
    scan = raw_data / dicom["image"]
    shape, affine = _grid(scan)
    for task, command, suffix in (("segment", "segment", "_seg.nii.gz"),
                                  ("denoise", "denoise", "_denoised.nii.gz")):
        overrides = [item for pair in zip(REGISTER[::2], REGISTER[1::2], strict=True)
                     for item in pair[1:]]
        cfg = load_config(REPO / "configs" / task / "cpu-tiny.yaml", overrides)
        model = save_model_folder(tmp_path / task, cfg,
                                  build_network(cfg, get_task(task)).state_dict(), {"steps": 0})
        extra = ["--samples", "1", "--steps", "1"]
        code, _, err = run_cli(command, "--model", str(model), "--out", str(tmp_path / command),
                               "--no-tracking", *extra, str(scan))
        assert code == 0, err
        out = nib.load(tmp_path / command / f"{scan.name}{suffix}")
        assert out.shape == tuple(shape) and np.allclose(out.affine, affine, atol=1e-4)
        if task == "segment":
            labels = np.asarray(out.dataobj)
            assert labels.dtype == np.uint8 and labels.max() < cfg.segment.num_classes


def test_super_resolution_refuses_a_model_that_registers(tmp_path):
    from medidiff.api import SuperResolver
    from medidiff.config import load_config
    from medidiff.errors import ConfigError
    from medidiff.models.folder import build_network, save_model_folder
    from medidiff.tasks.registry import get_task
    from tests.helpers import REPO

    cfg = load_config(REPO / "configs" / "superres" / "cpu-tiny.yaml",
                      ["preprocess.registration=rigid"])
    model = save_model_folder(tmp_path / "sr", cfg,
                              build_network(cfg, get_task("superres")).state_dict(), {"steps": 0})
    with pytest.raises(ConfigError, match="super-resolution refines the scan's own grid"):
        SuperResolver.load(model, device="cpu")

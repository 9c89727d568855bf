"""Models of several contrasts: cases grouped from nnU-Net and BIDS names, one registration per
subject (the others aligned rigidly to it), one channel per contrast, outputs on channel 0's
grid, and one line for every input that makes no case."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medidiff.config import Config, load_config
from medidiff.data.datasets import resolve_contrasts
from medidiff.data.raw import make_raw_dataset
from medidiff.errors import ConfigError, InputError
from medidiff.io.discover import CaseFiles, group_channels
from medidiff.io.read import load_image
from medidiff.io.write import save_nifti
from medidiff.models.folder import build_network, save_model_folder
from medidiff.preprocess.pipeline import Preprocessed, Preprocessor
from medidiff.tasks.anomaly.baselines import threshold_channel, zscore_channels
from medidiff.tasks.registry import get_task
from tests.helpers import REPO, SPACING, head

T1_T2_FLAIR = ["t1", "t2", "flair"]


# -- grouping ------------------------------------------------------------------------------------


def test_nnunet_channel_files_make_one_case_in_index_order():
    paths = [Path(f"/d/BRATS_001_{k:04d}.nii.gz") for k in (2, 0, 1)]
    cases, problems = group_channels(paths, T1_T2_FLAIR)
    assert problems == []
    assert cases == [CaseFiles("BRATS_001", tuple(Path(f"/d/BRATS_001_{k:04d}.nii.gz")
                                                   for k in range(3)))]


def test_bids_suffixes_are_put_in_the_models_order_and_extra_contrasts_left_out():
    paths = [Path(f"/d/sub-1_{s}.nii.gz") for s in ("T1w", "PDw", "FLAIR", "T2w")]
    cases, problems = group_channels(paths, ["flair", "t1"])
    assert problems == []
    assert cases == [CaseFiles("sub-1", (Path("/d/sub-1_FLAIR.nii.gz"),
                                         Path("/d/sub-1_T1w.nii.gz")))]


def test_a_missing_contrast_is_one_line_naming_the_case():
    paths = [Path("/d/a_0000.nii.gz"), Path("/d/a_0002.nii.gz"), Path("/d/sub-2_T1w.nii.gz"),
             Path("/d/sub-2_T2w.nii.gz"), *(Path(f"/d/b_{k:04d}.nii.gz") for k in range(3))]
    cases, problems = group_channels(paths, T1_T2_FLAIR)
    assert [c.name for c in cases] == ["b"]
    messages = {case: message for case, _, message in problems}
    assert set(messages) == {"a", "sub-2"}
    assert "case 'a' has no a_0001 (t2) scan" in messages["a"]
    assert "case 'sub-2' has no FLAIR scan (e.g. sub-2_FLAIR.nii.gz)" in messages["sub-2"]
    assert all("\n" not in m for m in messages.values())


def test_more_channels_than_the_model_takes_and_unnamed_files_make_no_case():
    paths = [*(Path(f"/d/c_{k:04d}.nii.gz") for k in range(4)), Path("/d/scan.nii.gz")]
    cases, problems = group_channels(paths, T1_T2_FLAIR)
    assert cases == []
    messages = {case: message for case, _, message in problems}
    assert "has 4 channels; the model takes 3 (t1, t2, flair)" in messages["c"]
    assert "names no contrast" in messages["scan"] and "CASE_0000.nii.gz" in messages["scan"]


def test_an_anomaly_model_takes_every_contrast_of_its_data_and_other_tasks_one(tmp_path):
    spec = {"modality": {"0": "T1", "1": "T2", "2": "FLAIR"}, "training": []}
    (tmp_path / "dataset.json").write_text(__import__("json").dumps(spec))
    cfg = resolve_contrasts(Config(), tmp_path)
    assert cfg.data.contrasts == T1_T2_FLAIR
    assert get_task("anomaly").target_channels(cfg) == 3
    with pytest.raises(ConfigError, match="denoise models take one contrast"):
        resolve_contrasts(Config.model_validate({"task": "denoise"}), tmp_path)


# -- baselines -------------------------------------------------------------------------------------


def test_thresholding_runs_on_the_contrast_that_shows_lesions_brightest():
    assert threshold_channel(["t1", "t2", "flair"]) == 2
    assert threshold_channel(["t1", "t2"]) == 1
    assert threshold_channel(["t1"]) == 0


def test_the_zscore_of_several_channels_is_their_mean_and_of_one_as_before():
    rng = np.random.default_rng(0)
    volume = rng.random((2, 5, 6, 4)).astype(np.float32)
    stats = {"mean": np.zeros((2, 5, 6, 4), np.float32), "std": np.ones((2, 5, 6, 4), np.float32)}
    assert np.allclose(zscore_channels(volume, stats), np.abs(volume).mean(axis=0))
    one = {k: v[0] for k, v in stats.items()}
    assert zscore_channels(volume[:1], one).shape == (5, 6, 4)


# -- preprocessing -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    """One raw subject in T1 and FLAIR, each on its own grid, with a little motion between."""
    root = tmp_path_factory.mktemp("mc") / "data"
    index = make_raw_dataset(root, seed=3, subjects=4, contrasts=("t1", "flair"))
    entry = index["training"][0]  # NIfTI files or DICOM series: load_image reads both
    return [root / f for f in entry["image"]]


def _scans(files):
    out = []
    for f in files:
        array, affine = load_image(f)
        out.append((array[0], affine))
    return out


def test_contrasts_of_a_subject_are_registered_once_onto_one_grid(subject, tmp_path):
    cfg = load_config(REPO / "configs" / "anomaly" / "cpu-small.yaml").preprocess
    scans = _scans(subject)
    result = Preprocessor(cfg).run_channels(scans, ["t1", "flair"], subject)
    assert result.image.shape[0] == 2 and result.image.shape[1:] == result.brain.shape
    assert result.failures == [], result.qc
    assert {"correlation", "correlation_flair", "head_dice_flair"} <= set(result.qc)
    assert result.native_shape == scans[0][0].shape  # results go back to channel 0's grid
    inside = result.brain > 0
    # each channel normalised on its own: both on the template's scale inside the brain
    for channel in result.image:
        assert 0.2 < float(np.median(channel[inside])) < 1.5
    # the cache's 4D file comes back channel first
    save_nifti(result.image, result.affine, tmp_path / "image.nii.gz")
    assert nib.load(tmp_path / "image.nii.gz").shape[-1] == 2
    loaded = Preprocessed.load(tmp_path, result.native_shape, result.native_affine, {})
    assert np.allclose(loaded.image, result.image, atol=1e-5)


def test_a_scan_of_the_wrong_contrast_for_its_channel_fails_quality_control(subject):
    cfg = load_config(REPO / "configs" / "anomaly" / "cpu-small.yaml").preprocess
    scans = _scans([subject[0], subject[0]])  # the T1 given as the FLAIR
    result = Preprocessor(cfg).run_channels(scans, ["t1", "flair"], [subject[0]] * 2)
    [reason] = result.failures
    assert reason.startswith("channel 1 (flair): unlike its template")


def test_a_channel_that_does_not_line_up_with_channel_0_fails_naming_it(subject):
    cfg = load_config(REPO / "configs" / "anomaly" / "cpu-small.yaml").preprocess
    (t1, a1), (flair, a2) = _scans(subject)
    moved = a2.copy()
    moved[:3, 3] += [0.0, 0.0, 120.0]  # another session's (or subject's) head, far away
    result = Preprocessor(cfg).run_channels([(t1, a1), (flair, moved)], ["t1", "flair"],
                                            ["t1.nii.gz", "flair.nii.gz"])
    [reason] = result.failures
    assert reason.startswith("channel 1 (flair): unlike its template after rigid alignment")
    assert "another contrast, subject or session" in reason


# -- scoring ---------------------------------------------------------------------------------------


def _two_channel_model(folder: Path) -> Path:
    cfg = load_config(REPO / "configs" / "anomaly" / "cpu-tiny.yaml")
    cfg = Config.model_validate({**cfg.to_dict(), "data": {**cfg.to_dict()["data"],
                                                           "contrasts": ["t1", "flair"]}})
    net = build_network(cfg, get_task("anomaly"))
    assert net.conv_in.conv.in_channels == 2
    return save_model_folder(folder, cfg, net.state_dict(), {"steps": 0})


def test_cases_of_nnunet_files_are_scored_into_outputs_on_channel_0s_grid(tmp_path):
    from medidiff.api import AnomalyDetector

    model = _two_channel_model(tmp_path / "model")
    inputs = tmp_path / "in"
    inputs.mkdir()
    data = head((20, 24, 12))
    for k in range(2):
        nib.save(nib.Nifti1Image(data * (1 + k), SPACING), inputs / f"case1_{k:04d}.nii.gz")
    nib.save(nib.Nifti1Image(data, SPACING), inputs / "case2_0000.nii.gz")  # no FLAIR
    nib.save(nib.Nifti1Image(np.stack([data, data], -1), SPACING), inputs / "case3_0000.nii.gz")
    nib.save(nib.Nifti1Image(data, SPACING), inputs / "case3_0001.nii.gz")
    other = np.diag([4.0, 4.0, 4.0, 1.0])  # on another grid: no registration to align it
    nib.save(nib.Nifti1Image(data, SPACING), inputs / "case4_0000.nii.gz")
    nib.save(nib.Nifti1Image(data, other), inputs / "case4_0001.nii.gz")
    detector = AnomalyDetector.load(model, device="cpu", method="zscore",
                                    calibration={"voxel_threshold": 1.0})
    detector._zscore = {"mean": np.zeros((2, 48, 56, 12), np.float32),
                        "std": np.ones((2, 48, 56, 12), np.float32)}
    outcomes = {o.case: o for o in detector.predict_files([inputs], tmp_path / "out")}
    assert outcomes["case1"].status == "done", outcomes["case1"].message
    written = nib.load(tmp_path / "out" / "case1_anomaly.nii.gz")
    assert written.shape == data.shape and np.allclose(written.affine, SPACING)
    assert "case 'case2' has no case2_0001 (flair) scan" in outcomes["case2"].message
    assert "case3_0000.nii.gz: has 4 dimensions" in outcomes["case3"].message
    assert "case4_0001.nii.gz: is on another grid" in outcomes["case4"].message
    for case in ("case2", "case3", "case4"):
        assert outcomes[case].status == "failed" and "\n" not in outcomes[case].message
        assert not (tmp_path / "out" / f"{case}_anomaly.nii.gz").exists()


def test_a_model_of_several_contrasts_refuses_a_single_scan(tmp_path):
    from medidiff.api import AnomalyDetector

    model = _two_channel_model(tmp_path / "model")
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(head(), SPACING), path)
    detector = AnomalyDetector.load(model, device="cpu", method="threshold", calibration={})
    with pytest.raises(InputError, match="is one scan; this model takes t1, flair"):
        detector.prepare_file(path)
    with pytest.raises(InputError, match="this model takes t1, flair"):
        detector.prepare_array(head(), SPACING)


def test_unregistered_contrasts_on_different_grids_are_refused_in_training(tmp_path):
    from medidiff.data.transforms import volume_transforms

    cfg = load_config(REPO / "configs" / "anomaly" / "cpu-tiny.yaml").data
    nib.save(nib.Nifti1Image(head(), SPACING), tmp_path / "a_T1w.nii.gz")
    nib.save(nib.Nifti1Image(head((16, 16, 10)), SPACING), tmp_path / "a_FLAIR.nii.gz")
    files = [str(tmp_path / "a_T1w.nii.gz"), str(tmp_path / "a_FLAIR.nii.gz")]
    with pytest.raises(InputError, match="a_FLAIR.nii.gz: is on another grid"):
        volume_transforms(cfg)({"image": files})
    nib.save(nib.Nifti1Image(head(), SPACING), tmp_path / "a_FLAIR.nii.gz")
    assert volume_transforms(cfg)({"image": files})["image"].shape[0] == 2

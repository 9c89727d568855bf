"""Preprocessing scans as scanners give them: registration to the head template, skull
stripping, bias correction, and every result back on the scan's own grid."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.transform import Rotation

from medidiff.config import PreprocessConfig
from medidiff.errors import InputError
from medidiff.preprocess.pipeline import Preprocessor
from medidiff.preprocess.template import load_template
from tests.helpers import REPO, run_cli

AFFINE = PreprocessConfig(registration="affine", skull_strip="template", bias_correction="n4")


def _posed_head(degrees=(10, -8, 12), shift=(15.0, -10.0, 8.0), spacing=(2.0, 2.0, 3.0)):
    """The T1 head template moved by a known rigid pose onto a native LPS grid of its own."""
    template = load_template("mni152-2009c-t1")
    pose = np.eye(4)
    pose[:3, :3] = Rotation.from_euler("xyz", degrees, degrees=True).as_matrix()
    pose[:3, 3] = shift
    shape = (110, 120, 70)
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])  # L, P, S axes
    affine[:3, 3] = -np.diag(affine[:3, :3]) * (np.asarray(shape) - 1) / 2  # centred on 0
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3)
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    in_template = (world - pose[:3, 3]) @ np.linalg.inv(pose[:3, :3]).T
    voxels = (in_template - template.affine[:3, 3]) @ np.linalg.inv(template.affine[:3, :3]).T
    head = ndimage.map_coordinates(template.head, voxels.T, order=1).reshape(shape)
    brain = ndimage.map_coordinates(template.brain.astype(np.float32), voxels.T,
                                    order=0).reshape(shape) > 0.5
    return (head * 1000).astype(np.float32), affine, brain, pose


@pytest.fixture(scope="module")
def posed():
    return _posed_head()


def test_template_brain_comes_back_on_the_native_grid_binary_and_aligned(posed):
    image, affine, brain, _ = posed
    result = Preprocessor(AFFINE).run(image, affine)
    assert not result.failures and result.qc["correlation"] > 0.8, result.qc
    back = result.to_native(result.brain.astype(np.float32), nearest=True)
    assert back.shape == image.shape
    assert set(np.unique(back)) <= {0.0, 1.0}  # a mask stays binary
    dice = 2 * np.logical_and(back > 0, brain).sum() / (back.sum() + brain.sum())
    assert dice > 0.93, dice  # the template mask is eroded by 2 mm, the truth is not


def test_a_sphere_returns_within_2_mm_of_where_it_was(posed):
    image, affine, _, _ = posed
    result = Preprocessor(AFFINE).run(image, affine)
    # a sphere on the template grid, mapped to the native grid and back through the transform
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in result.image.shape], indexing="ij"), -1)
    centre_vox = np.asarray(result.image.shape) / 2 + [5, -4, 6]
    sphere = (np.linalg.norm((grid - centre_vox) * 2.0, axis=-1) < 12).astype(np.float32)
    native = result.to_native(sphere)
    again = result.from_native(native, affine)

    def centroid(volume, grid_affine):
        index = np.argwhere(volume > 0.5).mean(axis=0)
        return grid_affine[:3, :3] @ index + grid_affine[:3, 3]

    moved = np.linalg.norm(centroid(again, result.affine) - centroid(sphere, result.affine))
    assert moved < 2.0, moved
    assert native.max() > 0.9  # the sphere landed on the native grid


def test_preprocessing_is_deterministic(posed):
    image, affine, _, _ = posed
    first = Preprocessor(AFFINE).run(image, affine)
    second = Preprocessor(AFFINE).run(image, affine)
    assert np.array_equal(first.image, second.image)
    assert first.transform.GetParameters() == second.transform.GetParameters()


def test_a_t2_scan_fails_the_t1_registration_quality_control():
    t2 = load_template("mni152-2009c-t2")
    result = Preprocessor(AFFINE).run(t2.head * 1000, t2.affine)
    assert result.failures and "correlation" in result.failures[0], result.qc


def test_a_single_slice_cannot_be_registered():
    with pytest.raises(InputError, match="3D scan"):
        Preprocessor(AFFINE).run(np.ones((40, 40, 1), np.float32), np.eye(4), "flat.nii.gz")


def test_skull_strip_needs_a_registration():
    with pytest.raises(ValueError, match="needs a registration"):
        PreprocessConfig(skull_strip="template")


def test_preprocess_command_writes_scan_mask_transform_and_picture(posed, tmp_path,
                                                                  monkeypatch):
    monkeypatch.setenv("MEDIDIFF_CACHE", str(tmp_path / "cache"))
    image, affine, _, _ = posed
    scan = tmp_path / "in" / "head.nii.gz"
    scan.parent.mkdir()
    nib.save(nib.Nifti1Image(image.astype(np.int16), affine), scan)
    before = scan.read_bytes()
    code, _, err = run_cli("preprocess", "--config", str(REPO / "configs/anomaly/cpu-small.yaml"),
                           "--out", str(tmp_path / "out"), "--no-tracking", str(scan))
    assert code == 0, err
    out = tmp_path / "out"
    for name in ("head_preprocessed.nii.gz", "head_brain.nii.gz", "head_transform.tfm",
                 "head_qc.png", "preprocess.csv"):
        assert (out / name).is_file(), name
    assert scan.read_bytes() == before  # inputs are never modified
    mask = nib.load(out / "head_brain.nii.gz").get_fdata()
    assert set(np.unique(mask)) <= {0.0, 1.0}
    cached = list((tmp_path / "cache" / "preprocess").iterdir())
    assert len(cached) == 1  # the same scan again reads the cache
    stamp = (cached[0] / "qc.json").stat().st_mtime_ns
    code, _, err = run_cli("preprocess", "--config", str(REPO / "configs/anomaly/cpu-small.yaml"),
                           "--out", str(tmp_path / "again"), "--no-tracking", str(scan))
    assert code == 0 and (cached[0] / "qc.json").stat().st_mtime_ns == stamp
    assert json.loads((out / "preprocess_settings.json").read_text())["registration"] == "affine"


def test_a_large_bright_lesion_does_not_darken_the_brain_under_median_normalisation():
    from medidiff.preprocess.pipeline import intensity_scale

    template = load_template("mni152-2009c-t1")
    healthy = template.head[template.brain]
    rng = np.random.default_rng(0)
    subject = healthy * rng.uniform(0.9, 1.1) + rng.normal(0, 0.01, healthy.size)
    lesioned = subject.copy()
    lesioned[rng.choice(subject.size, subject.size // 25, replace=False)] = 1.5 * subject.max()
    reference = healthy
    for method, at_most, at_least in (("median", 0.03, 0.0), ("p99", np.inf, 0.15)):
        change = intensity_scale(lesioned, reference, method) / intensity_scale(
            subject, reference, method) - 1
        assert at_least <= abs(change) <= at_most, (method, change)
    # on a healthy scan both scales agree to a few percent (the median is put on the p99 scale)
    ratio = intensity_scale(subject, reference, "median") / intensity_scale(subject, reference, "p99")
    assert abs(ratio - 1) < 0.1, ratio


def test_normalise_reads_the_boolean_of_older_model_files():
    assert PreprocessConfig(normalise=True).normalise == "p99"
    assert PreprocessConfig(normalise=False).normalise == "none"
    assert PreprocessConfig().normalise == "median"


def test_a_skull_stripped_brain_is_detected_and_registered_to_the_template_brain(posed):
    image, affine, brain, _ = posed
    stripped = image * brain  # as HD-BET or BraTS give it: zeros outside the brain
    result = Preprocessor(AFFINE).run(stripped, affine)
    assert result.kind == "brain" and not result.failures, (result.kind, result.failures)
    assert Preprocessor(AFFINE).run(image, affine).kind == "head"
    back = result.to_native(result.brain.astype(np.float32), nearest=True) > 0
    dice = 2 * np.logical_and(back, brain).sum() / (back.sum() + brain.sum())
    assert dice > 0.93, dice


def test_a_head_declared_a_brain_fails_quality_control_with_a_hint(posed):
    image, affine, _, _ = posed
    declared = AFFINE.model_copy(update={"input": "brain"})
    result = Preprocessor(declared).run(image, affine)
    assert result.kind == "brain"
    assert any("preprocess.input" in reason for reason in result.failures), result.failures


def test_a_neck_in_the_field_of_view_does_not_throw_the_registration_off():
    """The head moved 40 mm down a field of view that also holds 80 mm of neck: the centre of
    mass lies far below the brain's, and a single centre-of-mass start is off by that much."""
    image, affine, brain, _ = _posed_head(degrees=(12, 5, -10), shift=(5.0, 5.0, -20.0))
    neck_slices = 27  # 80 mm at 3 mm
    column = np.repeat(image[:, :, :1] * 0.9, neck_slices, axis=2)
    extended = np.concatenate([column, image], axis=2)
    grid = affine.copy()
    grid[:3, 3] -= grid[:3, 2] * neck_slices
    result = Preprocessor(AFFINE).run(extended, grid)
    assert not result.failures, result.failures
    back = result.to_native(result.brain.astype(np.float32), nearest=True) > 0
    truth = np.concatenate([np.zeros(column.shape, bool), brain], axis=2)
    dice = 2 * np.logical_and(back, truth).sum() / (back.sum() + truth.sum())
    assert dice > 0.93, dice


def test_histogram_standardisation_undoes_a_gamma_curve_and_keeps_a_lesion_bright():
    from medidiff.preprocess.pipeline import standardise_histogram

    template = load_template("mni152-2009c-t1")
    brain = template.brain
    reference = template.head[brain]
    plain = standardise_histogram(template.head, reference, reference)
    curved = standardise_histogram(template.head ** 1.4 * 700, (template.head ** 1.4 * 700)[brain],
                                   reference)
    assert np.abs(curved[brain] - plain[brain]).mean() < 0.02
    lesioned = template.head.copy()  # a bright ball of 3% of the brain
    centre = np.argwhere(brain).mean(axis=0)
    ball = np.linalg.norm(np.indices(brain.shape).T - centre, axis=-1).T < 8
    lesioned[ball] *= 1.6
    out = standardise_histogram(lesioned, lesioned[brain], reference)
    assert out[brain].max() > 1.3 * plain[brain].max()

"""The example data set from the MNI152 template, and the synthetic lesions it puts in test scans."""

import json
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medidiff.data.example import (
    load_template,
    make_example_dataset,
    output_grid,
    split_roles,
    synthesize_subject,
)
from medidiff.data.lesions import add_lesion
from medidiff.errors import InputError

SPACING = 4.0  # coarse, to keep the suite fast; the default 2 mm is checked through output_grid
SUBJECTS = 4


@pytest.fixture(scope="module")
def template():
    return load_template(SPACING)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    calls = []
    out = tmp_path_factory.mktemp("example") / "data"
    path = make_example_dataset(out, seed=0, subjects=SUBJECTS, spacing_mm=SPACING,
                                progress=lambda *a: calls.append(a))
    return path.parent, json.loads(path.read_text()), calls


def load(root, rel):
    image = nib.load(root / rel)
    return np.asarray(image.dataobj), image


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes_and_another_seed_differs(dataset, tmp_path):
    root, _, _ = dataset
    again = make_example_dataset(tmp_path / "again", seed=0, subjects=SUBJECTS, spacing_mm=SPACING)
    other = make_example_dataset(tmp_path / "other", seed=1, subjects=SUBJECTS, spacing_mm=SPACING)
    first = files(root)
    assert first == files(again.parent)
    changed = files(other.parent)
    assert first.keys() == changed.keys()
    assert first["train/images/sub-000.nii.gz"] != changed["train/images/sub-000.nii.gz"]
    assert not any(name.endswith(".tmp") for name in first)


def test_dataset_json_lists_every_file_with_relative_paths(dataset):
    root, index, calls = dataset
    assert index["tensorImageSize"] == "3D" and index["modality"] == {"0": "T1"}
    assert index["labels"] == {"0": "background", "1": "CSF", "2": "GM", "3": "WM"}
    assert "MNI152 2009a" in index["description"]
    assert (index["seed"], index["spacing_mm"]) == (0, SPACING)
    assert index["numTraining"] == len(index["training"]) == 1
    assert len(index["validation"]) == 1 and len(index["test"]) == 2
    assert sorted(t["lesion"] for t in index["test"]) == [False, True]
    for group in ("training", "validation", "test", "enhance"):
        for entry in index[group]:
            for key, rel in entry.items():
                if key != "lesion":
                    assert not Path(rel).is_absolute() and (root / rel).is_file(), rel
    assert [c[:2] for c in calls] == [(i + 1, SUBJECTS) for i in range(SUBJECTS)]


def test_scans_are_ras_float32_on_the_coarse_grid_with_tissue_labels(dataset):
    root, index, _ = dataset
    for entry in index["training"] + index["validation"] + index["test"]:
        scan, image = load(root, entry["image"])
        labels, label_image = load(root, entry["label"])
        assert scan.dtype == np.float32 and labels.dtype == np.uint8
        assert scan.shape == labels.shape == (50, 59, 48)
        assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
        np.testing.assert_allclose(np.diag(image.affine)[:3], SPACING)
        np.testing.assert_allclose(label_image.affine, image.affine)
        assert image.header["qform_code"] == image.header["sform_code"] == 1
        assert set(np.unique(labels)) == {0, 1, 2, 3}
        assert not scan[labels == 0].any()  # skull-stripped: background is exactly 0
        assert 0.1 < (labels > 0).mean() < 0.4


def test_default_grid_is_99x117x95_at_2mm_over_the_template_field_of_view(template):
    shape, affine = output_grid(replace(template, spacing_mm=2.0))
    assert shape == (99, 117, 95)
    np.testing.assert_allclose(affine[:3, 3], template.fov_affine[:3, 3])  # same centre, odd sizes
    np.testing.assert_allclose(np.diag(affine)[:3], 2.0)


def test_lesion_masks_are_non_empty_exactly_for_lesioned_scans_and_inside_the_brain(dataset):
    root, index, _ = dataset
    for entry in index["test"]:
        mask, _ = load(root, entry["mask"])
        labels, _ = load(root, entry["label"])
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
        assert bool(mask.any()) == entry["lesion"]
        assert not mask[labels == 0].any()


def test_lesions_change_the_healthy_scan_only_inside_the_brain(dataset, template):
    root, index, _ = dataset
    for entry in index["test"]:
        scan, _ = load(root, entry["image"])
        mask, _ = load(root, entry["mask"])
        subject_index = int(Path(entry["image"]).name[4:7])
        healthy = synthesize_subject(template, 0, subject_index)
        if not entry["lesion"]:
            assert np.array_equal(scan, healthy["image"])
            continue
        ref = np.percentile(healthy["image"][healthy["brain"]], 99)
        assert np.abs(scan - healthy["image"])[mask > 0].mean() > 0.05 * ref
        assert np.array_equal(scan[~healthy["brain"]], healthy["image"][~healthy["brain"]])


def test_enhancement_copies_have_the_right_grids_and_noise_levels(dataset, template):
    root, index, _ = dataset
    assert len(index["enhance"]) == 2  # one healthy test scan, topped up with a validation scan
    entry = index["enhance"][0]
    clean, clean_image = load(root, entry["clean"])
    subject = synthesize_subject(template, 0, int(Path(entry["clean"]).name[4:7]))
    assert np.array_equal(clean, subject["clean"])
    brain = subject["brain"]
    ref = np.percentile(clean[brain], 99)
    bright = clean > 0.5 * ref  # high SNR, where Rician noise is close to Gaussian
    for name, fraction in (("noisy05", 0.05), ("noisy10", 0.10)):
        noisy, image = load(root, entry[name])
        np.testing.assert_allclose(image.affine, clean_image.affine)
        assert (noisy - clean)[bright].std() == pytest.approx(fraction * ref, rel=0.1)
    for name, factor, shape in (("lowres2", 2, (25, 30, 48)), ("lowres4", 4, (13, 15, 48))):
        low, image = load(root, entry[name])
        assert low.shape == shape
        np.testing.assert_allclose(np.diag(image.affine)[:3], [SPACING * factor] * 2 + [SPACING])
        # the first coarse voxel is centred between the fine voxels it averages
        offset = (factor - 1) / 2 * SPACING
        np.testing.assert_allclose(image.affine[:2, 3], clean_image.affine[:2, 3] + offset)
        i, j, k = 24 // factor, 28 // factor, 24  # a block in the middle of the brain
        block = clean[factor * i : factor * (i + 1), factor * j : factor * (j + 1), k]
        assert low[i, j, k] == pytest.approx(block.mean(), rel=1e-5)


def test_refuses_a_folder_that_holds_a_data_set_and_too_few_subjects(dataset, tmp_path):
    root, _, _ = dataset
    with pytest.raises(InputError, match="already holds a data set"):
        make_example_dataset(root, subjects=SUBJECTS, spacing_mm=SPACING)
    with pytest.raises(InputError, match="at least 4 subjects"):
        make_example_dataset(tmp_path / "few", subjects=3, spacing_mm=SPACING)
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError):
        make_example_dataset(tmp_path / "file", subjects=SUBJECTS)


@pytest.mark.parametrize("subjects", [4, 5, 6, 10, 17, 40, 100])
def test_split_keeps_the_proportions_and_minimums(subjects):
    roles = split_roles(subjects, seed=0)
    count = {r: roles.count(r) for r in ("train", "val", "test-lesion", "test-healthy")}
    assert len(roles) == subjects and count["train"] >= 1 and count["val"] >= 1
    assert count["test-lesion"] >= 1 and count["test-healthy"] >= 1
    assert roles[: count["train"] + count["val"]] == ["train"] * count["train"] + ["val"] * count["val"]
    if subjects == 40:
        assert (count["train"], count["val"]) == (24, 6)
        assert (count["test-lesion"], count["test-healthy"]) == (7, 3)


def brain_phantom(shape=(40, 48, 36)):
    """An ellipsoidal 'brain' of CSF-, WM- and GM-like shells with a little noise."""
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    radius = np.sqrt(sum(g**2 for g in grid))
    brain = radius < 0.9
    tissue = np.select([radius < 0.2, radius < 0.6], [0.3, 0.9], 0.6)
    noise = 0.02 * np.random.default_rng(0).standard_normal(shape)
    return np.where(brain, tissue + noise, 0.0).astype(np.float32), brain


def test_add_lesion_is_deterministic_and_leaves_its_input_alone():
    image, brain = brain_phantom()
    before = image.copy()
    a = add_lesion(image, brain, 3.0, np.random.default_rng(5))
    b = add_lesion(image, brain, 3.0, np.random.default_rng(5))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    assert np.array_equal(image, before)
    new, mask, info = a
    assert mask.dtype == np.uint8 and mask.any() and not mask[~brain].any()
    assert 1 <= info["n_lesions"] == len(info["lesions"]) <= 3
    assert np.array_equal(new[~brain], image[~brain])


def test_lesions_come_in_bright_dark_and_subtle_kinds_of_plausible_size():
    image, brain = brain_phantom()
    kinds, sizes = set(), []
    low, high = np.percentile(image[brain], [5, 95])
    for seed in range(30):
        new, mask, info = add_lesion(image, brain, 3.0, np.random.default_rng(seed))
        for lesion in info["lesions"]:
            kinds.add(lesion["kind"])
            sizes.append(max(lesion["radii_mm"]))
            if lesion["kind"] != "subtle":
                assert 0.25 <= abs(lesion["shift"]) <= 0.6
            else:
                target = lesion["target"] * info["reference_intensity"]
                assert low - 1e-4 <= target <= high + 1e-4  # inside the normal tissue range
        assert np.abs(new - image)[mask > 0].mean() > 0.02
    assert kinds == {"hyper", "hypo", "subtle"}
    extent = 0.9 * 48 * 3.0  # the phantom's largest side in mm
    assert min(sizes) < 8.0 and max(sizes) <= 0.15 * extent * 1.05


def test_add_lesion_rejects_mismatched_or_empty_masks():
    image, brain = brain_phantom()
    with pytest.raises(InputError):
        add_lesion(image, brain[:-1], 3.0, np.random.default_rng(0))
    with pytest.raises(InputError):
        add_lesion(image, np.zeros_like(brain), 3.0, np.random.default_rng(0))

"""The raw example data set: skull-on scans as scanners write them, with their ground truth."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from medidiff.data.raw import (
    LANDMARKS_MM,
    _deformation,
    _from_template,
    _to_template,
    head_template,
    make_raw_dataset,
)
from medidiff.io.read import load_image
from tests.helpers import run_cli

SUBJECTS = 6
BRAIN_LANDMARKS = ("anterior_commissure", "posterior_commissure", "left_temporal_pole",
                   "right_temporal_pole")


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    out = tmp_path_factory.mktemp("raw") / "data"
    calls = []
    index = make_raw_dataset(out, seed=0, subjects=SUBJECTS,
                             progress=lambda *a: calls.append(a))
    assert json.loads((out / "dataset.json").read_text()) == index
    return out, index, calls


def entries(index: dict) -> list[dict]:
    return index["training"] + index["validation"] + index["test"]


def files(root: Path) -> dict[str, bytes]:
    paths = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in paths}


def load(root: Path, rel: str) -> tuple[np.ndarray, nib.Nifti1Image]:
    image = nib.load(root / rel)
    return np.asarray(image.dataobj), image


def scan_grid(root: Path, entry: dict) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and affine of a raw scan as the project reads it."""
    array, affine = load_image(root / entry["image"])
    return array.shape[1:], affine


def test_layout_and_dataset_json(raw):
    root, index, calls = raw
    assert index["raw"] is True and index["seed"] == 0 and "MNI" in index["licence"]
    assert index["anatomy_variability"] == 1.0
    assert index["numTraining"] + index["numValidation"] + index["numTest"] == SUBJECTS
    assert [c[:2] for c in calls] == [(i + 1, SUBJECTS) for i in range(SUBJECTS)]
    for entry in entries(index):
        keys = ["image", "label", "brain"] + (["mask"] if "mask" in entry else [])
        for key in keys + [f"registered/{k}" for k in entry["registered"]]:
            rel = entry["registered"][key[11:]] if key.startswith("registered/") else entry[key]
            assert not Path(rel).is_absolute() and (root / rel).exists(), rel
        assert entry["format"] in ("nifti", "dicom")
        assert (root / entry["image"]).is_dir() == (entry["format"] == "dicom")
        assert np.asarray(entry["pose"]).shape == (4, 4)
        assert set(entry["landmarks"]) == set(LANDMARKS_MM) and len(LANDMARKS_MM) == 8
    tests = index["test"]
    assert all("mask" in e and "lesion" in e for e in tests)
    assert {e["lesion"] for e in tests} == {True, False}
    formats = {(e["image"].split("/")[0], e["format"]) for e in entries(index)}
    assert {("train", "dicom"), ("test", "dicom"), ("train", "nifti")} <= formats
    assert not any(name.endswith(".tmp") for name in files(root))


def test_native_grids_vary_and_scans_are_int16(raw):
    root, index, _ = raw
    orientations, spacings = set(), set()
    for entry in entries(index):
        shape, affine = scan_grid(root, entry)
        orientations.add(nib.aff2axcodes(affine))
        spacings.add(tuple(np.round(np.linalg.norm(affine[:3, :3], axis=0), 3)))
        assert "".join(nib.aff2axcodes(affine)) == entry["orientation"]
        assert list(shape) == entry["shape"]
        if entry["format"] == "nifti":
            assert nib.load(root / entry["image"]).get_data_dtype() == np.int16
        else:
            import pydicom

            slices = sorted((root / entry["image"]).iterdir())
            assert len(slices) == shape[2]
            ds = pydicom.dcmread(slices[0])
            assert (ds.BitsAllocated, ds.PixelRepresentation) == (16, 1)
            assert str(ds.PatientName) == "anonymous"
            assert not any(k.endswith("Date") and ds.get(k) for k in ds.dir())
    assert len(orientations) >= 2 and len(spacings) >= 2


def test_ground_truth_on_the_raw_grid(raw):
    """Every ground-truth file lies on the grid load_image gives for the scan (DICOM too)."""
    root, index, _ = raw
    for entry in entries(index):
        shape, affine = scan_grid(root, entry)
        brain, brain_image = load(root, entry["brain"])
        labels, label_image = load(root, entry["label"])
        for image in (brain_image, label_image):
            assert image.shape == shape
            np.testing.assert_allclose(image.affine, affine, atol=1e-4)
        assert brain.dtype == labels.dtype == np.uint8
        assert set(np.unique(brain)) == {0, 1}
        assert set(np.unique(labels)) == {0, 1, 2, 3}
        assert np.array_equal(labels > 0, brain > 0)
        if "mask" in entry:
            mask, mask_image = load(root, entry["mask"])
            assert mask_image.shape == shape and mask.dtype == np.uint8
            np.testing.assert_allclose(mask_image.affine, affine, atol=1e-4)
            assert set(np.unique(mask)) <= {0, 1}
            assert mask.any() == entry["lesion"]
            assert not np.any(mask & (brain == 0))  # lesions only inside the brain


def test_dicom_subject_loads_with_its_mask_grid(raw):
    root, index, _ = raw
    dicom = [e for e in index["test"] if e["format"] == "dicom"]
    assert dicom
    array, affine = load_image(root / dicom[0]["image"])
    mask = nib.load(root / dicom[0]["mask"])
    assert array.shape[1:] == mask.shape
    np.testing.assert_allclose(mask.affine, affine, atol=1e-4)
    assert np.all(array == np.round(array)) and 0 <= array.min() and array.max() < 2**15


def test_pose_maps_the_registered_brain_onto_the_raw_brain(raw):
    root, index, _ = raw
    for entry in entries(index):
        registered, registered_image = load(root, entry["registered"]["brain"])
        brain, brain_image = load(root, entry["brain"])
        assert registered_image.shape == (97, 115, 97)
        pose = np.asarray(entry["pose"])
        matrix = np.linalg.inv(registered_image.affine) @ np.linalg.inv(pose) @ brain_image.affine
        mapped = ndi.affine_transform(registered, matrix[:3, :3], matrix[:3, 3],
                                      output_shape=brain.shape, order=0)
        dice = 2 * np.sum(mapped & brain) / (mapped.sum() + brain.sum())
        assert dice > 0.95, (entry["image"], dice)


def test_landmarks_follow_deformation_and_pose(raw):
    root, index, _ = raw
    for entry in entries(index):
        pose_inverse = np.linalg.inv(np.asarray(entry["pose"]))
        brain, brain_image = load(root, entry["brain"])
        for name, point in entry["landmarks"].items():
            assert point["template_mm"] == list(LANDMARKS_MM[name])
            back = (pose_inverse @ [*point["native_mm"], 1.0])[:3]
            # scaling by up to 8% about the head's centre and a few mm of elastic displacement
            limit = 8.0 if name in BRAIN_LANDMARKS[:2] else 16.0
            assert np.linalg.norm(back - point["template_mm"]) < limit, (entry["image"], name)
        for name in BRAIN_LANDMARKS:  # deep brain points land in the raw brain mask
            voxel = np.linalg.inv(brain_image.affine) @ [*entry["landmarks"][name]["native_mm"], 1]
            assert brain[tuple(np.round(voxel[:3]).astype(int))] == 1, (entry["image"], name)


def test_landmarks_invert_the_deformation_exactly():
    """Native landmarks come from inverting the subject -> template map, to far below a voxel."""
    tpl = head_template()
    field = _deformation(tpl, np.random.default_rng(3))
    points = np.array(list(LANDMARKS_MM.values())).T
    subject = _from_template(tpl, field, points)
    assert np.abs(subject - points).max() > 1.0  # the deformation moves them
    np.testing.assert_allclose(_to_template(tpl, field, subject), points, atol=0.01)


def test_cli_raw_is_deterministic_and_seeds_differ(raw, tmp_path):
    root, _, _ = raw
    code, _, err = run_cli("data", "example", str(tmp_path / "cli"), "--raw", "--subjects",
                           str(SUBJECTS))
    assert code == 0, err
    assert files(tmp_path / "cli") == files(root)  # the same seed gives the same bytes
    other = make_raw_dataset(tmp_path / "other", seed=1, subjects=4)
    first = other["training"][0]
    assert first["pose"] != json.loads((root / "dataset.json").read_text())["training"][0]["pose"]
    brain = first["brain"]
    assert (tmp_path / "other" / brain).read_bytes() != (root / brain).read_bytes()


def test_cli_refuses_spacing_with_raw(tmp_path):
    code, _, err = run_cli("data", "example", str(tmp_path / "x"), "--raw", "--spacing", "3")
    assert code == 2 and "--spacing" in err
    assert not (tmp_path / "x").exists()


def test_anatomy_variability_scales_the_displacement_only():
    tpl = head_template()
    base = _deformation(tpl, np.random.default_rng(5))
    wide = _deformation(tpl, np.random.default_rng(5), 2.5)
    np.testing.assert_array_equal(wide["scale"], base["scale"])  # the same draws
    np.testing.assert_allclose(wide["displacement"], 2.5 * base["displacement"], rtol=1e-5)
    rigid = _deformation(tpl, np.random.default_rng(5), 0.0)
    assert not rigid["displacement"].any()


def test_cli_anatomy_variability_is_recorded_and_raw_only(tmp_path):
    code, _, err = run_cli("data", "example", str(tmp_path / "x"), "--anatomy-variability", "2")
    assert code == 2 and "--raw" in err and not (tmp_path / "x").exists()
    code, _, err = run_cli("data", "example", str(tmp_path / "y"), "--raw", "--subjects", "4",
                           "--anatomy-variability", "9")
    assert code == 2 and "anatomy-variability" in err and not (tmp_path / "y").exists()
    index = make_raw_dataset(tmp_path / "z", seed=0, subjects=4, anatomy_variability=0.5)
    assert index["anatomy_variability"] == 0.5


# -- several contrasts -------------------------------------------------------------------------

CONTRASTS = ("t1", "t2", "flair")
SUFFIXES = {"t1": "T1w", "t2": "T2w", "flair": "FLAIR"}


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    out = tmp_path_factory.mktemp("raw-mc") / "data"
    index = make_raw_dataset(out, seed=0, subjects=4, contrasts=("T1w", "t2", "FLAIR"))
    assert json.loads((out / "dataset.json").read_text()) == index
    return out, index


def voxel_map(entry: dict, channel: int) -> np.ndarray:
    """Channel ``channel``'s native voxel -> the first contrast's native voxel (4x4)."""
    first, this = entry["channels"][0], entry["channels"][channel]
    return (np.linalg.inv(grid_affine(first)) @ np.asarray(first["pose"])
            @ np.linalg.inv(np.asarray(this["pose"])) @ grid_affine(this))


def grid_affine(channel: dict) -> np.ndarray:
    return channel["_affine"]


def read_channels(root: Path, entry: dict) -> list[np.ndarray]:
    """Each contrast's scan as load_image reads it; its affine is kept in the channel dict."""
    arrays = []
    for channel in entry["channels"]:
        array, affine = load_image(root / channel["image"])
        channel["_affine"] = np.asarray(affine, float)
        arrays.append(np.asarray(array[0], np.float32))
    return arrays


def test_one_t1_contrast_keeps_the_single_contrast_layout(raw):
    _, index, _ = raw
    assert "contrasts" not in index and "channel_names" not in index
    assert index["modality"] == {"0": "T1"} and index["description"].startswith("Synthetic raw T1")
    for entry in entries(index):
        assert "channels" not in entry and "lesion_kind" not in entry
        assert isinstance(entry["image"], str) and isinstance(entry["registered"]["image"], str)
        assert "_T1w" not in entry["image"]


def test_contrasts_are_named_and_listed_in_contrast_order(multi):
    root, index = multi
    assert index["contrasts"] == list(CONTRASTS)
    assert index["modality"] == index["channel_names"] == {"0": "T1", "1": "T2", "2": "FLAIR"}
    assert "T1, T2, FLAIR" in index["description"]
    for entry in entries(index):
        name = Path(entry["label"]).name.removesuffix(".nii.gz")
        split = entry["label"].split("/")[0]
        tail = "" if entry["format"] == "dicom" else ".nii.gz"
        assert entry["image"] == [f"{split}/images/{name}_{SUFFIXES[c]}{tail}" for c in CONTRASTS]
        assert entry["registered"]["image"] == [f"registered/images/{name}_{SUFFIXES[c]}.nii.gz"
                                                for c in CONTRASTS]
        assert [c["contrast"] for c in entry["channels"]] == list(CONTRASTS)
        for key in ("acquisition", "orientation", "spacing_mm", "shape", "pose", "gain",
                    "noise_fraction", "format"):
            assert entry[key] == entry["channels"][0][key]  # the first contrast at the top level
        for rel in [*entry["image"], *entry["registered"]["image"], entry["label"],
                    entry["brain"], entry["registered"]["brain"]]:
            assert (root / rel).exists(), rel
        assert (root / entry["image"][0]).is_dir() == (entry["format"] == "dicom")
    assert {e["format"] for e in entries(index)} == {"nifti", "dicom"}
    # one label and brain per subject on the first contrast's grid; the lesion mask also on
    # each contrast's own grid, named as its scan (a model of one contrast is evaluated there)
    assert len(list((root / "test" / "masks").iterdir())) == index["numTest"] * (1 + len(CONTRASTS))
    assert not any("_T" in p.name or "FLAIR" in p.name for p in (root / "test").rglob("*")
                   if p.parent.name in ("labels", "brains"))
    for entry in index["test"]:
        name = Path(entry["mask"]).name.removesuffix(".nii.gz")
        for channel in entry["channels"]:
            assert channel["mask"] == f"test/masks/{name}_{SUFFIXES[channel['contrast']]}.nii.gz"
            mask, _ = load_image(root / channel["mask"], labels=True)
            assert list(mask.shape[1:]) == channel["shape"]
        first, _ = load_image(root / entry["channels"][0]["mask"], labels=True)
        whole, _ = load_image(root / entry["mask"], labels=True)
        assert np.array_equal(first, whole)


def test_each_contrast_has_its_own_grid_and_a_small_motion(multi):
    root, index = multi
    for entry in entries(index):
        arrays = read_channels(root, entry)
        for channel, array in zip(entry["channels"], arrays, strict=True):
            assert list(array.shape) == channel["shape"]
            assert "".join(nib.aff2axcodes(channel["_affine"])) == channel["orientation"]
        first = entry["channels"][0]
        for channel in entry["channels"][1:]:
            other_grid = (channel["shape"] != first["shape"]
                          or not np.allclose(channel["_affine"], first["_affine"]))
            motion = np.asarray(channel["pose"]) @ np.linalg.inv(np.asarray(first["pose"]))
            angle = np.degrees(np.arccos(np.clip((np.trace(motion[:3, :3]) - 1) / 2, -1, 1)))
            assert 0 < angle <= 2.0 * 3**0.5 + 1e-6  # up to 2 degrees about each axis
            assert other_grid or not np.allclose(motion, np.eye(4))
    acquisitions = {c["acquisition"] for e in entries(index) for c in e["channels"]}
    assert len(acquisitions) >= 2


def test_dicom_contrasts_are_series_of_one_study(multi):
    import pydicom

    root, index = multi
    entry = next(e for e in entries(index) if e["format"] == "dicom")
    heads = [pydicom.dcmread(sorted((root / rel).iterdir())[0]) for rel in entry["image"]]
    assert len({h.StudyInstanceUID for h in heads}) == 1
    assert len({h.SeriesInstanceUID for h in heads}) == len(CONTRASTS)
    assert [h.SeriesDescription.split()[1] for h in heads] == ["T1", "T2", "FLAIR"]


def test_tissues_look_as_each_contrast_shows_them(multi):
    """On each native scan (labels mapped through the poses): T2 CSF > GM > WM, FLAIR CSF dark."""
    root, index = multi
    for entry in entries(index)[:2]:
        arrays = read_channels(root, entry)
        labels, _ = load(root, entry["label"])
        means = {}
        for k, (contrast, array) in enumerate(zip(CONTRASTS, arrays, strict=True)):
            matrix = voxel_map(entry, k)
            mapped = ndi.affine_transform(labels, matrix[:3, :3], matrix[:3, 3],
                                          output_shape=array.shape, order=0)
            means[contrast] = {t: float(array[mapped == t].mean()) for t in (1, 2, 3)}
        assert means["t1"][3] > means["t1"][2] > means["t1"][1], means
        assert means["t2"][1] > means["t2"][3] and means["t2"][2] > means["t2"][3], means
        assert means["flair"][1] < means["flair"][3] < means["flair"][2], means


def test_one_lesion_mask_shows_in_every_contrast(multi):
    root, index = multi
    lesioned = [e for e in index["test"] if e["lesion"]]
    assert lesioned and {e["lesion_kind"] for e in lesioned} <= {"ms", "tumour", "stroke"}
    for entry in lesioned:
        mask = load(root, entry["registered"]["mask"])[0] > 0
        brain = load(root, entry["registered"]["brain"])[0] > 0
        assert mask.any() and not np.any(mask & ~brain)
        shell = ndi.binary_dilation(mask, iterations=3) & ~ndi.binary_dilation(mask) & brain
        inside, around = {}, {}
        for contrast, rel in zip(CONTRASTS, entry["registered"]["image"], strict=True):
            image = load(root, rel)[0]
            inside[contrast], around[contrast] = image[mask].mean(), image[shell].mean()
        assert inside["t1"] < around["t1"], (inside, around)
        assert inside["t2"] > around["t2"] and inside["flair"] > around["flair"], (inside, around)
        assert load(root, entry["mask"])[0].any()  # visible on the first contrast's grid


@pytest.mark.parametrize("kind", ["ms", "tumour", "stroke"])
def test_lesion_kinds_are_dark_on_t1_and_bright_on_t2_and_flair(kind):
    from medidiff.data.lesions_mc import add_contrast_lesions
    from medidiff.data.raw import _subject

    subject = _subject(head_template(), 0, 1, False, 0, 1.0, ("t1", "t2", "flair"))
    images, labels = subject["images"], subject["labels"]
    out, mask, info = add_contrast_lesions(images, labels, 2.0, np.random.default_rng(4), kind)
    lesion = mask > 0
    assert info["kind"] == kind and lesion.any() and not np.any(lesion & (labels == 0))
    changed = np.zeros_like(lesion)
    for contrast in images:
        changed |= out[contrast] != images[contrast]
    assert not np.any(changed & (labels == 0))  # nothing outside the brain
    delta = {c: float((out[c] - images[c])[lesion].mean()) for c in images}
    assert delta["t1"] < 0 < delta["t2"] and delta["flair"] > 0, delta
    if kind == "ms":
        assert lesion.sum() < 2000  # a few small ovoids


def test_cli_contrasts_are_checked_and_raw_only(tmp_path):
    code, _, err = run_cli("data", "example", str(tmp_path / "a"), "--contrasts", "t1,t2")
    assert code == 2 and "--raw" in err and not (tmp_path / "a").exists()
    for spec, words in (("t1,T1w", "more than once"), ("t1,dwi", "unknown contrast")):
        code, _, err = run_cli("data", "example", str(tmp_path / "b"), "--raw", "--contrasts",
                               spec)
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "b").exists()


def test_training_reads_one_contrast_of_the_multi_contrast_set(multi):
    from medidiff.data.datasets import read_split

    root, _ = multi
    items = read_split(root, "training", ["flair"])
    assert items and all(isinstance(i["image"], str) and "FLAIR" in i["image"] for i in items)

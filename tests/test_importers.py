"""``medidiff data import``: public data layouts, in their real namings, to dataset.json."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medidiff.data.datasets import read_split
from medidiff.data.importers import IMPORTERS, import_dataset
from medidiff.errors import InputError
from medidiff.names import IMPORT_FORMATS
from tests.helpers import run_cli

_RNG = np.random.default_rng(3)
SHAPE = (6, 6, 5)


def nifti(path: Path, shape=SHAPE, data=None, affine=None) -> Path:
    """A tiny NIfTI file (random voxels and affine unless given)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if data is None:
        data = _RNG.random(shape).astype(np.float32)
    if affine is None:
        affine = np.diag([*_RNG.uniform(0.8, 2.0, 3), 1.0])
        affine[:3, 3] = _RNG.uniform(-50, 50, 3)
    nib.save(nib.Nifti1Image(np.asarray(data), affine), path)
    return path


def tree(root: Path) -> dict[str, tuple[int, float]]:
    """Every file under root with its size and modification time: SRC must stay as it was."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def manifest(path: Path) -> dict:
    """The dataset.json of an import (its path, or its output folder)."""
    path = Path(path)
    return json.loads((path if path.name == "dataset.json" else path / "dataset.json").read_text())


def entries(spec: dict) -> list[dict]:
    return spec["training"] + spec["validation"] + spec["test"]


def assert_links(out: Path, rel: str, source: Path) -> None:
    """``out/rel`` is a symbolic link to the absolute source file."""
    assert (out / rel).is_symlink()
    assert os.path.isabs(os.readlink(out / rel))
    assert (out / rel).resolve() == source.resolve()


def ixi_tree(src: Path, subjects: int = 14, folders: bool = True, no_pd: int = 1) -> list[str]:
    """IXI subjects, T1/T2/PD in per-modality folders; the first ``no_pd`` have no PD."""
    names = [f"IXI{i + 2:03d}-{('Guys', 'HH', 'IOP')[i % 3]}-{828 + i:04d}" for i in range(subjects)]
    for index, name in enumerate(names):
        for mod in ("T1", "T2", "PD"):
            if mod == "PD" and index < no_pd:
                continue
            folder = src / f"IXI-{mod}" if folders else src
            nifti(folder / f"{name}-{mod}.nii.gz")
    (src / "IXI.xls").write_bytes(b"demographics")
    nifti(src / "IXI-MRA" / f"{names[0]}-MRA.nii.gz")
    return names


# -- IXI -----------------------------------------------------------------------------------------


def test_ixi_links_every_contrast_and_drops_subjects_without_one(tmp_path):
    src, out = tmp_path / "IXI", tmp_path / "out"
    names = ixi_tree(src)
    before = tree(src)
    path = import_dataset("ixi", src, out)
    assert path == out / "dataset.json"
    spec = manifest(out)
    assert spec["source_format"] == "ixi" and spec["source"] == str(src.resolve())
    assert spec["contrasts"] == ["t1", "t2", "pd"]
    assert spec["modality"] == spec["channel_names"] == {"0": "T1", "1": "T2", "2": "PD"}
    assert (spec["input"], spec["space"], spec["tensorImageSize"]) == ("head", "native", "3D")
    assert (spec["numTraining"], spec["numValidation"], spec["numTest"]) == (11, 2, 0)
    assert len(spec["training"]) == 11 and len(spec["validation"]) == 2 and spec["test"] == []
    assert "1 subject without every contrast left out" in spec["notes"]
    kept = {e["image"][0].split("/")[1].rsplit("_", 1)[0] for e in entries(spec)}
    assert kept == set(names[1:])  # names[0] has no PD
    for entry in entries(spec):
        case = entry["image"][0][len("images/"):].rsplit("_", 1)[0]
        assert entry["image"] == [f"images/{case}_{c}.nii.gz" for c in ("t1", "t2", "pd")]
        for rel, mod in zip(entry["image"], ("T1", "T2", "PD"), strict=True):
            assert_links(out, rel, src / f"IXI-{mod}" / f"{case}-{mod}.nii.gz")
    assert tree(src) == before
    resolved = read_split(out, "training")
    assert len(resolved) == 11
    assert resolved[0]["image"][1] == str((out / spec["training"][0]["image"][1]).resolve())


def test_ixi_validation_split_is_seeded(tmp_path):
    src = tmp_path / "IXI"
    ixi_tree(src, subjects=20, folders=False, no_pd=0)
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 5)):
        runs[name] = manifest(import_dataset("ixi", src, tmp_path / name, seed=seed))["validation"]
    assert runs["a"] == runs["b"] and len(runs["a"]) == 3  # round(20 * 0.15)
    assert runs["a"] != runs["c"]
    none = manifest(import_dataset("ixi", src, tmp_path / "d", validation_fraction=0))
    assert none["numValidation"] == 0 and none["numTraining"] == 20


def test_ixi_copy_writes_files_not_links(tmp_path):
    src, out = tmp_path / "IXI", tmp_path / "out"
    ixi_tree(src, subjects=3, no_pd=0)
    spec = manifest(import_dataset("ixi", src, out, copy=True))
    rel = spec["training"][0]["image"][0]
    assert (out / rel).is_file() and not (out / rel).is_symlink()
    case = rel[len("images/"):].rsplit("_", 1)[0]
    assert (out / rel).read_bytes() == (src / "IXI-T1" / f"{case}-T1.nii.gz").read_bytes()


def test_symlink_failure_falls_back_to_a_copy(tmp_path, monkeypatch):
    src, out = tmp_path / "IXI", tmp_path / "out"
    ixi_tree(src, subjects=3, no_pd=0)

    def refuse(*args, **kwargs):
        raise OSError("links not supported here")

    monkeypatch.setattr(os, "symlink", refuse)
    spec = manifest(import_dataset("ixi", src, out))
    rel = spec["training"][0]["image"][0]
    assert (out / rel).is_file() and not (out / rel).is_symlink()


# -- BraTS ---------------------------------------------------------------------------------------


def brats2021_tree(src: Path, cases=("00000", "00002", "00003")) -> None:
    for index, case in enumerate(cases):
        folder = src / f"BraTS2021_{case}"
        affine = np.eye(4)
        for mod in ("t1", "t1ce", "t2", "flair"):
            nifti(folder / f"BraTS2021_{case}_{mod}.nii.gz", affine=affine)
        seg = np.zeros(SHAPE, np.uint8)
        if index != 1:  # the second case: an empty segmentation
            seg[2:4, 2:4, 1:3] = (1, 2, 4)[index % 3]
        nifti(folder / f"BraTS2021_{case}_seg.nii.gz", data=seg, affine=affine)


@pytest.mark.parametrize("fmt", ["brats", "brats2021"])
def test_brats2021_cases_are_test_entries_with_seg_masks(tmp_path, fmt):
    src, out = tmp_path / "RSNA_ASNR_MICCAI_BraTS2021_TrainingData", tmp_path / "out"
    brats2021_tree(src)
    before = tree(src)
    spec = manifest(import_dataset(fmt, src, out))
    assert spec["source_format"] == "brats"
    assert spec["contrasts"] == ["t1", "t1ce", "t2", "flair"]
    assert spec["modality"] == {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"}
    assert (spec["input"], spec["space"]) == ("brain", "sri24")
    assert (spec["numTraining"], spec["numValidation"], spec["numTest"]) == (0, 0, 3)
    first, empty, last = spec["test"]
    assert first["image"] == [f"images/BraTS2021_00000_{c}.nii.gz"
                              for c in ("t1", "t1ce", "t2", "flair")]
    assert first["mask"] == "masks/BraTS2021_00000.nii.gz"
    assert [first["lesion"], empty["lesion"], last["lesion"]] == [True, False, True]
    assert_links(out, first["mask"], src / "BraTS2021_00000" / "BraTS2021_00000_seg.nii.gz")
    assert_links(out, first["image"][1], src / "BraTS2021_00000" / "BraTS2021_00000_t1ce.nii.gz")
    assert tree(src) == before
    test = read_split(out, "test")
    assert test[0]["mask"] == str((src / "BraTS2021_00000" / "BraTS2021_00000_seg.nii.gz").resolve())


def test_brats2023_names_map_to_medidiff_contrasts(tmp_path):
    src, out = tmp_path / "ASNR-MICCAI-BraTS2023-GLI-Challenge-TrainingData", tmp_path / "out"
    case = "BraTS-GLI-00000-000"
    for mod in ("t1n", "t1c", "t2w", "t2f"):
        nifti(src / case / f"{case}-{mod}.nii.gz", affine=np.eye(4))
    nifti(src / case / f"{case}-seg.nii.gz", data=np.zeros(SHAPE, np.uint8), affine=np.eye(4))
    spec = manifest(import_dataset("BraTS2023", src, out))
    entry, = spec["test"]
    assert spec["name"] == "BraTS 2023" and spec["contrasts"] == ["t1", "t1ce", "t2", "flair"]
    assert_links(out, entry["image"][3], src / case / f"{case}-t2f.nii.gz")  # t2f is FLAIR
    assert_links(out, entry["image"][1], src / case / f"{case}-t1c.nii.gz")
    assert entry["lesion"] is False


def test_brats_alias_of_the_other_edition_finds_nothing(tmp_path):
    src = tmp_path / "brats"
    brats2021_tree(src)
    with pytest.raises(InputError, match="holds no BraTS files .*BraTS-GLI"):
        import_dataset("brats2023", src, tmp_path / "out")


# -- ATLAS ---------------------------------------------------------------------------------------


def test_atlas_t1w_with_lesion_masks_as_test(tmp_path):
    src, out = tmp_path / "ATLAS_2" / "Training", tmp_path / "out"
    stem = "sub-r001s001_ses-1_space-MNI152NLin2009aSym"
    anat = src / "R001" / "sub-r001s001" / "ses-1" / "anat"
    nifti(anat / f"{stem}_T1w.nii.gz", affine=np.eye(4))
    nifti(anat / f"{stem}_label-L_desc-T1lesion_mask.nii.gz", affine=np.eye(4),
          data=np.ones(SHAPE, np.uint8))
    (anat / f"{stem}_T1w.json").write_text("{}")
    spec = manifest(import_dataset("atlas", src, out))
    entry, = spec["test"]
    assert spec["contrasts"] == ["t1"] and spec["modality"] == {"0": "T1"}
    assert (spec["input"], spec["space"]) == ("head", "mni152-2009a")
    assert entry["image"] == "images/sub-r001s001_ses-1_t1.nii.gz"  # one contrast: a string
    assert entry["mask"] == "masks/sub-r001s001_ses-1.nii.gz"
    assert_links(out, entry["mask"], anat / f"{stem}_label-L_desc-T1lesion_mask.nii.gz")
    assert read_split(out, "test")[0]["image"] == str((anat / f"{stem}_T1w.nii.gz").resolve())


# -- BIDS ----------------------------------------------------------------------------------------


def test_bids_first_run_per_subject_and_derivatives_skipped(tmp_path):
    src, out = tmp_path / "ds000001", tmp_path / "out"
    for sub in ("01", "02", "03", "04"):
        anat = src / f"sub-{sub}" / "ses-1" / "anat"
        nifti(anat / f"sub-{sub}_ses-1_run-1_T1w.nii.gz")
        nifti(anat / f"sub-{sub}_ses-1_FLAIR.nii")
    nifti(src / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_run-2_T1w.nii.gz")
    nifti(src / "sub-05" / "anat" / "sub-05_T1w.nii.gz")  # no FLAIR: left out
    nifti(src / "derivatives" / "fmriprep" / "sub-01" / "anat" / "sub-01_desc-preproc_T1w.nii.gz")
    nifti(src / "sub-06" / "anat" / "sub-06_T1w.nii.gz", shape=(*SHAPE, 2))  # never read: no FLAIR
    (src / "dataset_description.json").write_text("{}")
    spec = manifest(import_dataset("bids", src, out, validation_fraction=0.25))
    assert spec["contrasts"] == ["t1", "flair"] and spec["modality"] == {"0": "T1", "1": "FLAIR"}
    assert (spec["input"], spec["space"]) == (None, None)
    assert (spec["numTraining"], spec["numValidation"]) == (3, 1)
    assert any("first in sorted order" in note for note in spec["notes"])
    assert "2 subjects without every contrast left out" in spec["notes"]
    sub01 = next(e for e in entries(spec) if e["image"][0].startswith("images/sub-01_"))
    assert sub01["image"] == ["images/sub-01_t1.nii.gz", "images/sub-01_flair.nii"]  # .nii kept
    assert_links(out, sub01["image"][0], src / "sub-01/ses-1/anat/sub-01_ses-1_run-1_T1w.nii.gz")


def test_4d_file_where_a_3d_contrast_is_expected(tmp_path):
    src = tmp_path / "bids"
    bad = nifti(src / "sub-01" / "anat" / "sub-01_T2w.nii.gz", shape=(*SHAPE, 3))
    with pytest.raises(InputError, match="is 4D .*a 3D T2 scan is expected") as info:
        import_dataset("bids", src, tmp_path / "out")
    assert info.value.path == str(bad)


# -- Decathlon -----------------------------------------------------------------------------------


def decathlon_tree(src: Path) -> np.ndarray:
    modality = {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
    (src / "dataset.json").parent.mkdir(parents=True)
    (src / "dataset.json").write_text(json.dumps({"name": "BRATS", "modality": modality,
                                                  "labels": {"0": "background", "1": "edema"}}))
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = (-3, 4, 7)
    data = _RNG.integers(0, 1000, (*SHAPE, 4)).astype(np.int16)
    nifti(src / "imagesTr" / "BRATS_001.nii.gz", data=data, affine=affine)
    nifti(src / "imagesTr" / "._BRATS_001.nii.gz", shape=(2, 2, 2))  # a macOS copy: skipped
    nifti(src / "labelsTr" / "BRATS_001.nii.gz", data=np.zeros(SHAPE, np.uint8), affine=affine)
    nifti(src / "imagesTs" / "BRATS_485.nii.gz", shape=(*SHAPE, 4))
    return data


def test_decathlon_4d_files_are_split_into_3d_channels(tmp_path):
    src, out = tmp_path / "Task01_BrainTumour", tmp_path / "out"
    data = decathlon_tree(src)
    before = tree(src)
    spec = manifest(import_dataset("decathlon", src, out))
    assert spec["contrasts"] == ["flair", "t1", "t1ce", "t2"]
    assert spec["modality"] == {"0": "FLAIR", "1": "T1", "2": "T1ce", "3": "T2"}
    assert (spec["numTraining"], spec["numValidation"], spec["numTest"]) == (1, 0, 1)
    entry, = spec["training"]
    assert entry["label"] == "labels/BRATS_001.nii.gz"
    assert_links(out, entry["label"], src / "labelsTr" / "BRATS_001.nii.gz")
    source = nib.load(src / "imagesTr" / "BRATS_001.nii.gz")
    for index, rel in enumerate(entry["image"]):
        written = nib.load(out / rel)
        assert not (out / rel).is_symlink() and written.shape == SHAPE
        np.testing.assert_array_equal(np.asanyarray(written.dataobj), data[..., index])
        np.testing.assert_allclose(written.affine, source.affine)
    assert spec["test"][0]["image"][3] == "images/BRATS_485_t2.nii.gz"
    assert tree(src) == before
    assert read_split(out, "training")[0]["label"] == str((src / "labelsTr/BRATS_001.nii.gz").resolve())


@pytest.mark.parametrize("fmt", ["decathlon", "nnunet"])
def test_source_dataset_json_invalid_or_without_channels(tmp_path, fmt):
    key = {"decathlon": "modality", "nnunet": "channel_names"}[fmt]
    src = tmp_path / "src"
    src.mkdir()
    (src / "dataset.json").write_text("{not json")
    with pytest.raises(InputError, match="dataset.json: is not valid JSON"):
        import_dataset(fmt, src, tmp_path / "out")
    (src / "dataset.json").write_text(json.dumps({"name": "x", "file_ending": ".nii.gz"}))
    with pytest.raises(InputError, match=f"lacks '{key}'"):
        import_dataset(fmt, src, tmp_path / "out")


def test_decathlon_4d_file_with_the_wrong_channel_count(tmp_path):
    src = tmp_path / "Task01"
    decathlon_tree(src)
    bad = nifti(src / "imagesTr" / "BRATS_002.nii.gz", shape=(*SHAPE, 2))
    with pytest.raises(InputError, match="4D file with 4 channels") as info:
        import_dataset("decathlon", src, tmp_path / "out")
    assert info.value.path == str(bad)


# -- nnU-Net v2 ----------------------------------------------------------------------------------


def nnunet_tree(src: Path) -> None:
    src.mkdir(parents=True)
    (src / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T2", "1": "FLAIR"}, "labels": {"background": 0, "lesion": 1},
        "numTraining": 2, "file_ending": ".nii.gz"}))
    for case in ("case_001", "case_002"):
        for channel in (0, 1):
            nifti(src / "imagesTr" / f"{case}_{channel:04d}.nii.gz", affine=np.eye(4))
        nifti(src / "labelsTr" / f"{case}.nii.gz", data=np.zeros(SHAPE, np.uint8),
              affine=np.eye(4))
    for channel in (0, 1):
        nifti(src / "imagesTs" / f"case_101_{channel:04d}.nii.gz")


def test_nnunet_channels_labels_and_test_cases(tmp_path):
    src, out = tmp_path / "Dataset001_Lesions", tmp_path / "out"
    nnunet_tree(src)
    spec = manifest(import_dataset("nnunet", src, out))
    assert spec["contrasts"] == ["t2", "flair"]
    assert spec["channel_names"] == {"0": "T2", "1": "FLAIR"}
    assert (spec["numTraining"], spec["numValidation"], spec["numTest"]) == (2, 0, 1)
    first = spec["training"][0]
    assert first == {"image": ["images/case_001_t2.nii.gz", "images/case_001_flair.nii.gz"],
                     "label": "labels/case_001.nii.gz"}
    assert_links(out, first["image"][1], src / "imagesTr" / "case_001_0001.nii.gz")
    assert_links(out, first["label"], src / "labelsTr" / "case_001.nii.gz")
    assert spec["test"] == [{"image": ["images/case_101_t2.nii.gz",
                                       "images/case_101_flair.nii.gz"]}]


# -- every format, and the command line ----------------------------------------------------------


@pytest.mark.parametrize("fmt, removed, message", [
    ("brats", "BraTS2021_00002/BraTS2021_00002_t2.nii.gz",
     "case BraTS2021_00002 has no BraTS2021_00002_t2.nii.gz"),
    ("brats", "BraTS2021_00003/BraTS2021_00003_seg.nii.gz",
     "case BraTS2021_00003 has no BraTS2021_00003_seg.nii.gz"),
    ("nnunet", "imagesTr/case_002_0001.nii.gz", "case case_002 has no case_002_0001.nii.gz"),
    ("nnunet", "labelsTr/case_001.nii.gz", "label of training case case_001"),
])
def test_case_missing_a_file_is_named(tmp_path, fmt, removed, message):
    src = tmp_path / "src"
    {"brats": brats2021_tree, "nnunet": nnunet_tree}[fmt](src)
    (src / removed).unlink()
    with pytest.raises(InputError, match=message):
        import_dataset(fmt, src, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written before the layout was read


def test_registry_follows_the_names():
    assert tuple(IMPORTERS) == IMPORT_FORMATS
    assert all(callable(module.collect) for module in IMPORTERS.values())


@pytest.mark.parametrize("fmt", IMPORT_FORMATS)
def test_source_without_the_layout_is_refused(tmp_path, fmt):
    src = tmp_path / "empty"
    nifti(src / "scan.nii.gz")
    with pytest.raises(InputError) as info:
        import_dataset(fmt, src, tmp_path / "out")
    assert info.value.path == str(src) and "holds no" in info.value.problem


def test_missing_source_unknown_format_and_used_output(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        import_dataset("ixi", tmp_path / "nowhere", tmp_path / "out")
    with pytest.raises(InputError, match="unknown import format 'oasis' .*ixi, brats"):
        import_dataset("oasis", tmp_path, tmp_path / "out")
    src = tmp_path / "IXI"
    ixi_tree(src, subjects=3, no_pd=0)
    with pytest.raises(InputError, match="inside the source"):
        import_dataset("ixi", src, src / "imported")
    import_dataset("ixi", src, tmp_path / "out")
    with pytest.raises(InputError, match="already holds a data set"):
        import_dataset("ixi", src, tmp_path / "out")


def test_ixi_error_names_the_expected_files(tmp_path):
    src = tmp_path / "IXI"
    nifti(src / "IXI002-Guys-0828-MRA.nii.gz")
    with pytest.raises(InputError, match=r"holds no IXI files \(IXI<id>-<site>-<nnnn>-T1.nii.gz"):
        import_dataset("ixi", src, tmp_path / "out")


def test_cli_import_prints_one_summary_line_and_errors_in_one_line(tmp_path):
    src, out = tmp_path / "IXI", tmp_path / "out"
    ixi_tree(src, subjects=14, no_pd=1)
    code, stdout, stderr = run_cli("data", "import", "IXI", str(src), str(out), "--seed", "1")
    assert code == 0, stderr
    assert stderr.strip() == (f"imported 11 training, 2 validation, 0 test cases (t1, t2, pd) "
                              f"from ixi into {out}; 1 subject without every contrast left out")
    code, _, stderr = run_cli("data", "import", "ixi", str(src), str(out))
    assert code == 2 and len(stderr.strip().splitlines()) == 1
    assert "already holds a data set" in stderr
    code, _, stderr = run_cli("data", "import", "brats", str(src), str(tmp_path / "b"))
    assert code == 2 and stderr.count("\n") == 1 and "holds no BraTS files" in stderr
    code, _, stderr = run_cli("data", "import", "oasis", str(src), str(tmp_path / "c"))
    assert code == 2 and len(stderr.strip().splitlines()) == 1

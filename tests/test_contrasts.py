"""Contrasts: the field's spellings, data sets of several contrasts, and a single-contrast
model picking its own among a subject's scans."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medidiff.config import Config
from medidiff.data.contrasts import canonical, dataset_contrasts
from medidiff.data.datasets import data_contrasts, read_split, resolve_contrasts
from medidiff.errors import ConfigError, InputError
from medidiff.io.discover import contrast_of_name, select_contrast


def test_every_spelling_of_the_field_maps_to_one_name():
    assert {canonical(n) for n in ("T1", "T1w", "t1n")} == {"t1"}
    assert {canonical(n) for n in ("FLAIR", "t2f", "Flair")} == {"flair"}
    assert {canonical(n) for n in ("T2w", "t2")} == {"t2"}
    assert canonical("t1c") == "t1ce"
    with pytest.raises(InputError, match="unknown contrast 'DWI'"):
        canonical("DWI")


def test_a_data_set_names_its_channels_in_decathlon_or_nnunet_style():
    assert dataset_contrasts({"modality": {"1": "T2w", "0": "FLAIR"}}) == ["flair", "t2"]
    assert dataset_contrasts({"channel_names": {"0": "T1", "1": "t2f"}}) == ["t1", "flair"]
    assert dataset_contrasts({}) == ["t1"]
    with pytest.raises(InputError, match="twice"):
        dataset_contrasts({"modality": {"0": "T1", "1": "T1w"}})


def _three_contrasts(root: Path) -> Path:
    for name in ("a_T1w", "a_T2w", "a_FLAIR"):
        (root / f"{name}.nii.gz").write_bytes(b"")
    spec = {"modality": {"0": "T1", "1": "T2", "2": "FLAIR"},
            "training": [{"image": ["a_T1w.nii.gz", "a_T2w.nii.gz", "a_FLAIR.nii.gz"]}]}
    (root / "dataset.json").write_text(json.dumps(spec))
    return root


def test_data_contrasts_picks_files_from_each_entry(tmp_path):
    root = _three_contrasts(tmp_path)
    assert data_contrasts(root) == ["t1", "t2", "flair"]
    [entry] = read_split(root, "training", ["flair"])
    assert entry["image"] == str((root / "a_FLAIR.nii.gz").resolve())
    [entry] = read_split(root, "training", ["t2", "t1"])
    assert [Path(p).name for p in entry["image"]] == ["a_T2w.nii.gz", "a_T1w.nii.gz"]
    with pytest.raises(InputError, match="has no pd scans"):
        read_split(root, "training", ["pd"])


def test_training_resolves_the_contrast_and_its_template(tmp_path):
    root = _three_contrasts(tmp_path)
    cfg = resolve_contrasts(Config.model_validate({"data": {"contrasts": ["flair"]}}), root)
    assert cfg.preprocess.template == "mni152-2009c-flair"
    assert resolve_contrasts(Config(), root).data.contrasts == ["t1", "t2", "flair"]
    with pytest.raises(ConfigError, match="segment models take one contrast"):
        resolve_contrasts(Config.model_validate({"task": "segment"}), root)
    plain = tmp_path / "plain"  # a folder without dataset.json holds T1 scans
    plain.mkdir()
    assert resolve_contrasts(Config(), plain).data.contrasts == ["t1"]


def test_a_single_contrast_model_scores_its_own_contrast_of_a_subject():
    paths = [Path(f"/d/sub-1_{s}.nii.gz") for s in ("T1w", "T2w", "FLAIR")] + [Path("/d/x.nii")]
    assert contrast_of_name(paths[2]) == "flair"
    assert contrast_of_name(Path("/d/sub-1_ses-2_T2w.nii.gz")) == "t2"
    assert select_contrast(paths, "flair") == [paths[2], paths[3]]
    only_t1 = [paths[0], paths[3]]
    assert select_contrast(only_t1, "flair") == only_t1  # nothing of its own: all kept

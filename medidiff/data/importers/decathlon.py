"""Medical Segmentation Decathlon: ``dataset.json`` with ``modality``, ``imagesTr/*.nii.gz``
(one 4D file per case, the channels on its last axis), ``labelsTr/``, ``imagesTs/``. The 4D
files are split into one 3D file per channel under OUT (the only files written, not linked)."""

from __future__ import annotations

from pathlib import Path

from medidiff.data.contrasts import DISPLAY
from medidiff.data.importers.layout import (
    Case,
    Channel,
    Layout,
    check_case,
    nifti_ending,
    shape_of,
    source_spec,
    spatial_shape,
)
from medidiff.errors import InputError


def _scans(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.name.endswith((".nii", ".nii.gz")))


def _case_name(path: Path) -> str:
    return path.name[: -len(nifti_ending(path))]


def _images(path: Path, contrasts: list[str]) -> list[Path | Channel]:
    """The channels of one case: the file itself when it is 3D and one channel is named."""
    shape = shape_of(path)
    if len(contrasts) == 1 and (len(shape) == 3 or shape[3:] == (1,)):
        spatial_shape(path, f"{DISPLAY[contrasts[0]]} scan")
        return [path]
    if len(shape) != 4 or shape[3] != len(contrasts):
        raise InputError(path, f"has shape {list(shape)}; a 4D file with {len(contrasts)} "
                               f"channels on its last axis ({', '.join(contrasts)}) is expected")
    return [Channel(path, i) for i in range(len(contrasts))]


def collect(src: Path) -> Layout:
    """imagesTr (with labelsTr) as training cases, imagesTs as test cases."""
    spec, contrasts = source_spec(src, "modality", "Decathlon")
    training, test = [], []
    for path in _scans(src / "imagesTr"):
        label = src / "labelsTr" / path.name
        case = Case(_case_name(path), _images(path, contrasts),
                    label=label if label.is_file() else None)
        check_case(case, contrasts)
        if case.label is not None and spatial_shape(label, "label") != shape_of(path)[:3]:
            raise InputError(label, f"has shape {list(shape_of(label))}, its scan "
                                    f"{list(shape_of(path)[:3])}")
        training.append(case)
    for path in _scans(src / "imagesTs"):
        test.append(Case(_case_name(path), _images(path, contrasts)))
    if not training and not test:
        raise InputError(src, "holds no Decathlon scans (imagesTr/<case>.nii.gz, imagesTs/)")
    name = str(spec.get("name") or src.name)
    extra = {"labels": spec["labels"]} if isinstance(spec.get("labels"), dict) else {}
    return Layout(name, str(spec.get("description") or f"Decathlon data set {name}"), contrasts,
                  input=None, space=None, training=training, test=test, extra=extra)

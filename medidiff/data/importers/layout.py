"""What an importer finds in a source tree: cases, their files, and the data set's hints.

An importer only reads (names and NIfTI headers); ``medidiff.data.importers.output`` links or
writes the files and the dataset.json.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib

from medidiff.data.contrasts import DISPLAY, dataset_contrasts
from medidiff.errors import InputError
from medidiff.names import CONTRASTS

SKIPPED_FOLDERS = ("derivatives", "sourcedata")


@dataclass(frozen=True)
class Channel:
    """Channel ``index`` (last axis) of the 4D file ``path``, written out as its own 3D file."""

    path: Path
    index: int


@dataclass
class Case:
    """One scan session: a file (or Channel) per contrast, and optionally its mask or label."""

    name: str
    images: list[Path | Channel]
    mask: Path | None = None
    label: Path | None = None
    lesion: bool | None = None


@dataclass
class Layout:
    """What ``collect`` found: the contrasts in channel order, cases by split, hints, notes."""

    name: str
    description: str
    contrasts: list[str]
    input: str | None
    space: str | None
    training: list[Case] = field(default_factory=list)
    test: list[Case] = field(default_factory=list)
    split_validation: bool = False  # healthy training cases: hold a seeded share out
    notes: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # more dataset.json keys (a source's labels)


def nifti_ending(path: Path) -> str:
    """``.nii.gz`` or ``.nii``, as the source file is named."""
    return ".nii.gz" if path.name.lower().endswith(".nii.gz") else ".nii"


def source_files(src: Path, pattern: str = "*.nii*"):
    """Files under ``src`` matching ``pattern``, sorted; hidden files and folders (macOS ``._``
    copies among them) and BIDS ``derivatives/`` and ``sourcedata/`` left out."""
    for path in sorted(src.rglob(pattern)):
        parts = path.relative_to(src).parts
        if any(p.startswith(".") for p in parts) or any(p in SKIPPED_FOLDERS for p in parts[:-1]):
            continue
        if path.is_file():
            yield path


def shape_of(path: Path) -> tuple[int, ...]:
    """The image shape from the NIfTI header (no voxels read)."""
    try:
        return tuple(int(n) for n in nib.load(path).shape)
    except Exception as exc:  # nibabel raises several types for a damaged file
        raise InputError(path, f"is not a readable NIfTI file ({type(exc).__name__})") from None


def spatial_shape(path: Path, what: str) -> tuple[int, ...]:
    """The 3D shape of ``path``, a ``what`` scan (a trailing singleton 4th axis is accepted)."""
    shape = shape_of(path)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise InputError(path, f"is {len(shape)}D {list(shape)}; a 3D {what} is expected")
    return shape


def check_case(case: Case, contrasts: list[str]) -> None:
    """Every contrast file of ``case`` is 3D; its mask and label share the first one's grid."""
    first = None
    for source, contrast in zip(case.images, contrasts, strict=True):
        if isinstance(source, Path):
            shape = spatial_shape(source, f"{DISPLAY[contrast]} scan")
            first = first or shape
    for path in (case.mask, case.label):
        if path is None:
            continue
        shape = spatial_shape(path, "mask or label")
        if first is not None and shape != first:
            raise InputError(path, f"has shape {list(shape)}, its scan {list(first)}")


def common_contrasts(found: dict[str, dict[str, Path]], what: str) -> tuple[list[str], dict, list]:
    """From ``{case: {contrast: file}}``: the contrasts more than half of the cases hold (in
    ``CONTRASTS`` order), the cases holding all of them, and notes on what was left out."""
    held = Counter(c for files in found.values() for c in files)
    chosen = [c for c in CONTRASTS if held[c] * 2 > len(found)]
    notes = []
    rare = [c for c in CONTRASTS if held[c] and c not in chosen]
    if rare:
        notes.append(f"{', '.join(rare)} left out (held by at most half of the {what}s)")
    kept = {case: files for case, files in found.items() if all(c in files for c in chosen)}
    dropped = len(found) - len(kept)
    if dropped:
        notes.append(f"{dropped} {what}{'s' if dropped != 1 else ''} without every contrast "
                     "left out")
    return chosen, kept, notes


def source_spec(src: Path, key: str, what: str) -> tuple[dict, list[str]]:
    """A source's ``dataset.json`` and the contrasts its ``key`` table names, in channel order."""
    path = src / "dataset.json"
    if not path.is_file():
        raise InputError(src, f"holds no dataset.json (a {what} folder has one)")
    try:
        spec = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(path, "is not valid JSON") from None
    if not isinstance(spec, dict):
        raise InputError(path, "must hold a JSON object")
    table = spec.get(key)
    if not isinstance(table, dict) or not table:
        raise InputError(path, f"lacks '{key}' (channel index -> contrast, e.g. {{\"0\": \"T2\"}})")
    return spec, dataset_contrasts({key: table}, path)

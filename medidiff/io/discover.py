"""Finding scans: files, DICOM series folders and folders of them, and the names of their outputs.

The kind of an input (NIfTI, PNG or a DICOM folder) is judged from its name, and a folder is a
DICOM series when it holds files with a `.dcm` suffix or the DICM magic. Also the one-line
`InputError` helpers the other `medidiff.io` modules share.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from medidiff.errors import InputError

_NIFTI_SUFFIXES = (".nii.gz", ".nii")
_DICOM_SKIP_SUFFIXES = (".nii", ".gz", ".png", ".json", ".csv", ".txt", ".yaml", ".yml")
_CASE_NAME_MAX = 100
_UNSUPPORTED = "has an unsupported type; expected .nii, .nii.gz, .png or a DICOM folder"


# -- paths and names ---------------------------------------------------------------------------


def _shown(path: str | Path) -> str:
    """The path as one printable line: control characters and undecodable bytes escaped."""
    text = str(path)
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _error(path: str | Path, problem: str) -> InputError:
    return InputError(_shown(path), problem)


def _kind(path: Path) -> str | None:
    """'nifti', 'png' or 'dicom' (a folder), judged by the name alone; None if unsupported."""
    if path.is_dir():
        return "dicom"
    name = path.name.lower()
    if name.endswith(_NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(".png"):
        return "png"
    return None


def _is_dicom_file(path: Path) -> bool:
    """A Part-10 DICOM file: the 'DICM' magic at byte 128."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _visible_entries(folder: Path) -> list[Path]:
    """A folder's entries without hidden ones, sorted by name (MONAI's glob skips hidden too)."""
    try:
        names = sorted(e.name for e in os.scandir(folder) if not e.name.startswith("."))
    except OSError as e:
        raise _error(folder, f"cannot be listed ({e.strerror or type(e).__name__})") from None
    return [folder / n for n in names]


def _dicom_candidates(folder: Path) -> list[Path]:
    """Files of a folder that claim to be DICOM: a `.dcm` suffix or the DICM magic."""
    found = []
    for entry in _visible_entries(folder):
        if not entry.is_file():
            continue
        name = entry.name.lower()
        if name.endswith(".dcm"):
            found.append(entry)
        elif not name.endswith(_DICOM_SKIP_SUFFIXES) and _is_dicom_file(entry):
            found.append(entry)
    return found


def _is_dicom_series(folder: Path) -> bool:
    return bool(_dicom_candidates(folder))


def _discover_one(path: Path) -> list[Path]:
    if not path.exists():
        raise _error(path, "does not exist")
    if path.is_dir():
        if _is_dicom_series(path):
            return [path]
        items = [
            e
            for e in _visible_entries(path)
            if (e.is_file() and _kind(e) in ("nifti", "png"))
            or (e.is_dir() and _is_dicom_series(e))
        ]
        if not items:
            raise _error(path, "holds no NIfTI, PNG or DICOM series")
        return items
    if _kind(path) is None:
        if path.name.lower().endswith(".dcm") or _is_dicom_file(path):
            raise _error(path, "is a single DICOM file; pass the folder of its series instead")
        raise _error(path, _UNSUPPORTED)
    return [path]


def discover_inputs(paths: Sequence[str | Path]) -> list[Path]:
    """The scans named by `paths`: files, DICOM series folders, or folders of them (one level).

    The result is de-duplicated and sorted by path, so that every process sharding the same
    inputs (`--part-id/--num-parts`) sees the same list whatever the order of its arguments.
    """
    found: dict[str, Path] = {}
    for given in paths:
        for item in _discover_one(Path(given)):
            found.setdefault(os.path.realpath(item), item)
    return sorted(found.values(), key=str)


def case_name(path: str | Path) -> str:
    """The name outputs of a scan are called after: `case.nii.gz` -> `case`, a folder -> its name.

    Only the file or folder name is used (never a DICOM header field, which may hold a patient's
    name), reduced to letters, digits, `-`, `_` and `.` (no leading dot), so that an output can
    never leave its folder. Distinct inputs may share a case name (`a/x.nii`, `b/x.nii`).
    """
    path = Path(path)
    name = Path(os.path.abspath(path)).name
    lower = name.lower()
    for suffix in (*_NIFTI_SUFFIXES, ".png"):
        if lower.endswith(suffix) and not path.is_dir():
            name = name[: -len(suffix)]
            break
    return _safe_name(name)


_BIDS_SUFFIX = re.compile(r"_([A-Za-z0-9]+)$")


def contrast_of_name(path: str | Path) -> str | None:
    """The contrast a file's name declares with a BIDS suffix (``sub-1_FLAIR.nii.gz`` ->
    ``flair``, ``sub-1_ses-1_T2w`` -> ``t2``), or None."""
    from medidiff.data.contrasts import maybe_canonical

    stem = case_name(path)
    match = _BIDS_SUFFIX.search(stem)
    return maybe_canonical(match.group(1)) if match else None


def select_contrast(paths: Sequence[Path], contrast: str) -> list[Path]:
    """The inputs of a single-contrast model among scans of several contrasts of a subject.

    When the inputs name their contrasts with BIDS suffixes (``sub-1_T1w``, ``sub-1_T2w``,
    ``sub-1_FLAIR``) and some are of ``contrast``, the others are left out, so a FLAIR model
    scores a subject's folder of all three by its FLAIR scan. Inputs that name no contrast
    are all kept (the model scores each, as always).
    """
    named = {p: contrast_of_name(p) for p in paths}
    if not any(c == contrast for c in named.values()):
        return list(paths)
    return [p for p, c in named.items() if c in (contrast, None)]


_NNUNET_CHANNEL = re.compile(r"^(.+)_(\d{4})$")


@dataclass(frozen=True)
class CaseFiles:
    """The scans of one case for a model of several contrasts: one file (or DICOM folder)
    per contrast, in the model's channel order."""

    name: str
    files: tuple[Path, ...]


def group_channels(paths: Sequence[Path], contrasts: Sequence[str]
                   ) -> tuple[list[CaseFiles], list[tuple[str, Path, str]]]:
    """The inputs of a model of several ``contrasts`` as cases, and the inputs that make no
    case (``(case, path, one-line problem)``).

    A case's files are named as nnU-Net names channels (``CASE_0000.nii.gz``,
    ``CASE_0001.nii.gz``, ...: the index is the model's channel) or with BIDS suffixes
    (``sub-1_T1w``, ``sub-1_T2w``, ``sub-1_FLAIR``: put in the model's order; contrasts the
    model does not take are left out). A case without one of the model's contrasts, or with
    more nnU-Net channels than the model takes, makes no case.
    """
    from medidiff.data.contrasts import BIDS_SUFFIX, DISPLAY

    order = list(contrasts)
    want = ", ".join(order)
    by_index: dict[str, dict[int, Path]] = {}
    by_contrast: dict[str, dict[str, Path]] = {}
    problems: list[tuple[str, Path, str]] = []
    doubled: set[str] = set()
    for path in paths:
        stem = case_name(path)
        match = _NNUNET_CHANNEL.match(stem)
        contrast = contrast_of_name(path)
        if match:
            by_index.setdefault(match.group(1), {})[int(match.group(2))] = path
        elif contrast is not None:
            prefix = stem[: _BIDS_SUFFIX.search(stem).start()] or "case"
            if contrast in order:
                if contrast in by_contrast.setdefault(prefix, {}):
                    doubled.add(prefix)
                    problems.append((prefix, path, f"{_shown(path)}: case '{prefix}' has two "
                                                   f"{DISPLAY[contrast]} scans"))
                by_contrast[prefix].setdefault(contrast, path)
            else:
                by_contrast.setdefault(prefix, {})
        else:
            problems.append((stem, path, f"{_shown(path)}: names no contrast; a model of "
                                         f"{want} scores cases of one file per contrast, named "
                                         "CASE_0000.nii.gz, CASE_0001.nii.gz, ... (nnU-Net) or "
                                         "CASE_T1w, CASE_T2w, CASE_FLAIR (BIDS)"))
    cases = []
    for prefix, files in sorted(by_index.items()):
        first = files[min(files)]
        missing = [k for k in range(len(order)) if k not in files]
        extra = sorted(k for k in files if k >= len(order))
        if missing:
            names = ", ".join(f"{prefix}_{k:04d} ({order[k]})" for k in missing)
            problems.append((prefix, first, f"{_shown(first)}: case '{prefix}' has no {names} "
                                            f"scan; the model takes {want}"))
        elif extra:
            problems.append((prefix, first, f"{_shown(first)}: case '{prefix}' has "
                                            f"{len(files)} channels; the model takes "
                                            f"{len(order)} ({want})"))
        else:
            cases.append(CaseFiles(_safe_name(prefix), tuple(files[k] for k in range(len(order)))))
    for prefix, files in sorted(by_contrast.items()):
        if prefix in doubled:
            continue
        missing = [c for c in order if c not in files]
        if missing:
            given = next(iter(files.values()), None)
            shown = _shown(given) + ": " if given is not None else ""
            problems.append((prefix, given, f"{shown}case '{prefix}' has no "
                                            f"{', '.join(DISPLAY[c] for c in missing)} scan "
                                            f"(e.g. {prefix}_{BIDS_SUFFIX[missing[0]]}.nii.gz); the "
                                            f"model takes {want}"))
        else:
            cases.append(CaseFiles(_safe_name(prefix), tuple(files[c] for c in order)))
    return sorted(cases, key=lambda c: c.name), problems


def _safe_name(name: str) -> str:
    """A case name from a file name: letters, digits, ``-``, ``_`` and ``.`` (no leading
    dot), at most ``_CASE_NAME_MAX`` characters, never empty."""
    name = re.sub(r"[^\w.-]+", "_", name).strip("._")
    return name[:_CASE_NAME_MAX] or "case"

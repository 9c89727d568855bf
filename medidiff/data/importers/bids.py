"""BIDS: ``sub-X[/ses-Y]/anat/sub-X[_ses-Y][_acq-..][_run-..]_<suffix>.nii.gz``, suffixes T1w
(with ``ce-``: a contrast-enhanced T1), T2w, FLAIR, PDw; ``derivatives/`` skipped. A subject is a
case; of several files of one contrast (sessions, runs) the first in sorted order is taken."""

from __future__ import annotations

import re
from pathlib import Path

from medidiff.data.contrasts import canonical
from medidiff.data.importers.layout import Case, Layout, check_case, common_contrasts, source_files
from medidiff.errors import InputError

PATTERN = re.compile(r"^(sub-[A-Za-z0-9]+)((?:_[a-zA-Z]+-[A-Za-z0-9]+)*)_(T1w|T2w|FLAIR|PDw)"
                     r"\.nii(\.gz)?$")
EXPECTED = "sub-<label>[/ses-<label>]/anat/sub-<label>[_ses-<label>]_T1w.nii.gz"


def _contrast(entities: str, suffix: str) -> str:
    if suffix == "T1w" and "_ce-" in entities:
        return "t1ce"
    return canonical(suffix)


def collect(src: Path) -> Layout:
    """Every subject of ``src`` with the contrasts most subjects have, as a training case."""
    found: dict[str, dict[str, list[Path]]] = {}
    for path in source_files(src):
        match = PATTERN.match(path.name)
        rel = path.relative_to(src).parts
        if not match or path.parent.name != "anat" or match.group(1) not in rel[:-1]:
            continue
        contrast = _contrast(match.group(2), match.group(3))
        found.setdefault(match.group(1), {}).setdefault(contrast, []).append(path)
    if not found:
        raise InputError(src, f"holds no BIDS anatomical scans ({EXPECTED})")
    several = sum(any(len(files) > 1 for files in by.values()) for by in found.values())
    first = {sub: {c: sorted(files)[0] for c, files in by.items()} for sub, by in found.items()}
    contrasts, kept, notes = common_contrasts(first, "subject")
    if not contrasts or not kept:
        raise InputError(src, "holds no subject with a contrast most subjects have")
    if several:
        notes.insert(0, f"{several} subject{'s' if several != 1 else ''} with several files of "
                        "one contrast (sessions or runs): the first in sorted order taken")
    cases = [Case(sub, [files[c] for c in contrasts]) for sub, files in sorted(kept.items())]
    for case in cases:
        check_case(case, contrasts)
    return Layout(src.name, f"BIDS data set {src.name} (anatomical scans)", contrasts,
                  input=None, space=None, training=cases, split_validation=True, notes=notes)

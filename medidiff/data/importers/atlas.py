"""ATLAS v2.0 (stroke, T1w): ``sub-r001s001/ses-1/anat/
sub-r001s001_ses-1_space-MNI152NLin2009aSym_T1w.nii.gz`` with ``..._label-L_desc-T1lesion_mask``;
in MNI 2009a, defaced but not skull-stripped."""

from __future__ import annotations

import re
from pathlib import Path

from medidiff.data.importers.layout import Case, Layout, check_case, source_files
from medidiff.errors import InputError

PATTERN = re.compile(r"^(sub-[A-Za-z0-9]+_ses-[A-Za-z0-9]+)_space-MNI152NLin2009aSym"
                     r"(_T1w|_label-L_desc-T1lesion_mask)\.nii(\.gz)?$")
EXPECTED = "sub-<id>/ses-<n>/anat/sub-<id>_ses-<n>_space-MNI152NLin2009aSym_T1w.nii.gz"


def collect(src: Path) -> Layout:
    """Every T1w of ``src`` as a test case, with its lesion mask where the release has one."""
    scans, masks = {}, {}
    for path in source_files(src):
        match = PATTERN.match(path.name)
        if match and path.parent.name == "anat":
            (scans if match.group(2) == "_T1w" else masks)[match.group(1)] = path
    if not scans:
        raise InputError(src, f"holds no ATLAS v2.0 scans ({EXPECTED})")
    cases = [Case(name, [scans[name]], mask=masks.get(name)) for name in sorted(scans)]
    for case in cases:
        check_case(case, ["t1"])
    notes = []
    unmasked = sum(case.mask is None for case in cases)
    if unmasked:
        notes.append(f"{unmasked} scan{'s' if unmasked != 1 else ''} without a lesion mask")
    return Layout("ATLAS v2.0", "ATLAS v2.0 stroke T1w scans (defaced heads) in MNI152NLin2009aSym",
                  ["t1"], input="head", space="mni152-2009a", test=cases, notes=notes)

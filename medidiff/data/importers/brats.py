"""BraTS 2021 (``BraTS2021_00000/BraTS2021_00000_{t1,t1ce,t2,flair,seg}.nii.gz``) and 2023
(``BraTS-GLI-00000-000/BraTS-GLI-00000-000-{t1n,t1c,t2w,t2f,seg}.nii.gz``, also MEN, MET, PED,
SSA): skull-stripped brains in SRI24, the edition told by the names."""

from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np

from medidiff.data.contrasts import canonical
from medidiff.data.importers.layout import Case, Layout, check_case, source_files
from medidiff.errors import InputError
from medidiff.names import CONTRASTS

EDITIONS = {
    "2021": (re.compile(r"^(BraTS2021_\d{5})_(t1|t1ce|t2|flair|seg)\.nii(\.gz)?$"),
             "BraTS2021_<id>/BraTS2021_<id>_{t1,t1ce,t2,flair,seg}.nii.gz", "_"),
    "2023": (re.compile(r"^(BraTS-[A-Z]{3}-\d{5}-\d{3})-(t1n|t1c|t2w|t2f|seg)\.nii(\.gz)?$"),
             "BraTS-GLI-<id>-<n>/BraTS-GLI-<id>-<n>-{t1n,t1c,t2w,t2f,seg}.nii.gz", "-"),
}
SPELLINGS = {"2021": {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair"},
             "2023": {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"}}
CONTRASTS_OF_BRATS = [c for c in CONTRASTS if c != "pd"]


def _found(src: Path, edition: str) -> dict[str, dict[str, Path]]:
    """{case: {contrast or "seg": file}} of one edition; a file must sit in its case's folder."""
    pattern = EDITIONS[edition][0]
    found: dict[str, dict[str, Path]] = {}
    for path in source_files(src):
        match = pattern.match(path.name)
        if match and path.parent.name == match.group(1):
            kind = "seg" if match.group(2) == "seg" else canonical(match.group(2))
            found.setdefault(match.group(1), {})[kind] = path
    return found


def has_lesion(seg: Path) -> bool:
    """Whether the segmentation marks any voxel as tumour (label > 0.5, as evaluation reads)."""
    return bool((np.asanyarray(nib.load(seg).dataobj) > 0.5).any())


def collect(src: Path, name: str = "brats") -> Layout:
    """Every BraTS case of ``src`` as a test case, its seg the mask (``name``: ``brats2021`` or
    ``brats2023`` accept that edition only)."""
    wanted = [name[-4:]] if name != "brats" else list(EDITIONS)
    by_edition = {e: f for e in wanted if (f := _found(src, e))}
    if not by_edition:
        expected = " or ".join(EDITIONS[e][1] for e in wanted)
        raise InputError(src, f"holds no BraTS files ({expected})")
    if len(by_edition) > 1:
        raise InputError(src, "holds BraTS 2021 and 2023 cases; import each edition on its own")
    (edition, found), = by_edition.items()
    segmented = sum("seg" in files for files in found.values())
    cases = []
    for case, files in sorted(found.items()):
        for kind in CONTRASTS_OF_BRATS + (["seg"] if segmented else []):
            if kind not in files:
                spelling = SPELLINGS[edition].get(kind, kind)
                raise InputError(src / case, f"case {case} has no "
                                             f"{case}{EDITIONS[edition][2]}{spelling}.nii.gz")
        images = [files[c] for c in CONTRASTS_OF_BRATS]
        cases.append(Case(case, images, mask=files.get("seg")))
    for case in cases:
        check_case(case, CONTRASTS_OF_BRATS)
        case.lesion = has_lesion(case.mask) if case.mask is not None else None
    notes = [] if segmented else ["no seg files (a validation release): test cases without masks"]
    return Layout(f"BraTS {edition}", f"BraTS {edition} glioma cases, skull-stripped, SRI24 1 mm",
                  CONTRASTS_OF_BRATS, input="brain", space="sri24", test=cases, notes=notes)

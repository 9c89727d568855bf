"""IXI: ``IXI002-Guys-0828-T1.nii.gz``, ``-T2``, ``-PD`` (in one folder or per-modality
subfolders such as ``IXI-T1/``); healthy heads with skull on their native grids."""

from __future__ import annotations

import re
from pathlib import Path

from medidiff.data.contrasts import canonical
from medidiff.data.importers.layout import Case, Layout, check_case, common_contrasts, source_files
from medidiff.errors import InputError

PATTERN = re.compile(r"^(IXI\d{3}-[A-Za-z]+-\d{4})-(T1|T2|PD)\.nii(\.gz)?$")
EXPECTED = "IXI<id>-<site>-<nnnn>-T1.nii.gz, -T2, -PD"


def collect(src: Path) -> Layout:
    """Every subject of ``src`` that holds all its common contrasts, as a training case."""
    found: dict[str, dict[str, Path]] = {}
    for path in source_files(src):
        match = PATTERN.match(path.name)
        if not match:
            continue  # MRA, DTI, IXI.xls and others
        subject, contrast = match.group(1), canonical(match.group(2))
        other = found.setdefault(subject, {}).get(contrast)
        if other is not None:
            raise InputError(path, f"is a second {match.group(2)} of {subject} (also {other})")
        found[subject][contrast] = path
    if not found:
        raise InputError(src, f"holds no IXI files ({EXPECTED})")
    contrasts, kept, notes = common_contrasts(found, "subject")
    if not contrasts or not kept:
        raise InputError(src, "holds no subject with a contrast most subjects have")
    cases = [Case(subject, [files[c] for c in contrasts]) for subject, files in sorted(kept.items())]
    for case in cases:
        check_case(case, contrasts)
    return Layout("IXI", "IXI healthy adults (Guys, HH, IOP), heads with skull, native grids",
                  contrasts, input="head", space="native", training=cases,
                  split_validation=True, notes=notes)

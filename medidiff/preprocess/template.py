"""The packaged head templates: MNI ICBM152 2009c nonlinear symmetric T1 and T2 heads and the
brain mask, down-sampled to 2 mm (``scripts/make_templates.py``; MNI notice in
``templates/COPYING``). Never downloaded."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import nibabel as nib
import numpy as np

from medidiff.errors import InputError

FOLDER = Path(__file__).resolve().parent / "templates"
HEADS = {"mni152-2009c-t1": "t1_head.nii.gz", "mni152-2009c-t2": "t2_head.nii.gz"}
BRAIN_MASK = "brain_mask.nii.gz"


@dataclass(frozen=True)
class Template:
    name: str
    head: np.ndarray  # (X, Y, Z) float32 in [0, 1]
    brain: np.ndarray  # bool brain mask
    affine: np.ndarray  # voxel -> RAS mm (MNI space)

    @property
    def head_mask(self) -> np.ndarray:
        """The head (scalp included): the template above a tenth of its range."""
        return self.head > 0.1


def _read(path: Path) -> nib.Nifti1Image:
    if not path.is_file():
        raise InputError(path, "template file is missing (reinstall medidiff)")
    return nib.load(path)


@cache
def load_template(name: str) -> Template:
    if name not in HEADS:
        raise InputError(None, f"unknown template '{name}' (known: {', '.join(HEADS)})")
    head = _read(FOLDER / HEADS[name])
    brain = _read(FOLDER / BRAIN_MASK)
    data = np.asarray(head.dataobj, np.float32)
    return Template(name, data / max(float(data.max()), 1e-6),
                    np.asarray(brain.dataobj) > 0, head.affine.copy())

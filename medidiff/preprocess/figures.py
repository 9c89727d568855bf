"""The quality-control picture of a registration: the template's brain outline over the
registered scan, through its centre, in three planes."""

from __future__ import annotations

import numpy as np

from medidiff.report import REFERENCE, Panel, display, panel_figure


def qc_figure(image: np.ndarray, brain: np.ndarray, case: str | None = None) -> np.ndarray:
    """Axial, coronal and sagittal slices of a registered scan (template grid, RAS), with the
    template brain outlined in the reference colour. RGB uint8."""
    scale = float(np.percentile(image, 99.5)) or 1.0
    image = np.clip(image / scale, 0, 1)
    centre = [s // 2 for s in image.shape]
    panels, columns = [], []
    for axis, plane in ((2, "axial"), (1, "coronal"), (0, "sagittal")):
        index = centre[axis]
        picture = display(np.take(image, index, axis=axis))
        outline = display(np.take(brain, index, axis=axis)) > 0
        panels.append(Panel(_square(picture), outlines=[(_square(outline), REFERENCE)]))
        columns.append(f"{plane} {index}/{image.shape[axis]}")
    return panel_figure([panels], f"{case or 'scan'}: registration QC", columns,
                        legend=[("template brain", REFERENCE)])


def _square(slice2d: np.ndarray) -> np.ndarray:
    """A slice padded (centred, with zeros) to a square, so the three planes share a size."""
    size = max(slice2d.shape)
    out = np.zeros((size, size), slice2d.dtype)
    top, left = (size - slice2d.shape[0]) // 2, (size - slice2d.shape[1]) // 2
    out[top:top + slice2d.shape[0], left:left + slice2d.shape[1]] = slice2d
    return out

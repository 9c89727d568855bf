"""The quality-control picture of a registration: the template's brain outline over the
registered scan, through its centre, in three planes."""

from __future__ import annotations

import numpy as np

from medidiff.report import display, montage, overlay


def qc_figure(image: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """Axial, coronal and sagittal slices of a registered scan (template grid, RAS), with the
    template brain outlined in cyan."""
    scale = float(np.percentile(image, 99.5)) or 1.0
    image = np.clip(image / scale, 0, 1)
    centre = [s // 2 for s in image.shape]
    tiles = []
    for axis in (2, 1, 0):
        index = centre[axis]
        picture = np.take(image, index, axis=axis)
        outline = np.take(brain, index, axis=axis) > 0
        tiles.append(display(overlay(picture, np.zeros_like(picture), 1.0, outline)))
    return montage([tiles])

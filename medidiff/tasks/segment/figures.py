"""The segmentation task's per-case picture."""

from __future__ import annotations

import numpy as np

from medidiff.report import display, montage, overlay, to_uint8

# a distinct colour per class (background transparent), repeated beyond eight classes
PALETTE = np.array([(0, 0, 0), (60, 140, 255), (80, 220, 80), (255, 210, 60), (230, 60, 60),
                    (200, 90, 255), (60, 230, 230), (255, 140, 40)], dtype=np.float32)


def label_overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Grey image with each foreground class tinted in its palette colour (RGB uint8)."""
    grey = np.repeat(to_uint8(image).astype(np.float32)[..., None], 3, axis=-1)
    index = np.asarray(labels, dtype=np.int64)
    colour = PALETTE[np.where(index > 0, (index - 1) % (len(PALETTE) - 1) + 1, 0)]
    weight = np.where(index > 0, alpha, 0.0)[..., None]
    return (grey * (1 - weight) + colour * weight).round().astype(np.uint8)


def segment_figure(grid, axis: int = 2, count: int = 3) -> np.ndarray:
    """Rows of slices through the segmented region: input | labels | uncertainty."""
    inside = np.nonzero(np.moveaxis(grid.labels, axis, 0).reshape(grid.labels.shape[axis], -1)
                        .any(axis=1))[0]
    low, high = (inside.min(), inside.max()) if inside.size else (0, grid.labels.shape[axis] - 1)
    picks = np.linspace(low, high, count + 2)[1:-1].round().astype(int)
    inside_labels = grid.uncertainty[grid.labels > 0]
    vmax = float(max(np.percentile(inside_labels, 99) if inside_labels.size else 0.0, 1e-6))
    rows = []
    for index in picks:
        image = np.take(grid.image, index, axis=axis)
        rows.append([display(image),
                     display(label_overlay(image, np.take(grid.labels, index, axis=axis))),
                     display(overlay(image, np.take(grid.uncertainty, index, axis=axis), vmax))])
    return montage(rows)

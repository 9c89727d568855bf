"""The segmentation task's per-case picture."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medidiff.report import (
    PALETTE,
    REFERENCE,
    ColourBar,
    Panel,
    display,
    panel_figure,
    pick_spread,
    plain,
    slice_label,
    to_uint8,
)

__all__ = ["PALETTE", "label_overlay", "segment_figure"]


def label_overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Grey image with each foreground class tinted in its palette colour (RGB uint8)."""
    grey = np.repeat(to_uint8(image).astype(np.float32)[..., None], 3, axis=-1)
    index = np.asarray(labels, dtype=np.int64)
    colour = PALETTE[np.where(index > 0, (index - 1) % (len(PALETTE) - 1) + 1, 0)]
    weight = np.where(index > 0, alpha, 0.0)[..., None]
    return (grey * (1 - weight) + colour * weight).round().astype(np.uint8)


def segment_figure(grid, axis: int = 2, count: int = 3, *, case: str | None = None,
                   mean_uncertainty: float | None = None, spacing: Sequence[float] | None = None,
                   reference: np.ndarray | None = None) -> np.ndarray:
    """Rows of slices spread over the segmented region: input | labels (reference labels
    outlined, when given on the grid) | uncertainty over the input (colour bar: normalised
    entropy). RGB uint8."""
    from medidiff.tasks.anomaly.figures import _aspect

    labels_v = np.asarray(grid.labels)
    present = labels_v > 0
    if reference is not None:
        present = present | (reference > 0)
    inside_labels = grid.uncertainty[labels_v > 0]
    vmax = float(max(np.percentile(inside_labels, 99) if inside_labels.size else 0.0, 1e-6))
    mean = float(np.mean(grid.uncertainty)) if mean_uncertainty is None else mean_uncertainty
    rows, row_labels = [], []
    for index in pick_spread(present, axis, count):
        image = display(np.take(grid.image, index, axis=axis))
        labels = display(np.take(labels_v, index, axis=axis))
        outlines = []
        if reference is not None:
            outlines.append((display(np.take(reference, index, axis=axis)) > 0, REFERENCE))
        rows.append([Panel(image), Panel(image, labels=labels, outlines=outlines),
                     Panel(image, heat=display(np.take(grid.uncertainty, index, axis=axis)))])
        row_labels.append(slice_label(axis, index, labels_v.shape[axis], spacing))
    classes = [int(c) for c in np.unique(labels_v) if c > 0]
    title = (f"{case or 'scan'}: segmentation\nmean uncertainty {plain(mean)} · "
             f"classes found: {', '.join(map(str, classes)) or 'none'}")
    legend = [(f"class {c}", _hex(c)) for c in classes[:7]]
    if reference is not None:
        legend.append(("reference labels", REFERENCE))
    return panel_figure(rows, title, ["input", "labels", "uncertainty"], row_labels,
                        ColourBar("uncertainty (normalised entropy)", vmax), legend,
                        _aspect(axis, spacing))


def _hex(label: int) -> str:
    r, g, b = PALETTE[(label - 1) % (len(PALETTE) - 1) + 1].astype(int)
    return f"#{r:02x}{g:02x}{b:02x}"

"""The enhancement tasks' per-case picture."""

from __future__ import annotations

import numpy as np

from medidiff.report import display, montage


def enhance_figure(result, axis: int = 2, count: int = 3) -> np.ndarray:
    """A before/after montage: ``count`` slices spread over the head, input left, result right."""
    extent = np.flatnonzero(np.moveaxis(result.before > 0.05, axis, 0).reshape(
        result.before.shape[axis], -1).any(axis=1))
    low, high = (int(extent[0]), int(extent[-1])) if extent.size else (0, result.before.shape[axis] - 1)
    picks = np.linspace(low, high, count + 2)[1:-1].round().astype(int)
    rows = [[display(np.take(result.before, i, axis=axis)), display(np.take(result.after, i, axis=axis))]
            for i in picks]
    return montage(rows)

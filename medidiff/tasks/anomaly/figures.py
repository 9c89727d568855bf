"""The anomaly task's per-case picture."""

from __future__ import annotations

import numpy as np

from medidiff.report import display, montage, overlay


def top_slices(volume_map: np.ndarray, axis: int = 2, count: int = 3) -> list[int]:
    """The indices of the ``count`` slices with the largest total map, in order."""
    totals = np.moveaxis(volume_map, axis, 0).reshape(volume_map.shape[axis], -1).sum(axis=1)
    order = np.argsort(totals)[::-1][:count]
    return sorted(int(i) for i in order)


def anomaly_figure(grid, threshold: float | None = None, axis: int = 2, count: int = 3) -> np.ndarray:
    """Rows of the most anomalous slices: input | reconstruction | map overlay (mask outlined)."""
    amap = grid.anomaly_map
    fg_values = amap[grid.foreground] if grid.foreground.any() else amap.ravel()
    vmax = float(max(np.percentile(fg_values, 99.9), (threshold or 0) * 1.5, 1e-6))
    if amap.ndim == 2:  # a 2D image: one row
        arrays = [a[..., None] if a is not None else None
                  for a in (grid.image, grid.recon, amap)]
        axis, count = 2, 1
    else:
        arrays = [grid.image, grid.recon, amap]
    image_v, recon_v, amap = arrays
    rows = []
    for index in top_slices(amap, axis, count):
        image = np.take(image_v, index, axis=axis)
        heat = np.take(amap, index, axis=axis)
        mask = heat >= threshold if threshold is not None else None
        row = [display(image)]
        if recon_v is not None:
            row.append(display(np.take(recon_v, index, axis=axis)))
        row.append(display(overlay(image, heat, vmax, mask)))
        rows.append(row)
    return montage(rows)

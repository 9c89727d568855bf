"""The enhancement tasks' per-case picture."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medidiff.report import ColourBar, Panel, display, panel_figure, pick_spread, plain, slice_label


def enhance_title(case: str | None, info: dict, task: str | None = None) -> str:
    """``CASE: denoise`` (or super-resolve) and what was estimated and done."""
    name = case or "scan"
    if "factors" in info or task == "super-resolve":
        factors = info.get("factors") or []
        scale = max(factors) if factors else None
        details = [f"scale ×{scale}" if scale else None,
                   f"factors {' × '.join(str(f) for f in factors)}" if factors else None,
                   f"trained scale ×{info['trained_scale']}" if "trained_scale" in info else None]
        spacing = info.get("output_spacing")
        if spacing:
            details.append("output spacing " + " × ".join(f"{s:.3g}" for s in spacing) + " mm")
        heading = f"{name}: super-resolve"
    else:
        fraction = info.get("sigma_fraction")
        how = "estimated" if info.get("sigma_estimated") else "given"
        details = [f"noise level σ {plain(info.get('sigma'))} "
                   f"({fraction:.1%} of brain intensity, {how})" if fraction is not None
                   else f"noise level σ {plain(info.get('sigma'))}"]
        if info.get("zero_shot"):
            details.append(f"zero-shot (SDEdit from t = {info.get('t_start', '?')})")
        elif "class_label" in info:
            details.append(f"conditional (noise class {info['class_label']})")
        heading = f"{name}: denoise"
    if "nfe_per_slice" in info:
        details.append(f"{info['nfe_per_slice']} NFE/slice")
    return heading + "\n" + " · ".join(d for d in details if d)


def enhance_figure(result, axis: int = 2, count: int = 3, *, case: str | None = None,
                   task: str | None = None, spacing: Sequence[float] | None = None) -> np.ndarray:
    """``count`` slices spread over the head: input | result | |result - input| (colour bar:
    the change, in the [0, 1] scale of the scan's intensity range). RGB uint8."""
    before, after = np.asarray(result.before, np.float32), np.asarray(result.after, np.float32)
    change = np.abs(after - before)
    head = before > 0.05
    vmax = float(max(np.percentile(change, 99.5), 1e-3))  # the whole field: nothing saturates
    rows, labels = [], []
    for index in pick_spread(head, axis, count):
        rows.append([Panel(display(np.take(before, index, axis=axis))),
                     Panel(display(np.take(after, index, axis=axis))),
                     Panel(heat=display(np.take(change, index, axis=axis)), opaque=True)])
        labels.append(slice_label(axis, index, before.shape[axis], spacing))
    sr = task == "super-resolve" or "factors" in (result.info or {})
    columns = ["input" + (" (nearest upsampled)" if sr else ""),
               "super-resolved" if sr else "denoised", "|change|"]
    from medidiff.tasks.anomaly.figures import _aspect

    return panel_figure(rows, enhance_title(case, result.info or {}, task), columns, labels,
                        ColourBar("|result − input| (intensity range = 1)", vmax),
                        aspect=_aspect(axis, spacing))

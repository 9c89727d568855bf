"""The anomaly task's per-case picture and the evaluation's summary picture."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from medidiff.report import (
    METHOD_COLOURS,
    PREDICTED,
    REFERENCE,
    ColourBar,
    Panel,
    display,
    panel_figure,
    plain,
    slice_label,
)


def top_slices(volume_map: np.ndarray, axis: int = 2, count: int = 3) -> list[int]:
    """The indices of the ``count`` slices with the largest total map, in order."""
    totals = np.moveaxis(volume_map, axis, 0).reshape(volume_map.shape[axis], -1).sum(axis=1)
    order = np.argsort(totals)[::-1][:count]
    return sorted(int(i) for i in order)


def anomaly_title(case: str | None, score: float | None, flagged: bool | None,
                  scan_threshold: float | None, method: str | None = None,
                  ood: Sequence[str] = ()) -> str:
    """``CASE`` and the verdict on one line, the method, score and threshold on the next."""
    name = case or "scan"
    if scan_threshold is None:
        verdict = "not calibrated: no flag"
    else:
        verdict = "FLAGGED as anomalous" if flagged else "not flagged"
    details = [f"scan score {plain(score)}",
               f"scan threshold {plain(scan_threshold)}" if scan_threshold is not None else None,
               f"method {method}" if method else None]
    lines = [f"{name}: {verdict}", " · ".join(d for d in details if d)]
    if ood:
        lines.append("out of distribution: " + "; ".join(ood)[:110])
    return "\n".join(lines)


def anomaly_figure(grid, threshold: float | None = None, axis: int = 2, count: int = 3, *,
                   case: str | None = None, score: float | None = None,
                   flagged: bool | None = None, scan_threshold: float | None = None,
                   method: str | None = None, ood: Sequence[str] = (),
                   spacing: Sequence[float] | None = None,
                   lesion: np.ndarray | None = None) -> np.ndarray:
    """Rows of the most anomalous slices: input | reconstruction | map over the input, with the
    mask at the voxel ``threshold`` outlined (and ``lesion`` labels on the grid, if given); the
    colour bar marks the threshold. RGB uint8."""
    amap = grid.anomaly_map
    fg_values = amap[grid.foreground] if grid.foreground.any() else amap.ravel()
    vmax = float(max(np.percentile(fg_values, 99.9), (threshold or 0) * 1.5, 1e-6))
    score = grid.score if score is None else score
    arrays = [grid.image, grid.recon, amap, lesion]
    if amap.ndim == 2:  # a 2D image: one row
        arrays = [a[..., None] if a is not None else None for a in arrays]
        axis, count = 2, 1
    image_v, recon_v, amap, lesion = arrays
    rows, labels = [], []
    for index in top_slices(amap, axis, count):
        image = display(np.take(image_v, index, axis=axis))
        heat = display(np.take(amap, index, axis=axis))
        outlines = []
        if threshold is not None:
            outlines.append((heat >= threshold, PREDICTED))
        if lesion is not None:
            outlines.append((display(np.take(lesion, index, axis=axis)) > 0, REFERENCE))
        row = [Panel(image)]
        if recon_v is not None:
            row.append(Panel(display(np.take(recon_v, index, axis=axis))))
        row.append(Panel(image, heat=heat, outlines=outlines))
        rows.append(row)
        labels.append(slice_label(axis, index, amap.shape[axis], spacing)
                      if amap.shape[axis] > 1 else "")
    columns = ["input"] + (["reconstruction"] if recon_v is not None else []) + ["anomaly map"]
    marks = ([(float(threshold), "threshold", PREDICTED)] if threshold is not None else [])
    legend = []
    if threshold is not None:
        legend.append((f"map ≥ voxel threshold {plain(threshold)}", PREDICTED))
    if lesion is not None:
        legend.append(("lesion (reference labels)", REFERENCE))
    aspect = _aspect(axis, spacing)
    return panel_figure(rows, anomaly_title(case, score, flagged, scan_threshold, method, ood),
                        columns, labels if any(labels) else None,
                        ColourBar("anomaly map", vmax, marks=marks), legend, aspect)


def _aspect(axis: int, spacing: Sequence[float] | None) -> float:
    """Displayed pixel height over width of a slice normal to ``axis`` (after ``display``)."""
    if spacing is None:
        return 1.0
    first, second = [float(s) for a, s in enumerate(spacing) if a != axis][:2]
    return second / first if first > 0 and second > 0 else 1.0


def summary_figure(methods: Mapping[str, Mapping], title: str = "anomaly detection") -> np.ndarray:
    """Precision-recall curves of the methods' pooled voxels on one plot, and beside it each
    method's per-scan scores (lesioned and healthy scans apart) with its calibrated per-scan
    threshold. ``methods``: name -> {"scores": pooled voxel scores, "labels": their truth,
    "ap": pooled AP, "scans": [(case, score, lesioned)], "scan_threshold": float or None}."""
    from matplotlib.lines import Line2D
    from sklearn.metrics import precision_recall_curve

    from medidiff.report import _figure, _render

    names = list(methods)
    fig, canvas = _figure(5.0 + 2.3 * len(names), 5.0)
    grid = fig.add_gridspec(1, 1 + len(names), width_ratios=[2.2] + [1.0] * len(names))
    ax = fig.add_subplot(grid[0, 0])
    prevalence = None
    for name in names:
        entry = methods[name]
        truth = np.asarray(entry["labels"], bool)
        colour = METHOD_COLOURS.get(name, None)
        if truth.any():
            precision, recall, _ = precision_recall_curve(truth, np.asarray(entry["scores"]))
            ax.plot(recall, precision, lw=2, color=colour,
                    label=f"{name} (AP {plain(entry.get('ap'))})", drawstyle="steps-post")
            prevalence = float(truth.mean())
        else:
            ax.plot([], [], color=colour, label=f"{name} (no lesion voxels)")
    if prevalence is not None:
        ax.axhline(prevalence, color="black", lw=1, ls=":", label=f"chance ({prevalence:.3f})")
    ax.set(xlim=(0, 1), ylim=(-0.02, 1.02), xlabel="recall (lesion voxels found)",
           ylabel="precision", title="pooled voxels: precision-recall")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=9)
    rng = np.random.default_rng(0)
    for i, name in enumerate(names):
        sax = fig.add_subplot(grid[0, 1 + i])
        scans = methods[name].get("scans", [])
        for lesioned, x, marker, colour in ((True, 0, "o", "#d62728"), (False, 1, "s", "#1f77b4")):
            values = [s for _, s, les in scans if les == lesioned]
            jitter = rng.uniform(-0.15, 0.15, len(values))
            sax.scatter(x + jitter, values, marker=marker, s=36, color=colour,
                        edgecolor="black", linewidth=0.5, zorder=3)
        threshold = methods[name].get("scan_threshold")
        if threshold is not None:
            sax.axhline(threshold, color=PREDICTED, lw=2.5, zorder=2)
            sax.annotate(f"threshold {plain(threshold)}", (1.0, threshold),
                         xycoords=("axes fraction", "data"), xytext=(-2, 3),
                         textcoords="offset points", ha="right", va="bottom", fontsize=8)
        sax.set_xticks([0, 1], ["lesioned", "healthy"])
        sax.set_xlim(-0.6, 1.6)
        sax.set_title(f"{name}: scan scores", fontsize=10, color=METHOD_COLOURS.get(name, "black"))
        sax.grid(axis="y", alpha=0.3)
        if i == 0:
            sax.set_ylabel("per-scan score")
    handles = [Line2D([], [], color=PREDICTED, lw=2.5, label="calibrated scan threshold"),
               Line2D([], [], ls="", marker="o", color="#d62728", label="lesioned scan"),
               Line2D([], [], ls="", marker="s", color="#1f77b4", label="healthy scan")]
    fig.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=9, frameon=False)
    fig.suptitle(title, fontsize=12)
    return _render(fig, canvas)

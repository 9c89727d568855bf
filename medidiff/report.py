"""Pictures for people: titled rows of slices with a colour bar, anomaly overlays, training
curves (PNG).

Every task's per-case picture is laid out by :func:`panel_figure` in one style: the case and
its numbers in the title, a title over each column, each row's slice position on its left, a
colour bar for the map (with the calibrated threshold marked), outlines in the same colours
everywhere (:data:`PREDICTED` for what the model marks, :data:`REFERENCE` for labels and the
template brain). Matplotlib (Agg, no pyplot state) renders it to an RGB uint8 array, so that
callers save and log arrays.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from medidiff.io.write import atomic_write_bytes

HEAT = "inferno"  # every map: anomaly, uncertainty, change
PREDICTED = "#39ff14"  # the model's mask (anomaly map at the threshold), and its mark on the bar
REFERENCE = "#00e5ff"  # reference outlines: lesion labels, the template brain
# a distinct colour per class (background transparent), repeated beyond seven classes
PALETTE = np.array([(0, 0, 0), (60, 140, 255), (80, 220, 80), (255, 210, 60), (230, 60, 60),
                    (200, 90, 255), (60, 230, 230), (255, 140, 40)], dtype=np.float32)
METHOD_COLOURS = {"diffusion": "#d62728", "zscore": "#1f77b4", "threshold": "#7f7f7f"}
PLANES = {0: ("sagittal", "x"), 1: ("coronal", "y"), 2: ("axial", "z")}
PANEL_INCHES = 2.9  # each slice at about 290 px wide
DPI = 100


def to_uint8(image: np.ndarray, low: float = 0.0, high: float = 1.0) -> np.ndarray:
    scaled = (np.asarray(image, dtype=np.float32) - low) / max(high - low, 1e-8)
    return (np.clip(scaled, 0, 1) * 255).round().astype(np.uint8)


def overlay(image: np.ndarray, heat: np.ndarray, vmax: float, mask: np.ndarray | None = None,
            alpha: float = 0.6) -> np.ndarray:
    """Grey image with a red-yellow heat map on top (RGB uint8); mask outline in cyan."""
    grey = to_uint8(image).astype(np.float32)
    rgb = np.stack([grey] * 3, axis=-1)
    level = np.clip(np.asarray(heat, np.float32) / max(vmax, 1e-8), 0, 1)
    colour = np.stack([np.full_like(level, 255), 255 * level, np.zeros_like(level)], axis=-1)
    weight = (alpha * level)[..., None]
    rgb = rgb * (1 - weight) + colour * weight
    if mask is not None:
        edge = mask.astype(bool) & ~_erode(mask.astype(bool))
        rgb[edge] = (0, 255, 255)
    return rgb.round().astype(np.uint8)


def _erode(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return ndimage.binary_erosion(mask)


def montage(rows: list[list[np.ndarray]], pad: int = 2) -> np.ndarray:
    """Tile equally sized tiles (grey HxW or RGB HxWx3) into one RGB image."""
    tiles = [[_rgb(t) for t in row] for row in rows]
    height = max(t.shape[0] for row in tiles for t in row)
    width = max(t.shape[1] for row in tiles for t in row)
    ncol = max(len(row) for row in tiles)
    canvas = np.zeros((len(tiles) * (height + pad) + pad, ncol * (width + pad) + pad, 3), np.uint8)
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            y, x = pad + r * (height + pad), pad + c * (width + pad)
            canvas[y:y + tile.shape[0], x:x + tile.shape[1]] = tile
    return canvas


def _rgb(tile: np.ndarray) -> np.ndarray:
    if tile.ndim == 2:
        tile = tile if tile.dtype == np.uint8 else to_uint8(tile)
        return np.stack([tile] * 3, axis=-1)
    return tile


def display(slice2d: np.ndarray) -> np.ndarray:
    """Rotate a RAS (x, y) slice so that anterior is up, as radiology viewers show it."""
    return np.ascontiguousarray(np.rot90(slice2d))


def label_colours(labels: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """RGBA float image of a class map: each foreground class in its palette colour."""
    index = np.asarray(labels, dtype=np.int64)
    colour = PALETTE[np.where(index > 0, (index - 1) % (len(PALETTE) - 1) + 1, 0)] / 255.0
    return np.concatenate([colour, np.where(index > 0, alpha, 0.0)[..., None]], axis=-1)


# -- the shared layout ----------------------------------------------------------------------------
@dataclass
class Panel:
    """One slice as shown: a grey ``image`` (display orientation, [0, 1]), optionally a ``heat``
    map over it (coloured with :data:`HEAT` on the figure's colour-bar range; ``opaque``: the
    map alone, else fading into the image where it is low), a class map ``labels`` tinted with
    :data:`PALETTE`, and ``outlines``: (mask, colour) drawn as contours."""

    image: np.ndarray | None = None
    heat: np.ndarray | None = None
    labels: np.ndarray | None = None
    outlines: list[tuple[np.ndarray, str]] = field(default_factory=list)
    opaque: bool = False


@dataclass
class ColourBar:
    """The range of the figure's heat maps, what they are, and marks on the bar: (value, text,
    colour), e.g. the calibrated threshold."""

    label: str
    vmax: float
    vmin: float = 0.0
    marks: list[tuple[float, str, str]] = field(default_factory=list)


def slice_label(axis: int, index: int, count: int, spacing: Sequence[float] | None = None) -> str:
    """A row's position: the plane, the slice index (of ``count``) and, with the grid's
    ``spacing``, its distance in mm from the grid's first slice along the axis."""
    plane, letter = PLANES.get(axis, (f"axis {axis}", "s"))
    text = f"{plane} {index}/{count}"
    if spacing is not None and spacing[axis]:
        text += f"\n{letter} = {index * float(spacing[axis]):.0f} mm"
    return text


def pick_spread(present: np.ndarray, axis: int, count: int) -> list[int]:
    """``count`` slice indices spread evenly inside the slices along ``axis`` where ``present``
    holds a voxel (the whole axis when none does)."""
    inside = np.flatnonzero(np.moveaxis(present, axis, 0).reshape(present.shape[axis], -1)
                            .any(axis=1))
    low, high = (int(inside[0]), int(inside[-1])) if inside.size else (0, present.shape[axis] - 1)
    picks = np.linspace(low, high, count + 2)[1:-1].round().astype(int)
    return sorted({int(i) for i in picks})


def panel_figure(rows: Sequence[Sequence[Panel]], title: str, columns: Sequence[str],
                 row_labels: Sequence[str] | None = None, colourbar: ColourBar | None = None,
                 legend: Sequence[tuple[str, str]] = (), aspect: float = 1.0,
                 panel_inches: float = PANEL_INCHES) -> np.ndarray:
    """Rows of titled panels, the title (first line: the case) above, row labels on the left,
    one colour bar on the right and a legend of outline colours below; RGB uint8.

    ``aspect``: the height of a displayed pixel over its width (voxel spacing)."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.lines import Line2D

    nrows, ncols = len(rows), max(len(r) for r in rows)
    first = next(p for r in rows for p in r if p.image is not None or p.heat is not None)
    shape = (first.image if first.image is not None else first.heat).shape
    ratio = shape[0] / shape[1] * aspect  # panel height over width
    bar = 0.75 if colourbar else 0.0
    width = ncols * panel_inches + 0.6 + bar
    height = nrows * panel_inches * ratio + 0.3 * (title.count("\n") + 1) + 0.35 \
        + (0.3 if legend else 0.0)
    fig, canvas = _figure(width, height)
    grid = fig.add_gridspec(nrows, ncols + (1 if colourbar else 0),
                            width_ratios=[1.0] * ncols + ([0.055] if colourbar else []))
    cmap = colormaps[HEAT]
    norm = Normalize(colourbar.vmin, colourbar.vmax) if colourbar else Normalize(0.0, 1.0)
    for r, row in enumerate(rows):
        for c, panel in enumerate(row):
            ax = fig.add_subplot(grid[r, c])
            _draw_panel(ax, panel, cmap, norm, aspect)
            if r == 0 and c < len(columns):
                ax.set_title(columns[c], fontsize=11)
            if c == 0 and row_labels:
                ax.set_ylabel(row_labels[r], fontsize=10)
    if colourbar:
        cax = fig.add_subplot(grid[:, -1])
        cb = fig.colorbar(ScalarMappable(norm, cmap), cax=cax)
        cb.set_label(colourbar.label, fontsize=10)
        for value, text, colour in colourbar.marks:
            if colourbar.vmin <= value <= colourbar.vmax:
                cax.axhline(value, color=colour, lw=2.5)
                cax.annotate(text, (0.0, value), xycoords=("axes fraction", "data"),
                             xytext=(-4, 0), textcoords="offset points", ha="right",
                             va="center", fontsize=8, color="black",
                             bbox={"boxstyle": "round,pad=0.15", "fc": colour, "ec": "none"})
    if legend:
        handles = [Line2D([], [], color=colour, lw=2.5, label=text) for text, colour in legend]
        fig.legend(handles=handles, loc="outside lower center", ncols=len(handles),
                   fontsize=9, frameon=False)
    fig.suptitle(title, fontsize=12)
    return _render(fig, canvas)


def _draw_panel(ax, panel: Panel, cmap, norm, aspect: float) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_facecolor("black")
    for spine in ax.spines.values():
        spine.set_visible(False)
    show = {"aspect": aspect, "interpolation": "bilinear", "origin": "upper"}
    if panel.image is not None:
        ax.imshow(np.clip(panel.image, 0, 1), cmap="gray", vmin=0, vmax=1, **show)
    if panel.heat is not None:
        rgba = cmap(norm(np.asarray(panel.heat, np.float32)))
        if not panel.opaque and panel.image is not None:
            level = np.clip(norm(np.asarray(panel.heat, np.float32)), 0, 1)
            rgba[..., 3] = np.clip(1.6 * level, 0, 0.85)
        ax.imshow(rgba, **show)
    if panel.labels is not None:
        ax.imshow(label_colours(panel.labels), **{**show, "interpolation": "nearest"})
    for mask, colour in panel.outlines:
        mask = np.asarray(mask, bool)
        if mask.any() and not mask.all():
            ax.contour(mask.astype(np.float32), levels=[0.5], colors=[colour], linewidths=1.6)


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained", facecolor="white")
    return fig, FigureCanvasAgg(fig)


def _render(fig, canvas) -> np.ndarray:
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def plain(value: float | None, digits: int = 3) -> str:
    """A number for a title: ``n/a`` when missing."""
    if value is None or not np.isfinite(value):
        return "n/a"
    return f"{value:.{digits}g}"


# -- files ------------------------------------------------------------------------------------------
def png_bytes(rgb: np.ndarray, upscale: int | None = None) -> bytes:
    """PNG of an RGB array; ``upscale`` (nearest): 2 for small arrays, 1 for laid-out figures."""
    if upscale is None:
        upscale = 2 if max(rgb.shape[:2]) < 400 else 1
    image = Image.fromarray(rgb)
    if upscale > 1:
        image = image.resize((rgb.shape[1] * upscale, rgb.shape[0] * upscale), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)  # fast: figures are written per scan
    return buffer.getvalue()


def save_png(rgb: np.ndarray, path: str | Path, upscale: int | None = None) -> Path:
    return atomic_write_bytes(Path(path), png_bytes(rgb, upscale))


def loss_curve(losses: list[float], every: int, path: str | Path) -> Path:
    """Training loss against step (log scale), as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    steps = np.arange(1, len(losses) + 1) * every
    ax.plot(steps, losses, lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return atomic_write_bytes(Path(path), buffer.getvalue())

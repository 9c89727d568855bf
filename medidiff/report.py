"""Pictures for people: montages of slices, anomaly overlays, training curves (PNG)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from medidiff.io.write import atomic_write_bytes


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


def png_bytes(rgb: np.ndarray, upscale: int = 2) -> bytes:
    image = Image.fromarray(rgb)
    if upscale > 1:
        image = image.resize((rgb.shape[1] * upscale, rgb.shape[0] * upscale), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def save_png(rgb: np.ndarray, path: str | Path, upscale: int = 2) -> Path:
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


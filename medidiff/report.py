"""Pictures for people: montages of slices, anomaly overlays, training curves (PNG)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from medidiff.data.io import atomic_write_bytes


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


@torch.no_grad()
def preview_grid(trainer, count: int = 4, steps: int = 20) -> np.ndarray | None:
    """Few-step samples from the EMA weights (with a real example's condition if any).

    DPM-Solver++(2M) on log-SNR spaced steps: accurate in few steps, so the grid shows what the
    model has learnt rather than the sampler's blur.
    """
    from medidiff.diffusion.samplers import get_sampler, timestep_schedule
    from medidiff.models.folder import build_network
    from medidiff.tasks.base import model_fn
    from medidiff.train import draw_batch

    if trainer.cfg.data.spatial_dims != 2:
        return None
    net = build_network(trainer.cfg).to(trainer.device).eval()
    trainer.ema.copy_to(net)
    generator = torch.Generator().manual_seed(1234)
    batch = draw_batch(trainer.dataset, count, generator)
    inputs = trainer.task.training_inputs(batch, trainer.cfg, generator)
    condition = None if inputs.condition is None else inputs.condition.to(trainer.device)
    labels = None if inputs.class_labels is None else inputs.class_labels.to(trainer.device)
    shape = inputs.target.shape
    t_start = trainer.cfg.trained_timesteps() - 1
    x = torch.randn(shape, generator=generator)
    if t_start < trainer.schedule.num_train_timesteps - 1:  # reconstruct from partial noise
        start = torch.full((shape[0],), t_start, dtype=torch.long)
        x = trainer.schedule.add_noise(inputs.target, x, start)
    x = x.to(trainer.device)
    timesteps = timestep_schedule(t_start, steps, spacing="logsnr", schedule=trainer.schedule)
    sample = get_sampler("dpmpp2m")(model_fn(net, condition, labels), x, timesteps,
                                    trainer.schedule, generator=generator, clip=True)
    tiles = [display((s[0].float().cpu().numpy() + 1) / 2) for s in sample]
    reals = [display((r[0].float().numpy() + 1) / 2) for r in inputs.target]
    return montage([reals, tiles])


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

"""One grid runner for every task: how a network function meets a volume on the model grid.

A 2D model runs slice by slice along ``data.slice_axis`` (each slice with its neighbour slices
as extra channels when the task asks for context), in batches, skipping slices without
foreground; a 3D model runs on the whole volume. Inputs are padded to the network's spatial
multiple, and inputs larger than the region the network was trained on are tiled with MONAI's
``sliding_window_inference`` (Gaussian-blended windows), as nnU-Net does.

The task's function gets the batch and, for each row, an *identity* (the slice index, and the
window's start for tiled inputs) from which it seeds that row's noise, so that results do not
depend on how rows were grouped into batches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference

from medidiff.config import Config
from medidiff.models.unet import spatial_multiple

Identity = tuple[int, ...]
# (B, C, *S) inputs in [0, 1] and one identity per row -> (B, K, *S) outputs
ItemFn = Callable[[torch.Tensor, list[Identity]], torch.Tensor]
# (S, C, h, w) all slices -> (S, K, h, w): what slices that are not run hold
Fill = Callable[[torch.Tensor], torch.Tensor]
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class GridRunner:
    """Runs an ``ItemFn`` over a (C, *spatial) volume; see the module docstring."""

    spatial_dims: int
    slice_axis: int = 2
    context: int = 0
    items_per_batch: int = 1
    multiple: int = 1
    region: tuple[int, ...] | None = None
    overlap: float = 0.25

    @classmethod
    def for_model(cls, cfg: Config, items_per_batch: int, context: int = 0) -> GridRunner:
        """The runner for a model config: its grid, its network's multiple, its trained region
        (the patch, else the grid: beyond it the network meets group-norm statistics it was
        not trained on, and its attention grows with the square of the size)."""
        return cls(spatial_dims=cfg.data.spatial_dims, slice_axis=cfg.data.slice_axis,
                   context=context, items_per_batch=max(1, items_per_batch),
                   multiple=spatial_multiple(cfg.model.channels),
                   region=tuple(cfg.data.patch or cfg.data.size))

    def run(self, fn: ItemFn, volume: torch.Tensor, foreground: np.ndarray, fill: Fill,
            progress: Progress | None = None) -> torch.Tensor:
        """(K, *spatial) outputs of ``fn`` for a (C, *spatial) volume on the model grid."""
        if self.spatial_dims == 3:
            out = self.call(fn, volume[None], [(0,)])[0]
            if progress:
                progress(1, 1)
            return out
        axis = self.slice_axis + 1
        slices = volume.movedim(axis, 0)  # (S, C, h, w)
        count = slices.shape[0]
        out = fill(slices)
        todo = np.flatnonzero(np.moveaxis(np.asarray(foreground), self.slice_axis, 0)
                              .reshape(count, -1).any(axis=1))
        for start in range(0, len(todo), self.items_per_batch):
            index = [int(i) for i in todo[start:start + self.items_per_batch]]
            out[index] = self.call(fn, self.with_context(slices, index), [(i,) for i in index])
            if progress:
                progress(min(start + self.items_per_batch, len(todo)), len(todo))
        return out.movedim(0, axis)

    def with_context(self, slices: torch.Tensor, index: Sequence[int]) -> torch.Tensor:
        """(B, (2 context + 1) C, h, w): each slice with its neighbours (edges repeated)."""
        rows = (torch.as_tensor(index)[:, None]
                + torch.arange(-self.context, self.context + 1)).clamp(0, slices.shape[0] - 1)
        return slices[rows].flatten(1, 2)

    def call(self, fn: ItemFn, batch: torch.Tensor, ids: list[Identity]) -> torch.Tensor:
        """``fn`` on a (B, C, *S) batch: padded to the multiple, tiled beyond the region."""
        size = batch.shape[2:]
        pad = []
        for s in reversed(size):
            pad += [0, -s % self.multiple]
        padded = F.pad(batch, pad) if any(pad) else batch  # background is 0
        if self.region is None or all(s <= r for s, r in zip(padded.shape[2:], self.region,
                                                             strict=True)):
            out = fn(padded, ids)
        else:
            out = self._tiled(fn, padded, ids)
        return out[(..., *(slice(0, s) for s in size))]

    def _tiled(self, fn: ItemFn, batch: torch.Tensor, ids: list[Identity]) -> torch.Tensor:
        def windows(patch: torch.Tensor, where) -> torch.Tensor:
            # each window: [batch row, channels, *spatial slices]; its start is its identity
            keys = [ids[w[0].start] + tuple(int(s.start or 0) for s in w[2:]) for w in where]
            return fn(patch, keys)

        return sliding_window_inference(batch, list(self.region), self.items_per_batch, windows,
                                        overlap=self.overlap, mode="gaussian", with_coord=True)

"""Running a network in micro-batches of one fixed size, so results never depend on batching.

CPU and GPU kernels (oneDNN, cuBLAS, cuDNN) choose their algorithm by batch size: the same row
comes out different in its last bits in a batch of 1, 3 or 32. At one fixed batch size the
output of a row does not depend on the other rows of its batch, nor on its place in it (zero
rows pad the last micro-batch), so a scan's result is the same for any ``--batch-size`` and any
split of the inputs over processes (tested in ``tests/test_inference.py``).
"""

from __future__ import annotations

import torch
import torch.nn as nn


class FixedBatch(nn.Module):
    """``net(x, timesteps=, class_labels=)`` evaluated ``size`` rows at a time."""

    def __init__(self, net: nn.Module, size: int):
        super().__init__()
        self.net, self.size = net, max(1, int(size))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        outs = []
        for start in range(0, x.shape[0], self.size):
            rows = slice(start, start + self.size)
            xs, ts = x[rows], timesteps[rows]
            labels = None if class_labels is None else class_labels[rows]
            missing = self.size - xs.shape[0]
            if missing:
                xs = torch.cat([xs, xs.new_zeros((missing, *xs.shape[1:]))])
                ts = torch.cat([ts, ts[:1].expand(missing)])
                labels = None if labels is None else torch.cat([labels, labels[:1].expand(missing)])
            outs.append(self.net(xs, timesteps=ts, class_labels=labels)[:self.size - missing])
        return torch.cat(outs)

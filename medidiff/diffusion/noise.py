"""Per-sample seeded noise, so that results never depend on batch size or sharding.

As NVlabs/edm's ``StackedRandomGenerator`` (``generate.py``) and diffusers' per-sample
generators: every row of a batch draws from its own generator, seeded from what the row *is*
(a slice index, a window position, a draw number), never from where it sits in a batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def sample_seed(*parts: int) -> int:
    """A 63-bit seed from a tuple of non-negative integers (numpy's SeedSequence hashing)."""
    words = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


class StackedGenerator:
    """One ``torch.Generator`` per batch row; ``randn_like(x)`` stacks their draws."""

    def __init__(self, seeds: Sequence[int]):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(len(self), *shape[1:]) standard normal noise on the CPU."""
        if shape[0] != len(self.generators):
            raise ValueError(f"batch of {shape[0]} rows, but {len(self.generators)} generators")
        return torch.stack([torch.randn(tuple(shape[1:]), generator=g, dtype=dtype)
                            for g in self.generators])

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(x.shape, dtype=x.dtype).to(x.device)

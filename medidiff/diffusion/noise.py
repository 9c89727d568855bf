"""Per-sample seeded noise, so that results never depend on batch size or sharding.

As NVlabs/edm's ``StackedRandomGenerator`` (``generate.py``) and diffusers' per-sample
generators: every row of a batch draws from its own generator, seeded from what the row *is*
(a slice index, a window position, a draw number), never from where it sits in a batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from medidiff import names


def sample_seed(*parts: int) -> int:
    """A 63-bit seed from a tuple of non-negative integers (numpy's SeedSequence hashing)."""
    words = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


class StackedGenerator:
    """One ``torch.Generator`` per batch row; ``randn(shape)`` stacks their draws."""

    def __init__(self, seeds: Sequence[int]):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def __len__(self) -> int:
        return len(self.generators)

    def per_row(self, shape: Sequence[int], row_noise) -> torch.Tensor:
        """(len(self), *shape[1:]): ``row_noise(row_shape, generator)`` for each row's own
        generator, stacked."""
        if shape[0] != len(self.generators):
            raise ValueError(f"batch of {shape[0]} rows, but {len(self.generators)} generators")
        return torch.stack([row_noise(tuple(shape[1:]), g) for g in self.generators])

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(len(self), *shape[1:]) standard normal noise on the CPU."""
        return self.per_row(shape, lambda row, g: torch.randn(row, generator=g, dtype=dtype))


# -- simplex noise (AnoDDPM, Wyatt et al. 2022) -------------------------------------------------
# Octaves of 3D simplex noise (Perlin 2001, in Gustavson's formulation): the first octave has
# features of about 1 / SIMPLEX_FREQUENCY voxels, each next one twice the frequency at
# SIMPLEX_PERSISTENCE times the amplitude (AnoDDPM's persistence). AnoDDPM's 6 octaves from 1/64
# on 256-pixel slices reach the pixel scale; on medidiff's coarser grids 4 octaves from 1/16 do.
SIMPLEX_OCTAVES = 4
SIMPLEX_FREQUENCY = 1.0 / 16.0
SIMPLEX_PERSISTENCE = 0.8
_GRAD3 = torch.tensor([[1, 1, 0], [-1, 1, 0], [1, -1, 0], [-1, -1, 0], [1, 0, 1], [-1, 0, 1],
                       [1, 0, -1], [-1, 0, -1], [0, 1, 1], [0, -1, 1], [0, 1, -1], [0, -1, -1]],
                      dtype=torch.float32)
_F3, _G3 = 1.0 / 3.0, 1.0 / 6.0


def _simplex3(points: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """3D simplex noise at (F, N, 3) float32 points, field f with permutation table perm[f]
    ((F, 512) long); values about [-1, 1]. Written per component: reductions over an axis of
    three are far slower on the CPU than three adds."""
    fields, count = points.shape[:2]
    shift = (512 * torch.arange(fields)).repeat_interleave(count)
    table = (perm + 512 * torch.arange(fields)[:, None]).reshape(-1)  # one flat table per field

    def lookup(i: torch.Tensor) -> torch.Tensor:
        return table[shift + i] - shift

    x, y, z = points.reshape(-1, 3).unbind(dim=1)
    skew = (x + y + z) * _F3
    i, j, k = torch.floor(x + skew), torch.floor(y + skew), torch.floor(z + skew)
    unskew = (i + j + k) * _G3
    x0, y0, z0 = x - i + unskew, y - j + unskew, z - k + unskew
    # the simplex holding the point follows the order of its offsets' components
    xy, yz, xz = x0 >= y0, y0 >= z0, x0 >= z0
    i1, j1, k1 = xy & xz, ~xy & yz, ~xz & ~yz
    i2, j2, k2 = xy | xz, ~xy | yz, ~(xz & yz)
    ii, jj, kk = i.long() & 255, j.long() & 255, k.long() & 255
    zero = torch.zeros_like(ii)
    total = torch.zeros_like(x)
    corners = ((zero, zero, zero), (i1.long(), j1.long(), k1.long()),
               (i2.long(), j2.long(), k2.long()), (zero + 1, zero + 1, zero + 1))
    for n, (oi, oj, ok) in enumerate(corners):
        cx, cy, cz = x0 - oi + n * _G3, y0 - oj + n * _G3, z0 - ok + n * _G3
        g = _GRAD3[lookup(ii + oi + lookup(jj + oj + lookup(kk + ok))) % 12]
        falloff = (0.6 - cx * cx - cy * cy - cz * cz).clamp(min=0.0)
        falloff = falloff * falloff
        total += falloff * falloff * (g[:, 0] * cx + g[:, 1] * cy + g[:, 2] * cz)
    return 32.0 * total.reshape(fields, count)


def simplex(shape: Sequence[int], generator: torch.Generator | None = None,
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, C, *spatial) simplex noise over a 2D or 3D grid, each field standardised to mean 0
    and variance 1 (so the variance-preserving schedule stays so), drawn from ``generator``.
    A 2D field is a plane of a 3D one at a random depth, as AnoDDPM slices its 3D field."""
    generator = generator if generator is not None else torch.default_generator
    batch, channels, *spatial = (int(s) for s in shape)
    fields = batch * channels
    perm = torch.stack([torch.randperm(256, generator=generator) for _ in range(fields)])
    perm = torch.cat([perm, perm], dim=1)
    offset = torch.rand(fields, 1, 3, generator=generator, dtype=torch.float32) * 256.0
    axes = [torch.arange(n, dtype=torch.float32) for n in spatial]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(spatial))
    if grid.shape[1] == 2:
        grid = torch.cat([grid, torch.zeros(grid.shape[0], 1, dtype=torch.float32)], dim=1)
    field = torch.zeros(fields, grid.shape[0], dtype=torch.float32)
    for octave in range(SIMPLEX_OCTAVES):
        frequency = SIMPLEX_FREQUENCY * 2.0 ** octave
        field += SIMPLEX_PERSISTENCE ** octave * _simplex3(grid[None] * frequency + offset, perm)
    field = (field - field.mean(dim=1, keepdim=True)) / field.std(dim=1, keepdim=True).clamp(
        min=1e-12)
    return field.reshape(batch, channels, *spatial).to(dtype)


NOISES = names.DIFFUSION_NOISES


def draw(kind: str, shape: Sequence[int], generator=None, dtype: torch.dtype = torch.float32,
         device: torch.device | str | None = None) -> torch.Tensor:
    """Noise of ``kind`` (``gaussian``: standard normal; ``simplex``: standardised simplex) from
    a ``torch.Generator`` or a ``StackedGenerator`` (one generator per batch row)."""
    if kind not in NOISES:
        raise ValueError(f"noise {kind!r} is not one of {', '.join(NOISES)}")
    if isinstance(generator, StackedGenerator):
        if kind == "gaussian":
            out = generator.randn(shape, dtype=dtype)
        else:
            out = generator.per_row(shape, lambda row, g: simplex((1, *row), g, dtype)[0])
        return out.to(device) if device is not None else out
    if kind == "gaussian":
        source = generator.device if generator is not None else device
        out = torch.randn(tuple(shape), generator=generator, device=source, dtype=dtype)
    else:
        out = simplex(shape, generator, dtype)
    return out.to(device) if device is not None else out

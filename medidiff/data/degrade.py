"""Degradations of image batches: Gaussian and Rician noise, thick-slice down-sampling.

Every function takes a batch ``(B, C, *spatial)`` of float images (2D or 3D) and draws all of its
randomness from a ``torch.Generator`` passed in, so the same code makes the enhancement copies of
the example data set and degrades scans on the fly during training, reproducibly.

Noise levels are in the image's own units. Callers usually express them as a fraction of
:func:`reference_intensity`, the 99th percentile of the brain (foreground) intensities.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from medidiff.errors import InputError

_DEFAULT_MODE = {2: "bicubic", 3: "trilinear"}


def _check_batch(x: torch.Tensor) -> int:
    """Return the number of spatial dims of a ``(B, C, *spatial)`` batch with 2 or 3 of them."""
    if not torch.is_tensor(x) or x.ndim not in (4, 5):
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise InputError(None, f"expected a batch (B, C, H, W) or (B, C, H, W, D), got {shape}")
    return x.ndim - 2


def _per_sample(value: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a float or a ``(B,)`` tensor against the batch ``x``."""
    value = torch.as_tensor(value, dtype=x.dtype, device=x.device)
    if value.ndim == 0:
        return value
    if value.shape != (x.shape[0],):
        raise InputError(None, f"per-sample value must have shape ({x.shape[0]},), got {tuple(value.shape)}")
    return value.reshape((-1,) + (1,) * (x.ndim - 1))


def _quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """Linear-interpolated quantile of a 1D tensor (numpy's default method).

    ``torch.quantile`` refuses inputs above 2**24 elements, a 256**3 volume already; two
    ``kthvalue`` selections have no such limit.
    """
    position = q * (values.numel() - 1)
    lo, hi = math.floor(position), math.ceil(position)
    v_lo = values.kthvalue(lo + 1).values
    v_hi = values.kthvalue(hi + 1).values if hi != lo else v_lo
    return v_lo + (position - lo) * (v_hi - v_lo)


def reference_intensity(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """99th percentile of each sample's foreground intensities, shape ``(B,)``.

    The foreground is ``mask`` (broadcast to ``x``) or, without one, the voxels above 0, which is
    the brain in skull-stripped scans. A robust maximum, as used to scale noise levels in the
    denoising literature (noise "as a percentage of the brightest tissue", Manjón et al. 2010).
    """
    _check_batch(x)
    foreground = x > 0 if mask is None else torch.broadcast_to(mask.bool(), x.shape)
    out = []
    for sample, keep in zip(x, foreground, strict=True):
        values = sample[keep] if keep.any() else sample.reshape(-1)
        out.append(_quantile(values.float(), 0.99))
    return torch.stack(out).to(x.dtype)


def add_gaussian_noise(
    x: torch.Tensor, sigma: float | torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Return ``x + sigma * n`` with ``n ~ N(0, 1)``; ``sigma`` is a float or a ``(B,)`` tensor.

    The result is not clipped, so its mean stays ``x`` (additive white Gaussian noise).
    """
    _check_batch(x)
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return x + _per_sample(sigma, x) * noise


def add_rician_noise(
    x: torch.Tensor, sigma: float | torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Rician noise: magnitude of the complex signal ``(x + sigma*n1) + i*sigma*n2``.

    This is the noise of a magnitude MR image reconstructed from one coil (Gudbjartsson and
    Patz 1995): Gaussian noise of standard deviation ``sigma`` on the real and imaginary
    channels. Its mean is biased upwards where the signal is low (Rayleigh in the background).
    ``sigma`` is a float or a ``(B,)`` tensor.
    """
    _check_batch(x)
    sigma = _per_sample(sigma, x)
    real = x + sigma * torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    imag = sigma * torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return torch.sqrt(real * real + imag * imag)


def _factors(factor: int, dims: Sequence[int], n_spatial: int) -> tuple[int, ...]:
    """Per-spatial-dim integer factors: ``factor`` along ``dims``, 1 elsewhere."""
    if int(factor) != factor or factor < 1:
        raise InputError(None, f"down-sampling factor must be a positive integer, got {factor}")
    if not dims or any(d < 0 or d >= n_spatial for d in dims):
        raise InputError(None, f"dims must name spatial axes 0..{n_spatial - 1}, got {tuple(dims)}")
    return tuple(int(factor) if d in dims else 1 for d in range(n_spatial))


def downsample(x: torch.Tensor, factor: int, dims: Sequence[int]) -> torch.Tensor:
    """Low-resolution acquisition: average ``factor`` voxels along each spatial axis in ``dims``.

    ``dims`` counts spatial axes from 0 (0 is H). Averaging models a thick slice or a large
    in-plane voxel (partial volume), the usual forward model in MR super-resolution. A size that
    is not a multiple of ``factor`` is padded at its end by repeating the edge, so coarse voxel
    ``i`` covers fine voxels ``factor*i .. factor*i + factor - 1`` and its centre is at fine index
    ``factor*i + (factor - 1)/2`` (this is how the affine of the coarse grid is updated).
    """
    return _average(x, _factors(factor, dims, _check_batch(x)))


def _average(x: torch.Tensor, factors: Sequence[int]) -> torch.Tensor:
    """Block averages of a batch, ``factors[d]`` voxels along spatial axis d, the end padded by
    repeating the edge where a size is not a multiple."""
    pad = []
    for size, f in zip(reversed(x.shape[2:]), reversed(factors), strict=True):
        pad += [0, -size % f]
    if any(pad):
        x = F.pad(x, pad, mode="replicate")
    pool = F.avg_pool2d if x.ndim == 4 else F.avg_pool3d
    return pool(x, kernel_size=tuple(factors), stride=tuple(factors))


def upsample_to(
    x_lr: torch.Tensor,
    size: Sequence[int],
    mode: str | None = None,
    factor: int | Sequence[int] | None = None,
) -> torch.Tensor:
    """Interpolate a low-resolution batch back onto the fine grid of spatial ``size``.

    This is the conditioning image for super-resolution: as in SR3 (Saharia et al. 2021), the
    low-resolution input is interpolated to the target grid and concatenated with the noisy
    target. ``mode`` defaults to bicubic for 2D and trilinear for 3D; "nearest" is allowed too.
    The grids are aligned as :func:`downsample` made them: the per-axis ``factor`` (inferred as
    the rounded size ratio when omitted) sets the voxel correspondence, and the padded end is
    cropped off.
    """
    n_spatial = _check_batch(x_lr)
    size = tuple(int(s) for s in size)
    if len(size) != n_spatial:
        raise InputError(None, f"size must have {n_spatial} entries, got {size}")
    mode = mode or _DEFAULT_MODE[n_spatial]
    allowed = {"nearest", _DEFAULT_MODE[n_spatial]}
    if mode not in allowed:
        raise InputError(None, f"mode for {n_spatial}D must be one of {sorted(allowed)}, got {mode!r}")
    if factor is None:
        factor = [max(1, round(s / n)) for s, n in zip(size, x_lr.shape[2:], strict=True)]
    elif isinstance(factor, int):
        factor = [factor] * n_spatial
    if any(n * f < s for s, n, f in zip(size, x_lr.shape[2:], factor, strict=True)):
        raise InputError(None, f"a grid of {tuple(x_lr.shape[2:])} times {tuple(factor)} cannot cover {size}")
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    up = F.interpolate(
        x_lr, scale_factor=[float(f) for f in factor], mode=mode, recompute_scale_factor=False, **kwargs
    )
    return up[(..., *(slice(0, s) for s in size))]


def project_consistent(fine: torch.Tensor, coarse: torch.Tensor,
                       factors: Sequence[int]) -> torch.Tensor:
    """The nearest image to ``fine`` whose :func:`downsample` by ``factors`` is ``coarse``.

    Data consistency for super-resolution (DDNM, Wang et al. 2023, with the averaging operator
    A and its pseudo-inverse A+ = replicate): ``fine + A+(coarse - A fine)``, the orthogonal
    projection onto the images that explain the measurement. When ``coarse`` is an exact
    average of the true image, the projection can only bring ``fine`` closer to it. ``fine`` is
    (B, C, *spatial) with one factor per spatial axis; ``coarse`` is its measured coarse batch.
    """
    n_spatial = _check_batch(fine)
    factors = tuple(int(f) for f in factors)
    if len(factors) != n_spatial or min(factors) < 1:
        raise InputError(None, f"factors must be {n_spatial} positive integers, got {factors}")
    size = fine.shape[2:]
    low = _average(fine, factors)
    if low.shape != coarse.shape:
        raise InputError(None, f"coarse batch {tuple(coarse.shape)} is not the {factors}-fold "
                               f"average of a fine one of {tuple(fine.shape)}")
    correction = (coarse.to(low) - low)
    for axis, f in enumerate(factors):
        correction = correction.repeat_interleave(f, dim=axis + 2)
    return fine + correction[(..., *(slice(0, s) for s in size))]

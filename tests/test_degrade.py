"""Noise and resolution degradations: known statistics, shapes, grid alignment, determinism."""

import numpy as np
import pytest
import torch
from scipy.special import i0e, i1e

from medidiff.data.degrade import (
    add_gaussian_noise,
    add_rician_noise,
    downsample,
    project_consistent,
    reference_intensity,
    upsample_to,
)
from medidiff.errors import InputError


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


def rician_mean(a, sigma):
    """E[M] = sigma sqrt(pi/2) L_1/2(-a^2 / 2 sigma^2), with scaled Bessel functions for stability."""
    v = a * a / (4 * sigma * sigma)
    return sigma * np.sqrt(np.pi / 2) * ((1 + 2 * v) * i0e(v) + 2 * v * i1e(v))


@pytest.mark.parametrize("a, sigma", [(0.5, 0.2), (0.1, 0.1), (0.0, 0.05)])
def test_rician_noise_on_a_constant_image_has_the_rician_mean_bias(a, sigma):
    x = torch.full((1, 1, 256, 256), a, dtype=torch.float64)
    y = add_rician_noise(x, sigma, generator())
    assert y.min() >= 0
    assert y.mean().item() == pytest.approx(rician_mean(a, sigma), abs=4 * sigma / 256)
    # the second moment is exact for any SNR: E[M^2] = a^2 + 2 sigma^2
    assert (y**2).mean().item() == pytest.approx(a * a + 2 * sigma * sigma, rel=0.02)


def test_rician_sigma_can_differ_per_sample():
    x = torch.full((2, 1, 64, 64), 0.8)
    y = add_rician_noise(x, torch.tensor([0.0, 0.1]), generator())
    assert torch.allclose(y[0], x[0])
    assert (y[1] - x[1]).std().item() == pytest.approx(0.1, rel=0.1)


def test_gaussian_noise_has_the_requested_std_and_zero_mean():
    x = torch.full((1, 1, 32, 32, 32), 0.3)
    y = add_gaussian_noise(x, 0.05, generator())
    assert (y - x).std().item() == pytest.approx(0.05, rel=0.05)
    assert (y - x).mean().item() == pytest.approx(0.0, abs=0.002)


def test_noise_is_reproducible_from_the_generator():
    x = torch.rand(2, 1, 16, 16)
    assert torch.equal(add_rician_noise(x, 0.1, generator(3)), add_rician_noise(x, 0.1, generator(3)))
    assert not torch.equal(add_rician_noise(x, 0.1, generator(3)), add_rician_noise(x, 0.1, generator(4)))
    assert torch.equal(add_gaussian_noise(x, 0.1, generator(3)), add_gaussian_noise(x, 0.1, generator(3)))


def test_reference_intensity_is_the_99th_percentile_of_the_foreground():
    x = torch.zeros(2, 1, 40, 40)
    x[0, 0, 10:30, 10:30] = torch.linspace(0.1, 1.0, 400).reshape(20, 20)
    x[1, 0, :20] = torch.rand(20, 40)
    ref = reference_intensity(x)
    for b in range(2):
        values = x[b][x[b] > 0].numpy()
        assert ref[b].item() == pytest.approx(np.percentile(values, 99), rel=1e-5)
    mask = torch.zeros(2, 1, 40, 40, dtype=torch.bool)
    mask[:, :, 10:20, 10:20] = True
    masked = reference_intensity(x, mask)
    assert masked[0].item() == pytest.approx(np.percentile(x[0][mask[0]].numpy(), 99), rel=1e-5)


def test_downsample_averages_blocks_and_pads_uneven_sizes():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    low = downsample(x, 2, dims=(0, 1))
    assert low.shape == (1, 1, 2, 2)
    assert low[0, 0, 0, 0].item() == pytest.approx((0 + 1 + 4 + 5) / 4)
    assert downsample(torch.rand(2, 1, 99, 117), 4, dims=(0, 1)).shape == (2, 1, 25, 30)
    # thick slices along the last axis of a volume
    assert downsample(torch.rand(1, 1, 20, 22, 95), 2, dims=(2,)).shape == (1, 1, 20, 22, 48)


def test_upsample_returns_the_fine_grid_with_the_default_modes():
    size2d, size3d = (99, 117), (20, 22, 95)
    low2d = downsample(torch.rand(1, 1, *size2d), 4, dims=(0, 1))
    low3d = downsample(torch.rand(1, 1, *size3d), 2, dims=(2,))
    assert upsample_to(low2d, size2d).shape == (1, 1, *size2d)
    assert upsample_to(low3d, size3d).shape == (1, 1, *size3d)
    assert upsample_to(low3d, size3d, mode="nearest").shape == (1, 1, *size3d)


def test_upsampled_grid_is_aligned_with_the_fine_grid():
    # A linear ramp survives block averaging and linear interpolation exactly, but only if the
    # coarse voxel centres are placed where downsample put them.
    ramp = torch.arange(31.0).reshape(1, 1, 31, 1, 1).expand(1, 1, 31, 4, 4).contiguous()
    back = upsample_to(downsample(ramp, 3, dims=(0,)), ramp.shape[2:], mode="trilinear")
    assert torch.allclose(back[:, :, 2:-4], ramp[:, :, 2:-4], atol=1e-5)  # the end is padded
    blocks = torch.rand(1, 1, 8, 8).repeat_interleave(2, 2).repeat_interleave(2, 3)
    assert torch.equal(upsample_to(downsample(blocks, 2, (0, 1)), (16, 16), mode="nearest"), blocks)


def test_consistency_projection_explains_the_measurement_and_moves_towards_the_truth():
    g = generator()
    truth = torch.rand(3, 1, 16, 12, 6, generator=g)
    coarse = downsample(truth, 2, dims=(0, 1))
    guess = truth + 0.3 * torch.randn(truth.shape, generator=g)
    projected = project_consistent(guess, coarse, (2, 2, 1))
    assert torch.allclose(downsample(projected, 2, dims=(0, 1)), coarse, atol=1e-6)
    # an orthogonal projection onto a set holding the truth: it removes the error's block means,
    # a quarter of white noise's energy over 2x2 blocks (norm x sqrt(3/4))
    ratio = float((projected - truth).norm() / (guess - truth).norm())
    assert ratio == pytest.approx(np.sqrt(0.75), abs=0.03)
    assert torch.allclose(project_consistent(projected, coarse, (2, 2, 1)), projected, atol=1e-6)
    with pytest.raises(InputError):
        project_consistent(guess, coarse, (4, 4, 1))


def test_bad_arguments_raise_input_error():
    with pytest.raises(InputError):
        add_rician_noise(torch.rand(8, 8), 0.1, generator())
    with pytest.raises(InputError):
        add_rician_noise(torch.rand(2, 1, 8, 8), torch.tensor([0.1, 0.2, 0.3]), generator())
    with pytest.raises(InputError):
        downsample(torch.rand(1, 1, 8, 8), 2, dims=(2,))
    with pytest.raises(InputError):
        upsample_to(torch.rand(1, 1, 4, 4, 4), (8, 8, 8), mode="bicubic")

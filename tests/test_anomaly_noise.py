"""Anomaly scoring options from the field: AnoDDPM's simplex noise and pDDPM's patch-wise
reconstruction (``diffusion.noise``, ``diffusion.noise_patch``)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from medidiff.api import AnomalyDetector, Denoiser
from medidiff.config import AnomalyConfig, load_config
from medidiff.diffusion import noise
from medidiff.diffusion.noise import StackedGenerator
from medidiff.diffusion.schedule import NoiseSchedule
from medidiff.errors import ConfigError, ModelFolderError
from medidiff.tasks.anomaly.scoring import patch_tiles, reconstruct
from medidiff.tasks.registry import get_task
from medidiff.tracking import Tracker
from medidiff.training.loss import VPLoss
from medidiff.training.trainer import run_training
from tests.helpers import REPO

TINY = REPO / "configs" / "anomaly" / "cpu-tiny.yaml"


def _lag_correlation(x: torch.Tensor, lag: int) -> float:
    x = x - x.mean()
    return float((x[..., lag:] * x[..., :-lag]).mean() / x.pow(2).mean())


def test_simplex_noise_is_standardised_smooth_and_seeded():
    field = noise.simplex((4, 2, 48, 56), torch.Generator().manual_seed(1))
    assert field.shape == (4, 2, 48, 56)
    flat = field.flatten(2)
    torch.testing.assert_close(flat.mean(dim=2), torch.zeros(4, 2), atol=1e-5, rtol=0)
    torch.testing.assert_close(flat.std(dim=2), torch.ones(4, 2), atol=1e-4, rtol=0)
    # low-frequency: neighbours are correlated, unlike white noise's
    assert _lag_correlation(field, 1) > 0.5
    assert abs(_lag_correlation(torch.randn(4, 2, 48, 56), 1)) < 0.05
    again = noise.simplex((4, 2, 48, 56), torch.Generator().manual_seed(1))
    assert torch.equal(field, again)
    assert not torch.equal(field[0], field[1])  # each field its own
    volume = noise.simplex((1, 1, 20, 24, 16), torch.Generator().manual_seed(2))
    assert volume.shape == (1, 1, 20, 24, 16) and _lag_correlation(volume, 1) > 0.5


def test_a_rows_simplex_noise_does_not_depend_on_its_batch():
    alone = noise.draw("simplex", (1, 1, 16, 16), StackedGenerator([7]))
    batch = noise.draw("simplex", (3, 1, 16, 16), StackedGenerator([3, 7, 5]))
    assert torch.equal(alone[0], batch[1])
    gaussian = noise.draw("gaussian", (3, 1, 16, 16), StackedGenerator([3, 7, 5]))
    assert torch.equal(gaussian, StackedGenerator([3, 7, 5]).randn((3, 1, 16, 16)))


def test_the_schedule_carries_its_noise_to_the_samplers():
    from medidiff.diffusion.samplers import ddpm

    schedule = NoiseSchedule(noise="simplex", prediction_type="sample")
    seen = []

    def model(x, t):
        seen.append(x.clone())
        return torch.zeros_like(x)  # x0 = 0: each step's x is the drawn noise, scaled

    ddpm(model, torch.zeros(2, 1, 32, 32), [200, 100], schedule,
         generator=StackedGenerator([1, 2]))
    assert _lag_correlation(seen[1], 1) > 0.5  # the ancestral step's noise was simplex
    with pytest.raises(ConfigError, match="noise"):
        NoiseSchedule(noise="perlin")


def test_patch_loss_noises_one_patch_and_counts_it_only():
    schedule = NoiseSchedule(prediction_type="sample", noise_patch=8)
    target = torch.rand(4, 1, 24, 20) * 2 - 1
    seen = {}

    def net(x, timesteps, class_labels=None):
        seen["x"] = x.clone()
        out = target.clone()
        out[..., :, :] += 5.0 * (x == target)  # wrong wherever the input was left clean
        return out

    loss = VPLoss(1000)(net, SimpleNamespace(target=target, condition=None, class_labels=None),
                        schedule, torch.Generator().manual_seed(0))
    noised = seen["x"] != target
    per_row = noised.flatten(1).sum(dim=1)
    assert (per_row > 0).all() and (per_row <= 64).all()  # at most one 8x8 patch per example
    # the clean context's (wrong) prediction does not count: the loss is inside the patch only
    assert float(loss) == pytest.approx(0.0, abs=1e-6)


def test_patch_tiles_cover_the_grid():
    tiles = patch_tiles((48, 56), 16)
    assert len(tiles) == 3 * 4
    covered = np.zeros((48, 56), int)
    for tile in tiles:
        covered[tile] += 1
    assert covered.min() == 1  # everything covered, the last column moved back to the edge
    assert patch_tiles((48, 56), 32) == [(slice(0, 32), slice(0, 32)), (slice(0, 32), slice(24, 56)),
                                         (slice(16, 48), slice(0, 32)), (slice(16, 48), slice(24, 56))]
    assert patch_tiles((48, 56), None) == [(slice(0, 48), slice(0, 56))]


def test_patchwise_reconstruction_keeps_the_context_clean():
    schedule = NoiseSchedule(prediction_type="sample", noise_patch=16)
    images = torch.rand(2, 1, 32, 48)
    calls = []

    def net(x, timesteps, class_labels=None):
        calls.append(x.clone())
        return x  # returns its input as x0: the clean context, the noised tile

    settings = AnomalyConfig(sampler="x0", noise_levels=[200], steps=1, draws=1)
    out = reconstruct(net, images, [(0,), (1,)], schedule, settings, torch.device("cpu"))
    assert out.shape == (2, 2, 32, 48)
    rows = calls[0]
    assert rows.shape[0] == 2 * len(patch_tiles((32, 48), 16))
    clean = (images * 2 - 1).repeat_interleave(6, dim=0)
    changed = (rows != clean).flatten(1).sum(dim=1)
    assert (changed > 0).all() and (changed <= 16 * 16).all()  # one tile noised per row
    # each tile's reconstruction is its own noised input, so the residual is the tile's noise
    assert float(out[:, 0].min()) > 0


def test_a_tiny_model_with_simplex_noise_on_noised_patches_trains_and_scores(example_data,
                                                                             tmp_path):
    # pDDPM's own recipe: simplex noise, one noised patch per example
    cfg = load_config(TINY, ["train.steps=10", "diffusion.noise=simplex",
                             "diffusion.noise_patch=16"])
    run_training(cfg, example_data, tmp_path / "model", task=get_task(cfg.task),
                 tracker=Tracker())
    detector = AnomalyDetector.load(tmp_path / "model", device="cpu", draws=1,
                                    noise_levels=[250])
    assert detector.schedule.to_config()["noise"] == "simplex"
    scan = example_data / "test" / "images" / "sub-007.nii.gz"
    result = detector.predict_file(scan)
    assert np.isfinite(result.anomaly_map).all() and result.anomaly_map.max() > 0
    assert detector.tiles == 12  # 16-voxel tiles over the 48 x 56 slice: 3 x 4
    assert detector.describe()["nfe_per_slice"] == 12  # one level, one draw, one x0 step
    # zero-shot SDEdit takes the scan's own (Gaussian) noise for the model's: refused in one line
    with pytest.raises(ModelFolderError, match="Gaussian noise on the whole image"):
        Denoiser.load(tmp_path / "model", device="cpu")


def test_noise_patch_is_for_anomaly_models_only():
    with pytest.raises(Exception, match="noise_patch"):
        load_config(REPO / "configs" / "denoise" / "cpu-tiny.yaml", ["diffusion.noise_patch=16"])

"""The training losses: what each weighs, whatever the network predicts."""

from __future__ import annotations

import pytest
import torch

from medidiff.config import load_config
from medidiff.diffusion.schedule import NoiseSchedule
from medidiff.training.loss import MinSNRLoss, VPLoss, loss_from_config
from tests.helpers import REPO


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weighs_the_x0_error_by_the_capped_snr(prediction):
    """Whatever the target, weight x (target error) = min(SNR, gamma) x (x0 error)."""
    schedule = NoiseSchedule(prediction_type=prediction)
    loss = MinSNRLoss(max_timestep=1000, gamma=5.0)
    generator = torch.Generator().manual_seed(0)
    t = torch.tensor([0, 20, 80, 250, 600, 999])
    x0 = torch.rand((6, 1, 8, 8), generator=generator) * 2 - 1
    noise = torch.randn(x0.shape, generator=generator)
    x_t = schedule.add_noise(x0, noise, t)
    target = schedule.training_target(x0, noise, t)
    wrong = target + 0.1 * torch.randn(x0.shape, generator=generator)
    _, x0_wrong = schedule.split(wrong, x_t, t)
    target_error = (wrong - target).double().pow(2).flatten(1).mean(1)
    x0_error = (x0_wrong - x0).double().pow(2).flatten(1).mean(1)
    abar = schedule.alphas_cumprod[t]
    capped = (abar / (1 - abar)).clamp(max=5.0)
    weighted = loss.weight(schedule, t).double() * target_error
    torch.testing.assert_close(weighted, capped * x0_error, rtol=1e-3, atol=1e-9)
    assert VPLoss(1000).weight(schedule, t) is None  # the plain loss weighs all alike


def test_the_config_chooses_the_weighting():
    path = REPO / "configs" / "anomaly" / "cpu-tiny.yaml"
    assert type(loss_from_config(load_config(path))) is VPLoss
    loss = loss_from_config(load_config(path, ["train.loss_weighting=min_snr",
                                               "train.min_snr_gamma=2"]))
    assert isinstance(loss, MinSNRLoss) and loss.gamma == 2.0


def test_l1_norm_takes_the_absolute_error_of_the_same_draws():
    from types import SimpleNamespace

    schedule = NoiseSchedule(prediction_type="sample")
    target = torch.rand(4, 1, 8, 8) * 2 - 1
    inputs = SimpleNamespace(target=target, condition=None, class_labels=None)

    def net(x, timesteps, class_labels=None):
        return target + 0.5  # off by 0.5 everywhere: L1 0.5, MSE 0.25

    l1 = VPLoss(1000, norm="l1")(net, inputs, schedule, torch.Generator().manual_seed(0))
    l2 = VPLoss(1000)(net, inputs, schedule, torch.Generator().manual_seed(0))
    assert float(l1) == pytest.approx(0.5) and float(l2) == pytest.approx(0.25)
    path = REPO / "configs" / "superres" / "cpu-tiny.yaml"
    assert loss_from_config(load_config(path, ["train.loss_norm=l1"])).norm == "l1"
    with pytest.raises(Exception, match="loss_norm"):
        load_config(path, ["train.loss_norm=huber"])

"""What one training step minimises, as a small callable (in the style of NVlabs/edm
``training/loss.py``): ``loss(net, inputs, schedule, generator) -> scalar tensor``.

``net`` is called as ``net(x, timesteps=t, class_labels=labels)`` (the trainer hands over its
network wrapped in autocast); ``inputs`` holds a task's ``target`` (in [-1, 1]), its
``condition`` channels and ``class_labels``, already on the network's device; ``generator`` is
the trainer's CPU generator, whose state every checkpoint keeps, so a resumed run draws the same
noise and timesteps. A new weighting or target is a new class here, not an edit of the loop.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from medidiff.config import Config
from medidiff.diffusion.schedule import NoiseSchedule


class Loss(Protocol):
    def __call__(self, net: Any, inputs: Any, schedule: NoiseSchedule,
                 generator: torch.Generator) -> torch.Tensor: ...


class VPLoss:
    """The DDPM loss (Ho et al. 2020) of a variance-preserving schedule: timesteps uniform in
    ``[0, max_timestep)``, unweighted MSE to the schedule's prediction target (eps, v or x0, as
    ``diffusion.prediction_type`` says)."""

    def __init__(self, max_timestep: int):
        self.max_timestep = int(max_timestep)

    def __call__(self, net: Any, inputs: Any, schedule: NoiseSchedule,
                 generator: torch.Generator) -> torch.Tensor:
        target = inputs.target
        noise = torch.randn(target.shape, generator=generator).to(target.device)
        t = torch.randint(0, self.max_timestep, (target.shape[0],),
                          generator=generator).to(target.device)
        x_t = schedule.add_noise(target, noise, t)
        if inputs.condition is not None:
            x_t = torch.cat([x_t, inputs.condition], dim=1)
        pred = net(x_t, timesteps=t, class_labels=inputs.class_labels)
        goal = schedule.training_target(target, noise, t)
        return torch.nn.functional.mse_loss(pred.float(), goal.float())


def loss_from_config(cfg: Config) -> VPLoss:
    """The loss a config trains with: timesteps below ``cfg.trained_timesteps()``."""
    return VPLoss(max_timestep=cfg.trained_timesteps())

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
    ``[0, max_timestep)``, unweighted MSE (or, with ``norm="l1"``, mean absolute error) to the
    schedule's prediction target (eps, v or x0, as ``diffusion.prediction_type`` says)."""

    def __init__(self, max_timestep: int, norm: str = "l2"):
        if norm not in ("l1", "l2"):
            raise ValueError(f"norm {norm!r} is not one of l1, l2")
        self.max_timestep = int(max_timestep)
        self.norm = norm

    def weight(self, schedule: NoiseSchedule, t: torch.Tensor) -> torch.Tensor | None:
        """Per-example weight of the MSE at timesteps ``t`` (None: all equal)."""
        return None

    def __call__(self, net: Any, inputs: Any, schedule: NoiseSchedule,
                 generator: torch.Generator) -> torch.Tensor:
        target = inputs.target
        noise = schedule.draw_noise(target.shape, generator).to(target.device)
        t = torch.randint(0, self.max_timestep, (target.shape[0],),
                          generator=generator).to(target.device)
        x_t = schedule.add_noise(target, noise, t)
        patch = None
        if schedule.noise_patch is not None:  # pDDPM: one noised patch, the rest clean context
            patch = patch_masks(target.shape, schedule.noise_patch, generator).to(target.device)
            x_t = torch.where(patch, x_t, target)
        if inputs.condition is not None:
            x_t = torch.cat([x_t, inputs.condition], dim=1)
        pred = net(x_t, timesteps=t, class_labels=inputs.class_labels)
        goal = schedule.training_target(target, noise, t)
        weight = self.weight(schedule, t)
        difference = pred.float() - goal.float()
        error = difference.abs() if self.norm == "l1" else difference.pow(2)
        if weight is None and patch is None:
            return error.mean()
        if patch is None:
            error = error.flatten(1).mean(dim=1)
        else:
            keep = patch.expand_as(error).flatten(1).float()
            error = (error.flatten(1) * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)
        if weight is None:
            return error.mean()
        return (weight.to(error.device) * error).mean()


def patch_masks(shape, size: int, generator: torch.Generator) -> torch.Tensor:
    """(B, 1, *spatial) boolean masks, each one square (cubic) patch of ``size`` voxels per
    side (at most the image) at a position drawn uniformly inside the image."""
    batch, _, *spatial = shape
    mask = torch.zeros(batch, 1, *spatial, dtype=torch.bool)
    for row in range(batch):
        box = [row, slice(None)]
        for n in spatial:
            side = min(int(size), n)
            start = int(torch.randint(0, n - side + 1, (1,), generator=generator))
            box.append(slice(start, start + side))
        mask[tuple(box)] = True
    return mask


class MinSNRLoss(VPLoss):
    """Min-SNR-gamma weighting (Hang et al., "Efficient Diffusion Training via Min-SNR Weighting
    Strategy", ICCV 2023): the x0 error of each noise level weighs min(SNR, gamma), written for
    the network's prediction target; nearly clean levels no longer dominate the gradient."""

    def __init__(self, max_timestep: int, gamma: float = 5.0, norm: str = "l2"):
        super().__init__(max_timestep, norm)
        self.gamma = float(gamma)

    def weight(self, schedule: NoiseSchedule, t: torch.Tensor) -> torch.Tensor:
        abar = schedule.alphas_cumprod[t.cpu()]
        snr = abar / (1.0 - abar)
        capped = snr.clamp(max=self.gamma)
        # the x0 MSE is the eps MSE / SNR and the v MSE / (SNR + 1)
        per_target = {"epsilon": snr, "v_prediction": snr + 1.0, "sample": torch.ones_like(snr)}
        return (capped / per_target[schedule.prediction_type]).float()


def loss_from_config(cfg: Config) -> VPLoss:
    """The loss a config trains with: timesteps below ``cfg.trained_timesteps()``, weighted
    as ``train.loss_weighting`` says."""
    if cfg.train.loss_weighting == "min_snr":
        return MinSNRLoss(cfg.trained_timesteps(), cfg.train.min_snr_gamma, cfg.train.loss_norm)
    return VPLoss(max_timestep=cfg.trained_timesteps(), norm=cfg.train.loss_norm)

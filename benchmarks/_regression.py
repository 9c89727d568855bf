"""Supervised regression counterparts of the conditional enhancement models (benchmarks only).

The fair alternative to a conditional diffusion model is not only a classical filter but the
same network trained by plain regression on the same pairs: a one-pass residual network in the
manner of DnCNN (Zhang et al. 2017) for denoising and SRCNN/EDSR (Dong et al. 2014; Lim et al.
2017) for super-resolution. Here it is the task's own ``DiffusionModelUNet`` (same channels,
same class label for the noise level or scale), given the condition with an empty target channel
and timestep 0, trained with an L1 loss on the same target the diffusion model generates. The
trainer, batches, crops, degradations, optimiser, learning-rate schedule and EMA are the
diffusion model's: :class:`RegressionLoss` draws (and discards) the noise and timesteps the
diffusion loss draws, so the seeded batch stream, hence every training pair, is the same.
:class:`OnePass` lets the task's predictor run it (same slices, same condition, same intensity
handling) with the one-step ``x0`` sampler.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medidiff.config import load_config
from medidiff.tasks.registry import get_task
from medidiff.training.trainer import Trainer, draw_batch


class RegressionLoss:
    """L1 between the network's one-pass prediction from the condition and the target."""

    def __init__(self, max_timestep: int):
        self.max_timestep = int(max_timestep)

    def __call__(self, net, inputs, schedule, generator: torch.Generator) -> torch.Tensor:
        target = inputs.target
        # the diffusion loss's draws, discarded: the generator, hence the next batch, stays in step
        torch.randn(target.shape, generator=generator)
        torch.randint(0, self.max_timestep, (target.shape[0],), generator=generator)
        x = torch.cat([torch.zeros_like(target), inputs.condition], dim=1)
        t = torch.zeros(target.shape[0], dtype=torch.long, device=target.device)
        pred = net(x, timesteps=t, class_labels=inputs.class_labels)
        return nn.functional.l1_loss(pred.float(), target.float())


class OnePass(nn.Module):
    """A regression network called as samplers call a diffusion model: the sampler's ``x_t``
    (the first ``channels``) is replaced by zeros and its timestep by 0, as in training."""

    def __init__(self, net: nn.Module, channels: int = 1):
        super().__init__()
        self.net, self.channels = net, int(channels)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        x = torch.cat([torch.zeros_like(x[:, :self.channels]), x[:, self.channels:]], dim=1)
        return self.net(x, timesteps=torch.zeros_like(timesteps), class_labels=class_labels)


def as_regression(predictor):
    """A task predictor (``Denoiser``/``SuperResolver``) over a regression model folder."""
    channels = predictor.task.target_channels(predictor.cfg)
    predictor.net = OnePass(predictor.net, channels)
    return predictor


def train_regression(config: Path, data: Path, out: Path, steps: int, seconds: float) -> dict:
    """Train a regression model with ``config``'s trainer for at most ``steps`` steps and
    ``seconds`` of wall time (the diffusion model's budget); the learning-rate schedule is the
    config's (``train.steps``), as the diffusion model's was. Writes a model folder and
    ``regression.json``, returns the latter's content."""
    cfg = load_config(config)
    task = get_task(cfg.task)
    trainer = Trainer(cfg, data, out, task=task, loss=RegressionLoss(cfg.trained_timesteps()))
    trainer.load_data()
    trainer.net.train()
    started, window = time.monotonic(), []
    while trainer.step < steps and time.monotonic() - started < seconds:
        window.append(trainer.train_step(draw_batch(trainer.dataset, cfg.train.batch_size,
                                                    trainer.generator)))
        if trainer.step % cfg.train.log_every == 0:
            trainer.losses.append(float(np.mean(window)))
            window = []
    elapsed = time.monotonic() - started
    out.mkdir(parents=True, exist_ok=True)
    trainer.finish()
    record = {"objective": "L1 regression, one pass", "steps": trainer.step,
              "seconds": round(elapsed, 1), "budget_steps": steps, "budget_seconds": seconds,
              "losses": trainer.losses, "log_every": cfg.train.log_every}
    (out / "regression.json").write_text(json.dumps(record, indent=1) + "\n")
    return record

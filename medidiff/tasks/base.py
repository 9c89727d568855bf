"""What every task shares: how it builds (target, condition) pairs and how its network is called.

A task never re-implements a sampler or the training loop; it only says what the network is
trained to generate (the target, in [-1, 1]) and what it is given (the condition channels,
concatenated after the noisy target, and optional class labels such as a noise level).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from medidiff.config import Config


@dataclass
class TrainingInputs:
    target: torch.Tensor
    condition: torch.Tensor | None = None
    class_labels: torch.Tensor | None = None


class Task:
    """Base class: an unconditional model of the image (the normative model)."""

    name: ClassVar[str] = "base"
    label_keys: ClassVar[tuple[str, ...]] = ()

    def target_channels(self, cfg: Config) -> int:
        return 1

    def condition_channels(self, cfg: Config) -> int:
        return 0

    def num_class_embeds(self, cfg: Config) -> int | None:
        return None

    def slice_context(self, cfg: Config) -> int:
        """2D: neighbour slices on each side given with every training slice (as channels)."""
        return 0

    def training_inputs(self, batch: dict, cfg: Config, generator: torch.Generator) -> TrainingInputs:
        return TrainingInputs(target=batch["image"] * 2.0 - 1.0)


def model_fn(net, condition: torch.Tensor | None = None, class_labels: torch.Tensor | None = None):
    """Wrap a network as ``model(x_t, t)`` for the samplers: condition channels go after x_t."""

    def call(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        inputs = x_t if condition is None else torch.cat([x_t, condition.to(x_t.dtype)], dim=1)
        labels = class_labels
        if labels is not None and labels.shape[0] != x_t.shape[0]:
            labels = labels.repeat_interleave(x_t.shape[0] // labels.shape[0])
        return net(inputs, timesteps=t, class_labels=labels)

    return call

"""Exponential moving average of a network's weights, the copy diffusion models sample with."""

from __future__ import annotations

import torch
import torch.nn as nn


def _unwrap(model: nn.Module) -> nn.Module:
    """The bare network inside DistributedDataParallel (or torch.compile) wrappers."""
    for attr in ("module", "_orig_mod"):
        while isinstance(getattr(model, attr, None), nn.Module):
            model = getattr(model, attr)
    return model


class EMA:
    """Polyak averaging of parameters and floating-point buffers (Polyak & Juditsky 1992).

    After each optimiser step ``update(model)`` sets ``shadow = d * shadow + (1 - d) * weights``.
    The decay ``d`` at update number ``n`` (counted after ``update_after_step`` plain copies) is
    ``min(decay, 1 - (1 + n / inv_gamma) ** -power)`` with ``warmup`` (as in diffusers'
    ``EMAModel(use_ema_warmup=True)``; power 2/3 suits long runs, 3/4 short ones), else the
    constant ``decay``; never below ``min_decay``. Warm-up keeps early averages from being
    dominated by the random initial weights. Integer buffers are copied, not averaged.
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.9999,
        *,
        warmup: bool = True,
        inv_gamma: float = 1.0,
        power: float = 2 / 3,
        min_decay: float = 0.0,
        update_after_step: int = 0,
    ) -> None:
        if not 0.0 <= min_decay <= decay <= 1.0:
            raise ValueError(f"need 0 <= min_decay <= decay <= 1, got {min_decay}, {decay}")
        self.decay, self.warmup = float(decay), bool(warmup)
        self.inv_gamma, self.power = float(inv_gamma), float(power)
        self.min_decay, self.update_after_step = float(min_decay), int(update_after_step)
        self.num_updates = 0
        self.shadow = {k: v.detach().clone() for k, v in _unwrap(model).state_dict().items()}

    def current_decay(self, num_updates: int | None = None) -> float:
        """The decay applied at update number ``num_updates`` (1-based; default: the next one)."""
        n = (self.num_updates + 1 if num_updates is None else num_updates) - self.update_after_step
        if n <= 0:
            return 0.0
        d = 1.0 - (1.0 + n / self.inv_gamma) ** -self.power if self.warmup else self.decay
        return max(min(d, self.decay), self.min_decay)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current weights into the average."""
        d = self.current_decay()
        averages, values = [], []
        for name, value in _unwrap(model).state_dict().items():
            avg = self.shadow[name]
            if avg.is_floating_point():
                averages.append(avg)
                values.append(value.detach().to(avg.dtype))
            else:
                avg.copy_(value)
        if averages:  # one multi-tensor kernel instead of one launch per tensor (GPU)
            torch._foreach_lerp_(averages, values, 1.0 - d)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into ``model`` (same architecture)."""
        _unwrap(model).load_state_dict(self.shadow, strict=True)

    def to(self, device: torch.device | str) -> EMA:
        self.shadow = {k: v.to(device) for k, v in self.shadow.items()}
        return self

    def state_dict(self) -> dict:
        """Everything needed to resume: the averages, the update count and the settings."""
        return {
            "shadow": dict(self.shadow),
            "num_updates": self.num_updates,
            "decay": self.decay,
            "warmup": self.warmup,
            "inv_gamma": self.inv_gamma,
            "power": self.power,
            "min_decay": self.min_decay,
            "update_after_step": self.update_after_step,
        }

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise KeyError(f"EMA state does not match the model: {sorted(missing)[:5]}")
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)
        self.num_updates = int(state["num_updates"])
        for key in ("decay", "warmup", "inv_gamma", "power", "min_decay", "update_after_step"):
            if key in state:
                setattr(self, key, type(getattr(self, key))(state[key]))

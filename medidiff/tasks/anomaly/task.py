"""The normative model's training behaviour."""

from __future__ import annotations

from medidiff.config import Config
from medidiff.tasks.base import Task


class AnomalyTask(Task):
    """The normative model: an unconditional DDPM of healthy scans (the base behaviour), of
    one channel per contrast it takes (``data.contrasts``)."""

    name = "anomaly"

    def target_channels(self, cfg: Config) -> int:
        return len(cfg.data.contrasts or ["t1"])

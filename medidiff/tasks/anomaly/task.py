"""The normative model's training behaviour."""

from __future__ import annotations

from medidiff.tasks.base import Task


class AnomalyTask(Task):
    """The normative model: an unconditional DDPM of healthy scans (the base behaviour)."""

    name = "anomaly"

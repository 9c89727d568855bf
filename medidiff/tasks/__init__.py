"""One module per application; ``get_task`` maps a config's ``task`` to its training behaviour."""

from __future__ import annotations

import importlib

from medidiff.errors import ConfigError
from medidiff.tasks.base import Task

# task name -> (module, class); modules are imported on demand
TASKS = {
    "anomaly": ("medidiff.tasks.anomaly", "AnomalyTask"),
    "denoise": ("medidiff.tasks.denoise", "DenoiseTask"),
    "superres": ("medidiff.tasks.superres", "SuperResTask"),
    "segment": ("medidiff.tasks.segment", "SegmentTask"),
}


def get_task(name: str) -> Task:
    """The Task object for a task name."""
    if name not in TASKS:
        raise ConfigError(f"task '{name}' is not available (known: {', '.join(sorted(TASKS))})")
    module, cls = TASKS[name]
    return getattr(importlib.import_module(module), cls)()

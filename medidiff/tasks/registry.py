"""Task names to task objects, and loading a model folder with its task.

``get_task(cfg.task)`` is how a workflow finds the task object it hands to the trainer and to
``medidiff.models.folder`` (which import no task).
"""

from __future__ import annotations

from pathlib import Path

from medidiff.errors import ConfigError
from medidiff.models import folder as model_folder
from medidiff.models.folder import LoadedModel
from medidiff.tasks.anomaly.task import AnomalyTask
from medidiff.tasks.base import Task
from medidiff.tasks.enhance.denoise import DenoiseTask
from medidiff.tasks.enhance.superres import SuperResTask
from medidiff.tasks.segment.task import SegmentTask

# task name -> its Task class
TASKS: dict[str, type[Task]] = {
    "anomaly": AnomalyTask,
    "denoise": DenoiseTask,
    "superres": SuperResTask,
    "segment": SegmentTask,
}


def get_task(name: str) -> Task:
    """The Task object for a task name."""
    if name not in TASKS:
        raise ConfigError(f"task '{name}' is not available (known: {', '.join(sorted(TASKS))})")
    return TASKS[name]()


def load_model(folder: str | Path, task: str | None = None, device: str = "cpu") -> LoadedModel:
    """Load a model folder for inference with its task (``task``: refuse a model of another).

    Errors are ``medidiff.models.folder.load_model``'s: a missing or foreign folder, a model of
    another task, tampered weights.
    """
    if task is None:
        task = model_folder.read_model_config(folder).task
    return model_folder.load_model(folder, get_task(task), device=device)

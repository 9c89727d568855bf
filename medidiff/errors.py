"""Typed errors. Library code raises these; the CLI turns them into one line and exit status 2."""

from __future__ import annotations

from pathlib import Path


class MedidiffError(Exception):
    """Base class of every error medidiff reports to a user as one line."""


class InputError(MedidiffError):
    """A file or folder given by the user cannot be used: names the path and the problem."""

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class ConfigError(MedidiffError):
    """A configuration key or value is wrong: names the key."""


class ModelFolderError(InputError):
    """A model folder is missing, of another task, tampered with or unsafe."""


class TrackingError(MedidiffError):
    """The MLflow tracking server cannot be reached or refused the request."""


class QualityError(InputError):
    """A scan's preprocessing ran but its result is unusable (a failed registration, another
    contrast or body part); ``reasons`` say why, for the results table."""

    def __init__(self, path: str | Path | None, reasons: list[str]):
        self.reasons = list(reasons)
        super().__init__(path, "; ".join(self.reasons))

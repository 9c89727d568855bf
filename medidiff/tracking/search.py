"""Searching MLflow runs: the latest runs of an experiment as plain dicts."""

from __future__ import annotations

from typing import Any

from medidiff.errors import InputError, TrackingError
from medidiff.tracking.tracker import DEFAULT_EXPERIMENT, _first_line
from medidiff.tracking.uri import _sqlite_path, check_reachable, redact, tracking_uri

# ---------------------------------------------------------------------------------------------
# Searching runs


def search_runs(experiment: str | None = None, uri: str | None = None,
                max_runs: int = 50) -> list[dict[str, Any]]:
    """The latest runs of an experiment as plain dicts (newest first).

    Each dict has run_id, name, status, start_time and end_time (ms since the epoch, or None),
    params, metrics (latest values) and tags.
    """
    name = experiment or DEFAULT_EXPERIMENT
    uri = tracking_uri(uri)
    check_reachable(uri)
    db = _sqlite_path(uri) if uri.startswith("sqlite:") else None
    if db is not None and not db.exists():  # do not create an empty database just to look
        raise InputError(None, f"no MLflow experiment named {name!r} (no database at {db})")
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    try:
        found = client.get_experiment_by_name(name)
        if found is None or found.lifecycle_stage == "deleted":
            raise InputError(None, f"no MLflow experiment named {name!r}")
        runs = client.search_runs([found.experiment_id], max_results=max_runs,
                                  order_by=["attributes.start_time DESC"])
    except InputError:
        raise
    except Exception as exc:
        raise TrackingError(f"cannot search MLflow runs at {redact(uri)}: "
                            f"{_first_line(exc)}") from exc
    return [_run_dict(run) for run in runs]


def _run_dict(run: Any) -> dict[str, Any]:
    info, data = run.info, run.data
    return {
        "run_id": info.run_id,
        "name": info.run_name or "",
        "status": info.status,
        "start_time": info.start_time,
        "end_time": info.end_time,
        "params": dict(data.params),
        "metrics": dict(data.metrics),
        "tags": dict(data.tags),
    }

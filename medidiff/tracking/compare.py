"""Compare MLflow runs side by side: the params that differ, key metrics, duration and device."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from medidiff.tracking.search import search_runs
from medidiff.tracking.tracker import DEFAULT_EXPERIMENT, DEVICE_TAG

FORMATS = ("table", "csv", "json", "markdown")
MAX_DEFAULT_METRICS = 8
BASE_COLUMNS = ["run", "id", "status", "start", "duration", "device"]


def compare_runs(experiment: str | None = None, metrics: Sequence[str] | None = None,
                 fmt: str = "table", uri: str | None = None, max_runs: int = 50) -> str:
    """The latest runs of `experiment`, one row each, as a table, CSV, JSON or Markdown.

    Columns: name, id, status, start time, duration, device, then the params whose values
    differ between the runs, then `metrics` (default: the most common non-system metrics).
    Raises `InputError` for an unknown experiment and `TrackingError` when MLflow is unreachable.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    runs = search_runs(experiment, uri=uri, max_runs=max_runs)
    params = differing_params(runs)
    keys = list(metrics) if metrics else common_metrics(runs)
    if fmt == "json":
        return json.dumps([_json_row(run, params, keys) for run in runs], indent=2)
    columns = BASE_COLUMNS + params + keys
    if fmt == "csv":
        return _csv(columns, [_cells(run, params, keys, human=False) for run in runs])
    if not runs:
        return f"no runs in MLflow experiment {experiment or DEFAULT_EXPERIMENT!r}"
    cells = [_cells(run, params, keys, human=True) for run in runs]
    right = [name in ("duration", *keys) for name in columns]
    return _markdown(columns, cells, right) if fmt == "markdown" else _table(columns, cells, right)


def differing_params(runs: Sequence[dict[str, Any]]) -> list[str]:
    """Param keys whose value is not the same in every run (missing counts as a value)."""
    keys = sorted({key for run in runs for key in run["params"]})
    return [k for k in keys if len({run["params"].get(k) for run in runs}) > 1]


def common_metrics(runs: Sequence[dict[str, Any]], limit: int = MAX_DEFAULT_METRICS) -> list[str]:
    """The metric keys most runs have (system metrics left out), most common first."""
    counts = Counter(key for run in runs for key in run["metrics"]
                     if not key.startswith("system/"))
    ranked = sorted(counts, key=lambda key: (-counts[key], key))
    return ranked[:limit]


def _duration_s(run: dict[str, Any]) -> float | None:
    if run["start_time"] is None or run["end_time"] is None:
        return None
    return max(0.0, (run["end_time"] - run["start_time"]) / 1000.0)


def _start(run: dict[str, Any], human: bool) -> str:
    if run["start_time"] is None:
        return ""
    moment = datetime.fromtimestamp(run["start_time"] / 1000.0, tz=timezone.utc)
    if human:
        return moment.astimezone().strftime("%Y-%m-%d %H:%M")
    return moment.isoformat(timespec="seconds")


def _human_duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def _cells(run: dict[str, Any], params: list[str], keys: list[str], human: bool) -> list[str]:
    duration = _duration_s(run)
    base = [
        run["name"],
        run["run_id"][:8] if human else run["run_id"],
        run["status"],
        _start(run, human),
        _human_duration(duration) if human else ("" if duration is None else f"{duration:.1f}"),
        run["tags"].get(DEVICE_TAG, ""),
    ]
    missing = "-" if human else ""
    values = [run["params"].get(k, missing) for k in params]
    numbers = [run["metrics"].get(k) for k in keys]
    shown = [missing if v is None else (f"{v:.4g}" if human else repr(v)) for v in numbers]
    return base + values + shown


def _json_row(run: dict[str, Any], params: list[str], keys: list[str]) -> dict[str, Any]:
    return {
        "name": run["name"],
        "run_id": run["run_id"],
        "status": run["status"],
        "start": _start(run, human=False) or None,
        "duration_s": _duration_s(run),
        "device": run["tags"].get(DEVICE_TAG),
        "params": {k: run["params"].get(k) for k in params},
        "metrics": {k: run["metrics"].get(k) for k in keys},
    }


def _csv(columns: list[str], rows: list[list[str]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    return out.getvalue()


def _table(columns: list[str], rows: list[list[str]], right: list[bool]) -> str:
    """A plain text table: aligned columns, a dashed line under the header."""
    widths = [max(len(text) for text in column) for column in zip(columns, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        pairs = zip(cells, widths, right, strict=True)
        return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in pairs).rstrip()

    return "\n".join([line(columns), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def _markdown(columns: list[str], rows: list[list[str]], right: list[bool]) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    rule = "|" + "|".join("---:" if r else "---" for r in right) + "|"
    return "\n".join([line(columns), rule] + [line(r) for r in rows])

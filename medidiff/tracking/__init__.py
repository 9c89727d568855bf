"""Everything MLflow: tracking URI, runs, params, metrics, images, models and run search.

The only package of medidiff that imports mlflow. It is imported lazily, inside the functions that
need it, so that `--no-tracking`, non-zero DDP ranks and `medidiff --help` never pay its start-up
time (about 2 s).

- `medidiff.tracking.uri`: the tracking URI (`tracking_uri`, `redact`) and `check_reachable`.
- `medidiff.tracking.tracker`: the fault-tolerant `Tracker`, default tags, key and param cleaning.
- `medidiff.tracking.search`: `search_runs`, the latest runs of an experiment as plain dicts.
- `medidiff.tracking.compare`: `compare_runs`, runs side by side as a table, CSV, JSON or Markdown.

A tracking failure in the middle of a run never reaches the training loop: it is logged once,
metrics are buffered (bounded) and sent when the server answers again. Starting a run against an
unreachable server raises `TrackingError` at once, before any long work.
"""

from medidiff.tracking.compare import compare_runs
from medidiff.tracking.search import search_runs
from medidiff.tracking.tracker import Tracker
from medidiff.tracking.uri import check_reachable, redact, tracking_uri

__all__ = ["Tracker", "check_reachable", "compare_runs", "redact", "search_runs", "tracking_uri"]

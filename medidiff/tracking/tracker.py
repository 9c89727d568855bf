"""The fault-tolerant `Tracker`: runs, params, metrics, images, artifacts and model folders.

mlflow is imported lazily, inside the methods that need it. A tracking failure in the middle of a
run never reaches the training loop: it is logged once, metrics are buffered (bounded) and sent
when the server answers again. Starting a run against an unreachable server raises
`TrackingError` at once, before any long work.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import json
import logging
import platform
import re
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

import medidiff
from medidiff.errors import TrackingError
from medidiff.tracking.uri import (
    _artifact_location,
    _http_client_defaults,
    check_reachable,
    redact,
    tracking_uri,
)

log = logging.getLogger("medidiff.tracking")  # the package's logger, as before the split

DEFAULT_EXPERIMENT = "medidiff"
DEVICE_TAG = "medidiff.device"
PARENT_RUN_TAG = "mlflow.parentRunId"  # the tag the MLflow UI reads to draw nested runs
DESCRIPTION_TAG = "mlflow.note.content"  # the run's description in the UI
DATASET_CONTEXT_TAG = "mlflow.data.context"  # a dataset input's context: training, scoring...
DATASET_NAME_LIMIT = 500  # MLflow's limits on a dataset's name and digest
DIGEST_LIMIT = 36
PARAM_VALUE_LIMIT = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
KEY_LIMIT = 250
PARAMS_PER_BATCH = 100  # MLflow's log_batch limits
METRICS_PER_BATCH = 1000
_REFUSALS = ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE")
_KEY_FORBIDDEN = re.compile(r"[^\w.\- :/]")
_IMAGE_KEY_FORBIDDEN = re.compile(r"[^A-Za-z0-9_\-./ ]")


# ---------------------------------------------------------------------------------------------
# Tags, params and images


def default_tags() -> dict[str, str]:
    """Tags every run carries: medidiff version, git commit, device, torch and monai versions."""
    return dict(_static_tags())


@functools.cache
def _static_tags() -> dict[str, str]:
    tags = {"medidiff.version": medidiff.__version__, DEVICE_TAG: device_name()}
    commit = _git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit  # the key the MLflow UI shows as "Git commit"
    for package in ("torch", "monai"):  # from metadata: importing monai takes seconds
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            tags[f"medidiff.{package}_version"] = importlib.metadata.version(package)
    return tags


def device_name() -> str:
    """The GPU's name when this process uses torch with CUDA, else the CPU model."""
    torch = sys.modules.get("torch")  # not imported: nothing here runs on a GPU, and it is slow
    with contextlib.suppress(Exception):
        if torch is not None and torch.cuda.is_available():
            return torch.cuda.get_device_name(torch.cuda.current_device())
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "cpu"


def _git_commit() -> str | None:
    """The commit of the working tree medidiff runs from, if it is a git checkout."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(medidiff.__file__).parent,
            capture_output=True, text=True, timeout=5, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", commit) else None


def clean_key(key: str) -> str:
    """A metric, param or tag key MLflow accepts (other characters become `_`)."""
    return _KEY_FORBIDDEN.sub("_", str(key))[:KEY_LIMIT]


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts become dotted keys (`model.channels`); lists and values become strings."""
    if hasattr(params, "model_dump"):  # a pydantic config
        params = params.model_dump(mode="json")
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, prefix=f"{name}."))
            continue
        if isinstance(value, (list, tuple)):
            text = json.dumps(value, default=str)
        else:
            text = str(value)
        flat[clean_key(name)] = text[:PARAM_VALUE_LIMIT]
    return flat


def image_uint8(image: Any) -> np.ndarray:
    """A 2D float image in [0, 1] (clipped), uint8, or HxWx3/4 (or CxHxW) as a uint8 array."""
    if hasattr(image, "detach"):  # a torch tensor
        image = image.detach().cpu().numpy()
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(f"an image must be HxW, HxWx3 or HxWx4, not shape {array.shape}")
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.integer):
        return np.clip(array, 0, 255).astype(np.uint8)
    scaled = np.clip(np.nan_to_num(array.astype(np.float64)), 0.0, 1.0) * 255.0
    return np.round(scaled).astype(np.uint8)


def _metric_value(key: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"metric {key!r} must be a number, not {type(value).__name__}") from None


def _clean_tags(tags: Mapping[str, Any]) -> dict[str, str]:
    return {clean_key(k): str(v)[:PARAM_VALUE_LIMIT] for k, v in tags.items()}


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


# ---------------------------------------------------------------------------------------------
# Tracker


@dataclass
class _Run:
    run_id: str
    experiment_id: str
    resumed: bool = False
    old_params: dict[str, str] = field(default_factory=dict)
    monitor: Any = None


class Tracker:
    """Logs one command's runs to MLflow; a disabled tracker has the same API and does nothing.

    Use `enabled=False` for `--no-tracking` and on DDP ranks other than 0. With an http URI the
    tracker lowers MLflow's HTTP retries (unless `MLFLOW_HTTP_REQUEST_MAX_RETRIES` is set) so a
    lost server costs seconds, not minutes. `retry_interval` (s) spaces the attempts to reach a
    lost server; `buffer_size` bounds the metric points kept while it is lost.
    """

    def __init__(self, experiment: str = DEFAULT_EXPERIMENT, uri: str | None = None,
                 enabled: bool = True, *, retry_interval: float = 30.0, buffer_size: int = 10_000):
        self.experiment = experiment
        self.enabled = enabled
        self.uri = tracking_uri(uri) if enabled else None
        self.retry_interval = retry_interval
        self._client: Any = None
        self._stack: list[_Run] = []
        self._buffer: deque[tuple[str, Any]] = deque(maxlen=buffer_size)
        self._dropped = 0
        self._degraded = False
        self._warned = False
        self._flushing = False
        self._last_attempt = 0.0
        self.last_run_id: str | None = None  # the run closed last, to describe it afterwards

    @property
    def degraded(self) -> bool:
        """True while the tracking server is lost; metrics wait in memory."""
        return self._degraded

    @property
    def pending_metrics(self) -> int:
        """Metric points not yet sent to MLflow."""
        return len(self._buffer)

    @property
    def run_id(self) -> str | None:
        """The id of the innermost active run (None when disabled or outside a run)."""
        return self._stack[-1].run_id if self._stack else None

    def run_url(self) -> str | None:
        """The MLflow UI's page of the innermost active run, for a tracking server."""
        if not self._stack or urlsplit(self.uri).scheme not in ("http", "https"):
            return None
        active = self._stack[-1]
        return (f"{redact(self.uri).rstrip('/')}/#/experiments/{active.experiment_id}"
                f"/runs/{active.run_id}")

    def check(self) -> None:
        """Raise `TrackingError` now if the tracking store cannot be reached."""
        if self.enabled:
            check_reachable(self.uri)

    # -- runs ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def run(self, name: str, *, nested: bool = False, tags: Mapping[str, Any] | None = None,
            run_id: str | None = None, system_metrics: bool = False,
            node_id: str | None = None) -> Iterator[str | None]:
        """Open a run (or resume `run_id`) and yield its id; it ends FINISHED, FAILED or KILLED.

        `nested=True` makes it a child of the active run. `system_metrics=True` starts MLflow's
        system metrics monitor (CPU, memory, disk, network; GPU when pynvml is importable),
        labelled with `node_id` in multi-node training.
        """
        if not self.enabled:
            yield None
            return
        active = self._open(name, nested, dict(tags or {}), run_id)
        self._stack.append(active)
        if system_metrics:
            active.monitor = self._start_monitor(active, node_id)
        status = "FINISHED"
        try:
            yield active.run_id
        except BaseException as exc:
            status = _status_for(exc)
            raise
        finally:
            self._stack.pop()
            self.last_run_id = active.run_id
            self._close(active, status)

    def _open(self, name: str, nested: bool, tags: dict[str, Any], run_id: str | None) -> _Run:
        check_reachable(self.uri)
        try:
            client = self._get_client()
            if run_id:
                return self._resume(client, run_id, tags)
            all_tags = {**default_tags(), **tags}
            if nested and self._stack:
                all_tags[PARENT_RUN_TAG] = self._stack[-1].run_id
            experiment_id = self._experiment_id(client)
            run = client.create_run(experiment_id, run_name=name, tags=_clean_tags(all_tags))
        except TrackingError:
            raise
        except Exception as exc:
            raise TrackingError(f"cannot start an MLflow run at {redact(self.uri)}: "
                                f"{_first_line(exc)}") from exc
        return _Run(run.info.run_id, experiment_id)

    def _resume(self, client: Any, run_id: str, tags: dict[str, Any]) -> _Run:
        try:
            run = client.get_run(run_id)
        except Exception as exc:
            raise TrackingError(f"cannot resume MLflow run {run_id} at {redact(self.uri)}: "
                                f"{_first_line(exc)}") from exc
        client.update_run(run_id, status="RUNNING")
        for key, value in _clean_tags(tags).items():
            client.set_tag(run_id, key, value)
        return _Run(run_id, run.info.experiment_id, resumed=True, old_params=dict(run.data.params))

    def _experiment_id(self, client: Any) -> str:
        experiment = client.get_experiment_by_name(self.experiment)
        if experiment is None:
            location = _artifact_location(self.uri, self.experiment)
            try:
                return client.create_experiment(self.experiment, artifact_location=location)
            except Exception:  # another process created it first
                experiment = client.get_experiment_by_name(self.experiment)
                if experiment is None:
                    raise
        if experiment.lifecycle_stage == "deleted":
            raise TrackingError(f"MLflow experiment {self.experiment!r} is deleted; restore it "
                                "(`mlflow experiments restore`) or choose another name")
        return experiment.experiment_id

    def _close(self, active: _Run, status: str) -> None:
        if active.monitor is not None:
            with contextlib.suppress(Exception):
                active.monitor.finish()
        self._last_attempt = float("-inf")  # one more try to send, whatever the interval
        self._flush()
        self._send("end the run", self._client.set_terminated, active.run_id, status=status)
        if self._buffer and not self._stack:
            log.warning("%d metric points could not be sent to MLflow (%d older ones were "
                        "dropped while it was lost)", len(self._buffer), self._dropped)

    def _start_monitor(self, active: _Run, node_id: str | None) -> Any:
        try:
            from mlflow.system_metrics import set_system_metrics_node_id
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            if node_id is not None:
                set_system_metrics_node_id(node_id)
            monitor = SystemMetricsMonitor(active.run_id, resume_logging=active.resumed,
                                           node_id=node_id, tracking_uri=self.uri)
            monitor.start()
            return monitor
        except Exception as exc:  # system metrics are a nicety, never a reason to stop
            log.warning("MLflow system metrics are off: %s", _first_line(exc))
            return None

    def _get_client(self) -> Any:
        if self._client is None:
            from mlflow import MlflowClient

            if urlsplit(self.uri).scheme in ("http", "https"):
                _http_client_defaults()
            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def _current(self) -> _Run | None:
        if not self.enabled:
            return None
        if not self._stack:
            raise RuntimeError("no active MLflow run: log inside `with tracker.run(...)`")
        return self._stack[-1]

    # -- fault tolerance -------------------------------------------------------------------

    def _send(self, what: str, call: Any, *args: Any, **kwargs: Any) -> bool:
        """Run one MLflow call; False when it must wait for the server (the tracker degrades)."""
        if not self._may_try():
            return False
        try:
            call(*args, **kwargs)
        except Exception as exc:
            if getattr(exc, "error_code", None) in _REFUSALS:
                # An answer, not an outage: sending the same request again cannot help.
                log.warning("MLflow refused to %s: %s", what, _first_line(exc))
                return True
            self._lost(what, exc)
            return False
        if self._degraded:
            self._degraded = False
            self._warned = False
            log.info("MLflow tracking at %s is back", redact(self.uri))
        if self._buffer and not self._flushing:
            self._flush()
        return True

    def _may_try(self) -> bool:
        if not self._degraded:
            return True
        now = time.monotonic()
        if now - self._last_attempt < self.retry_interval:
            return False
        self._last_attempt = now
        try:  # a quick probe, so a dead server costs 2 s and not MLflow's retries
            check_reachable(self.uri, timeout=2)
        except TrackingError:
            return False
        return True

    def _lost(self, what: str, exc: Exception) -> None:
        self._degraded = True
        self._last_attempt = time.monotonic()
        if self._warned:
            log.debug("MLflow tracking still lost (%s): %s", what, _first_line(exc))
            return
        self._warned = True
        log.warning("MLflow tracking at %s failed to %s (%s); work goes on, the last %d metric "
                    "points are kept and sent when it answers again", redact(self.uri), what,
                    _first_line(exc), self._buffer.maxlen)

    def _flush(self) -> None:
        """Send buffered metric points, oldest first, one run and at most 1000 points a call."""
        self._flushing = True
        try:
            while self._buffer and self._send_batch():
                pass
        finally:
            self._flushing = False

    def _send_batch(self) -> bool:
        run_id = self._buffer[0][0]
        batch = []
        for owner, metric in self._buffer:
            if owner != run_id or len(batch) == METRICS_PER_BATCH:
                break
            batch.append(metric)
        if not self._send("log metrics", self._client.log_batch, run_id, metrics=batch,
                          synchronous=True):
            return False
        for _ in batch:  # only now: a failed send keeps every point
            self._buffer.popleft()
        return True

    # -- logging ---------------------------------------------------------------------------

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log numbers at `step` (0 when None); `None` values are skipped."""
        active = self._current()
        if active is None:
            return
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        points = [Metric(clean_key(k), _metric_value(k, v), stamp, int(step or 0))
                  for k, v in metrics.items() if v is not None]
        room = self._buffer.maxlen - len(self._buffer)
        self._dropped += max(0, len(points) - room)
        self._buffer.extend((active.run_id, point) for point in points)
        self._flush()

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log a (nested) config once: dotted keys, string values cut to MLflow's limit."""
        active = self._current()
        if active is None:
            return
        from mlflow.entities import Param

        flat = flatten_params(params)
        changed = sorted(k for k, v in flat.items() if active.old_params.get(k, v) != v)
        if changed:  # MLflow refuses to change a logged param, e.g. when a run is resumed
            log.warning("MLflow keeps the first value of params logged again with another "
                        "value: %s", ", ".join(changed))
        items = [Param(k, v) for k, v in flat.items() if k not in active.old_params]
        for chunk in _chunks(items, PARAMS_PER_BATCH):
            if self._send("log params", self._client.log_batch, active.run_id, params=chunk,
                          synchronous=True):
                active.old_params.update({p.key: p.value for p in chunk})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set tags on the active run."""
        active = self._current()
        if active is None:
            return
        from mlflow.entities import RunTag

        items = [RunTag(k, v) for k, v in _clean_tags(tags).items()]
        for chunk in _chunks(items, PARAMS_PER_BATCH):
            self._send("set tags", self._client.log_batch, active.run_id, tags=chunk,
                       synchronous=True)

    def set_description(self, text: str, run_id: str | None = None) -> None:
        """The run's description (the UI's "Description" box and the runs table's column).

        It goes on the active run, or on `run_id` (say `last_run_id`), which may be closed.
        """
        if not self.enabled:
            return
        if run_id is None:
            run_id = self._current().run_id
        if self._client is None:  # no run was ever opened by this tracker
            return
        self._send("set the description", self._client.set_tag, run_id, DESCRIPTION_TAG,
                   str(text)[:PARAM_VALUE_LIMIT])

    def log_dataset(self, name: str, digest: str, source: str | Path, context: str) -> None:
        """Record a data set as an input of the active run: the runs table's Dataset column.

        `digest` is the data's fingerprint (`medidiff.data.datasets.fingerprint`), `source` the
        data folder (recorded as an absolute path; never anything read from the scans, so no
        patient identifiers) and `context` what the run does with it: "training",
        "calibration", "scoring".
        """
        active = self._current()
        if active is None:
            return
        from mlflow.entities import Dataset, DatasetInput, InputTag

        where = str(source)
        if "://" not in where:
            where = str(Path(where).absolute())
        dataset = Dataset(name=str(name)[:DATASET_NAME_LIMIT], digest=str(digest)[:DIGEST_LIMIT],
                          source_type="local", source=json.dumps({"uri": where}))
        item = DatasetInput(dataset, tags=[InputTag(DATASET_CONTEXT_TAG, str(context))])
        self._send("log a dataset", self._client.log_inputs, active.run_id, datasets=[item])

    def log_image(self, image: Any, key: str, step: int | None = None) -> None:
        """Log a 2D image (float in [0, 1], uint8, or HxWx3) in the UI's image grid under `key`."""
        active = self._current()
        if active is None:
            return
        from PIL import Image

        picture = Image.fromarray(image_uint8(image))
        safe_key = _IMAGE_KEY_FORBIDDEN.sub("_", key) or "image"
        self._send("log an image", self._client.log_image, active.run_id, picture, key=safe_key,
                   step=int(step or 0), synchronous=True)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a local file (or folder) into the run's artifacts."""
        active = self._current()
        if active is None:
            return
        if not Path(path).exists():
            raise FileNotFoundError(f"cannot log artifact {path}: it does not exist")
        self._send("log an artifact", self._client.log_artifact, active.run_id, str(path),
                   artifact_path)

    def log_artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None:
        """Copy the files of a local folder into the run's artifacts."""
        active = self._current()
        if active is None:
            return
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"cannot log artifacts of {folder}: not a folder")
        self._send("log artifacts", self._client.log_artifacts, active.run_id, str(folder),
                   artifact_path)

    def log_dict(self, data: Mapping[str, Any], filename: str) -> None:
        """Write a dict as a JSON (or YAML, by suffix) artifact."""
        active = self._current()
        if active is not None:
            self._send("log a dict", self._client.log_dict, active.run_id, dict(data), filename)

    def log_text(self, text: str, filename: str) -> None:
        """Write a text artifact."""
        active = self._current()
        if active is not None:
            self._send("log a text", self._client.log_text, active.run_id, text, filename)

    def log_model_folder(self, model_dir: str | Path, name: str = "model",
                         tags: Mapping[str, Any] | None = None) -> str | None:
        """Make a model folder findable in the UI, without pickling any code.

        Its top-level files (safetensors weights, model.yaml, model card; not `checkpoints/`
        nor hidden temporary files) become run artifacts under `name/`, and an MLflow 3
        LoggedModel linked to the run holds the same files, so the model is listed on the
        experiment's Logged Models page. Returns the LoggedModel id, or None where that API is
        missing or failed.
        """
        active = self._current()
        if active is None:
            return None
        files = model_files(model_dir)
        for path in files:
            if not self._send("log the model", self._client.log_artifact, active.run_id,
                              str(path), name):
                return None
        try:
            return self._logged_model(active, files, name, dict(tags or {}))
        except Exception as exc:  # the run artifacts above already hold the model
            log.warning("the model is in the run's artifacts but not on MLflow's Logged Models "
                        "page: %s", _first_line(exc))
            return None

    def link_model(self, model_id: str | None, step: int = 0) -> None:
        """List a LoggedModel (logged from another run, say a nested train run) among the active
        run's Logged models too."""
        active = self._current()
        if active is None or not model_id:
            return
        from mlflow.entities import LoggedModelOutput

        self._send("link the model", self._client.log_outputs, active.run_id,
                   [LoggedModelOutput(model_id, step=step)])

    def _logged_model(self, active: _Run, files: list[Path], name: str, tags: dict) -> str | None:
        client = self._client
        if not hasattr(client, "create_logged_model"):  # MLflow before 3.0
            return None
        from mlflow.entities import LoggedModelOutput

        model = client.create_logged_model(active.experiment_id, name=name,
                                           source_run_id=active.run_id,
                                           tags=_clean_tags({**default_tags(), **tags}),
                                           model_type="medidiff")
        try:
            for path in files:
                client.log_model_artifact(model.model_id, str(path))
        except Exception:
            client.finalize_logged_model(model.model_id, "FAILED")
            raise
        client.finalize_logged_model(model.model_id, "READY")
        client.log_outputs(active.run_id, [LoggedModelOutput(model.model_id, step=0)])
        return model.model_id


def model_files(model_dir: str | Path) -> list[Path]:
    """The files a model folder hands over: top level, not hidden (no checkpoints, no temp files)."""
    folder = Path(model_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot log model folder {folder}: not a folder")
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _status_for(exc: BaseException) -> str:
    if isinstance(exc, SystemExit) and exc.code in (0, None):
        return "FINISHED"
    return "FAILED" if isinstance(exc, Exception) else "KILLED"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__

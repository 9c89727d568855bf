"""The tracking URI: which store to track to, and whether it can take runs right now.

Checks are quick probes (an HTTP health request, a TCP connection, a folder's permissions), so an
unreachable store raises `TrackingError` before any long work, not in the middle of it.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.parse import urlsplit, urlunsplit
from urllib.request import urlopen

from medidiff.errors import TrackingError

# the schemes MLflow's tracking stores take (a database URI may name its driver: mysql+pymysql)
TRACKING_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "databricks",
                    "databricks-uc", "uc")
_DATABASE_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}


# ---------------------------------------------------------------------------------------------
# Tracking URI


def tracking_uri(explicit: str | None = None) -> str:
    """The URI to track to: `explicit`, else `MLFLOW_TRACKING_URI`, else sqlite in the cwd.

    A file store (a `file:` URI or a plain folder) is refused: MLflow 3.13+ no longer writes one
    without an opt-in, and medidiff never starts one.
    """
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI") or ""
    if not uri:
        return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"
    scheme = urlsplit(uri).scheme
    if scheme == "file" or len(scheme) <= 1:  # no scheme, or a Windows drive letter
        raise TrackingError(
            f"tracking URI {uri!r} is a folder (MLflow's file store), which medidiff does not "
            "use; give a database such as sqlite:///ABS/PATH/mlflow.db or a server "
            "http://HOST:PORT (`mlflow migrate-filestore` converts an existing mlruns folder)"
        )
    if scheme.split("+", 1)[0] not in TRACKING_SCHEMES:  # a typo such as htp://
        raise TrackingError(
            f"tracking URI {redact(uri)!r} has an unknown scheme {scheme!r}; give a server "
            "http://HOST:PORT, a database such as sqlite:///ABS/PATH/mlflow.db or "
            "postgresql://USER@HOST/DB, or pass --no-tracking"
        )
    return uri


def redact(uri: str) -> str:
    """The URI without a password, for messages."""
    parts = urlsplit(uri)
    if not parts.password:
        return uri
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def check_reachable(uri: str, timeout: float = 5) -> None:
    """Raise `TrackingError` at once when `uri` cannot take runs (server down, folder read-only)."""
    scheme = urlsplit(uri).scheme
    if scheme in ("http", "https"):
        _check_http(uri, timeout)
    elif scheme == "sqlite":
        _check_sqlite(uri)
    elif scheme.split("+", 1)[0] in _DATABASE_PORTS:
        _check_database(uri, timeout)


def _check_http(uri: str, timeout: float) -> None:
    base = uri.rstrip("/")
    try:
        _http_get(base + "/health", timeout)
        return
    except HTTPError as exc:
        if exc.code != 404:  # it answered (401/403 behind auth still means it is up)
            return
    except (URLError, OSError, ValueError) as exc:
        raise TrackingError(
            f"cannot reach the MLflow tracking server at {redact(uri)}: {_reason(exc)}; "
            "start it or pass --no-tracking"
        ) from None
    # No /health (an older server or a proxy under a path prefix): ask the REST API itself.
    try:
        _http_get(base + "/api/2.0/mlflow/experiments/search?max_results=1", timeout)
    except HTTPError as exc:
        if b"error_code" not in exc.read():
            raise TrackingError(
                f"{redact(uri)} answers but is not an MLflow tracking server (HTTP {exc.code}); "
                "check the URI or pass --no-tracking"
            ) from None
    except (URLError, OSError, ValueError) as exc:
        raise TrackingError(
            f"cannot reach the MLflow tracking server at {redact(uri)}: {_reason(exc)}; "
            "start it or pass --no-tracking"
        ) from None


def _check_database(uri: str, timeout: float) -> None:
    """A database server must at least accept a connection (the driver checks the rest)."""
    parts = urlsplit(uri)
    if not parts.hostname:
        return  # a local socket
    try:
        port = parts.port or _DATABASE_PORTS[parts.scheme.split("+", 1)[0]]
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except (OSError, ValueError) as exc:
        raise TrackingError(
            f"cannot reach the MLflow tracking database at {redact(uri)}: {_reason(exc)}; "
            "start it or pass --no-tracking"
        ) from None


def _http_get(url: str, timeout: float) -> None:
    with urlopen(url, timeout=timeout) as response:
        response.read(1024)


def _reason(exc: Exception) -> str:
    reason = getattr(exc, "reason", None) or exc
    return str(reason) or type(exc).__name__


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite URI (None for an in-memory database)."""
    path = uri[len("sqlite:///"):].split("?", 1)[0] if uri.startswith("sqlite:///") else ""
    return None if path in ("", ":memory:") else Path(path)


def _check_sqlite(uri: str) -> None:
    db = _sqlite_path(uri)
    if db is None:
        return
    folder = db.resolve().parent
    if not folder.is_dir():
        raise TrackingError(f"cannot create the MLflow database {db}: "
                            f"folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (db.exists() and not os.access(db, os.W_OK)):
        raise TrackingError(f"cannot write the MLflow database {db}: permission denied")


def _artifact_location(uri: str, experiment: str) -> str | None:
    """For sqlite, keep artifacts beside the database, not in whatever the cwd happens to be."""
    db = _sqlite_path(uri) if uri.startswith("sqlite:") else None
    if db is None:
        return None  # a server decides where its artifacts go
    slug = re.sub(r"[^\w.-]+", "_", experiment).strip("_") or "experiment"
    return (db.resolve().parent / "mlartifacts" / slug).as_uri()


def _http_client_defaults() -> None:
    # MLflow retries a failed request 7 times with backoff (about 4 minutes); a training loop
    # must not stall that long when the server goes away. It also writes each run's URL to
    # stdout, which would mix into a command's output. A user's own settings win.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

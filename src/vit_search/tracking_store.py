"""Whether an MLflow store can be used, asked before MLflow touches it: MLflow itself retries a
database or server that does not answer for minutes, and makes a SQLite file that is not there.
Nothing here imports MLflow at module level, or the model: the weights readers ask it too."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import UserError
from .files import (
    database_problem, error_chain, in_memory_sqlite, sqlite_busy, sqlite_problem, sqlite_timeout, symlink_loop,
)
from .redaction import redact, redact_in

# MLflow retries an unreachable server for minutes per request by default (7 retries, backoff
# factor 2, 120 s timeouts); a study should hear of an outage within a minute. Users may override,
# with values of the type MLflow reads (one it cannot read stops it with a traceback mid-request).
HTTP_RETRY_DEFAULTS: dict[str, tuple[str, type]] = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": ("3", int), "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": ("1", int),
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": ("0.5", float), "MLFLOW_HTTP_REQUEST_TIMEOUT": ("10", int),
}


class TrackingError(UserError):
    """An MLflow store that cannot be used: one line naming it (exit 2)."""


def bound_http_retries() -> None:
    """Bound MLflow's retries of a tracking server that does not answer (unless the environment sets
    them); a value set that MLflow cannot read is one line (TrackingError, exit 2)."""
    for key, (default, kind) in HTTP_RETRY_DEFAULTS.items():
        value = os.environ.setdefault(key, default)
        try:
            readable = kind(value) >= 0
        except ValueError:
            readable = False
        if not readable:
            what = "a whole number" if kind is int else "a number"
            raise TrackingError(f"{key}={value!r}: MLflow reads {what}, 0 or more, here; set it to one (such as "
                                f"{default}), or unset it for vit-search's default {default}")


def server_problem(uri: str | None = None, timeout: float = 5.0) -> str | None:
    """Why the MLflow tracking server at ``uri`` (default: the current one) does not answer its
    health check, or the database of a database store (``postgresql://``, ``mysql://``) does not
    answer or lacks its driver; None when it answers, or the store is a file."""
    import urllib.error
    import urllib.parse
    import urllib.request

    if uri is None:
        import mlflow

        uri = mlflow.get_tracking_uri()
    if uri.split(":", 1)[0].split("+", 1)[0] in ("postgresql", "mysql", "mssql"):  # MLflow's database stores
        problem = database_problem(uri, timeout)
        return problem and f"MLflow store {redact(uri)} {problem}"
    if not uri.startswith(("http://", "https://")):
        return None
    # urllib takes user:password@ for part of the host name: ask without it, the credentials in a header.
    try:
        parts = urllib.parse.urlsplit(uri)
        user, _, host = parts.netloc.rpartition("@")
        request = urllib.request.Request(urllib.parse.urlunsplit(parts._replace(netloc=host)).rstrip("/") + "/health")
        parts.port  # noqa: B018 -- read for its check: a port that is no number raises here, not in the request
    except ValueError as err:  # '[' left open, a port that is no number
        return f"MLflow tracking server URL {redact(uri)} is not a valid URL ({redact_in(str(err), uri)[:120]})"
    if user:
        import base64

        credentials = urllib.parse.unquote(user).encode()
        request.add_header("Authorization", f"Basic {base64.b64encode(credentials).decode()}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            if response.status == 200:
                return None
            reason = f"HTTP {response.status}"
    except urllib.error.HTTPError as err:
        reason = f"HTTP {err.code}"
    except (OSError, ValueError) as err:
        reason = redact_in(str(getattr(err, "reason", err)), uri)
    return f"MLflow tracking server {redact(uri)} does not answer ({reason[:120]})"


def store_fault(err: BaseException, uri: str | None = None) -> tuple[str, str] | None:
    """What ``err`` says of the MLflow store at ``uri`` (default: the current one) that no trial could get
    past, and what to do, even where the store answers again by now: its SQLite file held locked by another
    process past its wait, or its tracking server not reached (refused, timed out; MLflow's retries spent).
    None for any other error."""
    if uri is None:
        import mlflow

        uri = mlflow.get_tracking_uri()
    chain = list(error_chain(err))
    if uri.startswith("sqlite:") and sqlite_busy(err):
        from mlflow.exceptions import MlflowException

        if not any(isinstance(error, MlflowException) for error in chain):  # another SQLite file's (Optuna's storage)
            return None
        return (f"MLflow store {redact(uri)}: the file is locked by another process (waited {sqlite_timeout(uri):g} s)",
                "stop that process (or wait for it)")
    if not uri.startswith(("http://", "https://")):
        return None
    import requests

    for error in chain:  # MLflow raises its own error while handling requests' (the cause is its context)
        if isinstance(error, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
            return (f"MLflow tracking server {redact(uri)} did not answer for a while ({type(error).__name__}; it may "
                    f"answer again now)", "check that it stays up")
    return None


def source_store_problem(uri: str) -> str | None:
    """Why the MLflow store at ``uri`` cannot hold a run to read weights from, said as a sentence about it
    without the fix (None: it may): an in-memory database, a SQLite file that is not there (MLflow would
    make it), a loop of links, a folder, a file that is no database, a server that does not answer.
    Quick (one connection at most, within seconds), and writes nothing."""
    if in_memory_sqlite(uri):
        return f"MLflow store {redact(uri)} is an in-memory SQLite database, which holds no runs"
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        if symlink_loop(path):
            return f"MLflow store {path}: its symbolic links form a loop"
        if path.is_dir():
            return f"MLflow store {path} is a folder, not a store file"
        if not path.exists():
            return f"no such MLflow store: {path} does not exist, so no run is in it"
        if path.stat().st_size == 0:
            return f"MLflow store {path} is an empty file, so no run is in it"
        problem = sqlite_problem(path)
        return problem and f"MLflow store {path} is {problem}"
    return server_problem(uri)

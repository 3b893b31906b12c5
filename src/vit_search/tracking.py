"""MLflow logging of one training run: the spec as params, metrics per epoch, weights as artifacts.

The tracking URI is MLflow's own choice (``MLFLOW_TRACKING_URI``, else its local default) unless
the spec's ``tracking.uri`` names one and the environment does not. Only the main process logs.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import logging
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

from .errors import FileLocked, RunFailed
from .files import SqliteLocked, disk_full, error_chain, in_memory_sqlite, sqlite_problem, sqlite_timeout, symlink_loop
from .redaction import redact, redact_in, scrub
from .schema import Spec
from .sqlite_wal import use_wal
from .stopping import Terminated, signals_held
from .tracking_store import (  # noqa: F401  (the checks are this module's too)
    HTTP_RETRY_DEFAULTS, TrackingError, bound_http_retries, server_problem, source_store_problem,
)

MODEL_ARTIFACTS = "model"  # the folder of a run's weights and the spec that builds them
STATE_DICT_FILE, SPEC_FILE = "state_dict.pt", "spec.yaml"
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
RUN_MARK = "run.json"  # in a run of its own's checkpoint folder: which MLflow run trains there, from which process


def configure(spec: Spec) -> str:
    """Point MLflow at the spec's store and experiment; returns the experiment id.

    A store file that is no database is one line (TrackingError, exit 2), before MLflow touches it.
    """
    use_store(spec)
    return use_experiment(spec)


class _RaisedAgain(logging.Filter):
    """Drops MLflow's log of a database error with its traceback: MLflow raises the error again just
    after, and the run or the study reports it in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.exc_info is None


def use_store(spec: Spec) -> None:
    """Point MLflow at the spec's store, refusing one that cannot be used (TrackingError); writes nothing."""
    import mlflow

    database_log = logging.getLogger("mlflow.store.db.utils")
    if not any(isinstance(f, _RaisedAgain) for f in database_log.filters):
        database_log.addFilter(_RaisedAgain())
    uri = os.environ.get("MLFLOW_TRACKING_URI") or spec.tracking.uri
    if uri:  # else MLflow's own default store
        mlflow.set_tracking_uri(uri)
    if uri and redact(uri) != uri:  # MLflow prints each ended run's link, the server's password in it, on stdout
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    check_store(spec)


def use_experiment(spec: Spec) -> str:
    """Make the spec's experiment MLflow's current one (created if new) in the store in use; returns its id."""
    import mlflow

    try:
        experiment = mlflow.set_experiment(spec.tracking.experiment or spec.name)
    except Exception as err:
        full = mlflow_disk_full(err)
        if full:
            raise TrackingDiskFull(full, "free space, then run the command again") from None
        if server_problem():  # it went away since check_store
            check_store(spec)
        if type(err).__module__.startswith("sqlalchemy") or "DatabaseError" in type(err).__name__:
            raise TrackingError(f"MLflow store {redact(mlflow.get_tracking_uri())} cannot be opened: "
                                f"{str(getattr(err, 'orig', err)).splitlines()[0][:160]}; move a damaged file away, "
                                f"or set MLFLOW_TRACKING_URI to another store") from None
        if isinstance(err, mlflow.exceptions.MlflowException):
            raise refused(err) from None
        raise
    if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        # MLflow 3's UI shows the GenAI (traces) view unless the experiment says it trains models.
        mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment.experiment_id


def refused(err: Exception, uri: str | None = None) -> TrackingError:
    """One line for what MLflow refused at the start (a URI scheme it has no store for, its retired
    file store, missing credentials, a deleted experiment): the store, and MLflow's own first
    sentences, which say what to do."""
    import re

    import mlflow

    text = (str(getattr(err, "message", None) or err).strip().splitlines() or [type(err).__name__])[0]
    said = ""
    for sentence in re.split(r"(?<=[.!?])\s+", text):
        if said and len(said) + len(sentence) > 300:
            break
        said = f"{said} {sentence}".strip()
    uri = uri or mlflow.get_tracking_uri()
    return TrackingError(f"MLflow store {redact(uri)}: {redact_in(said, uri)[:400]}")


class TrackingLost(RunFailed):
    """MLflow's tracking server (or database) stopped answering during a run: one line, exit 1. The run is
    left as it is (nothing would reach it, after MLflow's retries); ``--resume``, or a resumed study, goes on
    from there. ``said`` is what went away, without what to do."""

    def __init__(self, said: str, fix: str) -> None:
        super().__init__(f"{said}: nothing more reaches it, so the run stays RUNNING there; {fix}")
        self.said = said


class TrackingDiskFull(RunFailed):
    """MLflow could not write (a metric, a tag, an artifact) because its store's disk, or its artifacts', is
    full: one line, exit 1. ``said`` is what filled up, without what to do (which differs by command)."""

    def __init__(self, said: str, fix: str) -> None:
        super().__init__(f"{said}; {fix}")
        self.said = said


def mlflow_disk_full(err: BaseException) -> str | None:
    """What filled up, when ``err`` is MLflow failing to write for a full disk ("MLflow store URI: no space
    left on its disk", or its artifacts'), or a tracking server that answers but could not store an
    artifact (what its full artifact disk looks like from here); None for any other error, a full disk
    under Optuna's storage included."""
    import mlflow

    if isinstance(err, TrackingDiskFull):
        return err.said
    if not disk_full(err):
        return _artifacts_refused(err)
    modules = list(_modules_raised_in(err))
    if not any(name.startswith("mlflow.") for name, _ in modules):
        return None
    for name, frame in modules:
        if name.startswith("mlflow.store.artifact"):  # a run's artifacts, written where the experiment keeps them
            where = getattr(frame.f_locals.get("self"), "artifact_uri", None)
            return f"MLflow artifacts{f' {redact(where)}' if where else ''}: no space left on their disk"
    return f"MLflow store {redact(mlflow.get_tracking_uri())}: no space left on its disk"


# What requests and urllib3 say of an upload the server refused: its 5xx answers, or a dropped connection.
_REFUSAL = re.compile(r"too many \d{3} error responses|Connection reset by peer|Connection aborted|status code \d{3}")


def _artifacts_refused(err: BaseException) -> str | None:
    """Why a tracking server that proxies artifacts (``mlflow server --artifacts-destination``) did not
    store one, when ``err`` is that upload failing while the server answers; None otherwise. The
    server answers a full or unwritable artifact disk with HTTP 500 or a dropped connection, and
    only its own log says which."""
    import mlflow

    if not any(name == "mlflow.store.artifact.http_artifact_repo" for name, _ in _modules_raised_in(err)):
        return None
    uri = mlflow.get_tracking_uri()
    if server_problem(uri):  # the server is gone: that outage is said as such
        return None
    seen = next((found.group(0) for cause in error_chain(err) if (found := _REFUSAL.search(str(cause)))),
                type(err).__name__)
    return (f"MLflow tracking server {redact(uri)} did not store an artifact ({seen}): its artifact store "
            f"(--artifacts-destination) is full or cannot be written; its log says which")


def _modules_raised_in(err: BaseException) -> Iterator[tuple[str, Any]]:
    """(module name, frame) of each frame that ``err``, and each error it was raised from, went through."""
    for cause in error_chain(err):
        traced = cause.__traceback__
        while traced is not None:
            yield str(traced.tb_frame.f_globals.get("__name__", "")), traced.tb_frame
            traced = traced.tb_next


@contextmanager
def full_disk_in_one_line(fix: str) -> Iterator[None]:
    """MLflow failing to write for a full disk, raised as one line (TrackingDiskFull) that says to ``fix``."""
    try:
        yield
    except RunFailed:  # said in one line already (a full disk, a server gone, a diverged run)
        raise
    except Exception as err:
        full = mlflow_disk_full(err)
        if full is None:
            raise
        raise TrackingDiskFull(full, fix) from None


def run_lifecycle(run_id: str) -> str | None:
    """Run ``run_id``'s stage in the MLflow store in use ("active", "deleted"), None where the store holds no such
    run (anything else it refuses: TrackingError)."""
    run = _stored_run(run_id)
    return None if run is None else run.info.lifecycle_stage


def store_uri(spec: Spec) -> str:
    """The MLflow store ``spec``'s runs go to: ``MLFLOW_TRACKING_URI``, else ``tracking.uri``, else MLflow's own."""
    import mlflow

    return os.environ.get("MLFLOW_TRACKING_URI") or spec.tracking.uri or mlflow.get_tracking_uri()


def store_identity(uri: str) -> str:
    """``uri`` as a checkpoint records the store its run was logged to: a SQLite file or a folder made absolute
    (a relative one means another store from another folder), its password masked."""
    local = _local_store(uri)
    if local is not None:
        uri = f"sqlite:///{local}" if uri.startswith("sqlite:") else str(local)
    return redact(uri)


def _local_store(uri: str) -> Path | None:
    """The file or folder of a ``sqlite:///`` or file store (None: a server or a database)."""
    if uri.startswith("sqlite:///"):
        path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    elif uri.startswith("file:"):
        path = uri.removeprefix("file://") if uri.startswith("file://") else uri.removeprefix("file:")
    elif "://" not in uri:
        path = uri
    else:
        return None
    return Path(path).expanduser().absolute() if path and path != ":memory:" else None


def check_resumable(spec: Spec, run_id: str, logged_to: str | None = None) -> None:
    """Refuse (TrackingError, exit 2) to continue MLflow run ``run_id`` where the store in use does not hold it, or
    holds it deleted; ``logged_to`` is the store its checkpoint recorded (:func:`store_identity`), if any. A
    ``sqlite:///`` file or file store that does not exist is not made: plainly, the run is not there."""
    uri = store_uri(spec)
    local = _local_store(uri)
    if local is not None and not local.exists():
        raise TrackingError(_not_in_store(run_id, uri, logged_to))
    use_store(spec)
    _check_continuable(run_id, uri, logged_to)


def _check_continuable(run_id: str, uri: str, logged_to: str | None = None) -> None:
    """Refuse to continue run ``run_id`` of the store in use, ``uri``, where it is missing or deleted."""
    run = _stored_run(run_id)
    if run is None:
        raise TrackingError(_not_in_store(run_id, uri, logged_to))
    if run.info.lifecycle_stage == "deleted":  # MLflow refuses to start it ("in the deleted state")
        raise TrackingError(f"MLflow run {run_id}, the one to continue, was deleted in the store {redact(uri)}; restore "
                            f"it (mlflow runs restore --run-id {run_id}) and run the same command again, or start "
                            f"afresh (without --resume)")


def _not_in_store(run_id: str, uri: str, logged_to: str | None) -> str:
    """Why run ``run_id`` is not in the store ``uri``, by what its checkpoint says of the store it was logged to."""
    said = f"MLflow run {run_id}, the one to continue, is not in the store {redact(uri)}"
    if logged_to == store_identity(uri):  # the same store: another one would not have it either
        return (f"{said}, the one it was logged to (MLFLOW_TRACKING_URI or tracking.uri names it still): it was "
                f"removed from it (deleted, then `mlflow gc`); start afresh (without --resume)")
    if logged_to:
        return (f"{said}; it was logged to {logged_to}: point MLFLOW_TRACKING_URI (or tracking.uri) at that store, or "
                f"start afresh (without --resume)")
    return (f"{said}: it was logged to another store, or removed from this one (deleted, then `mlflow gc`); point "
            f"MLFLOW_TRACKING_URI (or tracking.uri) at the store it was logged to, or start afresh (without --resume)")


def _stored_run(run_id: str) -> Any:
    """Run ``run_id`` from the MLflow store in use, None where it holds none (anything else: TrackingError)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.MlflowClient().get_run(run_id)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise refused(err) from None
        return None


def finished_metrics(spec: Spec, run_id: str) -> dict[str, float] | None:
    """Run ``run_id``'s metrics where it ended FINISHED after its test evaluation, so that resuming it has
    nothing left to do; None where it did not, or is not in the store (resuming it says so)."""
    use_store(spec)
    run = _stored_run(run_id)
    # The test metrics are logged after the last epoch, FINISHED once the model is too: a run killed between
    # its last checkpoint and either is resumed to do them.
    if run is None or run.info.status != "FINISHED" or "test_accuracy" not in run.data.metrics:
        return None
    return dict(run.data.metrics)


def mark_run(folder: Path, run_id: str) -> None:
    """Note in a run of its own's checkpoint ``folder`` that run ``run_id`` (started) trains there, from
    this process; first end KILLED the run noted there before, if it is still RUNNING and its process, on
    this host, is gone.

    A process killed outright (SIGKILL, the OOM killer) cannot end its run: MLflow shows it RUNNING for
    ever. The next ``train`` in its folder can tell it was abandoned; one on another host cannot, and
    leaves it. Best effort: a mark that cannot be read or written changes nothing else.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    mark = folder / RUN_MARK
    try:
        noted = json.loads(mark.read_text())
        before, host, pid = str(noted["run_id"]), str(noted["host"]), int(noted["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        before = host = pid = None
    if before and before != run_id and host == socket.gethostname() and pid and not _alive(pid):
        try:
            client = mlflow.MlflowClient()
            if client.get_run(before).info.status == "RUNNING":
                client.set_tag(before, "error", f"its process ({pid}) ended without ending the run (killed, or its tracking "
                                                    f"server went away)")
                client.set_terminated(before, "KILLED")
                print(f"MLflow run {before}, left RUNNING in {folder} by a process that ended without ending it, is now KILLED",
                      file=sys.stderr, flush=True)
        except MlflowException:  # not in this store (another tracking URI then): not ours to end
            pass
    written = folder / f".{RUN_MARK}.{os.getpid()}"  # whole or not at all: renamed into place
    try:
        folder.mkdir(parents=True, exist_ok=True)
        written.write_text(json.dumps({"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid()}))
        written.replace(mark)
    except OSError:  # a full disk says so at the first checkpoint
        written.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (one of another user's counts as alive)."""
    try:
        os.kill(pid, 0)  # signal 0: asks only whether it exists (PermissionError: it does, another user's)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


@contextmanager
def _new_store_removed_on_failure(uri: str) -> Iterator[None]:
    """A SQLite store file that this block creates is removed again if the block fails: half its tables made
    (a write error, a full disk), it could never be opened again ("index ... already exists")."""
    path = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
    new = path is not None and not path.exists()
    try:
        yield
    except BaseException:
        if new:
            for made in (path, *(path.with_name(path.name + end) for end in ("-wal", "-shm", "-journal"))):
                made.unlink(missing_ok=True)
        raise


def check_store(spec: Spec) -> None:
    """Refuse an MLflow store file that is no usable database, or a server that does not answer,
    before MLflow (or a study) writes anything."""
    import mlflow

    # What changes os.environ changes it here, before a process's trials run in threads: a change
    # while another thread copies it (every Accelerator does) raises there.
    bound_http_retries()
    _still_environment()
    uri = store_uri(spec)
    if in_memory_sqlite(uri):  # MLflow's tables would be made in one connection and missing in the next
        raise TrackingError(f"MLflow store {redact(uri)}: an in-memory SQLite database keeps nothing between MLflow's "
                            f"connections; name a file, e.g. sqlite:///mlflow.db (MLFLOW_TRACKING_URI or tracking.uri)")
    # Asked once, here: MLflow itself retries a database that does not answer for minutes.
    problem = server_problem(uri)
    if problem:
        fix = "pip install the package that provides it" if "not installed" in problem else "start it"
        raise TrackingError(f"{problem}; {fix} (or point MLFLOW_TRACKING_URI at a store that answers), then run the "
                            f"command again")
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///").split("?", 1)[0])
        if symlink_loop(path):  # else MLflow retries opening it for minutes
            raise TrackingError(f"{path}: its symbolic links form a loop, not MLflow's store file; point the link at a "
                                f"file, or set MLFLOW_TRACKING_URI to another store")
        if path.is_dir():
            raise TrackingError(f"{path}: a folder, not MLflow's store file; name a file in it (e.g. sqlite:///"
                                f"{path / 'mlflow.db'}), or set MLFLOW_TRACKING_URI to another store")
        in_the_way = next((folder for folder in path.parents if folder.is_file()), None)
        if in_the_way is not None:
            raise TrackingError(f"{path}: its folder cannot be made ({in_the_way} is a file); set MLFLOW_TRACKING_URI "
                                f"to a store in a folder that can be written")
        try:
            problem = sqlite_problem(path, sqlite_timeout(uri), raise_locked=True)
        except SqliteLocked as err:  # whole, and in use: moving it away would harm whoever holds it
            raise FileLocked(f"MLflow store {redact(uri)}", err.waited) from None
        if problem:
            raise TrackingError(f"{path}: {problem}, not MLflow's store; move it away, or set MLFLOW_TRACKING_URI to "
                                f"another store")
        # Imported before the lock below, not under it: about 290 modules (SQLAlchemy, alembic, the
        # store's own) that K workers starting at once would otherwise import one after another.
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    try:  # where MLflow refuses a store it has none for: an unknown scheme, its retired file store (a plain path)
        with _made_by_one(uri), _new_store_removed_on_failure(uri):
            if uri.startswith("sqlite:///"):
                use_wal(path, sqlite_timeout(uri))
            mlflow.MlflowClient(tracking_uri=uri)  # makes a new SQLite store's tables
    except mlflow.exceptions.MlflowException as err:
        raise refused(err, uri) from None
    except Exception as err:  # a new sqlite store's tables could not be made
        if disk_full(err):
            raise TrackingError(f"MLflow store {redact(uri)}: no space left on its disk; free space, or set "
                                f"MLFLOW_TRACKING_URI to another store") from None
        if type(err).__module__.startswith("sqlalchemy"):
            raise TrackingError(f"MLflow store {redact(uri)} cannot be opened: "
                                f"{str(getattr(err, 'orig', err)).splitlines()[0][:160]}; set MLFLOW_TRACKING_URI to "
                                f"another store") from None
        raise


# MLflow's telemetry puts its session id into os.environ at import, and takes it out again from a
# background thread when it gives up on telemetry (offline, its config fetch fails), about a second
# after the run's first MLflow call. A removal while another thread copies os.environ raises
# KeyError in that thread: a trial's Accelerator failed so.
_TELEMETRY_SESSION = "_MLFLOW_TELEMETRY_SESSION_ID"


def _still_environment() -> None:
    """Take MLflow's telemetry session id out of os.environ now, before the process's trials run in
    threads, so that MLflow's later removal changes nothing under them (child processes get their own)."""
    os.environ.pop(_TELEMETRY_SESSION, None)


@contextmanager
def _made_by_one(uri: str) -> Iterator[None]:
    """For a ``sqlite:///`` store: hold a lock on its file's folder (made first, so that every worker
    locks the same one), so that of the workers that start at once on a new store one makes its
    tables and the others wait, rather than all run MLflow's migrations at once (and fail on each
    other's tables)."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    folder = Path(uri.removeprefix("sqlite:///")).absolute().parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = os.open(folder, os.O_RDONLY)
    except OSError:  # a folder this user cannot open: MLflow says what it makes of that
        yield
        return
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:  # a file system without such locks (some NFS mounts): as MLflow alone would do
            pass
        yield
    finally:
        os.close(handle)  # lets go of the lock


def git_commit(path: str | os.PathLike[str] = ".") -> str | None:
    """The commit checked out at ``path`` (None outside a git work tree), asked of git once per
    folder and process: every trial of a study would otherwise start a git process."""
    return _git_commit(str(Path(path).resolve()))


@functools.lru_cache(maxsize=64)
def _git_commit(path: str) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


_EXIT_HOOK: list[bool] = []  # registered once per process


def _left_runs_killed_at_exit() -> None:
    """MLflow ends a run still active when the process exits FINISHED (its own exit hook): a run that a stop cut
    short before it was ended would read as whole. Registered after MLflow's, this hook runs first (the last
    registered runs first) and ends such a run KILLED."""
    if _EXIT_HOOK:
        return
    _EXIT_HOOK.append(True)

    def end_left_run_killed() -> None:
        import mlflow

        with contextlib.suppress(Exception):
            while mlflow.active_run() is not None:
                mlflow.end_run(status="KILLED")

    atexit.register(end_left_run_killed)


class Tracker:
    """One MLflow run's bookkeeping; every method is a no-op when tracking is off."""

    def __init__(self, spec: Spec, enabled: bool = True):
        self.spec = spec
        self.enabled = enabled and spec.tracking.enabled
        self.run_id: str | None = None
        self.store: str | None = None  # the store the run is logged to (store_identity), once it has started

    @contextmanager
    def run(
        self,
        run_id: str | None = None,
        parent_run_id: str | None = None,
        run_name: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> Iterator["Tracker"]:
        """Start (or resume, given ``run_id``) the run; a failure ends it FAILED with the error tagged."""
        if not self.enabled:
            yield self
            return
        import mlflow

        use_store(self.spec)
        self.store = store_identity(mlflow.get_tracking_uri())
        if run_id is not None:  # before the experiment is made in the wrong store
            _check_continuable(run_id, mlflow.get_tracking_uri())
        # A full disk leaves the run RUNNING (nothing more reaches the store); --resume continues it.
        with full_disk_in_one_line("free space, then run the same command with --resume"):
            use_experiment(self.spec)
            active = mlflow.start_run(
                run_id=run_id, run_name=None if run_id else (run_name or self.spec.name),
                parent_run_id=parent_run_id, nested=parent_run_id is not None,
                tags={**self.spec.tracking.tags, **(tags or {})},
            )
            self.run_id = active.info.run_id
            if run_id is not None and "error" in active.data.tags:
                # Resumed: why it stopped before (interrupted, a lost peer) no longer holds; a new stop tags it anew.
                mlflow.MlflowClient().delete_tag(run_id, "error")
            _left_runs_killed_at_exit()
            try:
                yield self
            except KeyboardInterrupt as err:
                # Whole, or a second stop (a launcher's SIGTERM once another process died) left the run active, for
                # MLflow's exit hook to end FINISHED; a held signal is delivered as the block ends.
                with signals_held():
                    if server_problem() is None:  # else MLflow's retries would hold up the stop; a resume sets it right
                        # As a study's trial says it (search/study.py), so that either kind of run reads the same.
                        how = "SIGTERM" if isinstance(err, Terminated) else "Ctrl-C"
                        self._end_quietly("KILLED", f"interrupted ({how})")
                raise
            except BaseException as err:
                with signals_held():
                    lost = server_problem()
                    if lost is None:
                        from optuna import TrialPruned

                        if isinstance(err, TrialPruned):  # no error: the study tags it with its pruned_reason
                            self._end_quietly("KILLED", None)
                        else:
                            self._end_quietly("FAILED", f"{type(err).__name__}: {err}"[:5000])
                if lost is None:
                    raise
                # Nothing more reaches the store: the run stays RUNNING there, and --resume continues it.
                raise TrackingLost(lost, "start the server, then run the same command with --resume") from err
            else:
                mlflow.end_run(status="FINISHED")

    def _end_quietly(self, status: str, error: str | None) -> None:
        """End the run on an error (tagged ``error`` unless None) without hiding that error under MLflow's own."""
        import mlflow

        try:
            if error is not None:
                mlflow.set_tag("error", scrub(error))  # a message repeating a URL: no password in the tag
        except Exception:
            pass  # the error being raised says more; a study reconciles the run's state later
        try:
            mlflow.end_run(status=status)  # leaves this process's run stack first, then tells the store
        except Exception:
            pass

    def log_start(self, parameters: int, flops: int, device: str, extra_tags: Mapping[str, str] | None = None,
                  trainable: int | None = None) -> None:
        """Log every resolved spec value as a param, model size (and ``trainable_parameters``, what
        ``train.freeze`` leaves), FLOPs, and provenance tags."""
        if not self.enabled:
            return
        import mlflow
        import torch
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.tracking import MlflowClient

        from . import __version__

        params = [Param(k, _param_value(v)) for k, v in self.spec.flat().items()
                  if not k.startswith("tracking.tags")]  # they are the run's tags
        sizes = {"parameters": parameters, "flops": flops}
        if trainable is not None:
            sizes["trainable_parameters"] = trainable
        at = int(time.time() * 1000)
        metrics = [Metric(key, float(value), at, 0) for key, value in sizes.items()]
        tags = {"vit_search.version": __version__, "torch.version": torch.__version__, "device": device}
        commit = git_commit(Path(self.spec.source).parent if self.spec.source else ".")
        if commit:
            tags["git.commit"] = commit
        run_tags = [RunTag(key, str(value)) for key, value in {**tags, **(extra_tags or {})}.items()]
        # One write for all of it where MLflow's limits allow (100 params and 100 tags a call): each
        # call is a transaction on the store, which every trial of a study shares.
        client = MlflowClient()
        for start in range(0, max(len(params), len(run_tags), 1), 100):
            client.log_batch(self.run_id, metrics=metrics if start == 0 else [], params=params[start:start + 100],
                             tags=run_tags[start:start + 100])
        mlflow.log_text(self.spec.to_yaml(), "spec.yaml")

    def log_resumed(self) -> str | None:
        """Record, in a run continued from a checkpoint, the spec values that differ from its params (MLflow keeps
        a param's first value; ``--resume`` allows only values that change neither the model, the data nor the
        optimisation): the tag ``resumed_with`` (``train.epochs: 3 -> 5``) and ``spec.yaml`` logged again with the
        values trained now. Returns the tag's text (None: nothing differs)."""
        if not self.enabled:
            return None
        import mlflow
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        logged = client.get_run(self.run_id).data.params
        now = {key: _param_value(value) for key, value in self.spec.flat().items()
               if not key.startswith("tracking.tags")}
        changes = [f"{key}: {logged[key]} -> {value}" for key, value in now.items()
                   if key in logged and logged[key] != value]
        if not changes:
            return None
        said = scrub("; ".join(changes))  # a URL's password never goes to the tag or the screen
        client.set_tag(self.run_id, "resumed_with", said[:5000])
        mlflow.log_text(self.spec.to_yaml(), "spec.yaml")
        return said

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Store metrics in the run, at ``step`` (the epoch) if given."""
        self.log_epochs([(metrics, step or 0, int(time.time() * 1000))])

    def log_epochs(self, epochs: list[tuple[Mapping[str, float], int, int]]) -> None:
        """Store several steps' metrics, each ``(metrics, step, timestamp in ms)``, in one call;
        callable from any thread (the trainer's checkpoint thread stores each epoch's this way, off
        the training path).

        (Not MLflow's asynchronous logging: its queue, once used, holds up the end of every run by up
        to a second, which is most of a small trial on a GPU.)"""
        if not self.enabled:
            return
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        metrics = [Metric(key, float(value), at, step) for values, step, at in epochs for key, value in values.items()]
        client = MlflowClient()
        for start in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics a call
            client.log_batch(self.run_id, metrics[start:start + 1000])

    def log_model(self, state_dict: Mapping[str, Any]) -> None:
        """Log the trained weights and the spec that builds them; :func:`load_model` reads them back."""
        if not (self.enabled and self.spec.tracking.log_model):
            return
        import mlflow
        import torch

        with tempfile.TemporaryDirectory() as tmp:
            torch.save(dict(state_dict), Path(tmp) / STATE_DICT_FILE)
            (Path(tmp) / SPEC_FILE).write_text(self.spec.to_yaml(exclude_search=True))
            mlflow.log_artifacts(tmp, MODEL_ARTIFACTS)


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 3] + "..."


def load_model(run_id: str, tracking_uri: str | None = None):
    """The trained model of an MLflow run, rebuilt from its logged spec and weights (eval mode)."""
    import mlflow
    import torch
    import yaml
    from mlflow.exceptions import MlflowException

    from .model import build_vit
    from .spec import load_spec

    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=MODEL_ARTIFACTS, dst_path=tmp,
                                                        tracking_uri=tracking_uri)
        except MlflowException as err:
            raise TrackingError(_no_model(run_id, tracking_uri, err)) from None
        raw = yaml.safe_load((Path(local) / SPEC_FILE).read_text())
        # The logged model section is complete; the weights it started from are replaced by the run's.
        raw.get("model", {}).pop("init", None)
        spec = load_spec(raw, check_model=False)
        model = build_vit(spec)
        model.load_state_dict(torch.load(Path(local) / STATE_DICT_FILE, map_location="cpu", weights_only=True))
    return model.eval()


def _no_model(run_id: str, tracking_uri: str | None, err: Exception) -> str:
    """Why MLflow run ``run_id`` gives no model to load, in one line: no such run, a study's parent
    run (its trials hold the models), or a run that logged none."""
    import mlflow

    uri = tracking_uri or mlflow.get_tracking_uri()
    try:
        run = mlflow.MlflowClient(tracking_uri).get_run(run_id)
    except Exception:  # the run itself is missing, or the store does not answer: MLflow's words
        # Masked with the URL as given: the redacted one's password is *** already and would mask nothing.
        return f"MLflow run {run_id} cannot be read from the store {redact(uri)} ({redact_in(str(err), uri)[:200]})"
    tags = run.data.tags
    if "optuna.study_name" in tags and "mlflow.parentRunId" not in tags:
        best = tags.get("best_run_id")
        return (f"MLflow run {run_id} is study {tags['optuna.study_name']!r}'s parent run, which holds no model; "
                f"load one of its trials' runs" + (f", such as the best, {best}" if best else ""))
    return (f"MLflow run {run_id} logged no model (tracking.log_model was false, or it ended before its last "
            f"epoch: status {run.info.status})")

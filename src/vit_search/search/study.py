"""An Optuna study over a spec: each trial is the spec with sampled values, trained by ``train()``.

Any number of ``vit-search run`` processes pointed at one storage are workers of one study. Each
takes its next trial under the study's lock (see :mod:`.storage`), so that together they start
exactly ``n_trials``; a trial whose worker died (its heartbeat went stale, or its process is gone
on this host) is failed and retried with the same values.
"""

from __future__ import annotations

import functools
import math
import os
import socket
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.trial import TrialState

from ..redaction import scrub
from ..schema import Spec
from ..spec import load_spec
from ..stopping import Terminated, signals_held
from .distinct import DistinctSampler
from .fixed import SHARED_VALUES, differences, shared_values
from .grid import Grid
from .samplers import PRUNERS, SAMPLERS
from .space import fill, parse_space, sample
from .storage import (
    STORAGE_ENV, StorageError, StorageLost, StudyMismatch, default_storage_url, file_faults_said, open_storage, redact,
    storage_file, study_lock,
)

HEARTBEAT = "vit_search:heartbeat"
WORKER = "vit_search:worker"
RETRIED = "vit_search:retried"
RETRY_OF = "vit_search:retry_of"
INITIALISED = "vit_search:initialised"
PARENT_RUN = "vit_search:mlflow_parent_run_id"
MAX_RETRIES = 2
# User attributes a trial is queued with that say what it is (a supernet finalist's subnet and its
# inherited score): its retry is the same trial, so they go with it.
QUEUED_ATTRS = ("subnets.trial_number", "inherited_val_accuracy")


def make_sampler(spec: Spec) -> optuna.samplers.BaseSampler:
    """The study's sampler: each trial seeded from (spec seed, trial number), its point distinct
    from every other trial's (see :mod:`.distinct`); the grid covers its points exactly as it is."""
    search = spec.search
    dims = parse_space(search.space)

    def make(seed: int) -> optuna.samplers.BaseSampler:
        with warnings.catch_warnings():  # multivariate TPE, GP: "experimental"
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return SAMPLERS[search.sampler](seed, dims, search.n_trials)

    return make(spec.seed) if search.sampler == "grid" else DistinctSampler(make, dims, spec.raw, spec.seed)


def make_pruner(name: str, epochs: int) -> optuna.pruners.BasePruner:
    """A pruner by name, fed one value per epoch."""
    return PRUNERS[name](epochs)


@dataclass
class StudyHandle:
    """A study with its storage, for the bookkeeping Optuna keeps out of the Study API."""

    study: optuna.Study
    storage: optuna.storages.BaseStorage
    url: str
    differs: dict[str, Any] = field(default_factory=dict)  # this worker's shared values the study's differ from

    @property
    def study_id(self) -> int:
        return self.storage.get_study_id_from_name(self.study.study_name)

    def attr(self, key: str) -> Any:
        """A study system attribute (None when unset)."""
        return self.storage.get_study_system_attrs(self.study_id).get(key)

    def set_attr(self, key: str, value: Any) -> None:
        """Set a study system attribute."""
        self.storage.set_study_system_attr(self.study_id, key, value)

    def trial_id(self, number: int) -> int:
        """The storage's id of trial ``number``."""
        return self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)

    def set_trial_attr(self, number: int, key: str, value: Any) -> None:
        """Set a trial system attribute."""
        self.storage.set_trial_system_attr(self.trial_id(number), key, value)


@dataclass
class WorkerReport:
    """What one worker did."""

    study_name: str
    storage: str
    trials_run: list[int] = field(default_factory=list)
    interrupted: bool = False
    stopped: StopWorker | None = None  # why the worker stopped early, its trial queued again
    timed_out: bool = False  # stopped at search.timeout, trials perhaps still queued


class StopWorker(Exception):
    """Raised by a trial when its worker cannot go on (its tracking server went away, its data set
    cannot be read): the trial is failed with this message and queued again, and the worker returns;
    the command then exits ``exit_code`` (2 where the input is at fault)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@functools.cache
def _process_space() -> str:
    """The processes this one can see: the hostname, the machine's boot and the PID namespace. A worker
    in another (a container that shares the host's name, another machine of the same name) may have a
    PID that is free here while it is alive: only its heartbeats tell."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:  # not Linux
        return socket.gethostname()
    return f"{socket.gethostname()}@{boot}.{namespace}"


def _worker_id() -> str:
    return f"{_process_space()}:{os.getpid()}"


def _worker_dead(worker: str | None) -> bool:
    """A worker whose process, one this process can see, is gone (for others only heartbeats tell)."""
    if not worker or ":" not in worker:
        return False
    host, pid = worker.rsplit(":", 1)
    if host != _process_space() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return _zombie(int(pid))


def _zombie(pid: int) -> bool:
    """A process that has exited but whose parent has not reaped it yet (Linux; False elsewhere)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"  # the state follows the parenthesised name


class Heartbeat:
    """Stamps a trial's heartbeat every ``interval`` seconds from a background thread."""

    def __init__(self, handle: StudyHandle, number: int, interval: float):
        self.handle, self.number, self.interval = handle, number, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.handle.set_trial_attr(self.number, HEARTBEAT, time.time())
            except Exception:  # a finished trial or a passing storage error: the next beat retries
                continue

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def counted(trials: list[optuna.trial.FrozenTrial]) -> int:
    """Trials that count towards ``n_trials``: all but failed ones that were retried."""
    return sum(1 for t in trials if not (t.state == TrialState.FAIL and t.system_attrs.get(RETRIED)))


def fail_stale_trials(handle: StudyHandle, grace: float) -> list[optuna.trial.FrozenTrial]:
    """Fail RUNNING trials whose worker is gone and enqueue a retry of each; call under the lock."""
    study, now, failed = handle.study, time.time(), []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        beat = trial.system_attrs.get(HEARTBEAT, trial.datetime_start.timestamp() if trial.datetime_start else now)
        if now - beat < grace and not _worker_dead(trial.system_attrs.get(WORKER)):
            continue
        trial_id = handle.trial_id(trial.number)
        retries = trial.system_attrs.get(RETRY_OF, [])
        retry = len(retries) < MAX_RETRIES
        handle.storage.set_trial_user_attr(trial_id, "error", "worker died (no heartbeat)")
        if retry:  # attributes first: a finished trial takes no more
            handle.storage.set_trial_system_attr(trial_id, RETRIED, True)
        handle.storage.set_trial_state_values(trial_id, TrialState.FAIL)
        failed.append(study.get_trials(deepcopy=False)[trial.number])
        if retry:
            enqueue_retry(handle, trial, [*retries, trial.number])
    return failed


def enqueue_retry(handle: StudyHandle, trial: optuna.trial.FrozenTrial, retry_of: list[int]) -> None:
    """Queue ``trial``'s values again, ``retry_of`` the failed trials before it; call under the lock."""
    study = handle.study
    carried = {key: trial.user_attrs[key] for key in QUEUED_ATTRS if key in trial.user_attrs}
    study.enqueue_trial(trial.params, user_attrs={**carried, "retry_of": trial.number}, skip_if_exists=False)
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))[-1]
    handle.set_trial_attr(waiting.number, RETRY_OF, retry_of)


def queue_again(handle: StudyHandle, number: int) -> bool:
    """Fail a RUNNING trial that was stopped (no fault of its own) and queue its values again, so
    that re-running the command trains it: it uses up neither a trial of ``n_trials`` nor one of its
    retries. False where it had ended already (another worker failed it); call under the lock."""
    frozen = handle.study.get_trials(deepcopy=False)[number]
    if frozen.state != TrialState.RUNNING:
        return False
    handle.set_trial_attr(number, RETRIED, True)
    handle.study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
    enqueue_retry(handle, frozen, frozen.system_attrs.get(RETRY_OF, []))
    return True


def interrupt_own_trials(handle: StudyHandle, reason: str) -> list[optuna.trial.FrozenTrial]:
    """Fail the trials this process is training with ``reason`` and queue each again, from outside
    the threads that train them (stopped at once, they are left mid-step); returns them ended."""
    study, me, ended = handle.study, _worker_id(), []
    # Signals held: a third Ctrl-C in here would leave a trial failed with no retry, or the rest not ended.
    with study_lock(handle.url, study.study_name), signals_held():
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if trial.system_attrs.get(WORKER) != me:
                continue
            handle.storage.set_trial_user_attr(handle.trial_id(trial.number), "error", reason)
            if queue_again(handle, trial.number):
                ended.append(study.get_trials(deepcopy=False)[trial.number])
    return ended


def storage_url_of(spec: Spec, storage_url: str | None = None) -> str:
    """The study's storage: ``--storage``, else ``$VIT_SEARCH_STORAGE``, else ``search.storage``, else
    the default beside MLflow's."""
    return (storage_url or os.environ.get(STORAGE_ENV) or (spec.search.storage if spec.search else None)
            or default_storage_url())


def open_study(spec: Spec, storage_url: str | None = None, create: bool = True) -> StudyHandle:
    """Create or load the spec's study (load_if_exists: re-running a command resumes it).

    ``differs`` holds the spec's shared values that differ from the study's (:mod:`.fixed`).
    Raises StudyMismatch when the stored study has other directions than the spec's, and
    StorageError for a storage URL that cannot be used, or (``create=False``) that holds no such
    study: a mistyped storage then leaves nothing behind. A SQLite file that another process holds
    locked past the wait is FileLocked (exit 1), one that cannot be written StorageError.
    """
    search = spec.search
    assert search is not None
    url = storage_url_of(spec, storage_url)
    directions = [search.direction] if isinstance(search.direction, str) else list(search.direction)
    name = search.study_name or spec.name
    missing = f"no study '{name}' in {redact(url)}; run 'vit-search run' on the spec first, or pass its --storage"
    path = storage_file(url)
    if not create and path is not None and (not path.exists() or path.stat().st_size == 0):
        raise StorageError(missing)  # an empty file holds no study, and must not become a database here
    with file_faults_said(url):
        storage = open_storage(url)
        stored = _stored_directions(storage, name)
    if stored is None and not create:
        raise StorageError(missing)
    if stored is not None and stored != [d.lower() for d in directions]:
        # load_if_exists would silently keep the stored directions, and judge every trial the wrong way.
        raise StudyMismatch(
            f"{spec.locate(('search', 'direction'))}: search.direction {_listed(directions)} does not match study "
            f"'{name}' in {redact(url)}, created with {_listed(stored)}; set a new search.study_name to start "
            f"a new study (or use the old direction and metrics to resume it)")
    sampler = make_sampler(spec)
    # Pruning needs one value per step: Optuna prunes single-objective studies only.
    pruner = make_pruner(search.pruner if len(directions) == 1 else "none", spec.train.epochs)
    with file_faults_said(url):
        study = optuna.create_study(
            study_name=name, storage=storage, sampler=sampler, pruner=pruner, directions=directions,
            load_if_exists=True,
        )
        handle = StudyHandle(study, storage, url)
        values, stored = shared_values(spec), handle.attr(SHARED_VALUES)
        if stored is None and create:  # a new study (or one from before the record): these values are its own
            handle.set_attr(SHARED_VALUES, values)
    handle.differs = differences(values, stored)
    return handle


def _stored_directions(storage: optuna.storages.BaseStorage, name: str) -> list[str] | None:
    """The directions of the stored study ``name`` ("maximize", ...), or None when there is none."""
    try:
        return [d.name.lower() for d in storage.get_study_directions(storage.get_study_id_from_name(name))]
    except KeyError:
        return None


def _listed(directions: list[str]) -> str:
    return directions[0] if len(directions) == 1 else f"[{', '.join(directions)}]"


def objective_values(spec: Spec, metrics: dict[str, float], parameters: int, flops: int) -> list[float]:
    """The study's objectives for one finished trial, in ``search.metric`` order."""
    names = [spec.search.metric] if isinstance(spec.search.metric, str) else spec.search.metric
    known = {**metrics, "parameters": float(parameters), "flops": float(flops)}
    return [known[name] for name in names]


def trial_spec(base: Spec, values: dict[str, Any], tags: dict[str, str] | None = None) -> Spec:
    """The plain spec of a trial: the base with ``values`` set and the search section dropped (``tags``
    added to its ``tracking.tags``)."""
    raw = fill(parse_space(base.search.space), base.raw, values)
    raw.pop("search", None)
    if tags:
        tracking = dict(raw.get("tracking") or {})
        raw["tracking"] = {**tracking, "tags": {**(tracking.get("tags") or {}), **tags}}
    return load_spec(raw, check_model=True)


def sample_spec(base: Spec, trial: optuna.Trial) -> tuple[Spec, dict[str, Any]]:
    """Draw a trial's values and build its spec (a SpecError means an infeasible combination)."""
    raw, drawn = sample(parse_space(base.search.space), base.raw, trial)
    raw.pop("search", None)
    return load_spec(raw, check_model=True), drawn


class _TrialEnds:
    """Counts the trials that ended in this process, so that a packed trial slot with nothing left to
    take wakes when a neighbour's trial ends (the study may be done, or need a retry) rather than at
    its next poll; trials in other processes are still seen at the poll."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self.count = 0

    def ended(self) -> None:
        with self._changed:
            self.count += 1
            self._changed.notify_all()

    def wait(self, seen: int, timeout: float, stop: threading.Event | None) -> None:
        """Until a trial ends after the count was ``seen``, ``stop`` is set, or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self.count == seen and not (stop is not None and stop.is_set()):
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._changed.wait(min(left, 0.1))  # short, to see ``stop`` soon


_TRIAL_ENDS = _TrialEnds()


def worker_loop(
    handle: StudyHandle,
    n_trials: int | None,
    draw: Callable[[optuna.Trial], Any],
    run_trial: Callable[[optuna.Trial, Any], list[float]],
    timeout: float | None = None,
    heartbeat: float = 10.0,
    grace: float = 60.0,
    on_trial_end: Callable[[optuna.trial.FrozenTrial], None] | None = None,
    initialise: Callable[[], None] | None = None,
    stop: threading.Event | None = None,
    report: WorkerReport | None = None,
) -> WorkerReport:
    """Take trials until the study has ``n_trials`` (or ``timeout`` passes); run each with ``run_trial``.

    ``draw(trial)`` suggests the trial's values under the study lock, so that the next worker to
    ask sees them (distinct points, TPE's constant liar); what it returns goes to
    ``run_trial(trial, drawn)``, which returns the objective values, or raises ``optuna.TrialPruned``
    (pruned) or any other exception (failed, recorded with its error; the loop goes on). Either may
    raise those. Ctrl-C or SIGTERM (a KeyboardInterrupt in ``run_trial``; :class:`~vit_search.stopping.Terminated`
    for SIGTERM) fails the trial in progress as "interrupted", queues it again, ends the loop and
    returns, as does :class:`StopWorker` with its message; so does ``stop`` once set, for loops in
    threads, which signals do not reach (``run_trial`` must then raise KeyboardInterrupt too).
    ``report``, when given, is the one filled in and returned: its caller still knows what the loop did
    if the loop's thread is left behind mid-step (a second Ctrl-C).
    """
    study = handle.study
    report = report or WorkerReport(study.study_name, handle.url)
    started = time.monotonic()
    opened = _file_identity(handle.url)
    while True:
        if stop is not None and stop.is_set():
            report.interrupted = True
            return report
        if opened is not None and _file_identity(handle.url) != opened:
            # SQLite would go on writing to the removed file, and the study would vanish with this process.
            raise StorageLost(f"Optuna storage {redact(handle.url)}: its file was removed or replaced while the study "
                              f"ran; the trials recorded in it are gone with it (their MLflow runs stay); run the same "
                              f"command to start the study afresh")
        drawn: Any = None
        draw_error: BaseException | None = None
        ends_seen = _TRIAL_ENDS.count
        with study_lock(handle.url, study.study_name):
            if initialise and not handle.attr(INITIALISED):
                initialise()
                handle.set_attr(INITIALISED, True)
            for stale in fail_stale_trials(handle, grace):
                if on_trial_end:
                    on_trial_end(stale)
            trials = study.get_trials(deepcopy=False)
            waiting = any(t.state == TrialState.WAITING for t in trials)
            out_of_time = timeout is not None and time.monotonic() - started > timeout
            exhausted = isinstance(study.sampler, Grid) and study.sampler.all_started(study)
            enough = n_trials is not None and counted(trials) >= n_trials
            if out_of_time or (not waiting and (enough or exhausted)):
                running = [t for t in trials if t.state == TrialState.RUNNING]
                if out_of_time or not running:
                    report.timed_out = out_of_time
                    return report
                trial = None  # others still run: wait, in case their worker dies and needs a retry
            else:
                trial = study.ask()
                handle.set_trial_attr(trial.number, WORKER, _worker_id())
                if handle.differs:  # trained otherwise than the study's first trials: what best must export
                    handle.set_trial_attr(trial.number, SHARED_VALUES, handle.differs)
                handle.set_trial_attr(trial.number, HEARTBEAT, time.time())
                try:
                    drawn = draw(trial)
                except (Exception, KeyboardInterrupt) as err:  # raised again below, where every trial's end is
                    draw_error = err  # handled: a second Ctrl-C here (a long draw) left the trial RUNNING, a retry spent
        if trial is None:
            # Trials in other processes end unannounced: look again soon (at a study's tail every idle
            # worker waits here; a 2 s poll cost each `--jobs` worker up to 2 s of the study's wall).
            _TRIAL_ENDS.wait(ends_seen, min(heartbeat, 0.5), stop)
            continue
        report.trials_run.append(trial.number)
        # Below, skip_if_finished and _set_error: another worker may have failed this trial already
        # (its heartbeat looked stale) and queued a retry; this worker then just goes on.
        try:
            with Heartbeat(handle, trial.number, heartbeat):
                if draw_error is not None:
                    raise draw_error
                values = run_trial(trial, drawn)
        except optuna.TrialPruned:
            study.tell(trial, state=TrialState.PRUNED, skip_if_finished=True)
        except (KeyboardInterrupt, StopWorker) as err:
            asked = "SIGTERM" if isinstance(err, Terminated) else "Ctrl-C"
            reason = str(err) if isinstance(err, StopWorker) else f"interrupted ({asked})"
            _set_error(trial, reason)
            with signals_held(), study_lock(handle.url, study.study_name):
                queued = queue_again(handle, trial.number)
            if isinstance(err, StopWorker):
                report.stopped = err
            else:
                report.interrupted = True
            _TRIAL_ENDS.ended()
            if on_trial_end and queued:  # else whoever ended it first said so (a second Ctrl-C's, a stale judge)
                on_trial_end(study.get_trials(deepcopy=False)[trial.number])
            return report
        except Exception as err:  # a failing trial is recorded and the study goes on
            _set_error(trial, f"{type(err).__name__}: {err}"[:2000])
            study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        else:
            if any(not math.isfinite(v) for v in values):
                _set_error(trial, f"objective is not finite: {values}")
                study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            else:
                study.tell(trial, values, skip_if_finished=True)
        _TRIAL_ENDS.ended()
        if on_trial_end:
            on_trial_end(study.get_trials(deepcopy=False)[trial.number])


def _file_identity(url: str) -> tuple[int, int] | None:
    """(device, inode) of a storage's file; None for a database server, or a file not there."""
    path = storage_file(url)
    try:
        stat = path.stat() if path is not None else None
    except OSError:
        return None
    return None if stat is None else (stat.st_dev, stat.st_ino)


def _set_error(trial: optuna.Trial, message: str) -> None:
    """Record why a trial failed, unless it is finished already (failed by another worker)."""
    try:
        trial.set_user_attr("error", scrub(message))  # kept in the storage and the run's tags: no password
    except (optuna.exceptions.UpdateFinishedTrialError, ValueError):
        pass

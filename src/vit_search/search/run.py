"""``vit-search run``: one worker of a study, each trial trained by ``train()`` and logged to MLflow.

MLflow gets one parent run per study, made by whichever worker starts the study first, and one
nested run per trial (pruned and failed ones included, tagged with their state): see
:mod:`.study_runs`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import optuna
from optuna.trial import TrialState

from ..checkpoints import CheckpointNotWritten, check_writable
from ..errors import RunFailed, UserError
from ..files import sqlite_busy
from ..log_lines import EpochLines, both, say, trial_line
from ..model.cost import model_cost
from ..performance import RunSeconds, cpu_only
from ..schema import Spec
from ..spec import SpecError, load_spec
from ..stopping import TRIAL_SLOT, requests_set
from ..tracking import TrackingDiskFull, check_store, full_disk_in_one_line
from ..train import LaunchBroken, peer_lost, train
from .epoch_reports import ReportNotStored, reporter
from .fixed import SHARED_VALUES, check_launch, say_joining
from .leaderboard import trial_run_name
from .space import parse_space, to_params
from .storage import (
    StorageLost, check_file, check_server, check_url, disk_full, driver_said, locked, redact, redact_in,
    storage_problem, study_lock,
)
from .study import (
    StopWorker, StudyHandle, WorkerReport, counted, interrupt_own_trials, objective_values, open_study, sample_spec,
    storage_url_of, worker_loop,
)
from .study_runs import StudyRuns, end_active_run


@dataclass
class SearchResult:
    """What a worker leaves behind: the study, its storage, this worker's trials, wall time."""

    study: optuna.Study | None  # None on the non-main processes of a launched run
    storage: str
    trials_run: list[int]
    wall_seconds: float
    train_seconds: float
    interrupted: bool
    stopped: StopWorker | None = None  # why this worker stopped early, its trial queued again (e.g. MLflow went away)
    seconds: RunSeconds = field(default_factory=RunSeconds)  # its trials' train() time, phase by phase, pruned ones too


class Infeasible(optuna.TrialPruned):
    """A sampled configuration that cannot be built, or breaks a constraint: pruned before training."""


def check_constraints(constraints: dict[str, float], parameters: int, flops: int) -> str | None:
    """Why a model breaks ``search.constraints``, or None when it fits."""
    value = {"params": parameters, "flops": flops}
    for key, bound in constraints.items():
        side, what = key.split("_", 1)
        if side == "max" and value[what] > bound:
            return f"{what} {value[what]:,} > max_{what} {bound:,.0f}"
        if side == "min" and value[what] < bound:
            return f"{what} {value[what]:,} < min_{what} {bound:,.0f}"
    return None


def run_search(spec: Spec, storage: str | None = None, progress: bool = True, trials_at_once: int = 1,
               checkpoint_dir: str | None = None, lines: bool = False) -> SearchResult:
    """Run this worker's share of the spec's study; returns when the study has its trials.

    ``trials_at_once`` > 1 packs that many trials into this process, each in a thread of its own
    (on a GPU, each on its own CUDA stream), so that small trials overlap on one device. Trials'
    checkpoints go to ``checkpoint_dir/<study>/trial-<n>`` (default: ``train.checkpoint_dir``, else
    ``runs``). ``lines``: print a line per finished trial and, every so often, per epoch (for logs;
    see :mod:`~vit_search.log_lines`).
    """
    from accelerate import PartialState

    search = spec.search
    assert search is not None
    # Under `accelerate launch`, each trial trains on all the launched processes: the main one runs
    # the study and tells the others which spec to train next.
    state = PartialState(cpu=cpu_only())
    check_packing(spec, trials_at_once, state.num_processes)
    if not state.is_main_process:
        return _follow_trials()
    url = storage_url_of(spec, storage)
    root = checkpoint_root(spec, checkpoint_dir)
    check_url(url)
    check_file(url)
    check_server(url)
    if spec.tracking.enabled:
        check_store(spec)
    check_writable(root)  # before anything is written: a folder that cannot take checkpoints is one line, exit 2
    # Workers starting together on fresh sqlite files would race to create the same tables.
    with study_lock(url, search.study_name or spec.name):
        handle = open_study(spec, url)
        runs = StudyRuns(spec, handle)
        check_launch(handle, state.num_processes)
    if handle.differs:
        say_joining(handle.differs, handle.attr(SHARED_VALUES), handle.study.study_name)
    bar = _ProgressBar(search.n_trials, not isinstance(search.metric, str), enabled=progress and sys.stderr.isatty(),
                       failures=not lines, done=counted([t for t in handle.study.get_trials(deepcopy=False)
                                                         if t.state.is_finished()]))
    stop = threading.Event()
    runners = [TrialRunner(spec, handle, runs, state.num_processes, stop, root, lines, _packing_tags(trials_at_once))
               for _ in range(trials_at_once)]

    def trial_end(frozen: optuna.trial.FrozenTrial) -> None:
        bar.update(handle.study, frozen)
        if lines:
            say(trial_line(frozen, runs.metrics))
        runs.record_trial_end(frozen, folder=root / f"trial-{frozen.number}")

    # Filled in as each runner's loop goes: what a slot left behind mid-step (a second Ctrl-C) had done.
    so_far = {runner: WorkerReport(handle.study.study_name, url) for runner in runners}

    def loop(runner: TrialRunner) -> WorkerReport:
        return worker_loop(handle, search.n_trials, runner.draw, runner.run, timeout=search.timeout,
                           heartbeat=search.heartbeat_seconds, grace=search.grace_seconds,
                           on_trial_end=trial_end, initialise=runner.initialise, stop=stop, report=so_far[runner])

    started = time.perf_counter()
    reports: list[WorkerReport] = []
    try:
        with storage_faults_in_one_line(url, runs):
            runs.reconcile()  # runs that an earlier worker left RUNNING when it lost MLflow
            # Under `accelerate launch` every process hears Ctrl-C and SIGTERM and stops by itself.
            with requests_set(stop) if state.num_processes == 1 else contextlib.nullcontext():
                try:
                    reports = [loop(runners[0])] if trials_at_once == 1 else _in_threads(loop, runners, stop)
                except StoppedAtOnce:  # their threads are left mid-step: the trials are ended from here
                    ended = interrupt_own_trials(handle, "interrupted (Ctrl-C)")
                    for frozen in ended:
                        trial_end(frozen)
                    run_here = {n for report in so_far.values() for n in report.trials_run} | {t.number for t in ended}
                    reports = [WorkerReport(handle.study.study_name, url, sorted(run_here), interrupted=True)]
    finally:  # also when the loop raises: the other launched processes must not wait forever
        bar.close()
        # Ctrl-C and SIGTERM reach every launched process, and each stops by itself: one that has
        # gone would never take this message, and the main process would wait for it until killed.
        if not (any(r.interrupted for r in reports) or isinstance(sys.exc_info()[1], KeyboardInterrupt)):
            try:
                _share_trial(state.num_processes, None)  # the other processes may stop
            except Exception as err:
                if not peer_lost(err):
                    raise
                # One of them had stopped already (its trial's failure was said, and queued again): none waits.
    interrupted = any(r.interrupted for r in reports)
    stopped = next((r.stopped for r in reports if r.stopped), None)
    runs.finish(interrupted=interrupted or stopped is not None,  # stopped early: KILLED, as after Ctrl-C
                timed_out=any(r.timed_out for r in reports))
    if not runs.lost:
        end_active_run()
    seconds = RunSeconds()
    for runner in runners:
        seconds.add(runner.seconds)
    return SearchResult(handle.study, url, sorted(n for r in reports for n in r.trials_run),
                        time.perf_counter() - started, seconds.total, interrupted, stopped, seconds)


@contextlib.contextmanager
def storage_faults_in_one_line(url: str, runs: StudyRuns) -> Iterator[None]:
    """A study's work (the parent run reopened first): a full MLflow disk, or an Optuna storage that went
    away, filled up or refused a write, raised as one line (TrackingDiskFull, StorageLost); the parent
    run ends KILLED with the error on any error but a full MLflow disk."""
    try:
        # A full MLflow disk out of a trial (making the parent run, bringing runs up to date): one line.
        with full_disk_in_one_line("free space, then run the same command"):
            runs.reopen_parent()
            yield
    except TrackingDiskFull:
        raise
    except Exception as err:
        lost, fix = storage_problem(url), "start the database"
        if lost is None and disk_full(err):
            lost, fix = f"Optuna storage {redact(url)}: no space left on its disk", "free space"
        if lost is None and isinstance(err, optuna.exceptions.StorageInternalError):  # a write it could not make
            said = driver_said(err.__cause__ or err.__context__ or err)
            lost, fix = (f"Optuna storage {redact(url)} could not be written ({redact_in(said, url)[:160]})",
                         "check its file and disk (or its server)")
        if lost is None:
            # Not left RUNNING (the study was reopened first) with nothing running: the error is why it stopped.
            runs.stopped_by(str(err) if isinstance(err, (UserError, RunFailed)) else f"{type(err).__name__}: {err}")
            raise
        # Nothing more can be written to the study: its trials in training stay RUNNING, and the
        # worker that resumes it fails them as a dead worker's and retries them.
        lost = StorageLost(f"{lost}: the trials this worker was training are retried when the study resumes; "
                           f"{fix}, then run the same command")
        runs.stopped_by(str(lost))
        raise lost from None


def checkpoint_root(spec: Spec, checkpoint_dir: str | None = None) -> Path:
    """The folder of a study's checkpoints: ``checkpoint_dir`` (``--checkpoint-dir``), else
    ``train.checkpoint_dir``, else ``runs``, then the study's name."""
    return Path(checkpoint_dir or spec.train.checkpoint_dir or "runs") / (spec.search.study_name or spec.name)


def check_packing(spec: Spec, trials_at_once: int, num_processes: int) -> None:
    """Refuse packings that cannot work, before anything is written (UserError, exit 2)."""
    if trials_at_once < 1:
        raise UserError(f"--trials-per-gpu {trials_at_once}: must be at least 1 (trials at once in a worker)")
    if trials_at_once == 1:
        return
    if num_processes > 1:
        raise UserError("--trials-per-gpu packs trials into one process; under accelerate launch each trial already "
                        "spans the launched processes: drop one of the two")
    shared = next((d.path for d in parse_space(spec.search.space) if d.path in _PROCESS_WIDE), None)
    if shared is not None:
        key = ".".join(shared)
        raise UserError(f"{spec.locate(('search', 'space'))}: search.space: {key} cannot be searched with "
                        f"--trials-per-gpu above 1 (packed trials share one process, and {_PROCESS_WIDE[shared]}); "
                        f"remove it from the space or pack 1")


# Settings that one process holds for all the trials packed into it.
_PROCESS_WIDE = {
    ("train", "mixed_precision"): "Accelerate keeps one precision per process",
    ("train", "grad_accum_steps"): "Accelerate keeps one gradient accumulation count per process",
    ("train", "tf32"): "TF32 matmuls are a process-wide torch setting",
}


class StoppedAtOnce(KeyboardInterrupt):
    """A second Ctrl-C while packed trials finish their step: the worker leaves their threads behind."""


def _in_threads(loop: Callable[[TrialRunner], WorkerReport], runners: list[TrialRunner],
                stop: threading.Event) -> list[WorkerReport]:
    """Run ``loop`` once per runner, each in its own thread; Ctrl-C stops them all after their step,
    each trial queued again, and a second Ctrl-C at once (:class:`StoppedAtOnce`; the threads are
    daemons, so that a step that never ends holds up no exit)."""
    reports: list[WorkerReport | None] = [None] * len(runners)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            with _own_stream():
                reports[i] = loop(runners[i])
        except BaseException as err:  # raised again in the main thread, after the others stopped
            errors.append(err)
            stop.set()

    threads = [threading.Thread(target=work, args=(i,), name=f"{TRIAL_SLOT}{i}", daemon=True)
               for i in range(len(runners))]
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        try:
            for thread in threads:
                thread.join(timeout=0.2)
        except KeyboardInterrupt:  # only the main thread hears it: the others stop at their next step
            if stop.is_set():  # asked before (the first Ctrl-C only sets it): now at once
                raise StoppedAtOnce() from None
            stop.set()
    if errors:
        raise errors[0]
    return [r for r in reports if r is not None]


def _own_stream() -> Any:
    """A CUDA stream of this thread's own, so that packed trials' kernels can overlap on the device."""
    import torch

    return torch.cuda.stream(torch.cuda.Stream()) if torch.cuda.is_available() else contextlib.nullcontext()


def _packing_tags(trials_at_once: int) -> dict[str, str]:
    """What a trial's run says of its packing: how many trials its worker trains at once, and, packed,
    whether each has a CUDA stream of its own (:func:`_own_stream`) or shares the CPU's one queue."""
    import torch

    tags = {"trials_at_once": str(trials_at_once)}
    if trials_at_once > 1:
        tags["cuda_stream"] = "own" if torch.cuda.is_available() else "off: no CUDA device"
    return tags


class TrialRunner:
    """How this worker starts the study, draws a trial's spec, and trains it."""

    def __init__(self, spec: Spec, handle: StudyHandle, runs: StudyRuns, num_processes: int,
                 stop: threading.Event | None = None, checkpoints: Path = Path("runs"), lines: bool = False,
                 tags: dict[str, str] | None = None):
        self.spec, self.handle, self.runs, self.num_processes = spec, handle, runs, num_processes
        self.lines = lines  # print a line per epoch every so often (for logs)
        self.checkpoints = checkpoints  # trial n's go to checkpoints / trial-n
        self.stop = stop  # set: the worker is stopping; the trial in training ends as Ctrl-C would end it
        self.seconds = RunSeconds()  # where this runner's trials spent their train() time
        self.tags = tags or {}  # on every trial's run besides the study's (its packing)

    def initialise(self) -> None:
        """Once per study, under the study lock: the enqueued configurations and the parent run."""
        dims = parse_space(self.spec.search.space)
        study = self.handle.study
        # Each entry is one trial, a repeated one too (`{model.ffn.type: swiglu}` twice: two trials, the rest drawn
        # for each). Those a first initialise enqueued before its worker was killed are not enqueued again.
        done = Counter(json.dumps(t.system_attrs["fixed_params"], sort_keys=True)
                       for t in study.get_trials(deepcopy=False) if "fixed_params" in t.system_attrs)
        for values in self.spec.search.enqueue:
            params = to_params(dims, values)
            key = json.dumps(params, sort_keys=True)
            if done[key]:
                done[key] -= 1
                continue
            study.enqueue_trial(params, skip_if_exists=False)
        self.runs.create_parent()

    def draw(self, trial: optuna.Trial) -> tuple[Spec, dict[str, Any]]:
        """The trial's spec and its drawn values (under the study lock); Infeasible if it cannot be built."""
        try:
            return sample_spec(self.spec, trial)
        except SpecError as err:
            unmendable = self._base_refused()
            if unmendable:  # every trial would meet it: the trial waits in the queue, not pruned, for its fix
                with self._failed_run(trial):
                    raise StopWorker(f"{unmendable} (trial {trial.number} is queued again; mend it, then run the same "
                                     f"command)", exit_code=2) from None
            reason = f"infeasible: {err.problems[0]}"
            trial.set_user_attr("pruned_reason", reason)
            raise Infeasible(reason) from None
        except Exception:  # the sampler failing: the trial fails, and MLflow hears of it as of any failed trial
            with self._failed_run(trial):
                raise

    @contextlib.contextmanager
    def _failed_run(self, trial: optuna.Trial, trial_spec: Spec | None = None,
                    values: dict[str, Any] | None = None) -> Iterator[None]:
        """A child run for a trial that fails before training (as its values are drawn: the study's spec and
        what was drawn so far), ended FAILED by the error raised in it."""
        tracker, run = self.runs.trial_run(trial_spec or self.spec, trial.number,
                                           trial.params if values is None else values)
        with run:
            _link_run(trial, tracker.run_id)
            yield

    def _base_refused(self) -> str | None:
        """Why the study's own spec, which loaded when the worker started, no longer loads (its weights
        file removed or rewritten since, say); None if it still loads. Then no drawn value caused the
        trial's problem."""
        try:
            load_spec({key: value for key, value in self.spec.raw.items() if key != "search"})
        except SpecError as err:
            return err.problems[0]
        return None

    def run(self, trial: optuna.Trial, drawn: tuple[Spec, dict[str, Any]]) -> list[float]:
        """Train the trial (after its size constraints) and return its objective values.

        A trial that fails because MLflow's tracking server stopped answering, MLflow's disk is full, its
        checkpoints cannot be written (a full disk, a file size limit), or on an input error that no searched
        value can cause (the data set cannot be read), is no fault of its own: it is queued again and this
        worker stops (StopWorker), rather than fail trial after trial (each of which would read the whole set
        again first).
        """
        try:
            return self._run(trial, drawn)
        except (optuna.TrialPruned, KeyboardInterrupt):
            raise
        except UserError as err:
            searched = [".".join(dim.path) for dim in parse_space(self.spec.search.space)]
            if not err.settings or any(key == s or key.startswith(f"{s}.") for s in err.settings for key in searched):
                raise  # it may follow from this trial's values: the study goes on
            raise StopWorker(f"{err} (trial {trial.number} is queued again)", exit_code=2) from err
        except Exception as err:
            if isinstance(err, ReportNotStored) and sqlite_busy(err):  # held past its wait: every trial would wait so
                raise StopWorker(f"{locked(self.handle.url)} (trial {trial.number} is queued again)") from err
            if self.runs.lost or self.runs.outage(err):  # MLflow can take no more: every trial would fail to log
                raise StopWorker(f"{self.runs.lost}: trial {trial.number} is queued again; {self.runs.remedy}, then "
                                 f"run the same command to resume") from err
            if isinstance(err, CheckpointNotWritten):  # every trial would meet the full disk or the limit: none is lost
                raise StopWorker(f"{err} (trial {trial.number} is queued again; then run the same command)") from err
            if self.num_processes > 1 and peer_lost(err):  # the launch is broken: no trial can train in it
                said = err.what if isinstance(err, LaunchBroken) else \
                    f"another process of the launch stopped ({(str(err).splitlines() or [''])[0][:200]})"
                raise StopWorker(f"{said}: trial {trial.number} is queued again; run the same command to resume") from err
            raise

    def _run(self, trial: optuna.Trial, drawn: tuple[Spec, dict[str, Any]]) -> list[float]:
        search, number = self.spec.search, trial.number
        trial_spec, values = drawn
        searched = list(values)
        try:
            parameters, flops = model_cost(trial_spec.model)
        except Exception:  # a block that cannot run: fail the trial, with a child run saying why
            with self._failed_run(trial, trial_spec, values):
                raise
        trial.set_user_attr("parameters", parameters)
        trial.set_user_attr("flops", flops)
        reason = check_constraints(search.constraints, parameters, flops)
        if reason:
            trial.set_user_attr("pruned_reason", reason)
            _link_run(trial, self.runs.log_untrained(trial_spec, number, values, parameters, flops, reason))
            raise Infeasible(reason)

        checkpoint_dir = str(self.checkpoints / f"trial-{number}")
        _share_trial(self.num_processes, {"raw": trial_spec.raw, "checkpoint_dir": checkpoint_dir})
        reports = reporter(trial, search)  # only single-objective studies report epochs and prune
        shown = next((m for m in self.runs.metrics if m not in ("parameters", "flops")), "val_accuracy")
        # The line first: a pruning verdict raises in `reports`.
        on_epoch = both(EpochLines(f"trial {number}", trial_spec.train.epochs, shown) if self.lines else None, reports)
        seconds = RunSeconds()
        try:
            result = train(trial_spec, on_epoch=on_epoch, parent_run_id=self.runs.parent_id,
                           run_name=trial_run_name(number, values),
                           tags={**self.runs.trial_tags(number, searched), **self.tags},
                           checkpoint_dir=checkpoint_dir, progress=False, stop=self.stop, seconds=seconds,
                           on_run_start=functools.partial(_link_run, trial))
        finally:
            self.seconds.add(seconds)  # a pruned trial's too: its train() raised
            if reports is not None:
                reports.close()
        for name, value in result.metrics.items():
            trial.set_user_attr(name, value)
        return objective_values(self.spec, result.metrics, result.parameters, result.flops)


def _link_run(trial: optuna.Trial, run_id: str | None) -> None:
    """The trial's MLflow run, named in its ``mlflow_run_id`` as it starts: a failed or pruned trial is
    found from Optuna too (None: tracking.enabled is false)."""
    if run_id is not None:
        trial.set_user_attr("mlflow_run_id", run_id)


def _share_trial(num_processes: int, message: dict[str, Any] | None) -> None:
    """Main process: send the next trial's spec (None: no more) to the other launched processes."""
    if num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list([message])


def _follow_trials() -> SearchResult:
    """Other processes: train each trial the main process sends, until it sends None.

    A trial stopped by the main process (pruned, or failed there: TrainingStopped) or diverged (which the
    processes decide together) ended on every process: the next one comes. Any other failure may be this
    process's alone (a plugin's error on one rank, memory on one device), while the main process waits for
    it in the step's collectives, which no signal interrupts: this process then says it in one line and
    ends, so that the launch's process group breaks at once, and the main process queues the trial again
    (``peer_lost``) rather than wait for ever.
    """
    from accelerate.utils import broadcast_object_list

    from ..train import TrainingDiverged, TrainingStopped

    started, train_seconds = time.perf_counter(), 0.0
    while True:
        (message,) = broadcast_object_list([None])
        if message is None:
            return SearchResult(None, "", [], time.perf_counter() - started, train_seconds, False)
        began = time.perf_counter()
        try:
            train(load_spec(message["raw"]), checkpoint_dir=message["checkpoint_dir"], progress=False)
        except (TrainingStopped, TrainingDiverged):
            pass
        except Exception as err:
            from ..redaction import scrub

            rank = os.environ.get("RANK", "?")
            if isinstance(err, LaunchBroken):  # the main process is gone (killed): the next worker queues it again
                said = f"{err.what}; run the same command to go on (its trial is queued again then)"
            else:
                said = (f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:300]}; it stops, and the "
                        f"main process queues the trial again")
            print(scrub(f"error: process {rank} of the launch: {said}"), file=sys.stderr, flush=True)
            os._exit(1)
        train_seconds += time.perf_counter() - began


class _ProgressBar:
    """A bar over the study's trials showing the best value so far (quiet when not a terminal)."""

    def __init__(self, total: int | None, multi: bool, enabled: bool, failures: bool = True, done: int = 0):
        from tqdm.auto import tqdm

        self.multi, self.failures = multi, failures  # failures: print a line for each failed trial
        # done: the trials a resumed study has already (a bar from 0 stopped short of its total, at 1/3)
        self.bar = tqdm(total=total, initial=done, desc="trials", unit="trial", disable=not enabled)

    def update(self, study: optuna.Study, frozen: optuna.trial.FrozenTrial) -> None:
        """One more trial ended."""
        self.bar.update(1)
        if frozen.state == TrialState.FAIL and self.failures:
            self.bar.write(f"trial {frozen.number} failed: {frozen.user_attrs.get('error', 'unknown error')}",
                           file=sys.stderr)
        if not self.multi and any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
            self.bar.set_postfix(best=f"{study.best_value:.4f}", trial=study.best_trial.number)

    def close(self) -> None:
        """Stop drawing the bar."""
        self.bar.close()

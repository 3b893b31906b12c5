"""A study's MLflow runs: one parent run per study, one nested run per trial, their tags and states.

Everything a study logs to MLflow is decided here; a trial's own run (its params, metrics and
weights) is written by :func:`~vit_search.train.train` through :class:`~vit_search.tracking.Tracker`.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping

from optuna.trial import FrozenTrial, TrialState

from ..errors import RunFailed, UserError
from ..redaction import scrub
from ..schema import Spec
from ..tracking import (Tracker, TrackingError, full_disk_in_one_line, mlflow_disk_full, run_lifecycle, use_experiment,
                        use_store)
from .leaderboard import NOTE_TAG, filter_value, leaderboard, score_of, trial_run_name
from .report import best_spec, best_trials, save_plots
from .fixed import SHARED_VALUES
from .storage import StudyMismatch, redact, study_lock
from .study import PARENT_RUN, StudyHandle

STATE_TAG = "trial.state"
ERROR_TAG = "error"  # why a run stopped: a trial's failure, or the study's storage lost
PENDING_TAG = "vit_search.parent_pending"  # a parent run made, not yet the study's (create_parent)


class StudyRuns:
    """The MLflow side of one worker's study (every method does nothing when tracking is off)."""

    def __init__(self, spec: Spec, handle: StudyHandle):
        from mlflow.tracking import MlflowClient

        self.spec, self.handle = spec, handle
        self.enabled = spec.tracking.enabled
        self.experiment_id: str | None = None
        self.client = None
        self._parent: str | None = None
        if self.enabled:
            use_store(spec)
            self.client = MlflowClient()
            self._check_parent()  # before the experiment is created in a store that is not the study's
            self.experiment_id = use_experiment(spec)
        # Set when MLflow can take no more (its tracking server went away, its disk is full): this
        # worker then writes nothing more to MLflow, and the next worker to start reconciles the runs
        # left behind (:meth:`reconcile`). ``remedy`` says what the user does about it.
        self.lost: str | None = None
        self.remedy = "start the server"

    def outage(self, err: BaseException | None = None) -> str | None:
        """Why MLflow can take nothing more now: ``err`` says its disk is full, its SQLite file locked, or
        its tracking server not reached, or the server does not answer now (None: it can)."""
        if not self.enabled:
            return None
        from ..tracking import server_problem
        from ..tracking_store import store_fault

        full = mlflow_disk_full(err) if err is not None else None
        if full:
            self.lost, self.remedy = full, "free space"
        else:
            self.lost, self.remedy = server_problem(), "start the server"
        if self.lost is None and err is not None:  # locked past its wait; a server gone and back since the error
            self.lost, self.remedy = store_fault(err) or (None, self.remedy)
        return self.lost

    @property
    def parent_id(self) -> str | None:
        """The study's parent run (made by the worker that started the study; kept once read, as it
        never changes, so that it is known after the storage went away)."""
        if self._parent is None and self.enabled:
            self._parent = self.handle.attr(PARENT_RUN)
        return self._parent

    def study_tags(self) -> dict[str, str]:
        """Tags on the parent run and on every trial's run."""
        search = self.spec.search
        return {"optuna.study_name": self.handle.study.study_name, "sampler": search.sampler, "pruner": search.pruner}

    @property
    def metrics(self) -> list[str]:
        """The study's objectives, in ``search.metric`` order."""
        metric = self.spec.search.metric
        return [metric] if isinstance(metric, str) else list(metric)

    def trial_tags(self, number: int, searched: list[str]) -> dict[str, str]:
        """Tags of trial ``number``'s run (``searched``: the keys drawn for it)."""
        return {**self.study_tags(), "optuna.trial_number": str(number), "search.keys": ",".join(searched)}

    def create_parent(self) -> None:
        """Make the study's parent run; once per study, under the study lock. A tracking server that goes away
        meanwhile (or a locked store file) is one line; the run it left half made is deleted by the next start."""
        if not self.enabled:
            return
        name = self.handle.study.study_name
        # Tagged until the study names it: a run that a start left so (its store went away before it could be
        # named, or deleted) is not the study's, and the next start deletes it rather than leave it RUNNING.
        pending = {PENDING_TAG: "1", "optuna.study_name": name, "optuna.storage": redact(self.handle.url)}
        parent = None
        try:
            for orphan in self.client.search_runs([self.experiment_id], filter_string=" and ".join(
                    [f"tags.`{key}` = {filter_value(value)}" for key, value in pending.items()] +
                    ["attributes.status = 'RUNNING'"])):
                self.client.delete_run(orphan.info.run_id)
            parent = self.client.create_run(self.experiment_id, run_name=name, tags={
                **self.spec.tracking.tags, **self.study_tags(), **pending, "mlflow.runName": name})
            self.client.log_text(parent.info.run_id, self.spec.to_yaml(), "study.yaml")
            self.handle.set_attr(PARENT_RUN, parent.info.run_id)
            self._parent = parent.info.run_id
            self.client.delete_tag(parent.info.run_id, PENDING_TAG)
        except Exception as err:
            if parent is not None and self._parent is None:  # not the study's: gone now, or at the next start
                with contextlib.suppress(Exception):
                    self.client.delete_run(parent.info.run_id)
            if not self.outage(err):
                raise
            made = "was not made" if self._parent is None else f"{self._parent} is not marked whole"
            raise RunFailed(f"{self.lost}: the study's MLflow parent run {made}; {self.remedy}, then run the same "
                            f"command") from None

    def _check_parent(self) -> None:
        """Refuse a study whose parent run this MLflow store does not hold (TrackingError): it was
        logged to another store, and trials logged on into this one would have no parent; or holds
        deleted: MLflow takes nothing more into it until it is restored."""
        parent = self.parent_id
        if not parent:
            return
        import mlflow

        stage = run_lifecycle(parent)
        study, store = self.handle.study.study_name, redact(mlflow.get_tracking_uri())
        afresh = "start a new study (another search.study_name or --storage)"
        if stage is None:
            raise TrackingError(
                f"study {study!r} logs to MLflow parent run {parent}, which the store {store} does not hold; point "
                f"MLFLOW_TRACKING_URI (or tracking.uri) at the store the study was logged to, or {afresh}")
        if stage == "deleted":
            raise TrackingError(
                f"study {study!r} logs to MLflow parent run {parent}, which was deleted in the store {store}; restore "
                f"it (mlflow runs restore --run-id {parent}) and run the same command again, or {afresh}")

    def reopen_parent(self) -> None:
        """A resumed study: its parent run is RUNNING again until the study ends, with no error from
        the stop it resumes from."""
        parent = self.parent_id
        if not parent:
            return
        run = self.client.get_run(parent)
        if run.info.status != "RUNNING":
            self.client.update_run(parent, status="RUNNING")
        if ERROR_TAG in run.data.tags:
            self.client.delete_tag(parent, ERROR_TAG)

    def stopped_by(self, why: str) -> None:
        """This worker stopped on an error (its storage went away, a file it needs is damaged): the parent run
        ends KILLED, as after Ctrl-C, with ``why`` as its error (the UI says why the study stopped; the resumed
        study reopens it). MLflow gone too is left to the resume, which brings the runs up to date."""
        parent = None if self.lost else self._parent
        if parent:
            with contextlib.suppress(Exception):
                self.client.set_tag(parent, ERROR_TAG, scrub(why))
                self.client.set_terminated(parent, "KILLED")

    def reconcile(self) -> None:
        """Give the runs of finished trials that MLflow still shows RUNNING, or that lack the trial's state
        (their worker lost the tracking server, or died, before or while it marked them) the trial's state: a
        resumed study's runs then agree with Optuna."""
        parent = self.parent_id
        if not parent:
            return
        study = self.handle.study
        finished = {str(t.number): t for t in study.get_trials(deepcopy=False)
                    if t.state not in (TrialState.RUNNING, TrialState.WAITING)}
        runs = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}' and "
                                                f"tags.`optuna.study_name` = {filter_value(study.study_name)}",
            max_results=50_000)  # MLflow's page limit: a study's trials, not a page of them
        for run in runs:
            if run.info.status != "RUNNING" and STATE_TAG in run.data.tags:
                continue  # marked already
            frozen = finished.get(run.data.tags.get("optuna.trial_number", ""))
            if frozen is not None:
                self.record_trial_end(frozen)  # ends failed trials' runs FAILED, pruned ones' KILLED
                if frozen.state == TrialState.COMPLETE:
                    self.client.set_terminated(run.info.run_id, "FINISHED")

    def trial_run(self, trial_spec: Spec, number: int, values: Mapping[str, Any],
                  extra_tags: dict[str, str] | None = None):
        """A child run for a trial that does not reach training (``with``: ended FAILED on an error)."""
        tracker = Tracker(trial_spec, enabled=self.enabled)
        return tracker, tracker.run(parent_run_id=self.parent_id, run_name=trial_run_name(number, values),
                                    tags={**self.trial_tags(number, list(values)), **(extra_tags or {})})

    def log_untrained(self, trial_spec: Spec, number: int, values: Mapping[str, Any], parameters: int, flops: int,
                      reason: str) -> str | None:
        """A child run for a trial pruned before training: its spec, size and the reason; returns its id
        (None: tracking.enabled is false)."""
        tracker, run = self.trial_run(trial_spec, number, values, {"pruned_reason": reason})
        with run:
            tracker.log_start(parameters, flops, "none")
        return tracker.run_id

    def record_trial_end(self, frozen: FrozenTrial, folder: Path | None = None, files: tuple[Path, ...] = ()) -> None:
        """Mark a trial's run with its Optuna state (pruned runs end KILLED, dead workers' FAILED), and
        name it with its searched values and score. On a full MLflow disk, or a tracking server that stopped
        answering, this worker stops writing to MLflow (its next trial then stops it, in the one line that
        says which) and a resumed study marks the run. The trial's checkpoint ``folder`` and its ``files`` are
        removed when it failed or was pruned: never read again (a retry trains afresh under its own number),
        and on a full disk the space to go on; removed even when a second Ctrl-C cuts the marking short."""
        try:
            parent = self.parent_id
            if not parent or self.lost:
                return
            try:
                self._record_trial_end(parent, frozen)
            except Exception as err:
                if not self.outage(err):
                    raise
        finally:
            if frozen.state in (TrialState.FAIL, TrialState.PRUNED):
                if folder is not None:
                    shutil.rmtree(folder, ignore_errors=True)
                for path in files:
                    with contextlib.suppress(OSError):  # not a file (a folder in its place): what is there stays
                        path.unlink(missing_ok=True)

    def _record_trial_end(self, parent: str, frozen: FrozenTrial) -> None:
        runs = self.client.search_runs(
            [self.client.get_run(parent).info.experiment_id],
            # The parent too: an older study of the same name (its storage deleted) has runs of the
            # same trial numbers in this experiment, which are not this study's.
            filter_string=f"tags.`optuna.trial_number` = '{frozen.number}' and "
                          f"tags.`optuna.study_name` = {filter_value(self.handle.study.study_name)} and "
                          f"tags.`mlflow.parentRunId` = '{parent}'",
        )
        from mlflow.entities import RunTag
        from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

        name = trial_run_name(frozen.number, frozen.params, score_of(frozen, self.metrics))
        # One write: the run's name (MLflow renames a run whose mlflow.runName tag is set), its state, why.
        tags = [RunTag(MLFLOW_RUN_NAME, name), RunTag(STATE_TAG, frozen.state.name)] + [
            RunTag(key, str(frozen.user_attrs[key])[:5000]) for key in ("error", "pruned_reason") if key in frozen.user_attrs]
        for run in runs:
            self.client.log_batch(run.info.run_id, tags=tags)
            if frozen.state == TrialState.PRUNED:
                self.client.set_terminated(run.info.run_id, "KILLED")
            elif frozen.state == TrialState.FAIL and run.info.status in ("RUNNING", "FINISHED"):
                # RUNNING: its worker died, or left it mid-step. FINISHED: training ended, then the trial
                # failed (a non-finite objective).
                stopped = str(frozen.user_attrs.get("error", "")).startswith("interrupted")
                self.client.set_terminated(run.info.run_id, "KILLED" if stopped else "FAILED")

    def finish(self, interrupted: bool = False, timed_out: bool = False) -> None:
        """Give the parent run the best trial's metrics and spec, the plots, the counts and the leaderboard.

        Called by each worker as it finishes (and so again on resume); the last one to finish ends
        the run: KILLED when it was interrupted, else FINISHED (all trials run, the grid covered, or
        the time limit reached, ``timed_out``, queued trials or not; re-running the study reopens it).
        """
        parent = self.parent_id
        if not parent or self.lost:
            return
        # Under the study lock: workers finishing at once would otherwise both insert the parent's
        # first `best_run_id` tag, and one of them fail on MLflow's unique key (tags.key, run_uuid).
        with study_lock(self.handle.url, self.handle.study.study_name):
            with full_disk_in_one_line("free space, then run the same command: it brings the study's MLflow runs "
                                       "up to date"):
                self._finish(parent, interrupted, timed_out)

    def _finish(self, parent: str, interrupted: bool, timed_out: bool = False) -> None:
        client, study = self.client, self.handle.study
        trials = study.get_trials(deepcopy=False)
        counts = {f"trials_{s.name.lower()}": sum(t.state == s for t in trials)
                  for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
        for key, value in counts.items():
            client.log_metric(parent, key, value)
        best = best_trials(study)
        if best:
            top = best[0]
            client.set_tag(parent, "best_trial", str(top.number))
            if len(best) > 1:
                client.set_tag(parent, "pareto_front", ",".join(str(t.number) for t in best))
            for key, value in top.user_attrs.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    client.log_metric(parent, f"best_{key}", float(value))
            if top.user_attrs.get("mlflow_run_id"):
                client.set_tag(parent, "best_run_id", top.user_attrs["mlflow_run_id"])
            try:
                exported = best_spec(self.spec, study, self.handle.attr(SHARED_VALUES)).to_yaml(exclude_search=True)
            except StudyMismatch:  # trained under values other than this worker's (it was told): not these
                pass
            except UserError as err:  # its spec no longer loads (its model.init file removed): the rest still goes on
                print(scrub(f"note: best_spec.yaml not logged: {(str(err).splitlines() or [''])[0][:300]}"),
                      file=sys.stderr)
            else:
                client.log_text(parent, exported, "best_spec.yaml")
        client.set_tag(parent, NOTE_TAG, leaderboard(study, self.metrics, self.experiment_id)[:8000])  # MLflow's tag limit
        if self.spec.tracking.plots:
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    drawn = save_plots(study, Path(tmp))
                except (ImportError, OSError, MemoryError) as err:  # a picture of what is stored: not worth the run
                    drawn = []
                    print(scrub(f"note: the study's plots were not drawn ({type(err).__name__}: "
                                f"{(str(err).splitlines() or [''])[0][:200]}); its runs and results are whole"),
                          file=sys.stderr)
                for path in drawn:
                    client.log_artifact(parent, str(path), "plots")
        running = any(t.state == TrialState.RUNNING for t in trials)
        waiting = any(t.state == TrialState.WAITING for t in trials)  # interrupted trials wait for a re-run
        if not running and (interrupted or timed_out or not waiting):
            client.set_terminated(parent, "KILLED" if interrupted else "FINISHED")


def end_active_run() -> None:
    """End a fluent MLflow run left open in this process (a trial stopped between runs)."""
    import mlflow

    if mlflow.active_run():
        mlflow.end_run()


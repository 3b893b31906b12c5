"""``vit-search run``: one worker of a study, each trial trained by ``train()`` and logged to MLflow.

MLflow gets one parent run per study, made by whichever worker starts the study first, and one
nested run per trial (pruned and failed ones included, tagged with their state).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import TrialState

from ..model import build_model, count_parameters
from ..performance import cpu_only
from ..spec import Spec, SpecError
from ..summary import flop_count
from ..tracking import Tracker, configure
from ..train import train
from .space import parse_space, to_params
from .storage import redact, study_lock
from .study import (
    PARENT_RUN, StudyHandle, objective_values, open_study, sample_spec, storage_url_of, worker_loop,
)

STATE_TAG = "trial.state"


@dataclass
class SearchResult:
    """What a worker leaves behind: the study, its storage, this worker's trials, wall time."""

    study: optuna.Study | None  # None on the non-main processes of a launched run
    storage: str
    trials_run: list[int]
    wall_seconds: float
    train_seconds: float
    interrupted: bool


class Infeasible(optuna.TrialPruned):
    """A sampled configuration that cannot be built, or breaks a constraint: pruned before training."""


def model_cost(spec: Spec) -> tuple[int, int]:
    """(parameters, forward FLOPs per image) of a spec's model, computed on the meta device."""
    import torch

    with torch.device("meta"):
        model = build_model(spec)
        size = spec.model.image_size
        height, width = (size, size) if isinstance(size, int) else size
        flops = flop_count(model.eval(), torch.empty(1, spec.model.in_channels, height, width))
    return count_parameters(model), flops


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


def run_search(spec: Spec, storage: str | None = None, progress: bool = True) -> SearchResult:
    """Run this worker's share of the spec's study; returns when the study has its trials."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from accelerate import PartialState

    search = spec.search
    assert search is not None
    # Under `accelerate launch`, each trial trains on all the launched processes: the main one runs
    # the study and tells the others which spec to train next.
    state = PartialState(cpu=cpu_only())
    if not state.is_main_process:
        return _follow_trials(state)
    url = storage_url_of(spec, storage)
    # Workers starting together on fresh sqlite files would race to create the same tables.
    with study_lock(url, search.study_name or spec.name):
        handle = open_study(spec, url)
        experiment_id = configure(spec) if spec.tracking.enabled else None
    study = handle.study
    client = MlflowClient() if spec.tracking.enabled else None
    multi = not isinstance(search.metric, str)
    train_seconds = 0.0

    def initialise() -> None:  # once per study, under the study lock
        dims = parse_space(search.space)
        for values in search.enqueue:
            study.enqueue_trial(to_params(dims, values), skip_if_exists=True)
        if client is not None:
            parent = client.create_run(experiment_id, run_name=study.study_name, tags={
                "optuna.study_name": study.study_name, "optuna.storage": redact(url),
                "sampler": search.sampler, "pruner": search.pruner, "mlflow.runName": study.study_name,
            })
            client.log_text(parent.info.run_id, spec.to_yaml(), "study.yaml")
            handle.set_attr(PARENT_RUN, parent.info.run_id)

    def draw(trial: optuna.Trial) -> tuple[Spec, dict[str, Any]]:
        try:
            return sample_spec(spec, trial)
        except SpecError as err:
            reason = f"infeasible: {err.problems[0]}"
            trial.set_user_attr("pruned_reason", reason)
            raise Infeasible(reason) from None

    def run_trial(trial: optuna.Trial, sampled: tuple[Spec, dict[str, Any]]) -> list[float]:
        nonlocal train_seconds
        trial_spec, drawn = sampled
        parent = handle.attr(PARENT_RUN)
        tags = {"optuna.trial_number": str(trial.number), "optuna.study_name": study.study_name,
                "sampler": search.sampler, "pruner": search.pruner}
        try:
            parameters, flops = model_cost(trial_spec)
        except Exception:  # a block that cannot run: fail the trial, with a child run saying why
            with Tracker(trial_spec, enabled=client is not None).run(
                parent_run_id=parent, run_name=f"trial {trial.number}", tags=tags
            ):
                raise
        trial.set_user_attr("parameters", parameters)
        trial.set_user_attr("flops", flops)
        reason = check_constraints(search.constraints, parameters, flops)
        if reason:
            trial.set_user_attr("pruned_reason", reason)
            _log_untrained(trial_spec, parent, trial.number, tags, parameters, flops, reason)
            raise Infeasible(reason)

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            if multi or search.metric not in metrics:  # parameters and flops do not change per epoch
                return
            trial.report(metrics[search.metric], epoch)
            if trial.should_prune():
                trial.set_user_attr("pruned_reason", f"pruned by {search.pruner} after epoch {epoch + 1}")
                raise optuna.TrialPruned(f"pruned after epoch {epoch + 1}")

        started = time.perf_counter()
        checkpoint_dir = f"runs/{study.study_name}/trial-{trial.number}"
        _share_trial(state, {"raw": trial_spec.raw, "checkpoint_dir": checkpoint_dir})
        try:
            result = train(trial_spec, on_epoch=on_epoch, parent_run_id=parent, run_name=f"trial {trial.number}",
                           tags={**tags, "search.keys": ",".join(drawn)}, checkpoint_dir=checkpoint_dir,
                           progress=False)
        finally:
            train_seconds += time.perf_counter() - started
        for name, value in result.metrics.items():
            trial.set_user_attr(name, value)
        trial.set_user_attr("mlflow_run_id", result.run_id)
        return objective_values(spec, result.metrics, result.parameters, result.flops)

    bar = _ProgressBar(search.n_trials, multi, enabled=progress and sys.stderr.isatty())

    def on_trial_end(frozen: optuna.trial.FrozenTrial) -> None:
        bar.update(study, frozen)
        if frozen.state == TrialState.FAIL:
            bar.write(f"trial {frozen.number} failed: {frozen.user_attrs.get('error', 'unknown error')}")
        if client is not None:
            _tag_child_run(client, handle, frozen)

    parent = handle.attr(PARENT_RUN)
    if client is not None and parent and client.get_run(parent).info.status != "RUNNING":
        client.update_run(parent, status="RUNNING")  # the study resumed: its run is open again
    started = time.perf_counter()
    try:
        report = worker_loop(handle, search.n_trials, draw, run_trial, timeout=search.timeout,
                             heartbeat=search.heartbeat_seconds, grace=search.grace_seconds,
                             on_trial_end=on_trial_end, initialise=initialise)
    finally:  # also when the loop raises: the other launched processes must not wait forever
        bar.close()
        _share_trial(state, None)  # the other processes may stop
    if client is not None:
        from .report import update_parent_run

        update_parent_run(client, handle, spec, interrupted=report.interrupted)
    if mlflow.active_run():
        mlflow.end_run()
    return SearchResult(study, url, report.trials_run, time.perf_counter() - started, train_seconds,
                        report.interrupted)


def _share_trial(state: Any, message: dict[str, Any] | None) -> None:
    """Main process: send the next trial's spec (None: no more) to the other launched processes."""
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list([message])


def _follow_trials(state: Any) -> SearchResult:
    """Other processes: train each trial the main process sends, until it sends None."""
    from accelerate.utils import broadcast_object_list

    from ..spec import load_spec
    from ..train import TrainingStopped

    started, train_seconds = time.perf_counter(), 0.0
    while True:
        (message,) = broadcast_object_list([None])
        if message is None:
            return SearchResult(None, "", [], time.perf_counter() - started, train_seconds, False)
        began = time.perf_counter()
        try:
            train(load_spec(message["raw"]), checkpoint_dir=message["checkpoint_dir"], progress=False)
        except TrainingStopped:  # pruned by the main process
            pass
        train_seconds += time.perf_counter() - began


def _log_untrained(spec: Spec, parent: str | None, number: int, tags: dict[str, str], parameters: int,
                   flops: int, reason: str) -> None:
    """A child run for a trial pruned before training: its spec, size and the reason."""
    tracker = Tracker(spec)
    with tracker.run(parent_run_id=parent, run_name=f"trial {number}", tags={**tags, "pruned_reason": reason}):
        tracker.log_start(parameters, flops, "none")


def _tag_child_run(client: Any, handle: StudyHandle, frozen: optuna.trial.FrozenTrial) -> None:
    """Mark a trial's MLflow run with its Optuna state (pruned runs end KILLED, not FAILED)."""
    study, parent = handle.study, handle.attr(PARENT_RUN)
    runs = client.search_runs(
        [client.get_run(parent).info.experiment_id] if parent else [],
        # The parent too: an older study of the same name (its storage deleted) has runs of the
        # same trial numbers in this experiment, which are not this study's.
        filter_string=f"tags.`optuna.trial_number` = '{frozen.number}' and "
                      f"tags.`optuna.study_name` = '{study.study_name}' and "
                      f"tags.`mlflow.parentRunId` = '{parent}'",
    ) if parent else []
    for run in runs:
        client.set_tag(run.info.run_id, STATE_TAG, frozen.state.name)
        for key in ("error", "pruned_reason"):
            if key in frozen.user_attrs:
                client.set_tag(run.info.run_id, key, str(frozen.user_attrs[key])[:5000])
        if frozen.state == TrialState.PRUNED:
            client.set_terminated(run.info.run_id, "KILLED")
        elif frozen.state == TrialState.FAIL and run.info.status == "RUNNING":  # its worker died
            client.set_terminated(run.info.run_id, "FAILED")


class _ProgressBar:
    """A bar over the study's trials showing the best value so far (quiet when not a terminal)."""

    def __init__(self, total: int | None, multi: bool, enabled: bool):
        from tqdm.auto import tqdm

        self.multi = multi
        self.bar = tqdm(total=total, desc="trials", unit="trial", disable=not enabled)

    def update(self, study: optuna.Study, frozen: optuna.trial.FrozenTrial) -> None:
        self.bar.update(1)
        if not self.multi and any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
            self.bar.set_postfix(best=f"{study.best_value:.4f}", trial=study.best_trial.number)

    def write(self, line: str) -> None:
        """A line on stderr that does not break the bar."""
        self.bar.write(line, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


"""``search.strategy: supernet``: one-shot architecture search in three phases, one worker's share.

1. The supernet is trained once (:mod:`.supernet_train`); its curves are the study's parent MLflow run.
2. Optuna draws subnets from ``search.space`` and scores each with the supernet's weights on the
   validation split, no training: the study ``<study>:subnets``, ``search.supernet.n_subnets`` trials.
   Constraints reject a subnet before it is scored. Every score goes to one table artifact of the
   parent run (``subnets.csv``), the best ``top_runs`` to child runs.
3. The best ``finalists`` subnets are trained as ordinary trials of the study ``<study>`` (from scratch
   or from their inherited weights), child runs as in ``trials`` mode; ``vit-search best`` reads them.

Phases 2 and 3 run through the same worker loop, storage and lock as ``trials`` mode, so several
workers share them and a killed worker's trial is retried; phase 1 is trained by one worker while
the others wait for it.
"""

from __future__ import annotations

import csv
import io
import threading
import time
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

from ..checkpoints import CheckpointNotWritten, check_writable, save_atomically
from ..errors import UserError
from ..log_lines import EpochLines, say, trial_line
from ..model.cost import model_cost
from ..model.elastic import set_subnet, subnet_state_dict
from ..performance import RunSeconds
from ..schema import Spec
from ..spec import SpecError, load_spec
from ..stopping import interruption, requests_set
from ..tracking import check_store
from .fixed import SHARED_VALUES, record_or_tell, say_joining
from .run import Infeasible, SearchResult, TrialRunner, check_constraints, checkpoint_root, storage_faults_in_one_line
from .space import parse_space, to_params
from .storage import check_file, check_server, check_url, study_lock
from .study import (
    PARENT_RUN, StopWorker, StudyHandle, WorkerReport, _worker_dead, _worker_id, counted, objective_values, open_study,
    sample_spec, storage_url_of, worker_loop,
)
from .study_runs import StudyRuns, end_active_run
from .supernet_space import SupernetSpace, describe_subnet
from .supernet_train import supernet_spec, train_supernet

TRAINED = "vit_search:supernet_trained"
OWNER = "vit_search:supernet_owner"
LOGGED = "vit_search:subnets_logged"
TRAINED_EPOCHS = "vit_search:supernet_epochs"  # the epochs phase 1 trained, set with TRAINED
FINALISTS_INIT = "vit_search:finalists_init"  # how the study's first finalists started


def _phase_spec(spec: Spec, study_name: str, n_trials: int) -> Spec:
    """``spec`` with its study renamed and sized (a copy)."""
    phase = spec.model_copy(deep=True)
    phase._source, phase._raw, phase._where = spec._source, spec.raw, spec._where
    phase.search.study_name, phase.search.n_trials = study_name, n_trials
    return phase


def run_supernet_search(spec: Spec, storage: str | None = None, progress: bool = True,
                        checkpoint_dir: str | None = None, lines: bool = False, outcome_here: bool = True) -> SearchResult:
    """Run this worker's share of all three phases; returns when the finalists are trained.

    ``lines``: print a line when the subnets are scored and one per finished finalist (for logs); the
    scores' line only where ``outcome_here`` (not in a ``--jobs`` worker: its command says it, once)."""
    search = spec.search
    name = search.study_name or spec.name
    url = storage_url_of(spec, storage)
    root = checkpoint_root(spec, checkpoint_dir)
    check_url(url)
    check_file(url)
    check_server(url)
    if spec.tracking.enabled:
        check_store(spec)
    check_writable(root)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = time.perf_counter()
    space = SupernetSpace.of(spec)
    # finalists: 0 scores only; the study of finalists then just holds the parent run (n_trials > 0 or None).
    finals_spec = _phase_spec(spec, name, search.supernet.finalists or None)
    scores_spec = _phase_spec(spec, f"{name}:subnets", search.supernet.n_subnets)
    scores_spec.search.pruner = "none"
    # A finalist is chosen to be trained in full: pruned after an epoch or two by the spec's pruner (which
    # suits a trials study's many draws), the best of the study could end unknown.
    finals_spec.search.pruner = "none"
    with study_lock(url, name):
        finals = open_study(finals_spec, url)
        runs = StudyRuns(finals_spec, finals)
        if spec.tracking.enabled and not finals.attr(PARENT_RUN):
            runs.create_parent()
    with study_lock(url, scores_spec.search.study_name):
        scores = open_study(scores_spec, url)
    stop = threading.Event()
    seconds = RunSeconds()  # phase 1's training (this worker's share) and the finalists'
    trained: list[int] = []
    stopped = None
    # Ctrl-C and SIGTERM set ``stop``, as on the trials path: raised wherever the worker happened to be, one
    # that landed in a finalizer (Python drops it there) or in code that made it another error was lost.
    with storage_faults_in_one_line(url, runs), requests_set(stop, "the supernet, a subnet being scored or a finalist "
                                                                  "in training ends after its current step"):
        runs.reconcile()  # runs that an earlier worker left RUNNING when it lost MLflow
        weights = _phase1(spec, space, finals, runs, root / "supernet", progress, stop, seconds, lines)
        runs.reopen_parent()  # phase 1 ended the parent run it logged into
        scored = _phase2(scores_spec, scores, space, weights, runs, stop)
        interrupted, stopped = scored.interrupted, scored.stopped
        if not interrupted and stopped is None:
            with study_lock(url, scores_spec.search.study_name):
                count = len(ranked(scores))
                # Logged again when more subnets were scored since (n_subnets raised on a finished study).
                if scores.attr(LOGGED) != count and _phase2_done(scores, search.supernet.n_subnets):
                    _log_scores(scores, spec, runs, search.supernet.top_runs)
                    scores.set_attr(LOGGED, count)
            if _scores_said(spec, scores, lines and outcome_here):
                say(_scores_outcome(spec, scores))
        if not interrupted and stopped is None and search.supernet.finalists:
            if finals.differs:  # said here, where its finalists join the others (phase 1 refuses other values itself)
                say_joining(finals.differs, finals.attr(SHARED_VALUES), name)
            runner = FinalistRunner(finals_spec, finals, runs, scores, space, weights, root / "finalists", stop, lines)
            with study_lock(url, name):
                target = runner.enqueue_finalists()
                _check_finalists_init(finals, search.supernet.finalists_init)

            def trial_end(frozen: optuna.trial.FrozenTrial) -> None:
                if lines:
                    say(trial_line(frozen, runs.metrics))
                runs.record_trial_end(frozen, folder=root / "finalists" / f"trial-{frozen.number}",
                                      files=(inherited_file(root / "finalists", frozen.number),))

            report = worker_loop(finals, target, runner.draw, runner.run, timeout=search.timeout,
                                 heartbeat=search.heartbeat_seconds, grace=search.grace_seconds,
                                 on_trial_end=trial_end, stop=stop)
            trained, interrupted, stopped = report.trials_run, report.interrupted, report.stopped
            seconds.add(runner.seconds)
    runs.finish(interrupted=interrupted or stopped is not None)  # stopped early: KILLED, as after Ctrl-C
    if not runs.lost:
        end_active_run()
    return SearchResult(finals.study, url, trained, time.perf_counter() - started, seconds.total, interrupted,
                        stopped, seconds)


def outcome_lines(spec: Spec, finals: optuna.Study, storage: str, interrupted: bool, said_lines: bool = False) -> list[str]:
    """What ``vit-search run`` says of phase 2 after a supernet study whose finalists' study is ``finals`` (on
    ``storage``): the scores, where their table is (unless the run printed that as phase 2 ended: ``said_lines``,
    its ``lines``), and why there are fewer finalists than asked (or none) where it was not ``interrupted``."""
    name = spec.search.study_name or spec.name
    study = optuna.load_study(study_name=f"{name}:subnets", storage=storage)
    scores = StudyHandle(study, study._storage, storage)
    lines = [] if _scores_said(spec, scores, said_lines) else [_scores_outcome(spec, scores)]
    trained_epochs = StudyHandle(finals, finals._storage, storage).attr(TRAINED_EPOCHS)
    asked_epochs = spec.search.supernet.epochs or spec.train.epochs
    if trained_epochs is not None and trained_epochs != asked_epochs:  # phase 1 is over: it is not trained again
        key = "search.supernet.epochs" if spec.search.supernet.epochs else "train.epochs"
        lines.append(f"note: the study's supernet was trained {trained_epochs} epochs in phase 1, which is over; "
                     f"{key} {asked_epochs} does not train it again (a new search.study_name would)")
    asked, trained = spec.search.supernet.finalists, len(finals.get_trials(deepcopy=False))
    if asked == 0:
        lines.append("finalists: 0, so no subnet is trained on its own; to train the best 3, run the same command "
                     "with --set search.supernet.finalists=3 added at its end")
    elif trained < asked and not interrupted:
        n_subnets, n_scored = spec.search.supernet.n_subnets, len(ranked(scores))
        repeats = sum(t.state == TrialState.COMPLETE for t in scores.study.get_trials(deepcopy=False)) - n_scored
        if repeats:  # every subnet of the space was scored: more draws only repeat them
            lines.append(f"finalists: {trained} of {asked}: only {n_scored} distinct subnets were scored, as many as "
                         f"the space holds that meet search.constraints (search.supernet.n_subnets {n_subnets}); "
                         f"widen search.space for more")
        else:
            broke = ", the others broke search.constraints" if n_scored < n_subnets else ""
            lines.append(f"finalists: {trained} of {asked}: only {n_scored} subnets were scored "
                         f"(search.supernet.n_subnets {n_subnets}{broke}); raise search.supernet.n_subnets for more")
    return lines


def _scores_said(spec: Spec, scores: StudyHandle, lines: bool) -> bool:
    """Whether a run printing ``lines`` says the scores as phase 2 ends: before its finalists' lines, which
    would bury them at the end of a long log."""
    return lines and spec.search.supernet.finalists > 0 and _phase2_done(scores, spec.search.supernet.n_subnets)


def _scores_outcome(spec: Spec, scores: StudyHandle) -> str:
    n_subnets = spec.search.supernet.n_subnets
    if not _phase2_done(scores, n_subnets):  # stopped before phase 2 ended: no table yet, and more to score
        judged = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in scores.study.get_trials(deepcopy=False))
        return f"subnets: {judged} of {n_subnets} scored so far in study '{scores.study.study_name}'"
    return scores_line(scores) + (" (their table: subnets.csv of the study's parent run)" if spec.tracking.enabled else "")


def scores_line(scores: StudyHandle) -> str:
    """``subnets: 60 scored, best inherited val_accuracy 0.8125 (subnet 14)``: phase 2's outcome in a line."""
    best = ranked(scores)
    if not best:
        return f"subnets: none scored in study '{scores.study.study_name}' (every drawn subnet broke a constraint)"
    return (f"subnets: {len(best)} scored in study '{scores.study.study_name}', best inherited val_accuracy "
            f"{best[0].user_attrs['val_accuracy']:.4f} (subnet {best[0].number})")


def _phase1(spec: Spec, space: SupernetSpace, handle: StudyHandle, runs: StudyRuns, folder: Path, progress: bool,
            stop: threading.Event, seconds: RunSeconds, lines: bool = False) -> Path:
    """Train the supernet unless it is trained; a worker that does not own the training waits for it.
    ``lines``: a line per epoch every so often, as a trial prints them (for logs)."""
    while True:
        with study_lock(handle.url, handle.study.study_name):
            if handle.attr(TRAINED):
                return Path(handle.attr(TRAINED))
            owner = handle.attr(OWNER)
            mine = owner is None or owner == _worker_id() or _worker_dead(owner)
            if mine:
                handle.set_attr(OWNER, _worker_id())
        if mine:
            try:
                epochs = spec.search.supernet.epochs or spec.train.epochs
                path = train_supernet(spec, space, folder, runs.parent_id, progress=progress, stop=stop,
                                      seconds=seconds, on_epoch=EpochLines("supernet", epochs) if lines else None)
            except BaseException:
                # Given up at once: another worker (or this process, in Python) need not wait for it to exit.
                with study_lock(handle.url, handle.study.study_name):
                    if handle.attr(OWNER) == _worker_id():
                        handle.set_attr(OWNER, None)
                raise
            with study_lock(handle.url, handle.study.study_name):
                handle.set_attr(TRAINED, str(path.resolve()))
                handle.set_attr(TRAINED_EPOCHS, epochs)
            return path
        if stop.wait(2.0):  # another worker trains it (a worker on another host is trusted to finish)
            raise interruption("stopped while another worker trains the supernet")


def load_supernet(spec: Spec, space: SupernetSpace, weights: Path) -> Any:
    """The trained supernet, on this machine's device, in eval mode; a file that is gone, damaged or of another
    model is one line (CheckpointError, exit 2) naming it."""
    from ..checkpoints import load_checkpoint
    from ..errors import CheckpointMismatch
    from ..model.vit import build_vit
    from ..performance import cpu_only

    model = build_vit(supernet_spec(spec, space))
    # Phase 1 is over (the study says so): deleting the file does not train it again, another study does.
    afresh = "give the study a new search.study_name (or --storage) to train a new supernet"
    # Tensors only: the path comes from the study's storage, which other hosts can write.
    state = load_checkpoint(weights, f"the study's supernet, trained in phase 1: put the file back, or {afresh}")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:  # the space or the model changed since phase 1: other shapes or names
        said = (str(err).splitlines() or [""])[1:2] or [""]
        raise CheckpointMismatch(f"{weights}: the study's supernet was trained for another search.space or model "
                                 f"({said[0].strip()[:160]})", f"run with the spec it was trained with, or {afresh}") \
            from None
    device = "cuda" if torch.cuda.is_available() and not (spec.train.cpu or cpu_only()) else "cpu"
    return model.to(device).eval()


class SubnetScorer:
    """Phase 2's trials: a drawn subnet, checked against the constraints, scored with inherited weights."""

    def __init__(self, spec: Spec, space: SupernetSpace, weights: Path, stop: threading.Event | None = None):
        from ..data.loading import load_data, make_loader

        self.spec, self.space, self.stop = spec, space, stop
        self.model = load_supernet(spec, space, weights)
        device = next(self.model.parameters()).device
        data = load_data(spec.data, spec.seed, device=device)
        batch = spec.train.eval_batch_size or 4 * spec.train.batch_size
        self.val = make_loader(data.val, batch, shuffle=False, seed=spec.seed, num_workers=0)
        self.device = device

    def draw(self, trial: optuna.Trial) -> tuple[Spec, dict[str, Any]]:
        """The subnet's spec and drawn values; Infeasible when it cannot be built."""
        try:
            return sample_spec(self.spec, trial)
        except SpecError as err:
            trial.set_user_attr("pruned_reason", f"infeasible: {err.problems[0]}")
            raise Infeasible(err.problems[0]) from None

    def run(self, trial: optuna.Trial, drawn: tuple[Spec, dict[str, Any]]) -> list[float]:
        """Score the subnet: constraints first, then val loss and accuracy with the supernet's weights."""
        subnet, _ = drawn
        parameters, flops = model_cost(subnet.model)
        trial.set_user_attr("parameters", parameters)
        trial.set_user_attr("flops", flops)
        reason = check_constraints(self.spec.search.constraints, parameters, flops)
        if reason:
            trial.set_user_attr("pruned_reason", reason)
            raise Infeasible(reason)
        metrics = self.score(subnet)
        for key, value in metrics.items():
            trial.set_user_attr(key, value)
        return objective_values(self.spec, metrics, parameters, flops)

    @torch.no_grad()
    def score(self, subnet: Spec) -> dict[str, float]:
        """Validation loss and accuracy of ``subnet`` run inside the supernet; ``stop`` set ends it (queued again)."""
        set_subnet(self.model, subnet.model)
        loss = hits = count = 0.0
        for images, labels in self.val:
            if self.stop is not None and self.stop.is_set():
                raise interruption("stopped by the worker")
            images, labels = images.to(self.device), labels.to(self.device)
            logits = self.model(images)
            loss += torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum").item()
            hits += (logits.argmax(-1) == labels).sum().item()
            count += labels.numel()
        set_subnet(self.model, None)
        # No train_loss: a scored subnet was never trained on its own (the supernet's would mislead).
        return {"val_loss": loss / max(count, 1), "val_accuracy": hits / max(count, 1)}


def _phase2_done(handle: StudyHandle, n: int) -> bool:
    trials = handle.study.get_trials(deepcopy=False)
    return counted(trials) >= n and not any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials)


def _phase2(spec: Spec, handle: StudyHandle, space: SupernetSpace, weights: Path, runs: StudyRuns,
            stop: threading.Event) -> Any:
    """Score subnets until the study has ``n_subnets`` of them, then wait for other workers' to end."""
    search = spec.search
    if _phase2_done(handle, search.n_trials):  # nothing to score: the supernet need not be read (nor be there)
        return WorkerReport(handle.study.study_name, handle.url)
    scorer = SubnetScorer(spec, space, weights, stop)
    report = worker_loop(handle, search.n_trials, scorer.draw, scorer.run, timeout=search.timeout,
                         heartbeat=search.heartbeat_seconds, grace=search.grace_seconds, stop=stop)
    return report


def ranked(handle: StudyHandle) -> list[optuna.trial.FrozenTrial]:
    """Scored subnets, best first: the Pareto front first when several objectives, then by the first.

    Each subnet once (its first scoring): a space smaller than ``n_subnets`` is drawn again once every
    subnet has been, and a repeat scores what its first scoring did; ranked twice, it took the
    finalists' and the top runs' places of other subnets."""
    study = handle.study
    first: dict[tuple, optuna.trial.FrozenTrial] = {}
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.COMPLETE:
            first.setdefault(tuple(sorted((k, repr(v)) for k, v in t.params.items())), t)
    complete = list(first.values())
    sign = -1 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else 1
    front = {t.number for t in study.best_trials} if len(study.directions) > 1 and complete else set()
    return sorted(complete, key=lambda t: (t.number not in front, sign * t.values[0], t.number))


def _log_scores(handle: StudyHandle, spec: Spec, runs: StudyRuns, top: int) -> int:
    """Every scored subnet as one table (``subnets.csv`` on the parent run), the best ``top`` as child
    runs tagged ``supernet.phase``; returns how many child runs were made."""
    if not runs.enabled or not runs.parent_id:
        return 0
    from ..tracking import Tracker

    trials = ranked(handle)
    keys = [d.key for d in parse_space(spec.search.space)]
    out = io.StringIO()
    table = csv.writer(out)
    table.writerow(["rank", "trial", "val_accuracy", "val_loss", "parameters", "flops", *keys])
    for rank, t in enumerate(trials, 1):
        table.writerow([rank, t.number, t.user_attrs.get("val_accuracy"), t.user_attrs.get("val_loss"),
                        t.user_attrs.get("parameters"), t.user_attrs.get("flops"), *[t.params.get(k) for k in keys]])
    runs.client.log_text(runs.parent_id, out.getvalue(), "subnets.csv")
    runs.client.log_metric(runs.parent_id, "subnets_scored", len(trials))
    if trials:
        runs.client.log_metric(runs.parent_id, "best_inherited_val_accuracy", trials[0].user_attrs["val_accuracy"])
    # A worker killed while logging leaves some of these runs behind (LOGGED unset): those it finished
    # are kept, those it did not are deleted and made again, so that each top subnet has one run.
    done: dict[str, str] = {}  # trial number -> its run
    for old in runs.client.search_runs(
            [runs.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{runs.parent_id}' and "
                                                f"tags.`supernet.phase` = '2: scored subnet'"):
        if old.info.status == "FINISHED":
            done[old.data.tags.get("subnets.trial_number")] = old.info.run_id
        else:
            runs.client.delete_run(old.info.run_id)
    rank_of = {str(t.number): rank for rank, t in enumerate(trials, 1)}
    for number, run_id in done.items():  # more subnets scored since (n_subnets raised): ranks move
        if number in rank_of:
            runs.client.set_tag(run_id, "supernet.rank", str(rank_of[number]))
    for rank, t in enumerate(trials[:top], 1):
        if str(t.number) in done:
            continue
        subnet_spec = load_spec({**{k: v for k, v in spec.raw.items() if k != "search"},
                                 "model": SupernetSpace.of(spec).model(t.params).model_dump(mode="json",
                                                                                           by_alias=True)})
        tracker = Tracker(subnet_spec)
        tags = {**runs.study_tags(), "supernet.phase": "2: scored subnet", "supernet.rank": str(rank),
                "optuna.study_name": handle.study.study_name, "subnets.trial_number": str(t.number),
                "subnet": describe_subnet(subnet_spec.model)}
        with tracker.run(parent_run_id=runs.parent_id, run_name=f"subnet {t.number} (rank {rank})", tags=tags):
            tracker.log_start(t.user_attrs.get("parameters", 0), t.user_attrs.get("flops", 0), "none")
            tracker.log_metrics({f"inherited_{k}": t.user_attrs[k] for k in ("val_accuracy", "val_loss")})
    return min(top, len(trials))


def _check_finalists_init(finals: StudyHandle, init: str) -> None:
    """Record how the study's finalists start; where this worker's start otherwise, say so (as for the values
    every trial shares): its finalists join a leaderboard of finalists that started another way."""
    record_or_tell(finals, FINALISTS_INIT, init, lambda first: (
        f"note: search.supernet.finalists_init {init} differs from study '{finals.study.study_name}', whose first "
        f"finalists started from {first}: this worker's finalists join the same leaderboard; set a new "
        f"search.study_name to keep them apart"))


def inherited_file(folder: Path, number: int) -> Path:
    """Finalist ``number``'s start: its slice of the supernet's weights (``finalists_init: inherited``)."""
    return folder / f"inherited-{number}.pt"


class FinalistRunner(TrialRunner):
    """Phase 3's trials: the best scored subnets, enqueued once, trained as ordinary trials."""

    def __init__(self, spec: Spec, handle: StudyHandle, runs: StudyRuns, scores: StudyHandle, space: SupernetSpace,
                 weights: Path, folder: Path, stop: threading.Event, lines: bool = False):
        super().__init__(spec, handle, runs, 1, stop, folder, lines)
        self.scores, self.space, self.weights = scores, space, weights
        self._supernet: Any = None

    def enqueue_finalists(self) -> int:
        """Under the study's lock: queue the best scored subnets that are not finalists yet, until the study
        holds ``finalists`` of them (``finalists`` raised on a trained study adds the next ranks); returns
        how many trials the study is to have: fewer where fewer subnets were scored. Only scored subnets
        are trained: the study's sampler draws none."""
        dims = parse_space(self.spec.search.space)
        study = self.handle.study
        trials = study.get_trials(deepcopy=False)
        taken = {t.user_attrs.get("subnets.trial_number") for t in trials}
        best = ranked(self.scores)
        have = counted(trials)
        target = max(min(self.spec.search.supernet.finalists, len(best)), have)
        for scored in best:
            if have >= target:
                break
            if scored.number in taken:
                continue
            study.enqueue_trial(to_params(dims, scored.params), skip_if_exists=False,
                                user_attrs={"inherited_val_accuracy": scored.user_attrs["val_accuracy"],
                                            "subnets.trial_number": scored.number})
            have += 1
        return target

    def draw(self, trial: optuna.Trial) -> tuple[Spec, dict[str, Any]]:
        """The finalist's spec; with ``finalists_init: inherited`` it starts from its slice of the supernet."""
        trial_spec, values = super().draw(trial)
        if self.spec.search.supernet.finalists_init == "inherited":
            path = inherited_file(self.checkpoints, trial.number)
            try:
                if self._supernet is None:  # read once, for the worker's finalists: a few need not read it each
                    self._supernet = load_supernet(self.spec, self.space, self.weights).cpu()
            except UserError as err:  # gone or damaged since phase 1: every finalist would meet it
                with self._failed_run(trial, trial_spec, values):
                    raise StopWorker(f"{err} (trial {trial.number} is queued again)", exit_code=2) from None
            try:
                save_atomically(path, {"model": subnet_state_dict(self._supernet, trial_spec.model),
                                       "model_spec": trial_spec.model.model_dump(by_alias=True)},  # int layer keys
                                "the finalist's inherited weights")
            except CheckpointNotWritten as err:  # every finalist would meet the full disk or the limit: none is lost
                with self._failed_run(trial, trial_spec, values):
                    raise StopWorker(f"{err} (trial {trial.number} is queued again; then run the same command)") \
                        from None
            raw = trial_spec.raw
            raw["model"]["init"] = {"from": "file", "path": str(path.resolve())}
            trial_spec = load_spec(raw, check_model=True)
        return trial_spec, values

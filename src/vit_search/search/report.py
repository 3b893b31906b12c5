"""What a study tells its user: the best trial (or Pareto front), a table of top trials, plots."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from ..schema import Spec
from .fixed import check_reproduces
from .leaderboard import ranked
from .study import trial_spec


def best_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The best trial (one objective) or the Pareto front (several); empty before any completes."""
    if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        return []
    return [study.best_trial] if len(study.directions) == 1 else list(study.best_trials)


def best_spec(spec: Spec, study: optuna.Study, shared: dict[str, Any] | None = None) -> Spec:
    """The best trial as a plain spec (no search section) that ``vit-search train`` reproduces; ``shared``,
    the study's recorded shared values: a spec that gives others is refused (StudyMismatch)."""
    trials = best_trials(study)
    if not trials:
        raise ValueError(f"study '{study.study_name}' has no completed trial yet; run it first")
    best = trials[0]
    check_reproduces(spec, shared, best, study.study_name)
    # Its retrained run, tagged so, is found beside the trial it repeats (it takes the study's name otherwise).
    tags = {"vit_search.retrain_of": f"study {study.study_name} trial {best.number}"}
    if best.user_attrs.get("mlflow_run_id"):
        tags["vit_search.retrain_of_run"] = best.user_attrs["mlflow_run_id"]
    return trial_spec(spec, best.params, tags)


def top_table(study: optuna.Study, limit: int = 10) -> str:
    """The top trials by the first objective, as aligned text."""
    complete = ranked(study)
    states = {s: sum(t.state == s for t in study.get_trials(deepcopy=False)) for s in TrialState}
    header = (f"study '{study.study_name}': {states[TrialState.COMPLETE]} complete, "
              f"{states[TrialState.PRUNED]} pruned, {states[TrialState.FAIL]} failed")
    if states[TrialState.RUNNING]:  # another worker's, still training: the study is not over
        header += f", {states[TrialState.RUNNING]} running"
    if states[TrialState.WAITING]:  # queued (an interrupted trial's retry, enqueued points): the study is not over
        header += f", {states[TrialState.WAITING]} queued"
    if not complete:
        return header
    keys = sorted({k for t in complete[:limit] for k in t.params})
    rows = [["trial", "value", "test_acc", "params", *keys]]
    for t in complete[:limit]:
        rows.append([str(t.number), ", ".join(f"{v:.4f}" for v in t.values),
                     f"{t.user_attrs.get('test_accuracy', float('nan')):.4f}",
                     f"{t.user_attrs.get('parameters', 0):,}",
                     *[_short(t.params.get(k, "-")) for k in keys]])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join([header, lines[0], "-" * len(lines[0]), *lines[1:]])


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def save_plots(study: optuna.Study, folder: Path) -> list[Path]:
    """Optuna's history, importance and parallel-coordinate plots as PNG files (what can be drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vis

    plots = {"optimization_history": vis.plot_optimization_history, "param_importances": vis.plot_param_importances,
             "parallel_coordinate": vis.plot_parallel_coordinate}
    if len(study.directions) > 1:
        plots = {"pareto_front": vis.plot_pareto_front}
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return []  # nothing to draw (Optuna would say so on stderr, once per plot)
    saved = []
    verbosity = optuna.logging.get_verbosity()
    for name, plot in plots.items():
        try:
            optuna.logging.set_verbosity(optuna.logging.ERROR)  # "too few trials" is the except below's business
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = plot(study)
        except (ValueError, RuntimeError, ZeroDivisionError):  # too few trials for this plot yet
            continue
        finally:
            optuna.logging.set_verbosity(verbosity)
        figure = getattr(axes, "figure", None) or axes.flat[0].figure
        figure.set_size_inches(10, 6)
        path = folder / f"{name}.png"
        figure.savefig(path, dpi=90, bbox_inches="tight")
        plt.close(figure)
        saved.append(path)
    return saved


def all_failed(study: optuna.Study, numbers: list[int]) -> str | None:
    """When every one of these trials failed (a full disk, a broken block): one line saying so, with the
    last trial's error; None when any trained or was pruned."""
    trials = study.get_trials(deepcopy=False)
    mine = [trials[n] for n in numbers if n < len(trials)]
    if not mine or any(t.state != TrialState.FAIL for t in mine):
        return None
    return (f"all {len(mine)} trials this worker ran failed; the last: "
            f"{mine[-1].user_attrs.get('error', 'no error recorded')}")

"""What a study tells its user: the best trial (or Pareto front), a table of top trials, plots, and
the study's MLflow parent run brought up to date."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from ..spec import Spec
from .study import PARENT_RUN, StudyHandle, trial_spec


def best_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The best trial (one objective) or the Pareto front (several); empty before any completes."""
    if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        return []
    return [study.best_trial] if len(study.directions) == 1 else list(study.best_trials)


def best_spec(spec: Spec, study: optuna.Study) -> Spec:
    """The best trial as a plain spec (no search section) that ``vit-search train`` reproduces."""
    trials = best_trials(study)
    if not trials:
        raise ValueError(f"study '{study.study_name}' has no completed trial yet; run it first")
    return trial_spec(spec, trials[0].params)


def top_table(study: optuna.Study, limit: int = 10) -> str:
    """The top trials by the first objective, as aligned text."""
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    reverse = study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
    complete.sort(key=lambda t: t.values[0], reverse=reverse)
    states = {s: sum(t.state == s for t in study.get_trials(deepcopy=False)) for s in TrialState}
    header = (f"study '{study.study_name}': {states[TrialState.COMPLETE]} complete, "
              f"{states[TrialState.PRUNED]} pruned, {states[TrialState.FAIL]} failed")
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
    saved = []
    for name, plot in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = plot(study)
        except (ValueError, RuntimeError, ZeroDivisionError):  # too few trials for this plot yet
            continue
        figure = getattr(axes, "figure", None) or axes.flat[0].figure
        figure.set_size_inches(10, 6)
        path = folder / f"{name}.png"
        figure.savefig(path, dpi=90, bbox_inches="tight")
        plt.close(figure)
        saved.append(path)
    return saved


def update_parent_run(client: Any, handle: StudyHandle, spec: Spec, interrupted: bool = False) -> None:
    """Give the study's parent run the best trial's metrics and spec, the plots and the counts.

    Called by each worker as it finishes (and so again on resume); the last one to finish ends
    the run: KILLED when it was interrupted, else FINISHED (all trials run, the grid covered, or
    the time limit reached; re-running the study reopens it).
    """
    study, parent = handle.study, handle.attr(PARENT_RUN)
    if not parent:
        return
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
        client.log_text(parent, best_spec(spec, study).to_yaml(exclude_search=True), "best_spec.yaml")
    if spec.tracking.plots:
        with tempfile.TemporaryDirectory() as tmp:
            for path in save_plots(study, Path(tmp)):
                client.log_artifact(parent, str(path), "plots")
    running = any(t.state == TrialState.RUNNING for t in trials)
    waiting = any(t.state == TrialState.WAITING for t in trials)  # interrupted trials wait for a re-run
    if not running and (interrupted or not waiting):
        client.set_terminated(parent, "KILLED" if interrupted else "FINISHED")

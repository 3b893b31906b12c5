"""How a study reads in MLflow's UI: trial run names that carry their values and score, the parent run's
description (a leaderboard of the top trials) and the address of the study's trials compared.

What MLflow 3 honours (checked in its UI, 3.17): the ``mlflow.note.content`` tag is a run's
description, rendered as markdown on the run's page; the runs table keeps its filter, order and view
in the address's fragment (``searchFilter``, ``orderByKey``, ``orderByAsc``, ``compareRunsMode``), and
lists nested runs flat, not folded under their parent, once the filter is set and the order is not
the default start time.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable, Mapping
from urllib.parse import quote

import optuna
from optuna.trial import FrozenTrial, TrialState

NOTE_TAG = "mlflow.note.content"  # MLflow's UI shows this tag as the run's description
MAX_VALUE_CHARS = 16  # a whole block as a choice is YAML text: clipped in names and tables


def filter_value(text: str) -> str:
    """``text`` quoted for an MLflow search filter: in single quotes, or in double ones where it holds a
    single quote (MLflow's filter parser takes no escapes; the schema refuses names holding both)."""
    return f'"{text}"' if "'" in text else f"'{text}'"


def short_key(key: str) -> str:
    """A searched key as a column or name reads it: its last part (``model.depth`` -> ``depth``), or the
    block for a block's type (``model.pooling.type`` -> ``pooling``)."""
    parts = key.split(".")
    return parts[-2] if parts[-1] == "type" and len(parts) > 1 else parts[-1]


def short_keys(keys: Iterable[str]) -> dict[str, str]:
    """Each key's :func:`short_key`, but where two would read alike (``model.layers.0.ffn.ratio`` and
    ``model.layers.1.ffn.ratio``, both ``ratio``): those keep all but ``model.`` (``layers.0.ffn.ratio``)."""
    keys = list(keys)
    short = {key: short_key(key) for key in keys}
    alike = Counter(short.values())
    return {key: key.removeprefix("model.") if alike[name] > 1 else name for key, name in short.items()}


def short_value(value: Any) -> str:
    """A value as a name or table shows it: floats to 3 significant digits, long text clipped."""
    text = f"{value:.3g}" if isinstance(value, float) else str(value)
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 1] + "…"


def trial_run_name(number: int, params: Mapping[str, Any], score: str | None = None) -> str:
    """``trial 7 · depth 6 · heads 4 · val_accuracy 0.9861``: the trial's searched values, then its score."""
    names = short_keys(params)
    parts = [f"trial {number}", *(f"{names[k]} {short_value(v)}" for k, v in params.items())]
    return " · ".join(parts + ([score] if score else []))


def score_of(frozen: FrozenTrial, metrics: list[str]) -> str | None:
    """What a finished trial's name ends with: its objective values, or how it ended."""
    if frozen.state == TrialState.COMPLETE and frozen.values:
        return " · ".join(f"{m} {v:.4g}" for m, v in zip(metrics, frozen.values))
    return {TrialState.PRUNED: "pruned", TrialState.FAIL: "failed"}.get(frozen.state)


def ranked(study: optuna.Study) -> list[FrozenTrial]:
    """The complete trials, best first by the first objective."""
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE and t.values]
    maximize = study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
    return sorted(complete, key=lambda t: t.values[0], reverse=maximize)


def leaderboard(study: optuna.Study, metrics: list[str], experiment_id: str, limit: int = 10) -> str:
    """The parent run's description: counts, then a markdown table of the top trials linking to their runs."""
    trials = study.get_trials(deepcopy=False)
    counts = {s: sum(t.state == s for t in trials) for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    lines = [f"**Study `{study.study_name}`**: {counts[TrialState.COMPLETE]} complete, "
             f"{counts[TrialState.PRUNED]} pruned, {counts[TrialState.FAIL]} failed.", ""]
    top = ranked(study)[:limit]
    if not top:
        return "\n".join(lines + ["No trial has completed yet."])
    keys = sorted({k for t in top for k in t.params})
    lines.append(f"Top {len(top)} trials:")
    lines.append("")
    header = ["rank", "trial", *metrics, "test_accuracy", "parameters", *short_keys(keys).values()]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for rank, trial in enumerate(top, 1):
        run = trial.user_attrs.get("mlflow_run_id")
        link = f"[trial {trial.number}](#/experiments/{experiment_id}/runs/{run})" if run else f"trial {trial.number}"
        test = trial.user_attrs.get("test_accuracy")
        row = [str(rank), link, *(f"{v:.4f}" for v in trial.values), "-" if test is None else f"{test:.4f}",
               f"{trial.user_attrs.get('parameters', 0):,}", *(short_value(trial.params.get(k, "-")) for k in keys)]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
    return "\n".join(lines)


def trials_address(experiment_id: str, study_name: str | None = None, metric: str | None = None,
                   maximize: bool = True) -> str:
    """The runs table's address fragment: the study's trial runs listed flat, best first, compared in
    charts; without a study, the experiment's runs table."""
    # MLflow 3 opens in its GenAI view unless asked for the machine-learning runs table.
    view = f"#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    if study_name is None:
        return view
    # The parent-run clause keeps the parent itself out; with a filter and an order other than the
    # start time, MLflow lists nested runs flat instead of folded under their parent.
    search = f"tags.`optuna.study_name` = {filter_value(study_name)} and tags.`mlflow.parentRunId` LIKE '%'"
    order = f"metrics.`{metric}`" if metric else "attributes.run_name"
    return (f"{view}&compareRunsMode=CHART&searchFilter={quote(search, safe='')}"
            f"&orderByKey={quote(order, safe='')}&orderByAsc={'false' if maximize and metric else 'true'}")

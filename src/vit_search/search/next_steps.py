"""What ``vit-search run`` says when it ends: the best trial, and the commands to take it further with
the study's own arguments (``--set``, ``--storage``), never a password."""

from __future__ import annotations

import json
import shlex

import optuna

from ..redaction import redact, scrub
from ..schema import Spec
from .fixed import SHARED_VALUES, trained_with
from .report import best_trials
from .storage import STORAGE_ENV


def next_steps(spec_path: str, overrides: list[str], storage: str | None, study: optuna.Study,
               tracked: bool = True, spec: Spec | None = None) -> list[str]:
    """Lines naming the best trial (or the Pareto front) and the ``best --export``, ``train`` and (where
    the study logged to MLflow: ``tracked``) ``ui`` commands for this study; ``storage`` is the
    ``--storage`` given, if any. ``spec`` (as this command loaded it): where the best trial was trained
    under other values (another worker's ``--set``), the ``best`` command passes those."""
    best = best_trials(study)
    if not best:
        return []
    top = best[0]
    if len(best) > 1:
        lines = [f"Pareto front: trials {', '.join(str(t.number) for t in best)}"]
    else:
        test = top.user_attrs.get("test_accuracy")
        lines = [f"best: trial {top.number} ({top.value:.4f}" + (f", test_accuracy {test:.4f})" if test is not None else ")")]
    secret = [o for o in overrides if scrub(o) != o]  # a URL with a password in it: never on the screen
    study_args = [spec_path, *(f"--set={o}" for o in overrides if o not in secret)]
    best_args = study_args
    if spec is not None:
        stored = study._storage.get_study_system_attrs(study._study_id).get(SHARED_VALUES)
        needed = trained_with(spec, stored, top)
        best_args = [spec_path, *(f"--set={o}" for o in overrides if o not in secret and _key(o) not in needed),
                     *(f"--set={key}={json.dumps(value)}" for key, value in needed.items())]
    for override in secret:
        key = _key(override)
        where = _ENVIRONMENT.get(key)
        lines.append(f"--set {key}=... holds a password and is left out of these commands: "
                     + (f"set {where} to its URL before them" if where else "give it again yourself"))
    storage_args: list[str] = []
    if storage is not None and redact(storage) != storage:
        # A password stays off the screen and the shell's history: the environment carries it.
        lines.append(f"the storage holds a password: set {STORAGE_ENV} to its URL before these commands")
    elif storage is not None:
        storage_args = [f"--storage={storage}"]
    lines += [
        "next:",
        f"  {_command('best', *best_args, *storage_args, '--export', 'best.yaml')}   # the best trial as a plain spec",
        "  vit-search train best.yaml   # retrain it as a single run",
    ]
    if tracked:
        lines.append(f"  {_command('ui', *study_args)}   # compare the trials in MLflow's UI")
    return lines


# Where a URL can come from instead of a --set that would show its password.
_ENVIRONMENT = {"search.storage": STORAGE_ENV, "tracking.uri": "MLFLOW_TRACKING_URI", "model.init.uri": "MLFLOW_TRACKING_URI"}


def study_command(verb: str, spec_path: str, overrides: list[str], storage: str | None) -> str:
    """``vit-search VERB SPEC`` with the command's ``--set`` and ``--storage``, for a line that sends the
    user to another command; those holding a password are left out (the environment carries them)."""
    storage_args = [f"--storage={storage}"] if storage is not None and redact(storage) == storage else []
    return _command(verb, spec_path, *(f"--set={o}" for o in overrides if scrub(o) == o), *storage_args)


def _key(override: str) -> str:
    return override.split("=", 1)[0].strip()


def _command(*args: str) -> str:
    return shlex.join(["vit-search", *args])

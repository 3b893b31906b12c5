"""Grid search whose end the worker loop can see while other workers still train grid points."""

from __future__ import annotations

import math
from typing import Any

import optuna
from optuna.trial import TrialState


class Grid(optuna.samplers.GridSampler):
    """Optuna's grid, whose end the worker loop reads (``all_started``): the ``study.stop()`` it
    would call works only inside ``Study.optimize``."""

    def __init__(self, search_space: dict[str, list[Any]], seed: int | None = None):
        super().__init__(search_space, seed=seed)
        self.size = math.prod(len(values) for values in search_space.values())

    def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
        return None

    def all_started(self, study: optuna.Study) -> bool:
        """Every grid point finished or running. (``is_exhausted`` waits for the running ones, so a
        worker asking meanwhile would draw a point another worker is training.)"""
        started = {t.system_attrs.get("grid_id") for t in study.get_trials(
            deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING))}
        return set(range(self.size)) <= started

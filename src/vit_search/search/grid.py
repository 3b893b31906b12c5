"""Grid search that tries every point once, enqueued trials included, and whose end the worker loop can
see while other workers still train grid points."""

from __future__ import annotations

import math
from typing import Any, Mapping

import optuna
from optuna.trial import TrialState

_STARTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)


class Grid(optuna.samplers.GridSampler):
    """Optuna's grid, with two changes.

    Each trial gets a point no trial has yet (``grid_id``, in the grid's seeded order). Optuna's gives
    trial *n* point *n* and an enqueued trial no point: the enqueued point was then trained twice and
    another never. Here an enqueued trial takes the point that holds its values, and the keys it
    leaves out come from an unused such point. Points are chosen in ``study.ask()``, which the worker
    loop calls under the study's lock, so no two workers take the same one.

    The worker loop reads the grid's end (``all_started``): the ``study.stop()`` Optuna's would call
    works only inside ``Study.optimize``.
    """

    def __init__(self, search_space: dict[str, list[Any]], seed: int | None = None):
        super().__init__(search_space, seed=seed)
        self.size = math.prod(len(values) for values in search_space.values())

    def before_trial(self, study: Any, trial: Any) -> None:
        """Give ``trial`` its grid point: the first unused one that holds its enqueued values (all
        points for a fresh trial); a point already tried only when every such point is."""
        if "grid_id" in trial.system_attrs:  # Optuna's retry of a stale trial keeps its point
            return
        fitting = self._points(self._fixed(trial))
        if not fitting:  # a value off the grid: the trial runs its own values (Optuna refuses a key left out)
            return
        taken = self._started(study) | self._pinned(study)
        grid_id = next((i for i in fitting if i not in taken), None)
        if grid_id is None:  # all tried or running: repeat one, as Optuna does
            grid_id = int(self._rng.rng.choice(fitting))
        study._storage.set_trial_system_attr(trial._trial_id, "search_space", self._search_space)
        study._storage.set_trial_system_attr(trial._trial_id, "grid_id", grid_id)

    def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
        return None

    def all_started(self, study: optuna.Study) -> bool:
        """Every grid point finished or running. (``is_exhausted`` waits for the running ones, so a
        worker asking meanwhile would draw a point another worker is training.)"""
        return set(range(self.size)) <= self._started(study)

    def _started(self, study: optuna.Study) -> set[int]:
        """The points of trials that finished or are running."""
        return {t.system_attrs["grid_id"] for t in study.get_trials(deepcopy=False, states=_STARTED)
                if "grid_id" in t.system_attrs}

    def _pinned(self, study: optuna.Study) -> set[int]:
        """The points queued trials that give every value will take: a trial that leaves keys out,
        asked before them, takes another."""
        pinned = set()
        for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            if set(self._param_names) <= set(self._fixed(t)):
                pinned.update(self._points(self._fixed(t)))
        return pinned

    @staticmethod
    def _fixed(trial: Any) -> Mapping[str, Any]:
        """An enqueued trial's values ({} for a fresh trial)."""
        return trial.system_attrs.get("fixed_params") or {}

    def _points(self, fixed: Mapping[str, Any]) -> range | list[int]:
        """The points that have each of the ``fixed`` values (every point when none is fixed)."""
        if not fixed:
            return range(self.size)
        return [i for i, point in enumerate(self._all_grids)
                if all(name not in fixed or _same(value, fixed[name]) for name, value in zip(self._param_names, point))]


def _same(grid_value: Any, value: Any) -> bool:
    """Whether an enqueued ``value`` is ``grid_value``: a yes/no only where the grid has one (YAML's
    true is 1 to Python), a number also a step computed with rounding (``0.1 + 0.2``)."""
    if isinstance(grid_value, bool) or isinstance(value, bool):
        return grid_value is value
    if isinstance(grid_value, (int, float)) and isinstance(value, (int, float)):
        return math.isclose(grid_value, value, rel_tol=1e-9) or grid_value == value
    return grid_value == value

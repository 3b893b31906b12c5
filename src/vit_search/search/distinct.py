"""Distinct points: every trial of a study gets a point no other trial has, while unused ones remain.

Optuna samplers draw from one random state seeded once per process, so workers started with the
same seed draw the same start-up points, and a resumed study draws its first points again. Here a
trial's random state is seeded from (the spec's seed, the trial's number): one worker on a fresh
study draws the same sequence every time; any two trials of a study, in any worker, draw from
different states. A drawn point that another trial already has (a running, finished or queued one)
is drawn again, first by the study's own sampler with another seed, then uniformly at random, and
for a small finite space from the points no trial has yet. Only an exhausted space repeats a point.

The whole point is drawn at once (as Optuna's "relative" parameters), so the check sees all of it.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler, RandomSampler
from optuna.trial import FrozenTrial, TrialState

from .space import Dimension, set_path

# Draws by the study's own sampler (reseeded) before uniform random ones; then, for finite spaces
# up to ENUMERATE_LIMIT points, a pick among the unused ones.
MODEL_ATTEMPTS = 3
RANDOM_ATTEMPTS = 32
ENUMERATE_LIMIT = 20_000

Point = dict[str, Any]


def trial_seed(seed: int | None, number: int, attempt: int = 0) -> int:
    """The seed of one draw: a hash of the spec's seed, the trial number and the attempt."""
    entropy = [0 if seed is None else seed & 0xFFFFFFFF, number, attempt]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def point_key(point: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    """A hashable form of a point, for comparing points."""
    return tuple(sorted(point.items()))


def used_points(study: optuna.Study, exclude: int | None = None) -> set[tuple[tuple[str, Any], ...]]:
    """The points trials of ``study`` already have: drawn (any state) or queued (fixed values)."""
    used = set()
    for t in study.get_trials(deepcopy=False):
        if t.number == exclude:
            continue
        point = t.system_attrs.get("fixed_params") if t.state == TrialState.WAITING else t.params
        if point:
            used.add(point_key(point))
    return used


class DistinctSampler(BaseSampler):
    """Wraps a sampler (made by ``make(seed)``) so that each trial draws a point no other trial has.

    ``dims`` and ``base`` (the raw spec) say which dimensions apply to a point: a block's own
    argument only where its block type is drawn.
    """

    def __init__(self, make: Callable[[int], BaseSampler], dims: Sequence[Dimension], base: Mapping[str, Any],
                 seed: int | None):
        self._make, self._dims, self._base, self._seed = make, list(dims), copy.deepcopy(dict(base)), seed
        self._sampler = make(trial_seed(seed, 0, attempt=2**31))  # before/after_trial bookkeeping only
        self._finite = _space_size(self._dims, self._base) is not None

    @property
    def base_sampler(self) -> BaseSampler:
        """The wrapped sampler (one instance of it)."""
        return self._sampler

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return {dim.key: dim.distribution() for dim in self._dims}

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        if trial.system_attrs.get("fixed_params"):  # an enqueued or retried trial: its values are given
            return {}
        used = used_points(study, exclude=trial.number)
        point: Point = {}
        for attempt in range(MODEL_ATTEMPTS + RANDOM_ATTEMPTS):
            seed = trial_seed(self._seed, trial.number, attempt)
            sampler = self._make(seed) if attempt < MODEL_ATTEMPTS else RandomSampler(seed=seed)
            point = self._draw(sampler, study, trial)
            if point_key(point) not in used:
                return point
        if self._finite:
            unused = [p for p in enumerate_points(self._dims, self._base, ENUMERATE_LIMIT) or []
                      if point_key(p) not in used]
            if unused:
                return unused[np.random.RandomState(trial_seed(self._seed, trial.number)).randint(len(unused))]
        return point  # every point is taken (or nearly): the space is exhausted

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        # Only for parameters outside search.space (none in vit-search's own trials).
        return self._sampler.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._sampler.before_trial(study, trial)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        self._sampler.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        return None  # each draw is seeded from its trial number already

    def _draw(self, sampler: BaseSampler, study: optuna.Study, trial: FrozenTrial) -> Point:
        """One whole point from ``sampler``: its joint ("relative") draw, the rest one by one."""
        relative_space = sampler.infer_relative_search_space(study, trial)
        relative = sampler.sample_relative(study, trial, relative_space) if relative_space else {}
        raw, point = copy.deepcopy(self._base), {}
        for dim in self._dims:
            if not dim.applies(raw):
                continue
            distribution = dim.distribution()
            if distribution.single():
                value = optuna.distributions._get_single_value(distribution)
            elif dim.key in relative and dim.key in relative_space:
                value = relative[dim.key]
            else:
                value = sampler.sample_independent(study, trial, dim.key, distribution)
            point[dim.key] = value
            set_path(raw, dim.path, dim.value_of(value))
        return point


def _space_size(dims: Sequence[Dimension], base: Mapping[str, Any]) -> int | None:
    """An upper bound on the number of points when every dimension is finite, else None."""
    sizes = [dim.size() for dim in dims]
    return None if any(s is None for s in sizes) else int(np.prod(sizes, dtype=object))


def enumerate_points(dims: Sequence[Dimension], base: Mapping[str, Any], limit: int) -> list[Point] | None:
    """Every point of a finite space (conditions applied), or None when it has more than ``limit``."""
    size = _space_size(dims, base)
    if size is None or size > limit:
        return None
    return list(itertools.islice(_walk(list(dims), copy.deepcopy(dict(base)), {}), limit))


def _walk(dims: list[Dimension], raw: dict[str, Any], point: Point) -> Iterator[Point]:
    if not dims:
        yield dict(point)
        return
    dim, rest = dims[0], dims[1:]
    if not dim.applies(raw):
        yield from _walk(rest, raw, point)
        return
    for value in dim.grid():
        filled = copy.deepcopy(raw)
        set_path(filled, dim.path, dim.value_of(value))
        yield from _walk(rest, filled, {**point, dim.key: value})

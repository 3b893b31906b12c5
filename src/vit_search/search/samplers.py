"""The samplers and pruners a spec can name: one table each, which the spec schema takes its names from.

Optuna is imported when a sampler or pruner is made, not when the tables are read, so a spec loads
without it. Adding one is an entry here (and a line in docs/search.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:
    from optuna.pruners import BasePruner
    from optuna.samplers import BaseSampler

    from .space import Dimension


def _tpe(seed: int, dims: Sequence["Dimension"], n_trials: int | None) -> "BaseSampler":
    import optuna

    # group + multivariate: TPE models conditional parameters only where they apply; the constant
    # liar lets a worker see the points other workers are still training (drawn under the study lock).
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True,
                                      n_startup_trials=max(4, min(10, (n_trials or 20) // 4)))


def _random(seed: int, dims: Sequence["Dimension"], n_trials: int | None) -> "BaseSampler":
    import optuna

    return optuna.samplers.RandomSampler(seed=seed)


def _grid(seed: int, dims: Sequence["Dimension"], n_trials: int | None) -> "BaseSampler":
    from .grid import Grid

    return Grid({d.key: d.grid() for d in dims}, seed=seed)


def _cmaes(seed: int, dims: Sequence["Dimension"], n_trials: int | None) -> "BaseSampler":
    import optuna

    return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)


def _gp(seed: int, dims: Sequence["Dimension"], n_trials: int | None) -> "BaseSampler":
    import optuna

    return optuna.samplers.GPSampler(seed=seed)


def _nsga2(seed: int, dims: Sequence["Dimension"], n_trials: int | None) -> "BaseSampler":
    import optuna

    return optuna.samplers.NSGAIISampler(seed=seed)


SAMPLERS: dict[str, Callable[[int, Sequence[Any], int | None], "BaseSampler"]] = {
    "tpe": _tpe, "random": _random, "grid": _grid, "cmaes": _cmaes, "gp": _gp, "nsga2": _nsga2,
}
"""``search.sampler`` name -> factory(seed, dimensions, n_trials)."""


def _hyperband(epochs: int) -> "BasePruner":
    import optuna

    return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs, reduction_factor=3)


def _median(epochs: int) -> "BasePruner":
    import optuna

    return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=max(1, epochs // 5))


def _successive_halving(epochs: int) -> "BasePruner":
    import optuna

    return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)


def _none(epochs: int) -> "BasePruner":
    import optuna

    return optuna.pruners.NopPruner()


PRUNERS: dict[str, Callable[[int], "BasePruner"]] = {
    "hyperband": _hyperband, "median": _median, "successive_halving": _successive_halving, "none": _none,
}
"""``search.pruner`` name -> factory(epochs): the resource unit is one epoch."""

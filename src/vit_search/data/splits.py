"""scikit-learn's ``train_test_split`` (shuffled, stratified or not), index for index, without importing it.

``sklearn.model_selection`` takes 1.5-2 s to import (it brings in most of scikit-learn), paid by every
process that reads a data set: each command, each ``--jobs`` worker, each launched process. The splits
must stay the ones scikit-learn draws, or a study resumed under a new version would validate its later
trials on other images than its first: this follows scikit-learn 1.9's ``ShuffleSplit`` and
``StratifiedShuffleSplit`` (the same ``RandomState`` draws in the same order), and
tests/test_data.py checks it against scikit-learn over many sizes, shares, seeds and class counts.
"""

from __future__ import annotations

import math

import numpy as np


def train_test_split(index: np.ndarray, test_size: float | int, random_state: int,
                     stratify: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``index`` split (kept, held out), ``test_size`` a share (float) or a count (int) held out, as
    ``sklearn.model_selection.train_test_split(index, test_size=..., stratify=..., random_state=...)``
    splits it; ValueError where that refuses the sizes (a side left empty, a class of one image when
    stratified, fewer images on a side than classes)."""
    n_samples = len(index)
    n_train, n_test = _sizes(n_samples, test_size)
    rng = np.random.RandomState(random_state)
    if stratify is None:
        permutation = rng.permutation(n_samples)
        return index[permutation[n_test:n_test + n_train]], index[permutation[:n_test]]
    classes, y_indices, class_counts = np.unique(stratify, return_inverse=True, return_counts=True)
    if class_counts.min() < 2:
        raise ValueError("the least populated class has only 1 member")
    if n_train < len(classes) or n_test < len(classes):
        raise ValueError(f"{n_train} kept and {n_test} held out: fewer than the {len(classes)} classes")
    class_indices = np.split(np.argsort(y_indices, kind="stable"), np.cumsum(class_counts)[:-1])
    kept_per_class = _approximate_mode(class_counts, n_train, rng)
    held_per_class = _approximate_mode(class_counts - kept_per_class, n_test, rng)
    kept: list[int] = []
    held: list[int] = []
    for i, members in enumerate(class_indices):
        shuffled = members.take(rng.permutation(class_counts[i]), mode="clip")
        kept.extend(shuffled[:kept_per_class[i]])
        held.extend(shuffled[kept_per_class[i]:kept_per_class[i] + held_per_class[i]])
    # scikit-learn shuffles each side last; its callers here sort them, and nothing draws after it.
    return index[np.asarray(kept, dtype=np.int64)], index[np.asarray(held, dtype=np.int64)]


def _sizes(n_samples: int, test_size: float | int) -> tuple[int, int]:
    """(kept, held out) counts, as scikit-learn's ``_validate_shuffle_split`` makes them (train_size unset)."""
    if isinstance(test_size, float):
        if not 0 < test_size < 1:
            raise ValueError(f"test_size={test_size} should be a float in the (0, 1) range")
        n_test = math.ceil(test_size * n_samples)
    else:
        if not 0 < test_size < n_samples:
            raise ValueError(f"test_size={test_size} should be positive and smaller than {n_samples}")
        n_test = int(test_size)
    n_train = n_samples - n_test
    if n_train <= 0:
        raise ValueError(f"with {n_samples} samples and test_size={test_size} nothing is kept")
    return n_train, n_test


def _approximate_mode(class_counts: np.ndarray, n_draws: int, rng: np.random.RandomState) -> np.ndarray:
    """Per class, how many of ``n_draws`` to draw: the shares floored, the rest to the largest remainders,
    ties broken by ``rng`` (scikit-learn's ``utils.extmath._approximate_mode``)."""
    continuous = class_counts / class_counts.sum() * n_draws
    floored = np.floor(continuous)
    need_to_add = int(n_draws - floored.sum())
    if need_to_add > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (tied,) = np.where(remainder == value)
            add_now = min(len(tied), need_to_add)
            floored[rng.choice(tied, size=add_now, replace=False)] += 1
            need_to_add -= add_now
            if need_to_add == 0:
                break
    return floored.astype(int)

"""The values every trial of a study shares: all that is not searched, recorded with the study.

A worker or a resume may run under other values (``--set train.epochs=20`` to finish a study sooner):
its trials then share a leaderboard with trials trained otherwise, which the worker is told in one
line, and each such trial records the values it had. ``best`` exports the best trial only under the
values it was trained with, so that the exported spec reproduces it.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable

from optuna.trial import FrozenTrial

from ..schema import Spec
from .space import parse_space
from .storage import StudyMismatch

SHARED_VALUES = "vit_search:shared_values"  # the study's (a study attribute); a trial's own where they differ
# What may differ without a word: where the data and the checkpoints are, how fast a trial runs, and where
# the weights of model.init are read from (a URI that may hold a password).
MAY_DIFFER = frozenset({
    "data.root", "data.download", "data.on_device", "data.max_on_device_mb", "data.num_workers", "data.cache",
    "train.mixed_precision", "train.tf32", "train.fused_optimizer", "train.activation_checkpointing",
    "train.peak_tflops", "train.compile", "train.cuda_graph", "train.eval_batch_size", "train.cpu",
    "train.checkpoint_dir", "model.init.uri",
})


def shared_values(spec: Spec) -> dict[str, Any]:
    """The spec's values that every trial of its study trains with, by dotted path, as stored (JSON)."""
    searched = [".".join(dim.path) for dim in parse_space(spec.search.space)] if spec.search else []
    values = {key: value for key, value in spec.flat().items()
              if (key == "seed" or key.startswith(("data.", "model.", "train.")))
              and key not in MAY_DIFFER and not _under_a_searched_path(key, searched)}
    return json.loads(json.dumps(values, default=str))


def _under_a_searched_path(key: str, searched: list[str]) -> bool:
    for path in searched:
        if path == "model.preset" and key.startswith("model."):  # every model value may come from the preset drawn
            return True
        block = path.removesuffix(".type")  # a block's type drawn: its arguments go with it
        if key == block or key.startswith(block + "."):
            return True
    return False


def differences(values: dict[str, Any], stored: dict[str, Any] | None) -> dict[str, Any]:
    """``values`` that differ from ``stored`` (keys both hold: values a newer version added, or a block's
    arguments that its type changed with, are judged by the keys both hold, the type among them)."""
    return {key: value for key, value in values.items() if stored and key in stored and stored[key] != value}


def say_joining(differs: dict[str, Any], stored: dict[str, Any], study: str) -> None:
    """Print (stderr) the line a worker says when its values differ from its study's: once for a
    ``--jobs`` command, by its first worker, as its workers all run under the same values."""
    if os.environ.get("VIT_SEARCH_WORKER", "0") != "0":
        return
    key = next(iter(differs))
    more = f" (and {len(differs) - 1} more)" if len(differs) > 1 else ""
    print(f"note: {key} {json.dumps(differs[key])}{more} differs from study '{study}', whose first trials were "
          f"trained with {json.dumps(stored[key])}: this worker's trials join the same leaderboard; set a new "
          f"search.study_name to keep them apart", file=sys.stderr)


LAUNCH = "vit_search:num_processes"  # the processes a study's first trials each trained on (a study attribute)


def check_launch(handle: Any, num_processes: int) -> None:
    """Record how many processes the study's trials train on (``accelerate launch``: each takes a batch of
    ``train.batch_size``, so a step's batch is theirs together); where this worker's differ from the study's
    first, say so: its trials join the leaderboard at another batch. Call under the study's lock."""
    record_or_tell(handle, LAUNCH, num_processes, lambda first: (
        f"note: this worker trains each trial on {_processes(num_processes)}, study '{handle.study.study_name}''s "
        f"first trials on {first}: a step takes train.batch_size images on each, so its trials join the same "
        f"leaderboard at another batch; set a new search.study_name to keep them apart"))


def record_or_tell(handle: Any, key: str, value: Any, note: Callable[[Any], str]) -> None:
    """Record ``value`` as the study attribute ``key`` where it has none; where it holds another, print
    ``note(first)`` (stderr), once for a ``--jobs`` command, as :func:`say_joining` does. Call under the lock."""
    first = handle.attr(key)
    if first is None:
        handle.set_attr(key, value)
    elif first != value and os.environ.get("VIT_SEARCH_WORKER", "0") == "0":
        print(note(first), file=sys.stderr)


def _processes(count: int) -> str:
    return f"{count} process" + ("" if count == 1 else "es")


def trained_with(spec: Spec, stored: dict[str, Any] | None, trial: FrozenTrial) -> dict[str, Any]:
    """The shared values ``trial`` was trained with where ``spec`` gives others (``stored``: the study's
    recorded ones): what ``best`` must be given with ``--set`` to export it."""
    trained = {**(stored or {}), **trial.system_attrs.get(SHARED_VALUES, {})}
    return {key: trained[key] for key in differences(shared_values(spec), trained)}


def check_reproduces(spec: Spec, stored: dict[str, Any] | None, trial: FrozenTrial, study: str) -> None:
    """Refuse (StudyMismatch, one line) to export ``trial`` from a spec whose shared values are not those it
    was trained with: the exported spec would not reproduce it."""
    trained = {**(stored or {}), **trial.system_attrs.get(SHARED_VALUES, {})}
    differs = differences(shared_values(spec), trained)
    if differs:
        key = next(iter(differs))
        flags = " ".join(f"--set {name}={json.dumps(trained[name])}" for name in differs)
        raise StudyMismatch(
            f"{spec.locate(tuple(key.split('.')))}: {key} {json.dumps(differs[key])} differs from the value the best "
            f"trial ({trial.number}) of study '{study}' was trained with, {json.dumps(trained[key])}; pass {flags} "
            f"to export it as it was trained")

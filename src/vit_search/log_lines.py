"""Progress as plain lines, for logs: when stdout is no terminal (``nohup``, a scheduler, CI), where
progress bars do not show, ``run`` prints a line per finished trial and ``train`` (and each trial) a
line per epoch every so often; ``--quiet`` turns them off.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from typing import Any, Callable

from optuna.trial import FrozenTrial, TrialState

from .errors import UserError

EVERY_ENV = "VIT_SEARCH_LOG_SECONDS"
DEFAULT_EVERY = 60.0  # seconds between a long run's epoch lines
_PRINT = threading.Lock()  # packed trials print from threads of their own


def wanted(quiet: bool) -> bool:
    """Whether to print log lines: stdout is not a terminal, and ``--quiet`` was not given."""
    return not quiet and not sys.stdout.isatty()


def say(line: str) -> None:
    """Print one line at once (a log file then shows it while the run goes on). Through tqdm: with
    stderr a terminal and stdout piped to it (``run | tee log``), a progress bar drawn there is cleared
    first and drawn again below, not run into the line."""
    from tqdm import tqdm

    with _PRINT:
        tqdm.write(line, file=sys.stdout)
        sys.stdout.flush()


def every_seconds() -> float:
    """Seconds between epoch lines: ``VIT_SEARCH_LOG_SECONDS`` (0: every epoch), else 60. Raises
    UserError for a value that is no number of seconds (the command checks it before it starts)."""
    text = os.environ.get(EVERY_ENV, "").strip()
    if not text:
        return DEFAULT_EVERY
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 <= seconds < math.inf:
        raise UserError(f"{EVERY_ENV}={text!r}: not a number of seconds between epoch lines; set it to 0 (every "
                        f"epoch) or more, or unset it for {DEFAULT_EVERY:.0f}")
    return seconds


class EpochLines:
    """An ``on_epoch`` callback printing ``PREFIX epoch 12/100: val_accuracy 0.9512, 2,345 img/s`` when
    ``every`` seconds have passed since the run began or since its last line."""

    def __init__(self, prefix: str, epochs: int, metric: str = "val_accuracy", every: float | None = None):
        self.prefix, self.epochs, self.metric = prefix, epochs, metric
        self.every = every_seconds() if every is None else every
        self.last = time.monotonic()

    def __call__(self, epoch: int, metrics: dict[str, float]) -> None:
        now = time.monotonic()
        if now - self.last < self.every:
            return
        self.last = now
        shown = [f"{self.metric} {metrics[self.metric]:.4f}"] if self.metric in metrics else []
        if "images_per_second" in metrics:
            shown.append(f"{metrics['images_per_second']:,.0f} img/s")
        say(f"{self.prefix} epoch {epoch + 1}/{self.epochs}: {', '.join(shown)}")


def trial_line(frozen: FrozenTrial, metrics: list[str]) -> str:
    """``trial 3 COMPLETE val_accuracy 0.9861 in 12.3 s [model.depth=4, train.lr=0.003]``, with the
    reason for a pruned or failed trial."""
    seconds = ""
    if frozen.datetime_start and frozen.datetime_complete:
        seconds = f" in {(frozen.datetime_complete - frozen.datetime_start).total_seconds():.1f} s"
    if frozen.state == TrialState.COMPLETE and frozen.values:
        value = " " + ", ".join(f"{m} {v:.4f}" for m, v in zip(metrics, frozen.values))
    elif frozen.intermediate_values:  # pruned (or failed) after some epochs: where it stood
        epoch = max(frozen.intermediate_values)
        value = f" {metrics[0]} {frozen.intermediate_values[epoch]:.4f} at epoch {epoch + 1}"
    else:
        value = ""
    values = ", ".join(f"{k}={_short(v)}" for k, v in frozen.params.items())
    why = frozen.user_attrs.get("pruned_reason") or frozen.user_attrs.get("error")
    return f"trial {frozen.number} {frozen.state.name}{value}{seconds} [{values}]" + (f": {why}" if why else "")


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def both(*callbacks: Callable[[int, dict[str, float]], None] | None) -> Callable[[int, dict[str, float]], None] | None:
    """One ``on_epoch`` callback calling each of ``callbacks`` that is not None, in order."""
    present = [c for c in callbacks if c is not None]
    if len(present) <= 1:
        return present[0] if present else None

    def call(epoch: int, metrics: dict[str, float]) -> None:
        for callback in present:
            callback(epoch, metrics)

    return call

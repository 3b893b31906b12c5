"""A trial's per-epoch values reported to Optuna off the training path.

Reporting a value and asking the pruner are storage round trips (a database write and reads of
the other trials), tens of milliseconds on SQLite: as long as a small trial's whole epoch on a GPU.
Here a background thread does both while the next epoch trains, and the pruner's verdict on epoch
*e* stops the trial at the end of epoch *e + 1*: a pruned trial trains one epoch more than the
pruner asked, and no epoch waits for the storage. A study that prunes nothing waits for no verdict:
its reports may fall behind training (many small trials on one SQLite file), and are all in when
the trial ends.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

import optuna

from ..files import driver_said


class ReportNotStored(optuna.exceptions.StorageInternalError):
    """The storage refused a trial's epoch report: said in the driver's words (Optuna's own message
    blames "invalid data in the commit", which is what the trial's MLflow run would record)."""


class EpochReports:
    """The ``on_epoch`` callback of one trial: queue the epoch's metric, act on the verdict on the one before."""

    def __init__(self, trial: optuna.Trial, metric: str, pruner: str):
        self.trial, self.metric, self.pruner = trial, metric, pruner
        self._queue: queue.Queue[tuple[int, float] | None] = queue.Queue()
        self._done = threading.Condition()
        self._reported = -1  # the last epoch whose report and verdict are in
        self._pruned_at: int | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._report, name=f"reports-trial-{trial.number}", daemon=True)
        self._thread.start()

    def __call__(self, epoch: int, metrics: dict[str, float]) -> None:
        if self.metric not in metrics:
            return
        self._queue.put((epoch, float(metrics[self.metric])))
        if self.pruner != "none":  # the verdict on the epoch before: it had a whole epoch to come in
            with self._done:
                self._done.wait_for(lambda: self._reported >= epoch - 1 or self._error is not None)
        if self._error is not None:
            raise self._error
        if self._pruned_at is not None:
            self.trial.set_user_attr("pruned_reason", f"pruned by {self.pruner} after epoch {self._pruned_at + 1}")
            raise optuna.TrialPruned(f"pruned after epoch {self._pruned_at + 1}")

    def close(self) -> None:
        """Send what is queued and stop the thread (before the trial is told its end)."""
        self._queue.put(None)
        self._thread.join()

    def _report(self) -> None:
        while (item := self._queue.get()) is not None:
            epoch, value = item
            try:
                self.trial.report(value, epoch)
                pruned = self.pruner != "none" and self._pruned_at is None and self.trial.should_prune()
            except optuna.exceptions.StorageInternalError as err:  # raised in the training thread at its next epoch
                driver = err.__cause__ or err.__context__ or err
                self._error = ReportNotStored(f"the Optuna storage did not take epoch {epoch + 1}'s report "
                                              f"({driver_said(driver)[:160]}); the trial is retried when the study resumes")
                self._error.__cause__ = driver  # what the worker's one line quotes
                pruned = False
            except BaseException as err:
                self._error = err
                pruned = False
            with self._done:
                if pruned:
                    self._pruned_at = epoch
                self._reported = epoch
                self._done.notify_all()


def reporter(trial: optuna.Trial, search: Any) -> EpochReports | None:
    """The per-epoch reporter of a trial, or None for studies that prune nothing (several objectives)."""
    if not isinstance(search.metric, str):
        return None
    return EpochReports(trial, search.metric, search.pruner)

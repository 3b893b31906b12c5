"""The errors the command line reports in one line, in one light module (no torch), so that it can catch them.

A :class:`UserError` is a bad input: one line (what, where, how to fix), exit 2. A :class:`RunFailed`
is a run or a study that cannot go on once started: one line, exit 1.
"""

from __future__ import annotations


class UserError(ValueError):
    """A bad input (spec, argument, file, plugin): one line for the user, exit code 2."""


class DataError(UserError):
    """Data that cannot be found or read; the message says where it was expected and what to do."""


class WeightsError(UserError):
    """Weights that cannot be loaded into the model: the file, its format or its shapes."""


class CheckpointError(UserError):
    """A checkpoint folder that cannot be written, or a checkpoint that cannot be resumed from."""


class RunFailed(RuntimeError):
    """A run or a study that cannot go on, for a reason one line says (exit code 1)."""

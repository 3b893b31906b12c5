"""The errors a user can cause, in one light module (no torch), so the command line can catch them.

Each is a bad input: the command line prints its one line (what, where, how to fix) and exits 2.
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

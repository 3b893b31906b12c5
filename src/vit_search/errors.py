"""The errors the command line reports in one line, in one light module (no torch), so that it can catch them.

A :class:`UserError` is a bad input: one line (what, where, how to fix), exit 2. A :class:`RunFailed`
is a run or a study that cannot go on once started: one line, exit 1.
"""

from __future__ import annotations


class UserError(ValueError):
    """A bad input (spec, argument, file, plugin): one line for the user, exit code 2."""

    # The spec keys this error follows from, where known ("data": the whole section). A study stops
    # at such an error unless one of them is searched: every trial would meet it again.
    settings: tuple[str, ...] = ()

    def __init__(self, *args: object, settings: tuple[str, ...] | None = None) -> None:
        if settings is not None:
            self.settings = settings
        # torch's DataLoader raises a worker's exception again in the main process as
        # type(err)("Caught ... in DataLoader worker process N.\nOriginal Traceback ...\n<Type>: <message>"):
        # keep the worker's own one line.
        if len(args) == 1 and isinstance(args[0], str) and args[0].startswith("Caught ") \
                and "\nOriginal Traceback" in args[0]:
            args = (args[0].rstrip().rsplit("\n", 1)[-1].split(": ", 1)[-1],)
        super().__init__(*args)


class DataError(UserError):
    """Data that cannot be found or read; the message says where it was expected and what to do."""

    settings = ("data",)


class WeightsError(UserError):
    """Weights that cannot be loaded into the model: the file, its format or its shapes."""


class CheckpointError(UserError):
    """A checkpoint folder that cannot be written, or a checkpoint that cannot be resumed from."""


class _CheckpointProblem(CheckpointError):
    """A checkpoint error said as ``what``; ``fix``: ``what`` alone kept for a caller whose way out differs."""

    def __init__(self, what: str, fix: str) -> None:
        super().__init__(f"{what}; {fix}")
        self.what = what


class CheckpointMismatch(_CheckpointProblem):
    """A readable checkpoint that this spec cannot continue: another model, or other training values."""


class UnreadableCheckpoint(_CheckpointProblem):
    """A checkpoint file that is gone, damaged or not vit-search's."""


class RunFailed(RuntimeError):
    """A run or a study that cannot go on, for a reason one line says (exit code 1)."""


class FileLocked(RunFailed):
    """A SQLite file (a study's storage, MLflow's store) that another process held locked for all of the wait:
    one line, exit 1 (the file is whole, and the same command goes on once the lock is let go). ``what`` names
    the file's use and place (``storage 'sqlite:///optuna.db'``)."""

    def __init__(self, what: str, waited: float) -> None:
        super().__init__(f"{what}: the file is locked by another process (waited {waited:g} s); stop that process "
                         f"(or wait for it), then run the same command")

"""Epoch checkpoints: what they hold, where they go, writing them in the background, reading them back.

A checkpoint holds the model, the optimizer, the scheduler, the random states (plain tensors and
lists, so that it loads with ``weights_only=True``), the epoch, the history and the MLflow run id.
It is written beside and renamed, so a kill mid-write leaves the previous one whole; a failed write
removes its temporary file and says why in one line (a full disk above all).
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .errors import CheckpointError
from .schema import Spec

CHECKPOINT_FILE = "checkpoint.pt"
REQUIRED = ("model", "optimizer", "scheduler", "rng", "epoch", "history", "run_id")


class TrainingFailed(RuntimeError):
    """A run that cannot go on, for a reason one line says (exit code 1)."""


class CheckpointNotWritten(TrainingFailed):
    """A checkpoint could not be written: a full disk, a folder that went away."""


def rng_state() -> dict[str, Any]:
    # Plain tensors, ints and lists only, so the checkpoint loads with weights_only=True.
    np_state = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": [version, list(internal), gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir_of(spec: Spec) -> Path:
    """Where a spec's epoch checkpoints go."""
    return Path(spec.train.checkpoint_dir or Path("runs") / spec.name)


def _save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    # Write beside, then rename: a kill mid-write leaves the previous checkpoint intact.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    try:
        torch.save(payload, tmp)
        tmp.replace(path)
    except (OSError, RuntimeError) as err:  # torch reports a full disk as RuntimeError ("unexpected pos")
        tmp.unlink(missing_ok=True)  # a half-written file helps no one, and fills the disk for the next
        if getattr(err, "errno", None) == errno.ENOSPC or shutil.disk_usage(path.parent).free < 64 * 2**20:
            raise CheckpointNotWritten(f"no space left in {path.parent} for the epoch checkpoint; free some, or "
                                       f"set train.checkpoint_dir (--checkpoint-dir) to a disk with room") from None
        raise CheckpointNotWritten(f"cannot write the checkpoint {path}: {type(err).__name__}: "
                                   f"{str(err).splitlines()[0][:200]}") from None


def check_writable(folder: Path) -> None:
    """Refuse, before any training, a checkpoint folder that cannot be written (exit 2); creates nothing."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, f"{existing} is a file")
        probe = existing / f".vit-search-write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise CheckpointError(f"cannot write checkpoints in {folder}: {reason}; set train.checkpoint_dir "
                              f"(--checkpoint-dir) to a writable folder") from None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint read back for ``--resume``; one line naming the file for anything unreadable."""
    fix = "delete it, or run without --resume to start afresh"
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, garbage, empty, not a torch file: torch's own text suggests unsafe loading
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(err).__name__}); {fix}") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: not a vit-search checkpoint (it holds a {type(checkpoint).__name__}); {fix}")
    missing = [key for key in REQUIRED if key not in checkpoint]
    if missing:
        raise CheckpointError(f"{path}: not a vit-search checkpoint (no {', '.join(repr(k) for k in missing)}); {fix}")
    return checkpoint


def _to_cpu(value: Any) -> Any:
    """A copy of a (nested) state on the CPU: what the device holds changes with the next step."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: _to_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(item) for item in value)
    return value


class CheckpointWriter:
    """Writes epoch checkpoints in a background thread: the next epoch trains while one is written."""

    def __init__(self, path: Path):
        self.path = path
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, payload: dict[str, Any], first: Callable[[], None]) -> None:
        """Copy ``payload`` off the device now; in the background (one write at a time), call
        ``first`` (the epoch's metrics into MLflow), then write it: a checkpoint of epoch e is never
        on disk before e's metrics are stored, so a run resumed from it misses none."""
        self.wait()
        snapshot = _to_cpu(payload)
        self._thread = threading.Thread(target=self._write, args=(snapshot, first), name="checkpoint", daemon=True)
        self._thread.start()

    def _write(self, payload: dict[str, Any], first: Callable[[], None]) -> None:
        try:
            first()
            _save_checkpoint(self.path, payload)
        except BaseException as err:  # raised in the training thread by wait()
            self._error = err

    def close(self) -> None:
        """Wait for the write in flight, whatever happened to it (the run is ending on another error)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def wait(self) -> None:
        """Wait for the write in flight; raise what it failed with."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

"""Epoch checkpoints: what they hold, where they go, writing them in the background, reading them back.

A checkpoint holds the model, the optimizer, the scheduler, the random states (plain tensors and
lists, so that it loads with ``weights_only=True``), the epoch, the history, the MLflow run id and the
store it was logged to, the ``train`` values its optimizer state was made under (:func:`resume_settings`)
and the whole spec it was trained under (:func:`spec_record`), which ``--resume`` checks before it
touches anything: only the values of :data:`RESUMABLE_CHANGES` may differ.
It is written beside and renamed, so a kill mid-write leaves the previous one whole; a failed write
removes its temporary file and says why in one line (a full disk above all).
"""

from __future__ import annotations

import contextlib
import errno
import math
import random
import resource
import shutil
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .errors import CheckpointError, CheckpointMismatch, RunFailed, UnreadableCheckpoint
from .files import symlink_loop
from .schema import Spec, flatten

CHECKPOINT_FILE = "checkpoint.pt"
REQUIRED = ("model", "optimizer", "scheduler", "rng", "epoch", "history", "run_id")
# The train values a checkpoint's optimizer and scheduler state is made under, which a resumed run cannot change:
# its parameter groups (train.freeze: which parameters have moments; train.layer_decay: each group's rate) and
# the hyperparameters each saved group carries and loading puts back over the spec's (train.lr, also the base
# rates the scheduler restores; train.weight_decay; train.betas). The schedule's length is not among them:
# `--set train.epochs=N` with --resume extends a run on purpose, and the schedule is rebuilt from the spec.
RESUME_SETTINGS = ("freeze", "layer_decay", "lr", "weight_decay", "betas")
# The spec values a resumed run may change (a dotted key, or a section and everything under it): they change neither
# the model, nor the data split and its content, nor the optimisation. Any other value differing from the checkpoint's
# record (spec_record) is refused, since the run would go on as another one while its MLflow record kept the first
# (the seed or val_fraction draw another split, putting trained-on images into val and test). train.epochs extends the
# run (never below the epochs trained); the rest say where things go, how fast, or what is logged.
RESUMABLE_CHANGES = (
    "name", "plugins", "search", "tracking",
    "train.epochs", "train.checkpoint_dir", "train.mixed_precision", "train.tf32", "train.fused_optimizer",
    "train.compile", "train.cuda_graph", "train.activation_checkpointing", "train.eval_batch_size", "train.cpu",
    "train.peak_tflops",
    "data.root", "data.download", "data.on_device", "data.max_on_device_mb", "data.num_workers", "data.cache",
)


class _Unset:
    """A key one side does not have (a layer override added, a block's own key), shown as such in a refusal."""

    def __repr__(self) -> str:
        return "unset"


_UNSET = _Unset()


class FewerEpochsThanTrained(CheckpointMismatch):
    """``train.epochs`` below the ``trained`` epochs of the checkpoint to resume (a caller names its own key)."""

    def __init__(self, trained: int, what: str, fix: str) -> None:
        super().__init__(what, fix)
        self.trained = trained


class TrainingFailed(RunFailed):
    """A run that cannot go on, for a reason one line says (exit code 1)."""


class CheckpointNotWritten(TrainingFailed):
    """A checkpoint could not be written (a full disk, a file size limit, a folder gone or made read-only): no
    fault of the run's, which a study queues again. ``what`` is what happened, ``in_place`` the mending that
    keeps the checkpoint folder (the one a resumed run needs); ``fix`` may also point elsewhere."""

    def __init__(self, what: str, fix: str, in_place: str) -> None:
        super().__init__(f"{what}; {fix}")
        self.what, self.in_place = what, in_place


class CheckpointDiskFull(CheckpointNotWritten):
    """No space left for a checkpoint."""


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


def save_atomically(path: Path, payload: dict[str, Any], what: str = "the epoch checkpoint") -> None:
    """``torch.save`` ``payload`` to ``path`` through a file beside it, renamed once whole: a kill mid-write leaves
    the previous file intact. A write that fails is CheckpointDiskFull or CheckpointNotWritten, naming ``what``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    try:
        torch.save(payload, tmp)
        tmp.replace(path)
    except (OSError, RuntimeError) as err:  # torch reports a full disk as RuntimeError ("unexpected pos")
        failure = _write_failure(path, tmp, err, what)  # before the partial file goes: its size tells
        with contextlib.suppress(OSError):  # (a read-only mount refuses even the unlink of a missing file)
            tmp.unlink(missing_ok=True)  # a half-written file helps no one, and fills the disk for the next
        raise failure from None


def _write_failure(path: Path, tmp: Path, err: BaseException, what: str) -> CheckpointNotWritten:
    """Why writing ``what`` to ``path`` (through ``tmp``) failed, in the system's words where torch's hide them
    ("unexpected pos 3038912 vs 3038800"): a file size limit, a full disk, or the folder's own refusal."""
    code, reason = getattr(err, "errno", None), getattr(err, "strerror", None)
    if code is None:  # torch's RuntimeError: what the folder says to a write of our own
        code, reason = _probe(path.parent)
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if code == errno.EFBIG or (limit != resource.RLIM_INFINITY and _size(tmp) >= limit):
        return CheckpointNotWritten(f"cannot write {what} {path}: files are limited to {limit:,} bytes here (ulimit "
                                    f"-f)", "lift the limit (ulimit -f unlimited)", "lift the limit (ulimit -f unlimited)")
    if code == errno.ENOSPC or (code is None and _free(path.parent) < 2**20):  # a full disk leaves next to nothing
        return CheckpointDiskFull(f"no space left in {path.parent} for {what}", "free some, or set train.checkpoint_dir "
                                  "(--checkpoint-dir) to a disk with room", "free some space")
    reason = reason or f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"
    return CheckpointNotWritten(f"cannot write {what} {path}: {reason}",
                                "set train.checkpoint_dir (--checkpoint-dir) to a folder that takes it",
                                f"make {path.parent} writable again")


def _probe(folder: Path) -> tuple[int | None, str | None]:
    """The error number and words of a write of one byte in ``folder`` (None, None: it took it)."""
    probe = folder / ".write-probe"
    try:
        probe.write_bytes(b"0")
        probe.unlink()
    except OSError as refused:  # a folder made read-only, or gone, since the run started; or a full disk
        return refused.errno, refused.strerror
    return None, None


def _size(file: Path) -> int:
    try:
        return file.stat().st_size
    except OSError:
        return 0


def _free(folder: Path) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:  # the folder is gone: its disk's space says nothing
        return 2**62


def check_writable(folder: Path) -> None:
    """Refuse, before any training, a checkpoint folder that cannot be written (exit 2); creates nothing."""
    if symlink_loop(folder):  # exists() says False of a loop: the probe below would go to a folder above it
        raise CheckpointError(f"cannot write checkpoints in {folder}: its symbolic links form a loop; set "
                              f"train.checkpoint_dir (--checkpoint-dir) to a writable folder")
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, f"{existing} is a file")
        # A name of its own (not the pid's): packed trials are threads of one process, checking at once
        with tempfile.NamedTemporaryFile(prefix=".vit-search-write-probe-", dir=existing):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise CheckpointError(f"cannot write checkpoints in {folder}: {reason}; set train.checkpoint_dir "
                              f"(--checkpoint-dir) to a writable folder") from None


RESUME_FIX = "delete it, or run without --resume to start afresh"


def load_checkpoint(path: Path, fix: str = RESUME_FIX) -> dict[str, Any]:
    """A checkpoint read back for ``--resume``; one line naming the file for anything unreadable, ending with
    ``fix`` (what to do about it)."""
    if not path.exists():
        raise UnreadableCheckpoint(f"{path}: no such file", fix)
    try:
        with warnings.catch_warnings():  # torch warns of odd pickle protocols in garbage: the one line says it all
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, garbage, empty, not a torch file: torch's own text suggests unsafe loading
        raise UnreadableCheckpoint(f"{path}: not a readable checkpoint ({type(err).__name__})", fix) from None
    if not isinstance(checkpoint, dict):
        raise UnreadableCheckpoint(f"{path}: not a vit-search checkpoint (it holds a {type(checkpoint).__name__})", fix)
    missing = [key for key in REQUIRED if key not in checkpoint]
    if missing:
        raise UnreadableCheckpoint(f"{path}: not a vit-search checkpoint (no {', '.join(repr(k) for k in missing)})", fix)
    # The right keys with the wrong contents (another tool's file, a hand edit) would fail only once the MLflow run
    # had been reopened, ending it FAILED with an internal error: said here, before anything is touched.
    damage = _damage(checkpoint)
    if damage:
        raise UnreadableCheckpoint(f"{path}: not a usable checkpoint (its {damage})", fix)
    return checkpoint


def _damage(checkpoint: dict[str, Any]) -> str | None:
    """What in a checkpoint with every key is not what the trainer wrote there (None: nothing)."""
    model, optimizer, epoch = checkpoint["model"], checkpoint["optimizer"], checkpoint["epoch"]
    if not isinstance(model, dict) or not all(isinstance(v, torch.Tensor) for v in model.values()):
        return f"'model' is a {type(model).__name__}, not a state dict of tensors"
    if not (isinstance(optimizer, dict) and isinstance(optimizer.get("state"), dict)
            and isinstance(optimizer.get("param_groups"), list)):
        return f"'optimizer' is {_kind(optimizer)}, not an optimizer's state (state and param_groups)"
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
        return f"'epoch' is {epoch!r}, not an epoch number (0 or more)"
    history = checkpoint["history"]
    if not isinstance(history, list) or not all(
            isinstance(m, dict) and all(isinstance(v, (int, float)) for v in m.values()) for m in history):
        return f"'history' is {_kind(history)}, not a list of each epoch's metrics"
    scheduler = checkpoint["scheduler"]
    if not (isinstance(scheduler, dict) and isinstance(scheduler.get("last_epoch"), int)
            and all(isinstance(scheduler.get(key), list) for key in ("base_lrs", "lr_lambdas"))):
        return f"'scheduler' is {_kind(scheduler)}, not a scheduler's state (last_epoch, base_lrs, lr_lambdas)"
    if not _rng_like(checkpoint["rng"]):
        return f"'rng' is {_kind(checkpoint['rng'])}, not the random states (torch, numpy, python)"
    if checkpoint["run_id"] is not None and not isinstance(checkpoint["run_id"], str):
        return f"'run_id' is {_kind(checkpoint['run_id'])}, not an MLflow run id"
    if "spec" in checkpoint and not isinstance(checkpoint["spec"], dict):
        return f"'spec' is {_kind(checkpoint['spec'])}, not a spec's values"
    return None


def _rng_like(state: Any) -> bool:
    """Whether ``state`` has the shape :func:`rng_state` gives (what :func:`set_rng_state` reads)."""
    if not isinstance(state, dict) or not isinstance(state.get("torch"), torch.Tensor):
        return False
    numpy_state, python_state = state.get("numpy"), state.get("python")
    return (isinstance(numpy_state, list) and len(numpy_state) == 5 and isinstance(numpy_state[0], str)
            and isinstance(numpy_state[1], torch.Tensor)
            and isinstance(python_state, list) and len(python_state) == 3 and isinstance(python_state[1], list)
            and ("cuda" not in state or isinstance(state["cuda"], list)))


def _kind(value: Any) -> str:
    """A short description of a wrong value: an empty dict, a str 'x', a list of 3."""
    if isinstance(value, (dict, list, tuple)):
        return f"a {type(value).__name__} of {len(value)}" if value else f"an empty {type(value).__name__}"
    name = type(value).__name__
    return "None" if value is None else f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def resume_settings(spec: Spec) -> dict[str, Any]:
    """What a checkpoint records of ``spec.train`` (:data:`RESUME_SETTINGS`), as plain values (weights_only)."""
    values = spec.train.model_dump(mode="json")
    return {key: values[key] for key in RESUME_SETTINGS}


def check_resume_settings(checkpoint: dict[str, Any], spec: Spec, path: Path, num_processes: int = 1) -> None:
    """Refuse (one line, exit 2) to resume ``checkpoint`` under train values other than those its optimizer
    state was made under, or on another number of processes (the scheduler counts each process's steps: its
    saved step would fall at another epoch, and the batch would change mid-run); called before anything is
    written or an MLflow run touched. A checkpoint from before the record (no ``train_settings`` or
    ``num_processes``), or a value it lacks, is not checked: such checkpoints resume as they always did."""
    saved = checkpoint.get("num_processes")
    if isinstance(saved, int) and saved != num_processes:
        raise CheckpointMismatch(f"--resume: {num_processes} process{'es' if num_processes > 1 else ''} now, but "
                                 f"{saved} trained the checkpoint's run in {path} (its schedule counts each "
                                 f"process's steps)", f"resume on {saved} (accelerate launch --num_processes {saved}"
                                 f"{'' if saved > 1 else ', or no launcher'}), or start afresh without --resume")
    recorded = checkpoint.get("train_settings")
    if not isinstance(recorded, dict):
        return
    now = resume_settings(spec)
    for key in RESUME_SETTINGS:
        if key in recorded and _plain_value(recorded[key]) != now[key]:
            raise CheckpointMismatch(f"--resume: train.{key} {now[key]!r} differs from the checkpoint's run in {path} "
                                     f"({_plain_value(recorded[key])!r})",
                                     "resume with the run's values, or start afresh without --resume")


def spec_record(spec: Spec) -> dict[str, Any]:
    """What a checkpoint records of the spec it trains under: every resolved value but the search section, as plain
    values (weights_only), passwords in URLs left out (:meth:`~vit_search.schema.Spec.to_dict`)."""
    return spec.to_dict(exclude_search=True)


def resumable_change(key: str) -> bool:
    """Whether the dotted spec ``key`` may differ from the checkpoint's on ``--resume`` (:data:`RESUMABLE_CHANGES`)."""
    return any(key == allowed or key.startswith(f"{allowed}.") for allowed in RESUMABLE_CHANGES)


def check_resume_spec(checkpoint: dict[str, Any], spec: Spec, path: Path) -> None:
    """Refuse (one line, exit 2) to resume ``checkpoint`` with fewer ``train.epochs`` than it has trained, or under
    any spec value other than its record's outside :data:`RESUMABLE_CHANGES`; called before anything is written or
    an MLflow run touched. A checkpoint from before the record (no ``spec``) is checked for its epochs alone."""
    trained = checkpoint["epoch"] + 1
    recorded = checkpoint.get("spec")
    if trained > spec.train.epochs:  # equal: the run is done, and its result is read back
        own = recorded.get("train", {}).get("epochs") if isinstance(recorded, dict) else None
        raise FewerEpochsThanTrained(trained, f"--resume: train.epochs {spec.train.epochs} is fewer than the {trained} "
                                     f"epochs the checkpoint's run in {path} has trained",
                                     f"resume with train.epochs {trained} or more{f' (its own: {own})' if own else ''}, "
                                     f"or start afresh without --resume")
    if not isinstance(recorded, dict):
        return
    then, now = flatten(recorded), flatten(spec_record(spec))
    for key in [*now, *(key for key in then if key not in now)]:  # in the spec's order; keys it lost last
        if resumable_change(key) or _plain_value(then.get(key, _UNSET)) == now.get(key, _UNSET):
            continue
        raise CheckpointMismatch(f"--resume: {key} {now.get(key, _UNSET)!r} differs from the checkpoint's run in {path} "
                                 f"({_plain_value(then.get(key, _UNSET))!r})",
                                 "resume with the run's values, or start afresh without --resume")


def _plain_value(value: Any) -> Any:
    # A tuple saved is a tuple read back (betas): compared with the spec's JSON values, which are lists.
    return list(value) if isinstance(value, tuple) else value


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
    """Stores each epoch in a background thread while the next ones train: its metrics (``log``)
    first, then its checkpoint, so a checkpoint of epoch e is never on disk before e's metrics are
    stored, and a run resumed from it misses none.

    When the tracking store or the disk is slower than an epoch (small trials on a GPU, several of
    them on one SQLite file), the epochs waiting are stored together: their metrics in one call, and
    only the newest checkpoint, which is the one a resume wants. Training waits for neither, except
    in :meth:`wait` at the end. Metrics alone are stored at most once every ``log_interval``
    seconds (a checkpoint and the run's end store them at once): epochs of milliseconds would
    otherwise make a write transaction each, which every trial sharing the store waits its turn for.

    Copying the state off the device is the one part training waits for. Where epochs are so short
    that copying after each would cost more than ``budget`` of the training time (a small model on
    a GPU: milliseconds of copies after an epoch of milliseconds), epochs are skipped until it does
    not; and a checkpoint is taken at most once every ``checkpoint_interval`` seconds, since each
    costs a write of the weights and a store of the metrics before it: a killed run repeats at most
    that much training. The first and the last epoch always have their checkpoint, and every epoch
    its metrics.

    Both intervals are per process: with K runs training at once in it (trials packed into
    threads), each run's are K times as long, so that the process stores about as often as one run
    alone would, rather than K times as often with K times the host work (one thread at a time).
    """

    _alive = 0  # writers of this process between their start and close()
    _alive_lock = threading.Lock()

    def __init__(self, path: Path, log: Callable[[list[tuple[dict[str, float], int, int]]], None] | None = None,
                 budget: float = 0.05, log_interval: float = 1.0, checkpoint_interval: float = 1.0):
        self.path, self.budget, self.log_interval = path, budget, log_interval
        self.checkpoint_interval = checkpoint_interval
        self._logged_at = -math.inf  # when metrics were last stored (monotonic): the first epoch's go at once
        self._ending = False  # wait() or close() was called: what is waiting is stored now
        self._log = log or (lambda epochs: None)
        self._changed = threading.Condition()
        self._epochs: list[tuple[dict[str, float], int, int]] = []  # (metrics, step, ms) not yet stored
        self._payload: dict[str, Any] | None = None  # the newest checkpoint not yet written
        self._running = False
        self._error: BaseException | None = None
        self._copied_at: float | None = None  # when the last snapshot was taken (perf_counter)
        self._copy_seconds = 0.0  # how long taking it took
        self.snapshots = 0  # checkpoints taken (and so written, unless a newer one replaced it first)
        self._counted = True
        with CheckpointWriter._alive_lock:
            CheckpointWriter._alive += 1

    @staticmethod
    def _sharing() -> int:
        """How many runs of this process store at once (at least 1)."""
        return max(1, CheckpointWriter._alive)

    def due(self, last: bool = False) -> bool:
        """Whether this epoch's state is worth copying off the device now (see the class)."""
        if last or self._copied_at is None:
            return True
        since = time.perf_counter() - self._copied_at
        return since >= self.checkpoint_interval * self._sharing() and self._copy_seconds <= self.budget * since

    def save(self, payload: dict[str, Any] | Callable[[], dict[str, Any]] | None, metrics: dict[str, float],
             step: int) -> None:
        """Copy ``payload`` (or what the callable returns; None: metrics only) off the device now;
        store ``metrics`` at ``step`` and write the checkpoint in the background. Raises what an
        earlier store or write failed with."""
        self._raise()
        snapshot = None
        if payload is not None:
            started = time.perf_counter()
            snapshot = _to_cpu(payload() if callable(payload) else payload)
            self._copied_at = time.perf_counter()
            self._copy_seconds = self._copied_at - started
            self.snapshots += 1
        with self._changed:
            self._epochs.append((dict(metrics), step, int(time.time() * 1000)))  # when, not when stored
            if snapshot is not None:
                self._payload = snapshot  # one still waiting is older: only the newest is worth writing
                self._changed.notify_all()  # a store waiting out the interval goes now: metrics, then this
            if not self._running:
                self._running = True
                threading.Thread(target=self._store, name="checkpoint", daemon=True).start()

    def _store(self) -> None:
        while True:
            with self._changed:
                while self._payload is None and self._epochs and not self._ending:
                    left = self._logged_at + self.log_interval * self._sharing() - time.monotonic()
                    if left <= 0:
                        break
                    self._changed.wait(left)
                epochs, payload = self._epochs, self._payload
                self._epochs, self._payload = [], None
                if (payload is None and not epochs) or self._error is not None:
                    self._running = False
                    self._changed.notify_all()
                    return
            try:
                if epochs:
                    self._log(epochs)
                    self._logged_at = time.monotonic()
                if payload is not None:
                    save_atomically(self.path, payload)
            except BaseException as err:  # raised in the training thread by its next save() or wait()
                with self._changed:
                    self._error = err

    def close(self) -> None:
        """Wait for what is being stored, whatever happened to it (the run is ending on another error)."""
        with self._changed:
            self._ending = True
            self._changed.notify_all()
            self._changed.wait_for(lambda: not self._running)
            counted, self._counted = self._counted, False
        if counted:
            with CheckpointWriter._alive_lock:
                CheckpointWriter._alive -= 1

    def wait(self) -> None:
        """Wait until every saved epoch is stored; raise what storing one failed with."""
        self.close()
        self._raise()

    def _raise(self) -> None:
        with self._changed:
            error, self._error = self._error, None
        if error is not None:
            raise error

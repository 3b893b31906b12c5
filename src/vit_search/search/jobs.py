"""``vit-search run --jobs N``: N worker processes of one study on this machine.

Each worker is a plain ``vit-search run`` process on the same storage, so the study's lock, its
exact trial count and its heartbeats work as they do across machines. On CPUs each worker gets its
share of the cores (its torch threads); on GPUs each is pinned to one device with
``CUDA_VISIBLE_DEVICES``; ``--jobs 0`` puts ``--trials-per-gpu`` workers on each GPU, an explicit
``--jobs`` packs that many trials into each worker's threads (see
:func:`~vit_search.search.run.run_search`). A worker that dies takes no other down: its trial is
failed and retried by the survivors.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

from ..stopping import WORKER_ENV, Terminated, exit_code, say_stopping


@dataclass
class WorkerPlan:
    """How one worker process is started: its environment additions, and how many trials it trains at
    once (in threads of its own)."""

    index: int
    env: dict[str, str]
    trials_at_once: int = 1

    def describe(self) -> str:
        """One line for the log."""
        packed = f" trials-at-once={self.trials_at_once}" if self.trials_at_once > 1 else ""
        return f"worker {self.index}: " + " ".join(f"{k}={v}" for k, v in sorted(self.env.items())) + packed


def plan_workers(jobs: int | None, trials_per_gpu: int, gpus: int, cpus: int) -> list[WorkerPlan]:
    """Where each worker runs. ``jobs`` 0 (or None) plans the machine: on GPUs ``trials_per_gpu``
    worker processes per GPU, one trial at a time each; without one, one worker per core, each
    packing ``trials_per_gpu`` trials in threads. An explicit ``jobs`` is that many workers (several
    per GPU where it is more than the GPUs), each packing ``trials_per_gpu`` trials in threads.

    Why processes on GPUs: a small trial's time is mostly host work (Python launching kernels,
    Optuna's and MLflow's bookkeeping), which threads of one process take turns at under the GIL
    and processes do at once; measured on one H100, 8 threads gave 0.89x one trial at a time and
    8 processes 2.38x, once started (docs/search.md)."""
    if trials_per_gpu < 1:
        raise ValueError(f"--trials-per-gpu must be at least 1, got {trials_per_gpu}")
    per_worker = trials_per_gpu
    if not jobs and gpus:
        jobs, per_worker = gpus * trials_per_gpu, 1
    jobs = jobs or max(1, cpus)
    plans = []
    for i in range(jobs):
        # Cores split as evenly as they go (also between workers sharing a GPU, whose host work is
        # most of a small trial); a worker never gets fewer than one thread.
        threads = str(max(1, cpus // jobs + (1 if i < cpus % jobs else 0)))
        env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        plans.append(WorkerPlan(i, {**env, "CUDA_VISIBLE_DEVICES": str(i % gpus)} if gpus else env, per_worker))
    return plans


def run_workers(arguments: list[str], plans: list[WorkerPlan], ready: Callable[[], dict[str, Any]],
                quiet: bool = False) -> tuple[list[int], bool]:
    """Start one ``vit-search run ARGUMENTS --worker`` per plan and wait for all; returns their exit
    codes, and whether this process was asked to stop.

    The workers start first: each imports what its trials need (seconds of torch, MLflow, Optuna)
    while ``ready`` runs here (loading the spec, making the stores), then waits for the word it sends
    them on their standard input: what ``ready`` returns (the storage URL and the ``--set`` overrides,
    whose passwords a command line would show in ``ps``). If ``ready`` raises, the workers are killed
    before they touch anything, and the error goes on up: one line from this command, not one per worker.

    The workers run in a session of their own, and every Ctrl-C and SIGTERM this process gets is
    passed on to each: once, whether it came from the terminal or from ``kill`` to this process alone
    (which would otherwise leave the workers training their trials to the end). Either way each ends
    its trials' bookkeeping; a second Ctrl-C stops them at once, as it does one worker.
    """
    processes: list[subprocess.Popen] = []
    try:
        for plan in plans:
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "vit_search", "run", *arguments, f"--trials-per-gpu={plan.trials_at_once}"],
                env={**os.environ, **plan.env, WORKER_ENV: str(plan.index)}, stdin=subprocess.PIPE, text=True,
                start_new_session=True,  # out of the terminal's reach: its Ctrl-C comes from here, once
                preexec_fn=_stop_when_orphaned if sys.platform == "linux" else None,
            ))
        try:
            word = json.dumps(ready()) + "\n"
        except Exception:
            for process in processes:
                process.kill()
                process.wait()
            raise
        if not quiet:  # once the input is taken: a refusal is its one line
            print("\n".join(plan.describe() for plan in plans), file=sys.stderr, flush=True)
        for process in processes:
            _tell(process, word)
        # Reap each worker as soon as it ends: an unreaped (zombie) worker still looks alive to the
        # others, which would then wait out the heartbeat grace before retrying its trial.
        while not all(process.poll() is not None for process in processes):
            time.sleep(0.2)
        return [process.returncode for process in processes], False
    except KeyboardInterrupt as err:
        return _stop_workers(processes, err), True


def _stop_when_orphaned() -> None:
    """In a worker, before it starts (Linux): SIGTERM when the command that started it dies, however it
    died (SIGKILL, its terminal closed), so that no worker trains on without it; its trials are then
    queued again, as on any SIGTERM."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None).prctl(pr_set_pdeathsig, int(signal.SIGTERM))


def _stop_workers(processes: list[subprocess.Popen], request: KeyboardInterrupt) -> list[int]:
    """Pass a stop request (Ctrl-C, or SIGTERM as :class:`Terminated`) on to every worker still running
    and wait for them all, passing on each further Ctrl-C too; their exit codes."""
    said = False
    while True:
        signum = signal.SIGTERM if isinstance(request, Terminated) else signal.SIGINT
        if not said and any(process.poll() is None for process in processes):  # said once here, not by each
            say_stopping(signum, "the workers' trials in training end after their current step")
            said = True
        for process in processes:
            if process.poll() is None:
                process.send_signal(signum)
        try:
            return [process.wait() for process in processes]
        except KeyboardInterrupt as again:  # a second Ctrl-C: the workers stop at once
            request = again


def _tell(process: subprocess.Popen, word: str) -> None:
    """Send a waiting worker its word, and close its input; one that died meanwhile is reaped later."""
    try:
        process.stdin.write(word)
        process.stdin.close()
    except OSError:  # BrokenPipeError: it exited during its imports (its exit code says how)
        pass


def wait_for_the_command() -> dict[str, Any] | None:
    """In a worker: the word the command sends once its checks pass (see :func:`run_workers`),
    or None when it sent nothing (it refused the input, said why, and is gone). A worker started by
    hand from a terminal has no command to wait for."""
    if sys.stdin is None or sys.stdin.isatty():
        return {}
    line = sys.stdin.readline()
    return json.loads(line) if line.strip() else None


def jobs_exit_code(codes: list[int], interrupted: bool) -> tuple[int, str | None]:
    """The exit code of ``run --jobs`` from its workers' codes, and the line that explains a failure.

    Stopped on request (this process, or a worker that exited 130 or 143 or died of SIGINT or
    SIGTERM) gives 143 for SIGTERM, else 130, and no line: its workers failed their trials as
    interrupted, none died. Workers that all exited 2 refused the same input before training, each
    with its line: 2, and nothing more to say. Any other non-zero code is a worker that died or
    failed, whose trials the others failed and retried: 1.
    """
    terminated = any(code in (143, -signal.SIGTERM) for code in codes)
    if interrupted or terminated or any(code in (130, -signal.SIGINT) for code in codes):
        return (143 if terminated or (interrupted and exit_code() == 143) else 130), None
    if codes and all(code == 2 for code in codes):
        return 2, None
    failed = [f"worker {i} exited {code}" for i, code in enumerate(codes) if code != 0]
    if failed and len(failed) == len(codes):  # none went on: what each was training waits for the next run
        return 1, "; ".join(failed) + " (their trials are queued again: mend what each said, then run the same command)"
    if failed:
        return 1, "; ".join(failed) + " (any trial it was training was failed and retried by the others)"
    return 0, None

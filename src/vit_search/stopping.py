"""Stopping on request: Ctrl-C (SIGINT) and SIGTERM stop a command the same way.

SIGTERM is how batch schedulers (a Slurm time limit, a Kubernetes pod deleted), ``timeout``,
``docker stop`` and systemd ask a process to stop before they kill it. Left to its default, it kills
the process where it stands: its trials stay RUNNING until a heartbeat goes stale, its MLflow runs
RUNNING, and ``run --jobs`` leaves its workers training without a parent. Handled here, it stops as
the first Ctrl-C does: trials in training end at their next step, failed as interrupted and queued
again, their runs KILLED, and the command exits 143 (130 for Ctrl-C). A second Ctrl-C stops at once;
a second SIGTERM changes nothing (a scheduler insists with SIGKILL).
"""

from __future__ import annotations

import _thread
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

_received: set[int] = set()  # the stop signals this command has received
# Set in each worker process of `run --jobs` (its index): the command that started it says what the
# workers would each say once per Ctrl-C, and draws what they would each draw.
WORKER_ENV = "VIT_SEARCH_WORKER"


def jobs_worker() -> str | None:
    """This process's index among the workers of a ``run --jobs`` command, or None when it is none."""
    return os.environ.get(WORKER_ENV)


def stopping_line(signum: int, ending: str) -> str:
    """``stopping (Ctrl-C): ENDING (Ctrl-C again to stop at once)``: what the first stop request prints."""
    again = "Ctrl-C again to stop at once" if signum == signal.SIGINT else "SIGKILL to stop at once"
    return f"stopping ({'Ctrl-C' if signum == signal.SIGINT else 'SIGTERM'}): {ending} ({again})"


def say_stopping(signum: int, ending: str) -> None:
    """Print :func:`stopping_line` on stderr, through tqdm: a progress bar there is cleared first, not run into."""
    from tqdm import tqdm

    tqdm.write(stopping_line(signum, ending), file=sys.stderr)


class Terminated(KeyboardInterrupt):
    """SIGTERM: handled wherever Ctrl-C is (it is a KeyboardInterrupt), but said as SIGTERM and exits 143."""


def cause() -> str:
    """What asked this command to stop, as a trial's error says it: ``SIGTERM`` or ``Ctrl-C``."""
    return "SIGTERM" if signal.SIGTERM in _received else "Ctrl-C"


def exit_code() -> int:
    """The exit code of a command stopped on request: 128 + the signal (143 for SIGTERM, 130 for Ctrl-C)."""
    return 128 + (signal.SIGTERM if signal.SIGTERM in _received else signal.SIGINT)


def interruption(message: str) -> KeyboardInterrupt:
    """The exception that ends a run asked to stop, of the kind that asked (:class:`Terminated` for SIGTERM)."""
    return Terminated(message) if signal.SIGTERM in _received else KeyboardInterrupt(message)


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """While the command runs, SIGTERM raises :class:`Terminated` in the main thread, as Ctrl-C raises
    KeyboardInterrupt; later ones are ignored, so that the clean-up it starts is not cut short."""
    _received.clear()
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield  # embedded in a program that handles SIGTERM itself
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_terminated(signum: int, frame: Any) -> None:
    _received.add(signum)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated("SIGTERM")


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM held back (delivered when the block ends) around bookkeeping that must be whole:
    a trial failed and its retry queued. A launcher's SIGTERM between the two lost the retry.

    Held by Python-level handlers that note the signal, not by the thread's signal mask: with other threads
    running (a heartbeat, MLflow's, packed trials) the kernel hands the signal to one of them, and Python
    runs its handler in the main thread all the same."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []

    def hold(signum: int, frame: Any) -> None:
        held.append(signum)

    previous = {signum: signal.signal(signum, hold) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            # None: a handler installed outside Python, which Python cannot put back; the default is the nearest.
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        for signum in dict.fromkeys(held):  # now, to the handlers put back (each signal once, as the kernel would)
            signal.raise_signal(signum)


@contextlib.contextmanager
def requests_set(stop: threading.Event, ending: str = "trials in training end after their current step") -> Iterator[None]:
    """Ctrl-C and SIGTERM set ``stop`` instead of raising wherever the worker happens to be (in a
    database write, an import, MLflow's client): each trial in training then ends at its next step,
    failed as interrupted and queued again, and the worker returns. A second Ctrl-C raises at once.
    ``ending``: what the line printed at the first one says ends, and when."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def request(signum: int, frame: Any) -> None:
        if stop.is_set():
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        _received.add(signum)
        stop.set()
        if jobs_worker() is None:  # a worker's comes from its command, which has said it
            say_stopping(signum, ending)

    def unraisable(info: Any) -> None:
        # The second Ctrl-C raised inside a finalizer (SQLAlchemy's, a weakref's callback): Python would print
        # "Exception ignored in ..." with a traceback and drop the stop. Asked again from another thread a
        # moment later, it lands after the finalizer (raised from here, it would be dropped with this hook).
        if isinstance(info.exc_value, KeyboardInterrupt) and threading.current_thread() is threading.main_thread():
            threading.Timer(0.01, _thread.interrupt_main, (signal.SIGINT,)).start()
            return
        hook(info)

    ours = {signal.SIGINT: (signal.default_int_handler,), signal.SIGTERM: (signal.SIG_DFL, _raise_terminated)}
    previous = {signum: signal.signal(signum, request)
                for signum, defaults in ours.items() if signal.getsignal(signum) in defaults}
    hook, sys.unraisablehook = sys.unraisablehook, unraisable
    try:
        yield
    finally:
        sys.unraisablehook = hook
        for signum, handler in previous.items():
            signal.signal(signum, handler)


TRIAL_SLOT = "trial-slot-"  # the name of a thread that trains packed trials, before its index


def trials_left_behind() -> bool:
    """Whether threads training packed trials are still running: a second Ctrl-C left them mid-step,
    and the interpreter's teardown would trip over them (they are daemons, caught in torch)."""
    return any(t.name.startswith(TRIAL_SLOT) and t.is_alive() for t in threading.enumerate())

"""``vit-search ui``: MLflow's UI server for a spec's tracking store, started and stopped as one program.

The port is checked before the server starts (a port in use would otherwise show whatever already
listens there, perhaps another store's UI); the address is printed once the server answers; the
server runs in a process group of its own, which SIGINT and SIGTERM to this process stop whole
(MLflow's UI is several processes: its command, uvicorn and uvicorn's workers).

MLflow's job runner (huey consumers for GenAI evaluation jobs and trace roll-ups) is not started unless
``MLFLOW_SERVER_ENABLE_JOB_EXECUTION`` says so: comparing trials needs none of it, and it costs eight
more processes, about 1.5 GB and 20 s of CPU at each start.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Any

from .errors import UserError
from .redaction import redact
from .schema import Spec

HOST = "127.0.0.1"
STOP_SECONDS = 10.0  # how long the server gets to stop after SIGTERM before it is killed
JOB_RUNNER = "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"


class UiError(UserError):
    """A port that cannot be served on: one line, exit 2."""


def choose_port(port: int, check_free: bool = True) -> int:
    """The port to serve on: ``port`` when it is free on 127.0.0.1, any free one for 0; UiError otherwise
    (``check_free`` False: only that it is a port number)."""
    if not 0 <= port <= 65535:
        raise UiError(f"--port {port}: not a TCP port; give one from 1 to 65535, or 0 for any free port")
    if not check_free:
        return port
    with socket.socket() as sock:
        # As the server will bind it: a port only lingering after a closed connection is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError as err:
            raise UiError(f"--port {port}: {HOST}:{port} is in use ({err.strerror}), perhaps by another MLflow UI; "
                          f"stop that, or give another port (--port 0 picks a free one)") from None
        return sock.getsockname()[1]


def ui_address(spec: Spec, experiment_id: str) -> str:
    """The address fragment ``ui`` opens: the study's trials compared, best first (see :mod:`.search.leaderboard`)."""
    from .search.leaderboard import trials_address

    search = spec.search
    if search is None:
        return trials_address(experiment_id)
    metric = search.metric if isinstance(search.metric, str) else search.metric[0]
    direction = search.direction if isinstance(search.direction, str) else search.direction[0]
    return trials_address(experiment_id, search.study_name or spec.name, metric, direction == "maximize")


def serve(uri: str, port: int, view: str) -> int:
    """Serve MLflow's UI for the store ``uri`` on 127.0.0.1:``port`` until it exits or this process is
    told to stop; prints the address of ``view`` once the server answers. Returns the exit code."""
    # The store goes in the environment (server_environment), not on the command line: `ps` shows that to
    # every user of the machine, a database password in it included.
    command = [sys.executable, "-m", "mlflow", "ui", "--host", HOST, "--port", str(port)]
    stopping: list[int] = []
    started: list[subprocess.Popen] = []

    def stop(signum: int, frame: Any) -> None:
        stopping.append(signum)
        for server in started:
            _signal_group(server, signal.SIGTERM)

    # Listening before the server starts: a Ctrl-C at any moment stops its whole group.
    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:  # the handlers are given back however this ends, a server that could not start included
        # The server's log goes to stderr: stdout carries the address line alone, for `vit-search ui | ...`.
        server = subprocess.Popen(command, env=server_environment(uri), start_new_session=True, stdout=2)
        started.append(server)
        if not _wait_until_up(server, f"http://{HOST}:{port}/health", stopping):
            if stopping:
                return 0
            print(f"error: the MLflow UI for {redact(uri)} did not start on {HOST}:{port} (exit {server.returncode}); "
                  f"its messages are above", file=sys.stderr)
            return 1
        print(f"MLflow UI for {redact(uri)}: http://{HOST}:{port}/{view}  (Ctrl-C stops it)", flush=True)
        code = server.wait()
        return 0 if stopping else code
    finally:
        for server in started:
            _stop(server)
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def server_environment(uri: str) -> dict[str, str]:
    """The UI server's environment: this one, tracking and serving the store ``uri``, without MLflow's job
    runner unless the user's own environment turns it on."""
    return {JOB_RUNNER: "false", **os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_BACKEND_STORE_URI": uri}


def _wait_until_up(server: subprocess.Popen, health: str, stopping: list[int]) -> bool:
    """Poll the server's health address until it answers (True), or it exits or is stopped (False)."""
    while server.poll() is None and not stopping:
        try:
            with urllib.request.urlopen(health, timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.3)
    return False


def _signal_group(server: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(server.pid, signum)
    except ProcessLookupError:  # the group is gone already
        pass


def _stop(server: subprocess.Popen) -> None:
    """Stop the server's whole process group: SIGTERM, then SIGKILL after STOP_SECONDS."""
    _signal_group(server, signal.SIGTERM)
    try:
        server.wait(timeout=STOP_SECONDS)
    except subprocess.TimeoutExpired:
        _signal_group(server, signal.SIGKILL)
        server.wait()
    # Workers that outlive the command itself are still in its group.
    _signal_group(server, signal.SIGKILL)

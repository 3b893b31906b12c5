"""``vit-search ui``: MLflow's UI server for a spec's tracking store, started and stopped as one program.

The port is checked before the server starts (a port in use would otherwise show whatever already
listens there, perhaps another store's UI); the address is printed once the server answers; the
server runs in a process group of its own, which SIGINT, SIGTERM and SIGHUP (its terminal closed) to
this process stop whole (MLflow's UI is several processes: its command, uvicorn and uvicorn's workers).
That group's leader is a small watcher (:data:`WATCHER`), which stops the group itself should this
process end without doing so (SIGKILL): nothing serves on, orphaned, holding the port.

The server says what goes wrong (a port it cannot bind, a store it cannot open), not how it is
doing: uvicorn's log at warning level, MLflow's at WARNING, no Python warnings, and not the note that
MLflow prints at every start about its ``--host`` (which ``vit-search ui`` does not take).

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
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # Ctrl-C, `kill` or `timeout`, a closed terminal
# Lines of the server's that say nothing to a user of `vit-search ui`, printed at every start whatever the log
# level: MLflow's note that it serves localhost only, and how to serve other hosts with flags ui does not take.
NOISE = ("[MLflow] Security middleware enabled with default settings",)

# The leader of the server's process group, run as `python -c WATCHER COMMAND...`: it starts the server in
# its group, passes on the server's log but NOISE, and exits with the server's exit code. Should the
# command that started it end without stopping the group (SIGKILL), its pipe to this script closes:
# the script then stops the group itself, SIGTERM and, after STOP_SECONDS or once the server has
# ended, SIGKILL (uvicorn's workers included, and the script). A parent-death signal would reach
# MLflow's command alone, not uvicorn and its workers. A script, not this module: it runs as long as
# the server, and needs nothing of the package.
WATCHER = f"""# vit-search ui: the watcher of MLflow's UI server
import os, signal, subprocess, sys, threading, time
for signum in (signal.SIGINT, signal.SIGTERM):  # the group's stop is for the server: this waits for it to end
    signal.signal(signum, lambda *_: None)
server = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
orphaned = threading.Event()

def forward():
    for line in server.stdout:
        if not line.startswith({tuple(noise.encode() for noise in NOISE)!r}):
            try:
                sys.stderr.buffer.write(line)
                sys.stderr.buffer.flush()
            except OSError:  # the terminal closed
                pass

def watch():
    while os.read(0, 512):  # vit-search ui writes nothing: the pipe ends when it does
        pass
    orphaned.set()
    os.killpg(0, signal.SIGTERM)
    time.sleep({STOP_SECONDS!r})
    os.killpg(0, signal.SIGKILL)

reader = threading.Thread(target=forward, daemon=True)
reader.start()
threading.Thread(target=watch, daemon=True).start()
code = server.wait()
reader.join(2)  # its last lines, which say why it failed
if orphaned.is_set():  # what outlives the server in its group
    os.killpg(0, signal.SIGKILL)
sys.exit(code if code >= 0 else 128 - code)
"""


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


def study_view(spec: Spec) -> str:
    """The address fragment ``ui`` opens in the store MLflow points at (``tracking.use_store``): the study's
    trials (:func:`ui_address`), or, where the store has no experiment of the spec's yet (a new store, a
    mistyped ``tracking.uri``), MLflow's list of experiments, after a line on stderr that says so. Creates
    nothing: ``ui`` only reads."""
    import mlflow

    name = spec.tracking.experiment or spec.name
    experiment = mlflow.MlflowClient().get_experiment_by_name(name)
    if experiment is not None and experiment.lifecycle_stage == "active":
        return ui_address(spec, experiment.experiment_id)
    store = redact(mlflow.get_tracking_uri())
    if experiment is None:
        print(f"note: MLflow store {store} has no experiment '{name}' yet: nothing of this spec's is logged there; "
              f"run the study first, or check tracking.uri and MLFLOW_TRACKING_URI", file=sys.stderr)
    else:  # in MLflow's trash: its runs are hidden until it is restored
        print(f"note: experiment '{name}' in MLflow store {store} is deleted; restore it (mlflow experiments restore "
              f"--experiment-id {experiment.experiment_id}) to see its runs", file=sys.stderr)
    return "#/experiments"


def serve(uri: str, port: int, view: str) -> int:
    """Serve MLflow's UI for the store ``uri`` on 127.0.0.1:``port`` until it exits or this process is
    told to stop; prints the address of ``view`` once the server answers. Returns the exit code."""
    # The store goes in the environment (server_environment), not on the command line: `ps` shows that to
    # every user of the machine, a database password in it included.
    # One worker: one local user's browser needs no more, and each of MLflow's default four costs seconds of
    # start-up and hundreds of MB.
    command = [sys.executable, "-m", "mlflow", "ui", "--host", HOST, "--port", str(port), "--workers", "1"]
    stopping: list[int] = []
    started: list[subprocess.Popen] = []

    def stop(signum: int, frame: Any) -> None:
        stopping.append(signum)
        for server in started:
            _signal_group(server, signal.SIGTERM)

    # Listening before the server starts: a Ctrl-C at any moment stops its whole group.
    previous = {s: signal.signal(s, stop) for s in STOP_SIGNALS}
    try:  # the handlers are given back however this ends, a server that could not start included
        # The server's log goes to stderr: stdout carries the address line alone, for `vit-search ui | ...`.
        # The watcher's standard input is a pipe from here, which it reads to learn that this process ended.
        server = subprocess.Popen([sys.executable, "-c", WATCHER, *command], env=server_environment(uri),
                                  start_new_session=True, stdin=subprocess.PIPE, stdout=2)
        started.append(server)
        if not _wait_until_up(server, f"http://{HOST}:{port}/health", stopping):
            if stopping:
                return 0
            # `mlflow ui` exits 0 when its uvicorn fails to start: an exit code would only mislead then.
            ended = f"it exited with code {server.returncode}" if server.returncode else "it stopped"
            print(f"error: the MLflow UI for {redact(uri)} did not start on {HOST}:{port} ({ended}); "
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
    """The UI server's environment: this one, tracking and serving the store ``uri`` (its models too), quiet
    but for what goes wrong, and without MLflow's job runner unless the user's own environment turns it on
    (or raises a log level: uvicorn's takes the last ``--log-level`` in ``MLFLOW_UVICORN_OPTS``)."""
    quiet = {"MLFLOW_LOGGING_LEVEL": "WARNING", "MLFLOW_REGISTRY_STORE_URI": uri}  # else "Registry store URI not provided"
    uvicorn = f"--log-level warning {os.environ.get('MLFLOW_UVICORN_OPTS', '')}".strip()
    # No Python warnings: the server's are its libraries' (Starlette's deprecations, once per worker).
    return {JOB_RUNNER: "false", **quiet, **os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_BACKEND_STORE_URI": uri,
            "MLFLOW_UVICORN_OPTS": uvicorn, "PYTHONWARNINGS": "ignore"}


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

"""`vit-search ui`: the port checked first, the address printed once MLflow's server answers, the server
stopped whole by SIGINT/SIGTERM, and the address that opens on the study's trials."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import psutil
import pytest

from vit_search.ui import JOB_RUNNER, serve, server_environment

SPEC = """
name: uitest
data: {dataset: digits, image_size: 8}
model: {dim: 16, depth: 1, patch_embed: {type: conv, patch_size: 2}, attention: {type: sdpa, heads: 2}}
train: {epochs: 1}
search:
  n_trials: 2
  space: {model.depth: {int: [1, 2]}}
tracking: {experiment: uitest}
"""


@pytest.fixture
def ui_spec(write_spec, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return write_spec(SPEC)


def start_ui(spec: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vit_search", "ui", str(spec), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_address(proc: subprocess.Popen) -> str:
    """The address line's URL: printed once the server answers, the first line on stdout (the server's
    own log goes to stderr, so that `vit-search ui | ...` reads the address alone)."""
    line = proc.stdout.readline()
    if line.startswith("MLflow UI for "):
        return line.split(": ", 1)[1].split()[0]
    raise AssertionError(f"{line!r} came first, not the address; exit {proc.wait()}: {proc.stderr.read()[-2000:]}")


def wait_until_gone(pids: list[int], deadline_seconds: float = 60) -> list[int]:
    """Poll until none of ``pids`` runs (zombies count as gone); returns those still running at the deadline."""
    deadline = time.monotonic() + deadline_seconds
    while True:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


@pytest.mark.parametrize("port", ["99999", "-1"])
def test_a_port_out_of_range_is_one_line_and_exit_2(ui_spec, cli_here, port):
    result = cli_here("ui", str(ui_spec), "--port", port)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [f"error: --port {port}: not a TCP port; give one from 1 to 65535, "
                                          f"or 0 for any free port"]


def test_a_port_in_use_is_refused_before_any_server_starts(ui_spec, cli_here):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli_here("ui", str(ui_spec), "--port", str(port))
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: --port {port}: 127.0.0.1:{port} is in use") and "--port 0" in line


def test_a_server_that_does_not_start_exits_non_zero(tmp_path, capsys):
    with socket.socket() as taken:  # taken after any check: MLflow's own server then fails to bind
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        code = serve(f"sqlite:///{tmp_path / 'mlflow.db'}", taken.getsockname()[1], "#/")
    assert code == 1
    assert "did not start on 127.0.0.1" in capsys.readouterr().err


@pytest.mark.slow
def test_port_0_serves_the_studys_runs_on_a_free_port_and_sigterm_stops_the_whole_server(ui_spec):
    signum = signal.SIGTERM
    proc = start_ui(ui_spec, "--port", "0")
    try:
        address = wait_for_address(proc)
        port = urllib.parse.urlsplit(address).port
        assert port and port != 0
        assert_lists_the_studys_trial_runs_best_first_in_charts(address)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as response:
            assert response.status == 200
        server = psutil.Process(proc.pid).children(recursive=True)
        assert server, "no server process under vit-search ui"
        # MLflow's job runner (huey consumers) is not started: comparing trials needs none of it.
        assert not [p for p in server if "huey" in " ".join(p.cmdline())]
        # Nor is the store on any command line (`ps` would show a database password in it to every user).
        assert not [p for p in server if "mlflow.db" in " ".join(p.cmdline())]
        proc.send_signal(signum)
        assert proc.wait(timeout=60) == 0
        assert wait_until_gone([p.pid for p in server]) == []
    finally:
        if proc.poll() is None:
            proc.kill()


def test_the_server_starts_without_mlflows_job_runner_unless_the_users_environment_turns_it_on(monkeypatch):
    monkeypatch.delenv(JOB_RUNNER, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    env = server_environment("sqlite:///here.db")
    assert env[JOB_RUNNER] == "false" and env["MLFLOW_TRACKING_URI"] == "sqlite:///here.db"
    monkeypatch.setenv(JOB_RUNNER, "true")
    assert server_environment("sqlite:///here.db")[JOB_RUNNER] == "true"


def _is_mlflow_ui(process: psutil.Process) -> bool:
    try:
        return "mlflow" in " ".join(process.cmdline())
    except psutil.Error:  # gone, or a zombie
        return False


def test_ctrl_c_while_the_server_starts_stops_its_whole_group_and_exits_0(ui_spec):
    proc = start_ui(ui_spec, "--port", "0")
    try:
        deadline, server = time.monotonic() + 60, []
        while not server:  # the server's processes exist: it is starting (answering takes seconds more)
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
            # the server's own: not a short-lived child before it (an import may run `git version`),
            # whose Ctrl-C would come before the command listens for one
            server = [p for p in psutil.Process(proc.pid).children(recursive=True) if _is_mlflow_ui(p)]
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        assert "MLflow UI for" not in proc.stdout.read()  # it never claimed to serve
        assert wait_until_gone([p.pid for p in server]) == []
    finally:
        if proc.poll() is None:
            proc.kill()


def assert_lists_the_studys_trial_runs_best_first_in_charts(address: str) -> None:
    """The printed address opens the study's trial runs, best val accuracy first, in the chart view."""
    fragment = urllib.parse.urlsplit(address).fragment
    path, _, query = fragment.partition("?")
    assert path.startswith("/experiments/") and path.endswith("/runs")
    params = dict(urllib.parse.parse_qsl(query))
    assert params == {
        "workflowType": "machine_learning", "compareRunsMode": "CHART",
        "searchFilter": "tags.`optuna.study_name` = 'uitest' and tags.`mlflow.parentRunId` LIKE '%'",
        "orderByKey": "metrics.`val_accuracy`", "orderByAsc": "false",
    }


def test_a_tracking_server_gets_the_address_printed_and_nothing_started(ui_spec, cli, mlflow_server):
    result = cli("ui", str(ui_spec), env={"MLFLOW_TRACKING_URI": mlflow_server})
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.splitlines()
    assert line.startswith(f"{mlflow_server}/#/experiments/") and "searchFilter=" in line
    assert os.environ.get("MLFLOW_TRACKING_URI") != mlflow_server

"""`vit-search ui`: the port checked first, the address printed once MLflow's server answers, the server
stopped whole by SIGINT/SIGTERM/SIGHUP and when `ui` is killed, its log quiet but for errors, and the
address that opens on the study's trials (or the experiments, with a note, where the study has logged nothing)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import psutil
import pytest

from vit_search.ui import JOB_RUNNER, serve, server_environment, study_view, ui_address

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


@pytest.fixture
def logged_ui_spec(ui_spec):
    """``ui_spec`` whose store holds its experiment, as a study's first trial leaves it."""
    logged_experiment(os.environ["MLFLOW_TRACKING_URI"])
    return ui_spec


def logged_experiment(uri: str, name: str = "uitest") -> str:
    """The id of experiment ``name`` in the MLflow store ``uri``, created if it is not there."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(name)
    return found.experiment_id if found else client.create_experiment(name)


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
        alive = [p for p in pids if _running(p)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:  # gone meanwhile
        return False


def kill_left(processes: list[psutil.Process]) -> None:
    """SIGKILL those of ``processes`` still running (a failed test's), by their own ids."""
    for process in processes:
        try:
            process.kill()  # psutil refuses an id reused by another process since
        except psutil.Error:
            pass


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


@pytest.mark.slow
def test_port_0_serves_the_studys_runs_quietly_on_a_free_port_and_sigterm_stops_the_whole_server(logged_ui_spec):
    signum = signal.SIGTERM
    proc = start_ui(logged_ui_spec, "--port", "0")
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
        # Nothing of how the server is doing, started or stopped: not uvicorn's INFO lines, Starlette's
        # deprecation warnings, MLflow's notes (its registry store, its --host, which ui does not take).
        assert proc.stderr.read() == ""
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow
def test_sigkill_of_ui_stops_the_whole_server_all_the_same(logged_ui_spec):
    proc = start_ui(logged_ui_spec, "--port", "0")
    server: list[psutil.Process] = []
    try:
        wait_for_address(proc)
        server = psutil.Process(proc.pid).children(recursive=True)
        assert [p for p in server if "uvicorn" in " ".join(p.cmdline())], "uvicorn is not up: nothing to orphan"
        proc.kill()  # no handler runs: the server must stop without ui's word
        proc.wait(timeout=60)
        assert wait_until_gone([p.pid for p in server]) == []
    finally:
        if proc.poll() is None:
            proc.kill()
        kill_left(server)


def test_a_server_that_does_not_start_exits_non_zero_and_still_says_why(tmp_path, capfd):
    with socket.socket() as taken:  # taken after any check: MLflow's own server then fails to bind
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert serve(f"sqlite:///{tmp_path / 'mlflow.db'}", taken.getsockname()[1], "#/") == 1
    err = capfd.readouterr().err
    assert "address already in use" in err.lower() and "did not start on 127.0.0.1" in err  # uvicorn's error, then ours
    assert "(exit 0)" not in err  # mlflow's command exits 0 after uvicorn's failure: no code that says all went well
    assert "INFO" not in err and "Warning" not in err and "--host" not in err


def test_the_server_starts_without_mlflows_job_runner_unless_the_users_environment_turns_it_on(monkeypatch):
    monkeypatch.delenv(JOB_RUNNER, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    env = server_environment("sqlite:///here.db")
    assert env[JOB_RUNNER] == "false" and env["MLFLOW_TRACKING_URI"] == "sqlite:///here.db"
    monkeypatch.setenv(JOB_RUNNER, "true")
    assert server_environment("sqlite:///here.db")[JOB_RUNNER] == "true"


def _is_mlflow_ui(process: psutil.Process) -> bool:
    """Whether ``process`` is MLflow's own command (`python -m mlflow ui`), not the watcher that starts it."""
    try:
        return process.cmdline()[1:4] == ["-m", "mlflow", "ui"]
    except psutil.Error:  # gone, or a zombie
        return False


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP], ids=["ctrl-c", "terminal-closed"])
def test_a_stop_while_the_server_starts_stops_its_whole_group_and_exits_0(ui_spec, signum):
    proc = start_ui(ui_spec, "--port", "0")
    server: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 60
        while not server:  # the server's processes exist: it is starting (answering takes seconds more)
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
            # the server's own: not a short-lived child before it (an import may run `git version`),
            # whose Ctrl-C would come before the command listens for one
            children = psutil.Process(proc.pid).children(recursive=True)
            server = children if any(_is_mlflow_ui(p) for p in children) else []
            time.sleep(0.05)
        proc.send_signal(signum)
        assert proc.wait(timeout=60) == 0
        assert "MLflow UI for" not in proc.stdout.read()  # it never claimed to serve
        assert wait_until_gone([p.pid for p in server]) == []
    finally:
        if proc.poll() is None:
            proc.kill()
        kill_left(server)


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
    logged_experiment(mlflow_server)
    result = cli("ui", str(ui_spec), env={"MLFLOW_TRACKING_URI": mlflow_server})
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.splitlines()
    assert line.startswith(f"{mlflow_server}/#/experiments/") and "searchFilter=" in line
    assert os.environ.get("MLFLOW_TRACKING_URI") != mlflow_server


def test_a_store_without_the_studys_experiment_opens_on_the_experiments_with_a_note_and_creates_none(ui_spec, capsys):
    from mlflow import MlflowClient

    from vit_search.spec import load_spec
    from vit_search.tracking import use_store

    spec = load_spec(ui_spec)
    use_store(spec)  # as `ui` points MLflow at the store
    uri = os.environ["MLFLOW_TRACKING_URI"]
    assert study_view(spec) == "#/experiments"
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert notes == [f"note: MLflow store {uri} has no experiment 'uitest' yet: nothing of this spec's is logged there; "
                     f"run the study first, or check tracking.uri and MLFLOW_TRACKING_URI"]
    client = MlflowClient(uri)
    assert client.get_experiment_by_name("uitest") is None  # a read-only command made none
    experiment_id = logged_experiment(uri)
    assert study_view(spec) == ui_address(spec, experiment_id)
    assert "note:" not in capsys.readouterr().err
    client.delete_experiment(experiment_id)
    assert study_view(spec) == "#/experiments"
    assert f"note: experiment 'uitest' in MLflow store {uri} is deleted; restore it" in capsys.readouterr().err


def test_ui_on_a_server_without_the_studys_experiment_says_so_and_creates_none(ui_spec, cli, mlflow_server):
    from mlflow import MlflowClient

    name = f"never-run-{uuid.uuid4().hex[:8]}"  # the server is the session's: no other test's experiment
    result = cli("ui", str(ui_spec), "--set", f"tracking.experiment={name}", env={"MLFLOW_TRACKING_URI": mlflow_server})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"{mlflow_server}/#/experiments"]
    assert result.stderr.splitlines() == [
        f"note: MLflow store {mlflow_server} has no experiment '{name}' yet: nothing of this spec's is logged there; "
        f"run the study first, or check tracking.uri and MLFLOW_TRACKING_URI"]
    assert MlflowClient(mlflow_server).get_experiment_by_name(name) is None


HOLD = """
import os, pathlib, time

pathlib.Path(os.environ["UI_TEST_HELD"]).touch()  # the spec is being loaded: the server is not started yet
while True:
    time.sleep(0.05)
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stop_before_the_server_starts_exits_0_too(ui_spec, write_spec, tmp_path, monkeypatch, signum):
    (tmp_path / "hold.py").write_text(HOLD)  # a plugin that holds `ui` in its spec's loading, before serve()
    held = tmp_path / "held"
    monkeypatch.setenv("UI_TEST_HELD", str(held))
    proc = start_ui(write_spec(SPEC + "plugins: [hold.py]\n", name="held.yaml"), "--port", "0")
    try:
        deadline = time.monotonic() + 60
        while not held.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
            time.sleep(0.05)
        proc.send_signal(signum)
        assert proc.wait(timeout=60) == 0
        assert (proc.stdout.read(), proc.stderr.read()) == ("", "")  # stopping is how a UI ends: nothing to say
    finally:
        if proc.poll() is None:
            proc.kill()

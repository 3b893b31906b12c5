"""Shared fixtures: specs written to disk, and the command line run as a user runs it."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The test models are tiny: one thread each is fastest, and tests that start several worker
# processes on a 2-core machine must not oversubscribe it (set before torch is imported).
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Decoded caches go to a folder of this test session (subprocesses inherit it), never the user's home.
_CACHE = tempfile.mkdtemp(prefix="vit-search-test-cache-")
os.environ["VIT_SEARCH_CACHE"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slow tests first, so that pytest-xdist's workers start them early and finish together rather
    than one waiting on another's last slow test. Tests that share the one PostgreSQL database run
    on one worker, one after another (two workers creating Optuna's tables in it at once would race)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: file order otherwise
    for item in items:
        if "postgres_url" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("postgresql"))


_LEFT_IN_THE_REPOSITORY = ("mlruns", "mlflow.db", "optuna.db", "runs", "mlartifacts")


@pytest.fixture(scope="session", autouse=True)
def nothing_is_written_into_the_repository():
    """No test leaves a store, study or checkpoint in the checkout (a command run with the repository as
    its working directory writes ./mlruns, ./runs ...): git ignores them, so only this would tell."""
    before = {name for name in _LEFT_IN_THE_REPOSITORY if (REPO / name).exists()}
    yield
    left = sorted(name for name in _LEFT_IN_THE_REPOSITORY if (REPO / name).exists() and name not in before)
    assert not left, f"tests left {left} in {REPO}: give the command a cwd (tmp_path) or chdir there"


@pytest.fixture(autouse=True)
def mlflow_follows_the_environment():
    """After each test, MLflow's tracking URI is unset again and MLFLOW_TRACKING_URI is what it was.

    A run in the test's own process sets MLflow's global URI (tracking.configure), and MLflow's
    ``set_tracking_uri`` writes the environment variable too, past monkeypatch: left as they are, a
    later test's ``MlflowClient()`` would read that test's store rather than its own.
    """
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if "mlflow" in sys.modules:
        sys.modules["mlflow"].set_tracking_uri(None)
    if saved is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = saved


@pytest.fixture(scope="session")
def sqlite_uri(tmp_path_factory) -> str:
    """One MLflow sqlite store for the session (creating its tables takes seconds); tests keep
    apart by experiment name."""
    from mlflow.tracking import MlflowClient

    folder = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    # MLflow makes a sqlite store's artifact root (./mlruns) absolute once per process, from the
    # working directory of the moment: let that be this folder, not the repository.
    here = os.getcwd()
    os.chdir(folder)
    try:
        MlflowClient(uri).search_experiments()
    finally:
        os.chdir(here)
    return uri


@pytest.fixture
def write_spec(tmp_path: Path):
    """Write YAML text (dedented) to a file in tmp_path and return its path."""

    def write(text: str, name: str = "spec.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text).lstrip())
        return path

    return write


@contextlib.contextmanager
def registry_restored(module_prefixes: tuple[str, ...]):
    """The default registry put back as it was after the block: its blocks (a test's must not show up in
    another's "registered: ..." list), and the plugin modules imported meanwhile whose names start with
    ``module_prefixes`` forgotten. The registry has no public way to unregister: a snapshot is the honest undo."""
    from vit_search.registry import REGISTRY

    REGISTRY.list()  # built-ins (and installed plugins) loaded first, so that they are kept
    saved = {kind: dict(blocks) for kind, blocks in REGISTRY._blocks.items()}
    modules_before = set(sys.modules)
    try:
        yield REGISTRY
    finally:
        for kind, blocks in REGISTRY._blocks.items():
            blocks.clear()
            blocks.update(saved[kind])
        for name in set(sys.modules) - modules_before:
            if name.startswith(module_prefixes):
                del sys.modules[name]


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 600):
    """Run ``python -m vit_search ARGS`` in a fresh process; returns the CompletedProcess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "vit_search", *args],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture
def cli():
    """The command line as a subprocess: ``cli("validate", path)``."""
    return run_cli


@pytest.fixture
def cli_here(capsys, monkeypatch):
    """The command line in the test's process, for refusals that need no process of their own (no
    start-up to pay): ``cli_here("run", path, cwd=..., env=...)`` returns a CompletedProcess. An
    exception out of the command fails the test, as a traceback would."""
    from vit_search.cli import main

    def run(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        if cwd is not None:
            monkeypatch.chdir(cwd)
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)
        capsys.readouterr()
        code = main([str(arg) for arg in args])
        said = capsys.readouterr()
        return subprocess.CompletedProcess(list(args), code, said.out, said.err)

    return run


def trials_watch(study_name: str, storage: str):
    """A function returning the trials of a study that another process writes ([] until it exists), for
    polling loops. ``optuna.load_study`` opens the storage anew, about 70 ms of CPU a call: polled every
    0.1 s, that took most of a core from the process under test. Here the study is loaded once. A SQLite
    storage is first read, read-only, for the study's row: opening it with Optuna while the other process
    still makes its tables would make them too ("table studies already exists" there)."""
    import sqlite3

    import optuna

    loaded: list = []
    file = Path(storage.removeprefix("sqlite:///")) if storage.startswith("sqlite:///") else None

    def made() -> bool:
        try:
            with contextlib.closing(sqlite3.connect(f"file:{file}?mode=ro", uri=True, timeout=1)) as db:
                return db.execute("SELECT 1 FROM studies WHERE study_name = ?", (study_name,)).fetchone() is not None
        except sqlite3.Error:  # no file, no table yet, or locked
            return False

    def trials() -> list:
        if not loaded:
            if file is not None and not made():
                return []
            try:
                loaded.append(optuna.load_study(study_name=study_name, storage=storage))
            except KeyError:  # no such study yet
                return []
        return loaded[0].get_trials(deepcopy=False)

    return trials


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing holds right now, drawn below the kernel's ephemeral range.

    A port from ``bind(0)`` lies in that range, from which the kernel also gives every client socket and
    every listener without a port of its own (gloo's, in a launch beside ours) theirs: one of them
    could take it in the seconds before the server meant to bind it (which starts Python first) does.
    """
    import random
    import socket

    try:
        ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768  # Linux's default
    # Not the module's generator: training in a test's process seeds it (set_seed), and two xdist workers
    # that trained with the same seed then drew the same port for their MLflow servers, one answering
    # the other's client.
    draw = random.SystemRandom()
    for _ in range(200):
        port = draw.randrange(10000, max(ephemeral, 10001))
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port on 127.0.0.1 between 10000 and {ephemeral}")


def two_process_launch(*args: str) -> list[str]:
    """``accelerate launch`` of ``args`` on two processes of this machine (one gloo group on CPUs), on a
    port of its own: launches from tests running at once would all take torch's default 29500. Port 0
    lets torchrun pick one and bind it at once; one picked here would stay free for the seconds the
    launcher takes to import, and something else could take it meanwhile."""
    # --multi_gpu selects torchrun's launcher; on a machine without GPUs the processes join one gloo
    # group (accelerate's --cpu flag alone starts a single process unless MPI is set up).
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
            "1", "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no", *args]


def launched_pid(mark: str, rank: str) -> int | None:
    """The pid of the launched process of local rank ``rank`` whose environment holds ``mark`` (``NAME=VALUE``, set
    by the test for its launch alone); None while it has not started."""
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            variables = environ.read_bytes().split(b"\0")
        except OSError:  # gone, or not ours
            continue
        if mark.encode() in variables and f"LOCAL_RANK={rank}".encode() in variables:
            return int(environ.parent.name)
    return None


def stopped_at_first_checkpoint(argv: list[str], checkpoint: Path, signum: int, cwd: Path, env: dict[str, str],
                                wait_seconds: float = 120) -> subprocess.CompletedProcess:
    """``argv`` started, then sent ``signum`` once ``checkpoint`` is on disk (training under way); returns the
    finished process with its stderr (stdout is dropped)."""
    import time

    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + wait_seconds
    while not checkpoint.exists():  # training
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signum)
    err = proc.communicate(timeout=120)[1]
    return subprocess.CompletedProcess(argv, proc.returncode, "", err)


def start_mlflow_server(root: Path, port: int, artifacts: Path | None = None) -> subprocess.Popen:
    """A real ``mlflow server`` on 127.0.0.1:``port``, in a process group of its own, over the sqlite store in
    ``root`` (the same store when started again), proxying artifacts to ``artifacts`` (default: a folder in
    ``root``); returned once it answers. Its output goes to ``root/server.log``.

    MLflow's job runner is off: it would add eight processes and 20 s of CPU to every start, and no test
    uses it (``vit-search ui`` turns it off the same way).
    """
    import time
    import urllib.request

    with open(root / "server.log", "a") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--artifacts-destination", str(artifacts or root / "artifacts")],
            stdout=log, stderr=subprocess.STDOUT, cwd=root, start_new_session=True,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return proc
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            kill_group(proc)
            raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.3)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a process started with a session of its own, and everything in its group (a server's workers)."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` process on 127.0.0.1 with a sqlite store; yields its URI."""
    port = free_port()
    proc = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"), port)
    yield f"http://127.0.0.1:{port}"
    kill_group(proc)


@pytest.fixture
def redis_url() -> str:
    """The Redis server of the development and CI machines; tests skip where none answers."""
    redis = pytest.importorskip("redis", reason="redis is needed for Redis storages (pip install -e '.[test]')")
    url = "redis://127.0.0.1:6379"
    try:
        redis.Redis.from_url(url, socket_connect_timeout=3).ping()
    except redis.exceptions.RedisError as err:
        pytest.skip(f"no Redis server answers on 127.0.0.1:6379: {err}")
    return url


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """The PostgreSQL server of the development and CI machines; tests skip where none answers."""
    psycopg = pytest.importorskip("psycopg", reason="psycopg is needed for PostgreSQL storages (pip install -e '.[test]')")
    url = "postgresql://postgres@127.0.0.1:5432/test"
    try:
        psycopg.connect(url, connect_timeout=3).close()
    except psycopg.OperationalError as err:
        pytest.skip(f"no PostgreSQL server answers on 127.0.0.1:5432 (database test, user postgres): {err}")
    return url

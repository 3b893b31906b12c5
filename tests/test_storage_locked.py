"""A SQLite study storage that another process holds locked, or that cannot be written, when a study starts:
one line naming the storage, its cause and the way out, not Optuna's "invalid data in the commit" nor "a
damaged SQLite database ... move it away" (a live database moved away from its holder is harmed).

The locks are real: another process holds them through its own sqlite3 connection. The wait for them is
the storage URL's own ``timeout`` (``sqlite:///optuna.db?timeout=1``, seconds), 60 s when it has none.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import optuna
import pytest
import yaml

from test_faults import one_line
from test_study import study_raw
from vit_search.files import sqlite_problem
from vit_search.search.study import open_study
from vit_search.spec import load_spec

# Another process's connection: takes the lock the way MODE says, says "locked", then holds it until killed.
HOLDER = """
import sqlite3, sys, time
connection = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=5)
if sys.argv[2] == "exclusive-mode":  # every lock it takes is kept, readers' too, past its transaction
    connection.execute("PRAGMA locking_mode=EXCLUSIVE")
connection.execute("BEGIN EXCLUSIVE")
if sys.argv[2] == "exclusive-mode":
    connection.execute("CREATE TABLE IF NOT EXISTS held (x)")  # a write: the lock is taken
print("locked", flush=True)
time.sleep(120)
"""


@contextlib.contextmanager
def held(path: Path, mode: str) -> Iterator[None]:
    """``path`` locked by another process for the ``with`` body: ``begin`` (BEGIN EXCLUSIVE, a writer's lock;
    in WAL mode readers still read) or ``exclusive-mode`` (PRAGMA locking_mode=EXCLUSIVE: nobody reads)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), mode], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        yield
    finally:
        holder.kill()
        holder.wait(timeout=30)


@pytest.fixture
def stored(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """A study made as ``vit-search run`` makes it (its file in WAL mode), no trial yet, and its spec (no
    MLflow: the storage is what is under test). Returns (spec file, storage file)."""
    monkeypatch.chdir(tmp_path)
    raw = {**study_raw("held"), "tracking": {"enabled": False}}
    spec = tmp_path / "study.yaml"
    spec.write_text(yaml.safe_dump(raw, sort_keys=False))
    handle = open_study(load_spec(raw))
    handle.storage.engine.dispose()  # this process holds no connection to it: the command opens its own
    path = tmp_path / "optuna.db"
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    return spec, path


def trials_in(path: Path) -> int:
    return len(optuna.load_study(study_name="held", storage=f"sqlite:///{path}").get_trials())


@pytest.mark.parametrize("mode", ["begin", "exclusive-mode"])
def test_a_study_file_another_process_holds_locked_is_one_line_naming_the_lock_and_the_wait(stored, cli_here, mode):
    # begin: the file reads, and the study's first write waits (Optuna's "invalid data in the commit", exit 1,
    # after 60 s whatever the URL said). exclusive-mode: nothing reads (it was "a damaged SQLite database
    # (database is locked) ...; move it away", exit 2).
    spec, path = stored
    url = f"sqlite:///{path}?timeout=1"
    with held(path, mode):
        started = time.monotonic()
        result = cli_here("run", spec, "--storage", url)
        took = time.monotonic() - started
    assert one_line(result, code=1) == (f"error: storage '{url}': the file is locked by another process (waited 1 s); "
                                        f"stop that process (or wait for it), then run the same command")
    assert took < 10  # the URL's wait, not 60 s
    assert trials_in(path) == 0  # the file is whole, and no trial was started in it


@pytest.fixture
def read_only(stored) -> Iterator[tuple[Path, Path]]:
    """The stored study's file made read-only: immutable for root (whom its mode does not stop), else its mode."""
    spec, path = stored
    if os.geteuid() == 0:
        made = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
        if made.returncode != 0:
            pytest.skip(f"chattr +i is refused here: {made.stderr.strip()}")
        try:
            yield spec, path
        finally:
            subprocess.run(["chattr", "-i", str(path)], check=True)  # else tmp_path cannot be removed
    else:
        path.chmod(0o444)
        yield spec, path


def test_a_study_file_that_cannot_be_written_is_one_line_saying_so(read_only, cli_here):
    # It was Optuna's "An exception is raised during the commit ... invalid data", exit 1, as a fault of ours.
    spec, path = read_only
    url = f"sqlite:///{path}"
    result = cli_here("run", spec, "--storage", url)
    assert one_line(result, code=2) == (f"error: storage '{url}': the file cannot be written (attempt to write a "
                                        f"readonly database); make it writable (its permissions, chattr -i, a "
                                        f"read-write mount), or pass another --storage")


def test_a_sqlite_file_another_process_holds_is_not_called_damaged(stored):
    # The same check reads MLflow's sqlite:/// store: a whole, live file is never sent away as damaged.
    from vit_search.files import SqliteLocked

    _, path = stored
    with held(path, "exclusive-mode"):
        assert sqlite_problem(path, timeout=0.2) is None
        with pytest.raises(SqliteLocked) as locked:
            sqlite_problem(path, timeout=0.2, raise_locked=True)
    assert locked.value.waited == 0.2 and "database is locked" in locked.value.said
    assert sqlite_problem(path) is None  # let go: a database, read at once


def test_an_mlflow_store_another_process_holds_locked_is_one_line_after_one_wait(tmp_path, cli_here):
    # It was "MLflow store ... cannot be opened: database is locked; set MLFLOW_TRACKING_URI to another store",
    # exit 2, after 133 s: three waits of 60 s, the URL's own timeout unread.
    store = tmp_path / "mlflow.db"
    raw = {**study_raw("held"), "tracking": {"experiment": "held"}}
    # A store made as the command makes it, by another process: one of this one's would keep a connection open.
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({key: value for key, value in raw.items() if key != "search"}, sort_keys=False))
    subprocess.run([sys.executable, "-c", "import sys; from vit_search.spec import load_spec; from vit_search.tracking "
                    "import check_store; check_store(load_spec(sys.argv[1], ['tracking.uri=' + sys.argv[2]]))",
                    str(spec), f"sqlite:///{store}"], check=True, timeout=120)
    uri = f"sqlite:///{store}?timeout=1"
    with held(store, "exclusive-mode"):
        started = time.monotonic()
        result = cli_here("train", spec, cwd=tmp_path, env={"MLFLOW_TRACKING_URI": uri})
        took = time.monotonic() - started
    assert one_line(result, code=1) == (f"error: MLflow store {uri}: the file is locked by another process (waited "
                                        f"1 s); stop that process (or wait for it), then run the same command")
    assert took < 15 and not (tmp_path / "runs").exists()  # one wait, and nothing trained


# Another process's writer lock on the file, held for argv[2] seconds (0: until killed), then let go.
HOLD_FOR = """
import sqlite3, sys, time
connection = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=5)
connection.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]) or 600)
connection.execute("ROLLBACK")
"""


def locked_mid_trial(argv: list[str], path: Path, seconds: float, cwd: Path, env: dict[str, str]) -> tuple[int, str]:
    """Run ``argv`` (a study of long trials) and hold ``path`` locked from its trial 0's second epoch, for
    ``seconds`` (0: until the command ends); returns its exit code and its last stderr line."""
    proc = subprocess.Popen(argv, cwd=cwd, env={**os.environ, **env, "VIT_SEARCH_LOG_SECONDS": "0"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    holder = None
    try:
        assert proc.stdout is not None and proc.stderr is not None
        for line in proc.stdout:  # the epoch lines, one an epoch
            if line.startswith("trial 0 epoch 2/"):
                holder = subprocess.Popen([sys.executable, "-c", HOLD_FOR, str(path), str(seconds)],
                                          stdout=subprocess.PIPE, text=True)
                assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
                break
        assert holder is not None, "the trial never reached its second epoch"
        proc.stdout.read()
        err = proc.stderr.read()
        code = proc.wait(timeout=300)
    finally:
        proc.kill()
        if holder is not None:
            holder.kill()
            holder.wait(timeout=30)
    assert "Traceback" not in err, err[-2000:]
    return code, (err.strip().splitlines() or [""])[-1]


def test_a_study_file_locked_past_its_wait_mid_trial_stops_the_worker_with_the_trial_queued_again(stored):
    # It was `trial 0 failed: ReportNotStored ... retried when the study resumes`, then the worker went on and
    # the study ended (exit 0) with the trial FAILED for good: once the lock was let go, nothing retried it.
    spec, path = stored
    url = f"sqlite:///{path}?timeout=3"
    argv = [sys.executable, "-m", "vit_search", "run", str(spec), "--storage", url, "--n-trials", "1",
            "--set", "train.epochs=200"]
    # Let go before the trial's failure waits out its own 3 s: its report failed, and the worker can write again.
    code, line = locked_mid_trial(argv, path, 5, spec.parent, {})
    assert code == 1 and line == (f"error: storage '{url}': the file is locked by another process (waited 3 s); stop "
                                  f"that process (or wait for it), then run the same command (trial 0 is queued again)")
    states = [t.state for t in optuna.load_study(study_name="held", storage=f"sqlite:///{path}").get_trials()]
    assert states == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.WAITING]


def test_an_mlflow_store_locked_mid_trial_stops_the_worker_with_the_trial_queued_again(tmp_path, monkeypatch):
    # It was the trial failed for good with MLflow's SQL text as its error (exit 1 as a fault of ours, or the
    # next trial met the same lock): the lock is the store's, which no trial gets past.
    monkeypatch.chdir(tmp_path)
    raw = {**study_raw("held", n_trials=1), "tracking": {"experiment": "held", "plots": False}}
    spec = tmp_path / "study.yaml"
    spec.write_text(yaml.safe_dump(raw, sort_keys=False))
    store = tmp_path / "mlflow.db"
    uri = f"sqlite:///{store}?timeout=2"
    argv = [sys.executable, "-m", "vit_search", "run", str(spec), "--set", "train.epochs=200"]
    code, line = locked_mid_trial(argv, store, 0, tmp_path, {"MLFLOW_TRACKING_URI": uri})
    assert code == 1 and line == (f"error: MLflow store {uri}: the file is locked by another process (waited 2 s): "
                                  f"trial 0 is queued again; stop that process (or wait for it), then run the same "
                                  f"command to resume")
    states = [t.state for t in optuna.load_study(study_name="held", storage=raw["search"]["storage"]).get_trials()]
    assert states == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.WAITING]

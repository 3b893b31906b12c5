"""SQLite stores in WAL mode with synchronous=NORMAL: commits that wait for no fsync, on local disks only."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest
import sqlalchemy

from vit_search import sqlite_wal
from vit_search.search.storage import open_storage


def journal_mode(path: Path) -> str:
    connection = sqlite3.connect(path)
    try:
        return connection.execute("PRAGMA journal_mode").fetchone()[0]
    finally:
        connection.close()


def synchronous(path: Path) -> int:
    """PRAGMA synchronous of a new SQLAlchemy engine's connection to ``path`` (1 NORMAL, 2 FULL)."""
    engine = sqlalchemy.create_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as connection:
            return connection.exec_driver_sql("PRAGMA synchronous").scalar()
    finally:
        engine.dispose()


def test_an_optuna_storage_file_is_put_in_wal_mode_and_its_connections_skip_the_fsync(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    optuna.create_study(study_name="wal", storage=storage).optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    assert journal_mode(tmp_path / "optuna.db") == "wal"
    with storage.engine.connect() as connection:  # Optuna's own engine
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 1
    assert synchronous(tmp_path / "optuna.db") == 1
    other = tmp_path / "not-ours.db"  # a file nobody named keeps SQLite's defaults
    sqlite3.connect(other).close()
    assert synchronous(other) == 2 and journal_mode(other) == "delete"


def test_a_sqlite_urls_driver_options_are_no_part_of_the_files_name(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}?timeout=30")
    optuna.create_study(study_name="query", storage=storage).optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    assert journal_mode(tmp_path / "optuna.db") == "wal"
    assert sorted(p.name for p in tmp_path.iterdir() if "?" in p.name) == []  # no 'optuna.db?timeout=30' beside it


def test_an_mlflow_sqlite_store_is_made_in_wal_mode(tmp_path, monkeypatch):
    from vit_search.spec import load_spec
    from vit_search.tracking import use_store

    monkeypatch.chdir(tmp_path)
    store = tmp_path / "new" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: wal\ndata: {dataset: digits, image_size: 8}\n"
                    "model: {dim: 8, depth: 1, patch_embed: {type: conv, patch_size: 4}}\n")
    use_store(load_spec(spec))
    assert journal_mode(store) == "wal" and synchronous(store) == 1
    tables = sqlite3.connect(store).execute("SELECT count(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0]
    assert tables > 10  # MLflow's migrations ran on the WAL file


@pytest.mark.parametrize("end", ["killed", "exits"])
def test_a_killed_process_loses_no_commit_and_one_that_exits_folds_the_log_back(tmp_path, end):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    # Killed: no connection closed, no checkpoint, the commits are in the -wal file only.
    writer = textwrap.dedent(f"""
        import os, optuna
        from vit_search.search.storage import open_storage
        study = optuna.create_study(study_name="wal", storage=open_storage({url!r}))
        study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
        {"os.kill(os.getpid(), 9)" if end == "killed" else ""}
    """)
    done = subprocess.run([sys.executable, "-c", writer], capture_output=True, text=True, timeout=120)
    assert done.returncode == (-9 if end == "killed" else 0), done.stderr[-2000:]
    if end == "killed":
        assert (tmp_path / "optuna.db-wal").stat().st_size > 0
    else:  # the last connection's close moved the log into the file: optuna.db alone can be copied
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("optuna.db")) == ["optuna.db"]
    study = optuna.load_study(study_name="wal", storage=open_storage(url))
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 3


def test_a_file_another_process_holds_keeps_its_mode_and_the_worker_goes_on(tmp_path):
    path = tmp_path / "busy.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")  # a writer mid-transaction in rollback mode
    try:
        assert sqlite_wal.use_wal(path, timeout=0.2) is False
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert journal_mode(path) == "delete"
    assert sqlite_wal.use_wal(path) is True and journal_mode(path) == "wal"


MOUNTS = """\
/dev/root / ext4 rw,relatime 0 0
tmpfs /dev/shm tmpfs rw 0 0
server:/export /mnt/share nfs4 rw,vers=4.2 0 0
//nas/team /mnt/team\\040drive cifs rw 0 0
me@host:/data /mnt/remote fuse.sshfs rw 0 0
"""


@pytest.mark.parametrize("path, local", [
    ("/home/me/optuna.db", True), ("/dev/shm/optuna.db", True), ("/mnt/share/study/optuna.db", False),
    ("/mnt/sharedata/optuna.db", True),  # a name that starts like a network mount is not inside it
    ("/mnt/team drive/optuna.db", False), ("/mnt/remote/optuna.db", False)])
def test_files_on_network_file_systems_are_told_from_local_ones(tmp_path, monkeypatch, path, local):
    (tmp_path / "mounts").write_text(MOUNTS)
    monkeypatch.setattr(sqlite_wal, "MOUNTS", str(tmp_path / "mounts"))
    assert sqlite_wal.local_file_system(Path(path)) is local


def test_a_storage_on_a_network_file_system_keeps_its_journal_mode(tmp_path, monkeypatch):
    (tmp_path / "mounts").write_text(f"/dev/root / ext4 rw 0 0\nserver:/x {tmp_path} nfs4 rw 0 0\n")
    monkeypatch.setattr(sqlite_wal, "MOUNTS", str(tmp_path / "mounts"))
    storage = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    optuna.create_study(study_name="nfs", storage=storage)
    assert journal_mode(tmp_path / "optuna.db") == "delete" and synchronous(tmp_path / "optuna.db") == 2


def test_checking_a_store_this_process_holds_leaves_its_wal_to_it(tmp_path):
    from vit_search.files import sqlite_problem

    path = tmp_path / "held.db"
    assert sqlite_wal.use_wal(path)
    held = sqlite3.connect(path)  # this process's connection, as MLflow's pool keeps one
    held.execute("CREATE TABLE t (x)")
    held.commit()
    assert sqlite_problem(path) is None
    # Another process opens and closes the file. Had the check dropped this process's locks, that
    # process would take itself for the last user, checkpoint and delete the log under `held`.
    other = f"import sqlite3; c = sqlite3.connect({str(path)!r}); c.execute('SELECT * FROM t').fetchall(); c.close()"
    subprocess.run([sys.executable, "-c", other], check=True, timeout=60)
    assert (tmp_path / "held.db-wal").exists()
    held.execute("INSERT INTO t VALUES (1)")
    held.commit()
    held.close()
    assert sqlite3.connect(path).execute("SELECT x FROM t").fetchall() == [(1,)]


@pytest.mark.parametrize("wal", [True, False])
def test_a_reader_mid_transaction_does_not_block_a_writer_in_wal_mode(tmp_path, wal):
    path = tmp_path / "study.db"
    sqlite3.connect(path).execute("CREATE TABLE t (x)").connection.commit()
    if wal:
        assert sqlite_wal.use_wal(path)
    reader = sqlite3.connect(path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM t").fetchone()  # a report or `best` reading the study
    writer = sqlite3.connect(path, timeout=0.2, isolation_level=None)
    try:
        writer.execute("INSERT INTO t VALUES (1)")  # a worker's commit
        committed = True
    except sqlite3.OperationalError:  # "database is locked": the rollback journal waits for the reader
        committed = False
    finally:
        reader.execute("COMMIT")
        reader.close()
        writer.close()
    assert committed is wal

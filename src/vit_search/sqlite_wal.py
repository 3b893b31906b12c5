"""Our SQLite stores (Optuna's and MLflow's) commit without waiting for the disk.

In SQLite's default mode (a rollback journal, ``synchronous=FULL``) every commit waits for about
three fsyncs while it holds the only write lock on the file. A 20-epoch trial waited for 168
``fdatasync`` calls (about 56 commits, counted with strace), and making a new study's and MLflow
store's tables for about 1,300: at a few milliseconds an fsync, as on many cloud disks, that was the
pace of a whole study however many trials ran at once. In WAL mode with ``synchronous=NORMAL`` a
commit appends to the log and waits for no fsync (the log is synced at checkpoints), and readers no
longer block the writer.

What that gives up: after a power cut or an operating-system crash (not a killed process) the last
commits may be rolled back; the file stays consistent. WAL needs memory shared by every process
that opens the file, so files on network file systems (NFS, SMB, FUSE mounts) keep their mode.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path

# File system types where processes on other machines may open the file: no shared memory for WAL.
NETWORK_FILE_SYSTEMS = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "ncpfs", "afs", "9p", "ceph", "glusterfs",
                                  "lustre", "gpfs", "beegfs", "orangefs", "pvfs2"})

MOUNTS = "/proc/self/mounts"
"""Linux's mount table: each line ``device mount-point type options ...``."""

_wal_files: set[str] = set()
_listening = threading.Lock()


def local_file_system(path: Path) -> bool:
    """Whether ``path``'s folder is on a file system of this machine alone (True where Linux's mount
    table cannot be read)."""
    folder = os.path.realpath(path.parent)
    try:
        with open(MOUNTS) as mounts:
            table = [line.split()[1:3] for line in mounts]
    except OSError:
        return True
    mounted = [(point.replace("\\040", " "), kind) for point, kind in table]
    inside = [(point, kind) for point, kind in mounted
              if folder == point or folder.startswith(point.rstrip("/") + "/")]
    if not inside:
        return True
    kind = max(inside, key=lambda entry: len(entry[0]))[1]
    return kind not in NETWORK_FILE_SYSTEMS and not kind.startswith("fuse")


def use_wal(path: Path, timeout: float = 60.0) -> bool:
    """Put the SQLite file ``path`` (made if absent) in WAL mode, and have every later connection of
    this process to it commit with ``synchronous=NORMAL``. False, the file left in its mode, on a
    network file system or where SQLite refuses (a full disk, a lock held past ``timeout``)."""
    if os.path.realpath(path) in _wal_files:  # done already in this process (every trial checks its store)
        return True
    if not local_file_system(path):
        return False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(path, timeout=timeout)
    except (OSError, sqlite3.Error):
        return False
    try:
        mode = connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    except sqlite3.Error:
        return False
    finally:
        connection.close()
    if mode != "wal":
        return False
    _wal_files.add(os.path.realpath(path))
    _listen()
    return True


def _listen() -> None:
    """SQLAlchemy's documented recipe for pragmas: a ``connect`` listener on every engine (Optuna and
    MLflow make their own), acting on the files ``use_wal`` named only."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    with _listening:
        if not event.contains(Engine, "connect", _commit_without_fsync):
            event.listen(Engine, "connect", _commit_without_fsync)


def _commit_without_fsync(dbapi_connection: object, _record: object) -> None:
    if not isinstance(dbapi_connection, sqlite3.Connection):
        return
    try:
        main = next(row[2] for row in dbapi_connection.execute("PRAGMA database_list") if row[1] == "main")
        if main and os.path.realpath(main) in _wal_files:
            # Only in WAL mode: with a rollback journal, NORMAL could leave a damaged file after a power cut.
            if dbapi_connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
                dbapi_connection.execute("PRAGMA synchronous=NORMAL")
    except (sqlite3.Error, StopIteration):  # a connection we cannot ask keeps SQLite's defaults
        return

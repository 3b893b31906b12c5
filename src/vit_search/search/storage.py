"""Where a study lives (an Optuna storage) and the lock that lets several workers share it.

Storage URLs:

* ``sqlite:///path.db``, ``postgresql://...``, ``mysql+pymysql://...``: Optuna's RDBStorage;
* ``journal:PATH`` or a path ending in ``.log``/``.journal``/``.jsonl``: a JournalStorage file;
* ``redis://host:port/db``: a JournalStorage on Redis;
* nothing: ``sqlite:///optuna.db`` beside the MLflow store (its folder when that is a sqlite file,
  else the working directory).

Workers take each new trial under a lock held in the same place as the study (a file lock beside a
sqlite or journal file, an advisory lock in PostgreSQL or MySQL, a Redis lock), so that together
they start exactly ``n_trials``.
"""

from __future__ import annotations

import fcntl
import functools
import os
import tempfile
import warnings
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ..errors import FileLocked, RunFailed, UserError
from ..files import (
    SqliteLocked, database_problem, disk_full, driver_said, in_memory_sqlite, sqlite_busy, sqlite_problem, sqlite_read_only,
    sqlite_timeout, symlink_loop,
)
from ..redaction import redact, redact_in  # noqa: F401  (storage messages and tags use it from here too)
from ..sqlite_wal import use_wal

JOURNAL_SUFFIXES = (".log", ".journal", ".jsonl")
EXAMPLES = ("sqlite:///optuna.db, journal:study.log, postgresql://user@host/db, mysql+pymysql://user@host/db "
            "or redis://host:6379/0")
# Drivers the docs name, by the module SQLAlchemy (or Optuna) imports: how to install each.
INSTALL = {"psycopg": "pip install 'vit-search[postgres]'", "redis": "pip install redis",
           "pymysql": "pip install pymysql",
           "psycopg2": "write postgresql+psycopg://... and pip install 'vit-search[postgres]', or pip install psycopg2-binary",
           "MySQLdb": "write mysql+pymysql://... and pip install pymysql, or pip install mysqlclient"}


class StorageError(UserError):
    """A storage URL that cannot be used here: one line naming the URL and the fix (the CLI exits 2)."""


class StudyMismatch(StorageError):
    """A stored study that the spec cannot resume (other objectives): one line, the CLI exits 2."""


class StorageLost(RunFailed):
    """The study's database stopped answering while a worker ran: one line, the CLI exits 1."""


STORAGE_ENV = "VIT_SEARCH_STORAGE"
"""The storage URL, when ``--storage`` is not given: keeps a password off the command line (``ps``)."""


def default_storage_url() -> str:
    """``sqlite:///optuna.db`` next to MLflow's sqlite store, or in the working directory."""
    tracking = os.environ.get("MLFLOW_TRACKING_URI", "")
    if tracking.startswith("sqlite:///"):
        return f"sqlite:///{Path(tracking.removeprefix('sqlite:///')).parent / 'optuna.db'}"
    return "sqlite:///optuna.db"


def journal_path(url: str) -> Path | None:
    """The journal file a URL names, or None for a database URL."""
    if url.startswith("journal:"):
        return Path(url.removeprefix("journal:"))
    if "://" not in url and url.endswith(JOURNAL_SUFFIXES):
        return Path(url)
    return None


def storage_file(url: str) -> Path | None:
    """The file a SQLite or journal storage lives in (None for a database server); a SQLite URL's query
    (``?timeout=30``) is the driver's options, not part of the name, as SQLAlchemy reads it."""
    if url.startswith("sqlite:///"):
        return Path(url.removeprefix("sqlite:///").partition("?")[0])
    return journal_path(url)


@functools.lru_cache(maxsize=None)  # workers check before every trial's lock: parse once
def check_url(url: str) -> None:
    """Raise StorageError unless ``url`` is a storage this machine can open and lock: a URL that
    parses, of a kind with a worker lock, whose driver is installed. Connects to nothing."""
    if journal_path(url) is not None:
        return
    if url.startswith("redis://"):
        _require_driver(url, "redis")
        return
    from sqlalchemy import exc
    from sqlalchemy.engine import make_url

    if ":" not in url:  # a bare path: say how to write it as a URL
        raise StorageError(f"storage '{url}' is not a storage URL; write sqlite:///{url} for a SQLite file or "
                           f"journal:{url} for a journal file (--storage or search.storage)")
    try:
        dialect = make_url(url).get_dialect()
    except exc.NoSuchModuleError:
        raise StorageError(f"storage '{redact(url)}': unknown database kind '{url.split('://')[0]}'; use one of "
                           f"{EXAMPLES} (--storage or search.storage)") from None
    except (exc.ArgumentError, ValueError):  # ValueError: a port that is not a number
        raise StorageError(f"storage '{redact(url)}' is not a storage URL SQLAlchemy can read; use one of "
                           f"{EXAMPLES} (--storage or search.storage)") from None
    if dialect.name == "sqlite" and (not url.startswith("sqlite:///") or in_memory_sqlite(url)):
        raise StorageError(f"storage '{redact(url)}': an in-memory SQLite database cannot be shared by workers; "
                           f"name a file, e.g. sqlite:///optuna.db")
    if dialect.name not in ("sqlite", "postgresql", "mysql", "mariadb"):
        raise StorageError(f"storage '{redact(url)}': no worker lock for {dialect.name} databases; use one of "
                           f"{EXAMPLES}")
    try:
        dialect.import_dbapi()
    except ImportError as err:
        raise StorageError(_missing_driver(url, err.name or dialect.driver)) from None


def _require_driver(url: str, module: str) -> None:
    try:
        __import__(module)
    except ImportError as err:
        raise StorageError(_missing_driver(url, err.name or module)) from None


def _missing_driver(url: str, module: str) -> str:
    fix = INSTALL.get(module.split(".")[0], f"install the package that provides the '{module}' module")
    return f"storage '{redact(url)}' needs the Python module '{module}', which is not installed; {fix}"


def open_storage(url: str) -> Any:
    """An Optuna storage for ``url`` (see the module docstring); StorageError for a bad URL."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalRedisBackend

    check_url(url)
    check_file(url)  # and makes the file's folder
    path = journal_path(url)
    try:
        if path is not None:
            return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
        if url.startswith("redis://"):
            with warnings.catch_warnings():  # Optuna marks its Redis backend experimental, at every start
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.JournalStorage(JournalRedisBackend(url))
        engine_kwargs: dict[str, Any] = {}
        if url.startswith("sqlite"):
            timeout = sqlite_timeout(url)
            use_wal(storage_file(url) or Path(url), timeout)  # check_url took only sqlite:/// files
            # Several local workers write one file: wait for the lock instead of failing at once.
            engine_kwargs = {"connect_args": {"timeout": timeout}}
        else:
            engine_kwargs = {"pool_pre_ping": True}
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
    except (ValueError, KeyError, TypeError) as err:  # a journal whose lines are not Optuna's (JSON decode, ...)
        raise StorageError(f"storage '{redact(url)}' cannot be read: {type(err).__name__}: "
                           f"{str(err).splitlines()[0][:160] if str(err) else ''}; move the file away, or pass "
                           f"another --storage") from None
    except Exception as err:  # SQLAlchemy or Redis: a file that is not a database, a server that refuses us
        if type(err).__module__.startswith(("sqlalchemy", "redis")):
            raise file_fault(url, err) or StorageError(_cannot_open(url, err)) from None
        raise


def _cannot_open(url: str, err: BaseException) -> str:
    if disk_full(err):
        return _NO_SPACE.format(url=redact(url))
    first = driver_said(err)[:200]
    return (f"storage '{redact(url)}' cannot be opened: {redact_in(first, url)}; check the URL and that the database "
            f"answers, or move a damaged file away")


def storage_problem(url: str, timeout: float = 5.0) -> str | None:
    """Why the database server behind ``url`` does not answer now (None: it does, or the storage is
    a file on this machine, which has no server to lose)."""
    if storage_file(url) is not None:
        return None
    if not url.startswith("redis://"):
        problem = database_problem(url, timeout)
        return problem and f"Optuna storage {redact(url)} {problem}"
    import redis

    try:
        redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout).ping()
    except ValueError as err:  # a port that is no number, a '[' left open: redis-py refuses the URL itself
        return f"Optuna storage {redact(url)} is not a valid URL ({redact_in(str(err), url)[:160]})"
    except redis.exceptions.RedisError as err:
        return f"Optuna storage {redact(url)} does not answer ({redact_in(str(err), url)[:160]})"
    return None


def check_server(url: str) -> None:
    """Raise StorageError when the database server behind ``url`` does not answer: said before the MLflow
    store or the stores' folders are made, so that a mistyped URL leaves nothing behind."""
    problem = storage_problem(url)
    if problem:
        raise StorageError(f"{problem}; start it or fix the URL (--storage, {STORAGE_ENV} or search.storage), then run "
                           f"the command again")


_NO_SPACE = "storage '{url}': no space left on its disk; free space, or pass another --storage"


def locked(url: str) -> FileLocked:
    """The one line for the study's SQLite file held locked by another process past its wait."""
    return FileLocked(f"storage '{redact(url)}'", sqlite_timeout(url))


def file_fault(url: str, err: BaseException) -> StorageError | FileLocked | None:
    """The one line for ``err`` when it is a fault of the storage's file met while the study is opened or made
    (None: another error): a full disk under it (StorageError), a lock another process held for all of the wait
    (FileLocked: run-time, exit 1), a SQLite file that cannot be written (StorageError: the user's to mend,
    as a folder that takes no files is)."""
    if disk_full(err):
        return StorageError(_NO_SPACE.format(url=redact(url)))
    if not url.startswith("sqlite"):
        return None
    if sqlite_busy(err):
        return locked(url)
    read_only = sqlite_read_only(err)
    if read_only:
        return StorageError(f"storage '{redact(url)}': the file cannot be written ({read_only[:160]}); make it "
                            f"writable (its permissions, chattr -i, a read-write mount), or pass another --storage")
    return None


@contextmanager
def file_faults_said(url: str) -> Iterator[None]:
    """A fault of the storage's file met while the study is opened or made (see :func:`file_fault`): one line.
    Optuna says each as "An exception is raised during the commit ... invalid data", its driver's error inside."""
    try:
        yield
    except (StorageError, FileLocked):
        raise
    except Exception as err:
        fault = file_fault(url, err)
        if fault is None:
            raise
        raise fault from None


def check_file(url: str) -> None:
    """Refuse a storage file that is a folder, sits where no folder can be made, or exists but is no
    usable SQLite database (a garbage or truncated file), before anything opens or changes it; then
    make its folder, where the file and the worker lock beside it go."""
    path = storage_file(url)
    if path is None:
        return
    if symlink_loop(path):
        raise StorageError(f"storage '{redact(url)}': {path}: its symbolic links form a loop; point the link at a "
                           f"file, or pass another --storage")
    if path.is_dir():
        example = path / ("optuna.db" if url.startswith("sqlite:///") else "study.log")
        raise StorageError(f"{path}: a folder, not a storage file; name a file in it (e.g. {example}), or pass "
                           f"another --storage")
    if path.exists() and not path.is_file():  # /dev/zero would be read without end, /dev/null taken for empty
        raise StorageError(f"storage '{redact(url)}': {path} is not a regular file (a device, a pipe or a socket); "
                           f"name a file, or pass another --storage")
    try:
        # The study's file, and the worker lock beside it, go in this folder.
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        why = "a file is in the way" if isinstance(err, (FileExistsError, NotADirectoryError)) else err.strerror
        raise StorageError(f"storage '{redact(url)}': its folder {path.parent} cannot be made ({why}); pass a "
                           f"--storage in a folder that can be written") from None
    try:  # a folder that exists but takes no files (read-only, /proc): said before any other store is made
        tempfile.TemporaryFile(dir=path.parent, prefix=".vit-search-probe-").close()
    except OSError as err:
        raise StorageError(f"storage '{redact(url)}': its folder {path.parent} takes no files ({err.strerror or err}); "
                           f"pass a --storage in a folder that can be written") from None
    if not url.startswith("sqlite:///"):
        return
    try:
        problem = sqlite_problem(path, sqlite_timeout(url), raise_locked=True)
    except SqliteLocked:  # whole, and in use: moving it away would harm whoever holds it
        raise locked(url) from None
    if problem:
        raise StorageError(f"{path}: {problem}, not an Optuna storage; move it away, or pass another --storage")


@contextmanager
def study_lock(url: str, study_name: str, timeout: float = 600.0) -> Iterator[None]:
    """Hold the study's worker lock (see the module docstring) for the ``with`` body.

    Raises StorageError for a bad URL, before anything is written.
    """
    check_url(url)
    check_file(url)  # a damaged file gets no lock file beside it either
    path = storage_file(url)
    if path is not None:
        # The lock file sits beside the study's file (check_file made its folder).
        lock_file = path.with_name(f"{path.name}.{zlib.crc32(study_name.encode())}.lock")
        try:
            handle = open(lock_file, "a")
        except OSError as err:
            raise StorageError(f"storage '{redact(url)}': the worker lock {lock_file} cannot be made "
                               f"({err.strerror}); pass a --storage in a folder that can be written") from None
        with handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        return
    if url.startswith("redis://"):
        with _redis_lock(url, study_name, timeout):
            yield
        return
    with _database_lock(url, study_name, timeout):
        yield


# A Redis lock is a key that outlives a holder killed outright (SIGKILL, the OOM killer): its lease is
# short, and renewed while the holder lives, so that such a lock frees itself in seconds, not minutes.
REDIS_LEASE_SECONDS = 20.0


@contextmanager
def _redis_lock(url: str, study_name: str, timeout: float) -> Iterator[None]:
    import threading

    import redis

    # Not thread-local: the thread that renews the lease holds it with the thread that took it. A socket
    # timeout: a renewal sent to a server that went away must not hold up the release for ever.
    client = redis.Redis.from_url(url, socket_timeout=REDIS_LEASE_SECONDS / 2)
    lock = client.lock(f"vit-search:{study_name}", timeout=REDIS_LEASE_SECONDS, blocking_timeout=timeout,
                       thread_local=False)
    try:
        taken = lock.acquire()
    except redis.exceptions.RedisError as err:  # no server answers there
        raise StorageError(_cannot_open(url, err)) from None
    if not taken:
        raise StorageError(f"storage '{redact(url)}': another worker held the study lock for {timeout:.0f} s; "
                           f"check that it is not stuck, then run the command again")
    released = threading.Event()

    def renew() -> None:
        while not released.wait(REDIS_LEASE_SECONDS / 4):
            try:
                lock.reacquire()  # the lease starts again
            except redis.exceptions.RedisError:  # lost (the server went away): the body's own calls say so
                return

    keeper = threading.Thread(target=renew, name="vit-search-redis-lease", daemon=True)
    keeper.start()
    try:
        yield
    finally:
        released.set()
        keeper.join()
        try:
            lock.release()
        except redis.exceptions.RedisError:  # its lease ran out, or the server went away: the key expires
            pass


@contextmanager
def _database_lock(url: str, study_name: str, timeout: float) -> Iterator[None]:
    import sqlalchemy

    key = zlib.crc32(f"vit-search:{study_name}".encode()) & 0x7FFFFFFF
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    dialect = engine.dialect.name
    try:
        try:
            connection = engine.connect()
        except sqlalchemy.exc.SQLAlchemyError as err:  # no server answers there, or it refuses us
            raise StorageError(_cannot_open(url, err)) from None
        with connection as conn:
            if dialect == "postgresql":
                conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
                unlock = ("SELECT pg_advisory_unlock(:k)", {"k": key})
            elif dialect in ("mysql", "mariadb"):
                got = conn.execute(sqlalchemy.text("SELECT GET_LOCK(:k, :t)"), {"k": str(key), "t": timeout}).scalar()
                if got != 1:
                    raise TimeoutError(f"could not take the study lock in {timeout:.0f} s")
                unlock = ("SELECT RELEASE_LOCK(:k)", {"k": str(key)})
            else:
                raise ValueError(f"no worker lock for {dialect} storages; use sqlite, PostgreSQL, MySQL, a journal "
                                 f"file or Redis")
            try:
                yield
            finally:
                try:
                    conn.execute(sqlalchemy.text(unlock[0]), unlock[1])
                    conn.commit()
                except sqlalchemy.exc.DBAPIError as err:
                    if not err.connection_invalidated:
                        raise
                    # The connection was cut (a server restart, an administrator): the server ended its session,
                    # and the lock with it. Optuna's own connections reconnect; the next lock is taken afresh.
    finally:
        engine.dispose()


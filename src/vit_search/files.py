"""Databases a user hands us, checked before anything opens or changes them: files that may be damaged,
servers that may not answer; and whether a download's host answers at all."""

from __future__ import annotations

import errno
import functools
import os
import sqlite3
from pathlib import Path
from typing import Iterator


def driver_said(err: BaseException) -> str:
    """The first line of what a database driver said, under SQLAlchemy's wrapper where there is one."""
    return (str(getattr(err, "orig", None) or err).strip().splitlines() or [type(err).__name__])[0]


def symlink_loop(path: Path) -> bool:
    """Whether ``path``, or a folder on the way to it, is a loop of symbolic links (``ln -s b a; ln -s a b``):
    pathlib's ``exists()``, ``is_file()`` and ``is_dir()`` all say False of one, and opening it fails."""
    try:
        os.stat(path)
    except OSError as err:
        return err.errno == errno.ELOOP
    except ValueError:  # a NUL in the name: no file, and no loop either
        return False
    return False


def in_memory_sqlite(url: str) -> bool:
    """Whether the SQLAlchemy ``url`` names an in-memory SQLite database (``sqlite://``,
    ``sqlite:///:memory:``, ``?mode=memory``): each connection gets an empty database of its own."""
    if not url.startswith("sqlite"):
        return False
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:  # not a URL: the caller's own check says so
        return False
    if parsed.get_backend_name() != "sqlite":
        return False
    database = parsed.database or ""
    return database in ("", ":memory:") or database.startswith("file::memory:") or parsed.query.get("mode") == "memory"


SQLITE_TIMEOUT = 60.0
"""How long a connection to a SQLite file (a study's storage, MLflow's store) waits for a lock another one
holds, unless its URL says (``sqlite:///optuna.db?timeout=5``, in seconds): several local workers write one file."""


@functools.lru_cache(maxsize=None)  # workers check before every trial's lock: parse once
def sqlite_timeout(url: str) -> float:
    """The seconds a SQLite URL's connections wait for a lock: the URL's ``timeout``, else SQLITE_TIMEOUT."""
    from sqlalchemy.engine import make_url

    try:
        return float(make_url(url).query["timeout"])  # type: ignore[arg-type]
    except Exception:  # none given, or not one number (SQLAlchemy refuses that one when it connects)
        return SQLITE_TIMEOUT


class SqliteLocked(Exception):
    """A SQLite file whose lock another connection (another process, most often) held for all of ``waited``
    seconds: a whole file, that the same command can use once the lock is let go."""

    def __init__(self, path: Path, waited: float, said: str) -> None:
        super().__init__(f"{path}: locked by another process (waited {waited:g} s; {said})")
        self.path, self.waited, self.said = path, waited, said


def sqlite_problem(path: Path, timeout: float = SQLITE_TIMEOUT, raise_locked: bool = False) -> str | None:
    """Why an existing, non-empty file is no usable SQLite database (None: it is one, or absent or empty).

    Reads the header and the schema through a read-only connection: a garbage or truncated file is
    caught without a byte of it written. Only SQLite opens the file: closing a handle of our own
    would drop the locks that this process's connections hold on it (POSIX locks belong to the
    process), and in WAL mode another process could then take itself for the last user and reset
    the log under them, damaging the file.

    A lock held by another connection is waited for, ``timeout`` seconds at most. One held all that time
    (SQLite's "database is locked") is no damage: None, the file left to whoever opens it next, or
    :class:`SqliteLocked` with ``raise_locked``, for a caller that says so at once rather than wait again.
    """
    if not path.is_file() or path.stat().st_size == 0:
        return None
    try:
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=timeout)
    except sqlite3.Error as err:
        return f"an unreadable SQLite database ({err})"
    try:
        connection.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.DatabaseError as err:
        if sqlite_busy(err):  # an OperationalError, itself a DatabaseError: the file is whole
            if raise_locked:
                raise SqliteLocked(path, timeout, str(err)) from None
            return None
        return "not a SQLite database" if "file is not a database" in str(err) else f"a damaged SQLite database ({err})"
    finally:
        connection.close()
    return None


def _sqlite_errors(err: BaseException) -> Iterator[sqlite3.Error]:
    """The sqlite3 errors in ``err``'s chain (SQLAlchemy keeps the driver's as ``orig``)."""
    for cause in error_chain(err):
        for error in (cause, getattr(cause, "orig", None)):
            if isinstance(error, sqlite3.Error):
                yield error


def sqlite_busy(err: BaseException) -> bool:
    """Whether ``err``, or an error it was raised from, is SQLite's "database is locked" (SQLITE_BUSY): another
    connection held the file's lock for all of the connection's busy timeout."""
    return any(getattr(error, "sqlite_errorname", "").startswith("SQLITE_BUSY") or "database is locked" in str(error)
               for error in _sqlite_errors(err))


def sqlite_read_only(err: BaseException) -> str | None:
    """SQLite's words when ``err``, or an error it was raised from, says the file cannot be written
    ("attempt to write a readonly database": its permissions, ``chattr +i``, a read-only mount), else None."""
    # Not SQLITE_READONLY_DBMOVED, in the same words: a file removed or replaced under an open connection.
    return next((str(error) for error in _sqlite_errors(err) if getattr(error, "sqlite_errorname", "") !=
                 "SQLITE_READONLY_DBMOVED" and "readonly database" in str(error)), None)


def database_problem(url: str, timeout: float = 5.0) -> str | None:
    """Why the database server behind the SQLAlchemy ``url`` cannot be used now, said as the end of a
    sentence about it ("needs the Python module ...", "does not answer (...)"), or None when it
    answers. Connects once, within about ``timeout`` seconds, and writes nothing."""
    import sqlalchemy
    from sqlalchemy import exc

    from .redaction import redact_in

    try:
        dialect = sqlalchemy.engine.make_url(url).get_dialect()
        dialect.import_dbapi()
    except ImportError as err:
        return f"needs the Python module '{err.name}', which is not installed"
    except (exc.ArgumentError, exc.NoSuchModuleError, ValueError) as err:
        return f"is not a database URL SQLAlchemy can read ({redact_in(str(err), url)[:160]})"
    # Without a timeout a firewalled host holds the connection for minutes.
    connect_args = {"connect_timeout": max(1, round(timeout))} if dialect.name in ("postgresql", "mysql") else {}
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool, connect_args=connect_args)
    try:
        with engine.connect():
            pass
    except Exception as err:  # the driver's own error: refused, unknown host, wrong password, no database
        return f"does not answer ({redact_in(driver_said(err), url)[:160]})"
    finally:
        engine.dispose()
    return None


PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
"""The proxy settings urllib and requests read: with one set, a host this machine cannot reach may still be."""


def host_problem(url: str, timeout: float = 5.0) -> str | None:
    """Why the host of the download ``url`` cannot be reached now ("huggingface.co does not answer
    (...)"), or None when it answers, or when a proxy is set (the download goes through it, which this
    check cannot see). One connection, at most about ``timeout`` seconds, looking up the name
    included: a machine without a network hears so at once, not after a library's minute of retries."""
    import socket
    import threading
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if not parts.hostname or any(os.environ.get(name) for name in PROXY_VARIABLES):
        return None
    port = parts.port or (443 if parts.scheme == "https" else 80)
    said: list[str] = []

    def connect() -> None:
        try:
            socket.create_connection((parts.hostname, port), timeout=timeout).close()
        except OSError as err:
            said.append(f"{type(err).__name__}: {err}")

    # In a thread: the name lookup itself takes no timeout, and a resolver that does not answer blocks.
    attempt = threading.Thread(target=connect, name="host-check", daemon=True)
    attempt.start()
    attempt.join(timeout + 1)
    if attempt.is_alive():
        return f"{parts.hostname} does not answer (nothing within {timeout:.0f} s)"
    return f"{parts.hostname} does not answer ({said[0]})" if said else None


def error_chain(err: BaseException) -> Iterator[BaseException]:
    """``err``, then each error it was raised from (``raise ... from``, or raised while handling it)."""
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        yield cause
        cause = cause.__cause__ or cause.__context__


def disk_full(err: BaseException) -> bool:
    """Whether ``err``, or an error it was raised from, says the disk under a file is full (SQLite's
    "database or disk is full", an OSError ENOSPC from a journal file)."""
    return any(isinstance(cause, OSError) and cause.errno == errno.ENOSPC or "disk is full" in str(cause)
               for cause in error_chain(err))

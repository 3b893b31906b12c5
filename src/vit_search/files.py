"""Databases a user hands us, checked before anything opens or changes them: files that may be damaged,
servers that may not answer; and whether a download's host answers at all."""

from __future__ import annotations

import errno
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


def sqlite_problem(path: Path) -> str | None:
    """Why an existing, non-empty file is no usable SQLite database (None: it is one, or absent or empty).

    Reads the header and the schema through a read-only connection: a garbage or truncated file is
    caught without a byte of it written. Only SQLite opens the file: closing a handle of our own
    would drop the locks that this process's connections hold on it (POSIX locks belong to the
    process), and in WAL mode another process could then take itself for the last user and reset
    the log under them, damaging the file.
    """
    if not path.is_file() or path.stat().st_size == 0:
        return None
    try:
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60)
    except sqlite3.Error as err:
        return f"an unreadable SQLite database ({err})"
    try:
        connection.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.DatabaseError as err:
        return "not a SQLite database" if "file is not a database" in str(err) else f"a damaged SQLite database ({err})"
    finally:
        connection.close()
    return None


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

"""Database files a user hands us that may be damaged: checked before anything opens or changes them."""

from __future__ import annotations

import sqlite3
from pathlib import Path

SQLITE_HEADER = b"SQLite format 3\x00"


def sqlite_problem(path: Path) -> str | None:
    """Why an existing, non-empty file is no usable SQLite database (None: it is one, or absent or empty).

    Reads the header and the schema through a read-only connection: a garbage or truncated file is
    caught without a byte of it written.
    """
    if not path.is_file() or path.stat().st_size == 0:
        return None
    with open(path, "rb") as handle:
        if handle.read(len(SQLITE_HEADER)) != SQLITE_HEADER:
            return "not a SQLite database"
    try:
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60)
    except sqlite3.Error as err:
        return f"an unreadable SQLite database ({err})"
    try:
        connection.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.DatabaseError as err:
        return f"a damaged SQLite database ({err})"
    finally:
        connection.close()
    return None

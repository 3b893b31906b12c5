"""How long a study's trials hold the write lock of each SQLite store (Optuna's, MLflow's).

SQLite lets one writer at a time into a file: a connection takes the write lock at its first
INSERT, UPDATE or DELETE and lets go of it at COMMIT. What a trial holds it for in all, times the
trials, is the least time a study's writes take one after another, however many workers share the
file; when that is far below the study's wall time, the workers seldom wait for each other there.

This runs one worker of a study in this process (a 20-epoch trial that trains almost nothing, as
``study_overhead.py``'s), notes through SQLAlchemy's engine events when each connection first
writes and when it commits, and prints per store: the write transactions, the seconds held in all
and per trial, and the median, 90th percentile and longest hold; the transactions that made the
store's tables (a CREATE, ALTER or DROP in them: once per store, not per trial) are counted apart.

    python benchmarks/store_locks.py [--trials 16] [--tmp /dev/shm]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study_overhead import SPEC  # noqa: E402  (a module beside this script)

WRITES = ("INSERT", "UPDATE", "DELETE", "REPLACE")
SCHEMA = ("CREATE", "ALTER", "DROP")  # a transaction with one of these makes the store's tables


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16, help="trials of the study")
    parser.add_argument("--tmp", help="folder for the stores (default: the system's temporary folder)")
    args = parser.parse_args()
    if args.trials < 1:
        parser.error(f"--trials {args.trials}: must be at least 1")
    if args.tmp and not Path(args.tmp).is_dir():
        parser.error(f"--tmp {args.tmp}: no such folder")

    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    held: dict[str, list[float]] = defaultdict(list)  # store file -> seconds each write transaction held the lock
    making: dict[str, list[float]] = defaultdict(list)  # the same, of the transactions that made the store's tables
    writing: dict[int, tuple[float, str]] = {}  # DB-API connection -> (when it first wrote, its store file)
    schema: set[int] = set()  # DB-API connections whose open transaction changed the tables

    def first_write(conn, cursor, statement, parameters, context, executemany) -> None:
        key = id(conn.connection.dbapi_connection)
        verb = statement.lstrip().split(None, 1)[0].upper()
        if verb in SCHEMA:
            schema.add(key)
        if key not in writing and verb in WRITES + SCHEMA:
            writing[key] = (time.perf_counter(), Path(conn.engine.url.database or "?").name)

    def commit(conn) -> None:
        key = id(conn.connection.dbapi_connection)
        began = writing.pop(key, None)
        if began is not None:
            (making if key in schema else held)[began[1]].append(time.perf_counter() - began[0])
        schema.discard(key)

    def rollback(conn) -> None:  # nothing written: the next transaction starts afresh
        key = id(conn.connection.dbapi_connection)
        writing.pop(key, None)
        schema.discard(key)

    event.listen(Engine, "before_cursor_execute", first_write)
    event.listen(Engine, "commit", commit)
    event.listen(Engine, "rollback", rollback)

    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        spec = {**SPEC, "search": {**SPEC["search"], "n_trials": args.trials}}
        (Path(tmp) / "spec.yaml").write_text(yaml.safe_dump(spec))
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        os.chdir(tmp)
        from vit_search.cli import main as vit_search

        said = io.StringIO()  # the study's table and its `next:` commands name this folder, deleted below
        started = time.perf_counter()
        with contextlib.redirect_stdout(said):
            code = vit_search(["run", "spec.yaml", "--storage", f"sqlite:///{tmp}/optuna.db", "--quiet"])
        wall = time.perf_counter() - started
        os.chdir("/")
    if code != 0:
        print(said.getvalue(), end="", file=sys.stderr)
        raise SystemExit(f"the study exited {code}")
    print(f"one worker, {args.trials} trials of 20 epochs that train almost nothing: {wall:.1f} s wall (with the "
          f"stores' creation)")
    for store in sorted(set(held) | set(making)):
        seconds, made = sorted(held[store]), making[store]
        spread = (f"; median {statistics.median(seconds) * 1e3:.2f} ms, 90th percentile "
                  f"{seconds[int(len(seconds) * 0.9)] * 1e3:.2f} ms, longest {seconds[-1] * 1e3:.1f} ms") if seconds else ""
        print(f"{store}: {len(seconds)} write transactions, {sum(seconds):.3f} s held in all, "
              f"{sum(seconds) / args.trials * 1e3:.1f} ms a trial (the study's or experiment's one-off rows included)"
              f"{spread}; besides, {len(made)} that made its tables, {sum(made):.3f} s")


if __name__ == "__main__":
    main()

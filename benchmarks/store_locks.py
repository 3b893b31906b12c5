"""How long a study's trials hold the write lock of each SQLite store (Optuna's, MLflow's).

SQLite lets one writer at a time into a file: a connection takes the write lock at its first
INSERT, UPDATE or DELETE and lets go of it at COMMIT. What a trial holds it for in all, times the
trials, is the least time a study's writes take one after another, however many workers share the
file; when that is far below the study's wall time, the workers seldom wait for each other there.

This runs one worker of a study in this process (a 20-epoch trial that trains almost nothing, as
``study_overhead.py``'s), notes through SQLAlchemy's engine events when each connection first
writes and when it commits, and prints per store: the write transactions, the seconds held in all
and per trial, and the median, 90th percentile and longest hold.

    python benchmarks/store_locks.py [--trials 16] [--tmp /dev/shm]
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16, help="trials of the study")
    parser.add_argument("--tmp", help="folder for the stores (default: the system's temporary folder)")
    args = parser.parse_args()

    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    held: dict[str, list[float]] = defaultdict(list)  # store file -> seconds each write transaction held the lock
    writing: dict[int, tuple[float, str]] = {}  # DB-API connection -> (when it first wrote, its store file)

    def first_write(conn, cursor, statement, parameters, context, executemany) -> None:
        key = id(conn.connection.dbapi_connection)
        if key not in writing and statement.lstrip().split(None, 1)[0].upper() in WRITES:
            writing[key] = (time.perf_counter(), Path(conn.engine.url.database or "?").name)

    def commit(conn) -> None:
        began = writing.pop(id(conn.connection.dbapi_connection), None)
        if began is not None:
            held[began[1]].append(time.perf_counter() - began[0])

    event.listen(Engine, "before_cursor_execute", first_write)
    event.listen(Engine, "commit", commit)

    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        spec = {**SPEC, "search": {**SPEC["search"], "n_trials": args.trials}}
        (Path(tmp) / "spec.yaml").write_text(yaml.safe_dump(spec))
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        os.chdir(tmp)
        from vit_search.cli import main as vit_search

        started = time.perf_counter()
        code = vit_search(["run", "spec.yaml", "--storage", f"sqlite:///{tmp}/optuna.db", "--quiet"])
        wall = time.perf_counter() - started
        os.chdir("/")
    if code != 0:
        raise SystemExit(f"the study exited {code}")
    print(f"one worker, {args.trials} trials of 20 epochs that train almost nothing: {wall:.1f} s wall (with the "
          f"stores' creation)")
    for store, seconds in sorted(held.items()):
        seconds.sort()
        print(f"{store}: {len(seconds)} write transactions, {sum(seconds):.3f} s held in all, "
              f"{sum(seconds) / args.trials * 1e3:.1f} ms a trial; median {statistics.median(seconds) * 1e3:.2f} ms, "
              f"90th percentile {seconds[int(len(seconds) * 0.9)] * 1e3:.2f} ms, longest {seconds[-1] * 1e3:.1f} ms")


if __name__ == "__main__":
    main()

"""Where a command's threads spend their time: samples every thread's Python stack while the CLI runs.

Packed trials share one process and one GIL, so the host work around their steps (set-up, MLflow,
Optuna, data) is what K trials per GPU must overlap. cProfile sees one thread; this samples all of
them every few milliseconds, charges each thread's CPU time since the last sample (Linux's
schedstat) to the stack it is in, and prints the functions that used the most CPU on top of a
stack, under our own innermost frame, and anywhere in a stack (inclusive), each named by its file and function.

    python benchmarks/stack_samples.py -- run study.yaml --jobs 0 --trials-per-gpu 8
    python benchmarks/stack_samples.py --interval 0.005 --top 30 -- train experiments/digits.yaml
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections import Counter



def _on_cpu_ns(native_id: int) -> int:
    """A thread's time on a CPU so far, in nanoseconds (Linux's schedstat); 0 where unreadable."""
    try:
        with open(f"/proc/self/task/{native_id}/schedstat") as stat:
            return int(stat.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def _where(frame) -> str:
    code = frame.f_code
    short = code.co_filename.split("site-packages/")[-1].split("/src/")[-1]
    return f"{short}:{code.co_name}"


def sample(stop: threading.Event, interval: float, leaf: Counter, ours: Counter, inclusive: Counter,
           totals: Counter) -> None:
    """Every ``interval`` seconds, charge each thread's CPU time since the last sample to its stack now:
    a thread parked on a lock, a queue or the device costs nothing, whatever its Python frame."""
    own = threading.get_ident()
    last: dict[int, int] = {}
    while not stop.wait(interval):
        natives = {t.ident: t.native_id for t in threading.enumerate()}
        for ident, frame in sys._current_frames().items():
            if ident == own or natives.get(ident) is None:
                continue
            now = _on_cpu_ns(natives[ident])
            spent, last[ident] = now - last.get(ident, now), now
            totals["threads"] = max(totals["threads"], len(natives) - 1)
            if spent <= 0:
                continue
            totals["cpu_ns"] += spent
            leaf[_where(frame)] += spent
            seen, inner = set(), None
            while frame is not None:
                where = _where(frame)
                if inner is None and where.startswith("vit_search/"):
                    inner = where
                if where not in seen:
                    seen.add(where)
                    inclusive[where] += spent
                frame = frame.f_back
            ours[inner or "(no frame of ours)"] += spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interval", type=float, default=0.005, help="seconds between samples")
    parser.add_argument("--top", type=int, default=25, help="rows per table")
    parser.add_argument("argv", nargs=argparse.REMAINDER, help="vit-search's arguments, after --")
    args = parser.parse_args()
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    from vit_search import cli

    leaf, ours, inclusive, totals = Counter(), Counter(), Counter(), Counter()
    stop = threading.Event()
    sampler = threading.Thread(target=sample, daemon=True,
                               args=(stop, args.interval, leaf, ours, inclusive, totals))
    started = time.perf_counter()
    sampler.start()
    try:
        code = cli.main(argv)
    finally:
        stop.set()
        sampler.join()
    wall = time.perf_counter() - started
    cpu = totals["cpu_ns"] or 1
    print(f"\nvit-search {' '.join(argv)}: exit {code}, {wall:.1f} s wall; its threads (up to {totals['threads']}) "
          f"used {cpu / 1e9:.1f} s of CPU")
    for title, table in (("on top of the stack", leaf), ("under our innermost frame", ours),
                         ("anywhere in the stack", inclusive)):
        print(f"\nCPU time {title}:")
        for where, ns in table.most_common(args.top):
            print(f"  {ns / 1e9:7.2f} s {100 * ns / cpu:5.1f}%  {where}")
    sys.exit(code)


if __name__ == "__main__":
    main()

"""Where a command's processes spend their wall time before their first trial: the parent and every worker.

Start-up is what a worker pays before it trains (imports, CUDA, the stores, the study's lock), once
per process: with K worker processes per GPU it is paid K times at once, and a study of small trials
can spend more time starting than training. This runs ``vit-search ARGS`` with a sampler in every
Python process it starts (the parent and its ``--jobs`` workers, through ``sitecustomize``): every
``--interval`` seconds it notes where the main thread is, so time spent waiting (a lock, a busy
SQLite file, the device) counts as well as time computing. It prints, per process, when it began,
when its first trial began, and its wall time before that by phase: our innermost frames, and the
module being imported or the innermost function outside our code.

    python benchmarks/startup_timeline.py -- run experiments/digits.yaml --jobs 8 --n-trials 8
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

TRIALS = "worker_loop"  # a process whose main thread is in here has started on its trials


def _label(frame) -> str:
    """Where a stack is: our innermost three frames, then what is being imported or the innermost frame."""
    ours, importing, inner = [], None, None
    while frame is not None:
        code = frame.f_code
        path = code.co_filename
        if inner is None and not path.startswith("<frozen"):
            inner = f"{path.split('site-packages/')[-1].split('/')[0]}:{code.co_name}"
        if "vit_search/" in path:
            ours.append(f"{Path(path).stem}.{code.co_name}")
        if importing is None and code.co_name == "_find_and_load" and path.startswith("<frozen"):
            name = str(frame.f_locals.get("name", "?"))
            importing = None if name.startswith("vit_search") else name.split(".")[0]  # the innermost other package
        frame = frame.f_back
    where = f"import {importing}" if importing else (inner or "?")
    return " > ".join(reversed(ours[:3])) + f" · {where}"


def _sample(interval: float, samples: list, main_id: int, stop: threading.Event) -> None:
    while not stop.wait(interval):
        frame = sys._current_frames().get(main_id)
        if frame is not None:
            samples.append((time.time(), _label(frame), any_in(frame, TRIALS)))


def any_in(frame, name: str) -> bool:
    """Is ``name`` a function on this stack?"""
    while frame is not None:
        if frame.f_code.co_name == name:
            return True
        frame = frame.f_back
    return False


def start(out: str, interval: float) -> None:
    """Sample this process's main thread until it exits, then write what was seen to ``out``."""
    began, samples, stop = time.time(), [], threading.Event()
    sampler = threading.Thread(target=_sample, args=(interval, samples, threading.main_thread().ident, stop), daemon=True)
    sampler.start()

    def write() -> None:
        stop.set()
        record = {"pid": os.getpid(), "argv": sys.argv, "began": began, "ended": time.time(), "interval": interval,
                  "samples": samples}
        Path(out, f"{os.getpid()}.json").write_text(json.dumps(record))

    atexit.register(write)


def report(out: Path, t0: float, top: int) -> None:
    """Per process: when it began, when its trials began, and its wall before them by phase."""
    records = sorted((json.loads(p.read_text()) for p in out.glob("*.json")), key=lambda r: r["began"])
    for record in records:
        samples = record["samples"]
        first = next((t for t, _, trials in samples if trials), None)
        before = Counter(label for t, label, _ in samples if first is None or t < first)
        argv = " ".join(record["argv"][1:])[:90]
        trials = f"first trial +{first - t0:.1f} s" if first else "no trial"
        print(f"\nprocess {record['pid']} ({argv}): began +{record['began'] - t0:.1f} s, {trials}, "
              f"ended +{record['ended'] - t0:.1f} s; before its trials, by phase:")
        for label, n in before.most_common(top):
            print(f"  {n * record['interval']:6.2f} s  {label}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interval", type=float, default=0.01, help="seconds between samples")
    parser.add_argument("--top", type=int, default=12, help="phases per process")
    parser.add_argument("argv", nargs=argparse.REMAINDER, help="vit-search's arguments, after --")
    args = parser.parse_args()
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    with tempfile.TemporaryDirectory() as tmp:
        hook, out = Path(tmp, "hook"), Path(tmp, "out")
        hook.mkdir()
        out.mkdir()
        # Every Python process that inherits this environment imports sitecustomize first.
        hook.joinpath("sitecustomize.py").write_text(
            f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\nimport startup_timeline\n"
            f"startup_timeline.start({str(out)!r}, {args.interval!r})\nsys.path.pop(0)\n")
        env = {**os.environ,
               "PYTHONPATH": os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))}
        t0 = time.time()
        code = subprocess.run([sys.executable, "-m", "vit_search", *argv], env=env, stdout=subprocess.DEVNULL).returncode
        print(f"vit-search {' '.join(argv)}: exit {code}, {time.time() - t0:.1f} s wall", flush=True)
        report(out, t0, args.top)
    sys.exit(code)


if __name__ == "__main__":
    main()

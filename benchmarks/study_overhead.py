"""What a trial costs a study beyond its training: the bookkeeping of ``vit-search run`` per trial.

The trials here train almost nothing (a 1-block, 8-wide ViT on 64 synthetic 8x8 images, 20 epochs of
two batches), so what is left of a trial's time is the study's path: the study lock, asking and
telling Optuna, 20 epoch reports, the MLflow run with its parameters, metrics and weights, the
checkpoints. Each layout runs the study twice in fresh stores, with 1 and with 1 + N trials; the
difference over N is the seconds a trial adds, start-up (imports, store creation) taken out.

With ``--strace`` (Linux, strace installed) it also counts the ``fsync``/``fdatasync`` calls of
each run: the disk waits that SQLite makes per commit, which decide the pace where an fsync is slow.
``--slow-fsync MS`` makes every fsync of the runs take MS milliseconds longer (a preloaded shim,
compiled with the machine's C compiler, that sleeps before the real call), as on a disk whose
flushes are slow: the local disk then behaves like many cloud machines' (GPU machines' included).

    python benchmarks/study_overhead.py [--trials 16] [--packed 1,8] [--jobs 1] [--tmp /dev/shm] [--strace]
    python benchmarks/study_overhead.py --slow-fsync 5 --packed 1 --jobs 1,2 --repeat 3
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

SPEC = {
    "name": "overhead", "seed": 0,
    "data": {"dataset": "synthetic", "num_samples": 64, "image_size": 8, "channels": 1, "num_classes": 4},
    "model": {"dim": 8, "depth": 1, "patch_embed": {"type": "conv", "patch_size": 4},
              "attention": {"type": "sdpa", "heads": 1}, "ffn": {"type": "mlp", "ratio": 1}, "pooling": {"type": "mean"}},
    "train": {"epochs": 20, "batch_size": 32, "lr": 1.0e-3},
    "search": {"metric": "val_accuracy", "direction": "maximize", "sampler": "random", "pruner": "median",
               "space": {"train.lr": {"float": [1.0e-4, 1.0e-2], "log": True}}},
    "tracking": {"experiment": "overhead", "plots": False},
}


SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <time.h>
static void slow(void) {
    long ns = (long)(atof(getenv("SLOW_FSYNC_MS") ? getenv("SLOW_FSYNC_MS") : "0") * 1e6);
    struct timespec pause = {ns / 1000000000L, ns % 1000000000L};
    nanosleep(&pause, 0);
}
int fsync(int fd) { static int (*real)(int); if (!real) real = dlsym(RTLD_NEXT, "fsync"); slow(); return real(fd); }
int fdatasync(int fd) { static int (*real)(int); if (!real) real = dlsym(RTLD_NEXT, "fdatasync"); slow(); return real(fd); }
"""


def slow_fsync_env(ms: float, folder: str) -> dict[str, str]:
    """The environment that makes every fsync of a process take ``ms`` longer (the shim, compiled here)."""
    source, library = Path(folder) / "slow_fsync.c", Path(folder) / "slow_fsync.so"
    source.write_text(SHIM)
    subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", str(library), str(source), "-ldl"], check=True)
    return {"LD_PRELOAD": str(library), "SLOW_FSYNC_MS": str(ms)}


def one_study(trials: int, packed: int, jobs: int, tmp_root: str | None, trace: bool,
              extra_env: dict[str, str]) -> tuple[float, int | None]:
    """Wall seconds of ``vit-search run`` over ``trials`` trials in fresh stores, and its fsync count."""
    with tempfile.TemporaryDirectory(dir=tmp_root) as tmp:
        spec = Path(tmp) / "study.yaml"
        spec.write_text(yaml.safe_dump(SPEC))
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db", **extra_env}
        command = [sys.executable, "-m", "vit_search", "run", str(spec), "--n-trials", str(trials),
                   "--jobs", str(jobs), "--trials-per-gpu", str(packed)]
        counts = Path(tmp) / "strace.txt"
        if trace:
            command = ["strace", "-f", "-c", "-e", "trace=fsync,fdatasync", "-o", str(counts), *command]
        started = time.perf_counter()
        subprocess.run(command, cwd=tmp, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - started
        if not trace:
            return wall, None
        calls = sum(int(m.group(1)) for m in re.finditer(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?f(?:data)?sync$",
                                                        counts.read_text(), re.M))
        return wall, calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=16, help="N: trials of the longer study")
    parser.add_argument("--packed", default="1,8", help="comma-separated --trials-per-gpu values to compare")
    parser.add_argument("--jobs", default="1", help="comma-separated --jobs values to compare")
    parser.add_argument("--slow-fsync", type=float, default=0.0, metavar="MS", help="add MS to every fsync")
    parser.add_argument("--repeat", type=int, default=1, help="pairs of studies per layout; the median pace is kept")
    parser.add_argument("--tmp", help="folder for the stores (default: the system's temporary folder)")
    parser.add_argument("--strace", action="store_true", help="count fsync calls (slower: strace stops each)")
    args = parser.parse_args()
    if args.trials < 1 or args.repeat < 1:
        parser.error(f"--trials {args.trials} --repeat {args.repeat}: both must be at least 1")
    try:
        jobs_values = [int(j) for j in args.jobs.split(",")]
        packed_values = [int(k) for k in args.packed.split(",")]
    except ValueError:
        parser.error(f"--jobs {args.jobs} --packed {args.packed}: comma-separated whole numbers")
    if min(jobs_values) < 0 or min(packed_values) < 1:
        parser.error(f"--jobs {args.jobs} --packed {args.packed}: --jobs 0 or more, --packed 1 or more")
    if args.slow_fsync < 0:
        parser.error(f"--slow-fsync {args.slow_fsync:g}: must be 0 or more")
    if args.slow_fsync and not shutil.which("cc"):
        parser.error("--slow-fsync: no C compiler (cc) here to build its shim")
    if args.tmp and not Path(args.tmp).is_dir():
        parser.error(f"--tmp {args.tmp}: no such folder")
    if args.strace and not shutil.which("strace"):
        parser.error("--strace: strace is not installed")
    where = args.tmp or tempfile.gettempdir()
    slow = f", every fsync {args.slow_fsync:g} ms slower" if args.slow_fsync else ""
    print(f"stores in {where}{slow}; {args.trials} trials of 20 epochs that train almost nothing", flush=True)
    noise = "the difference is within the noise (use more --trials or --repeat)"
    with tempfile.TemporaryDirectory() as shim:
        extra = slow_fsync_env(args.slow_fsync, shim) if args.slow_fsync else {}
        paces: dict[tuple[int, int], float | None] = {}
        for jobs in jobs_values:
            for packed in packed_values:
                pairs = sorted(((one_study(1, packed, jobs, args.tmp, args.strace, extra),
                                 one_study(1 + args.trials, packed, jobs, args.tmp, args.strace, extra))
                                for _ in range(args.repeat)), key=lambda pair: pair[1][0] - pair[0][0])
                (short, short_syncs), (long, long_syncs) = pairs[len(pairs) // 2]  # the median pace
                # The longer study not longer than the short one: its trials cost less than the runs' noise.
                paces[jobs, packed] = (long - short) / args.trials if long > short else None
                if short_syncs is None or long_syncs is None:
                    syncs = ""
                elif long_syncs >= short_syncs:
                    syncs = (f"; fsyncs: {short_syncs} for start-up and one trial, "
                             f"{(long_syncs - short_syncs) / args.trials:.1f} per further trial")
                else:
                    syncs = (f"; fsyncs: {short_syncs} for start-up and one trial, {long_syncs} for all "
                             f"{1 + args.trials} (fewer: within the noise)")
                pace = paces[jobs, packed]
                said = f"{pace:.3f} s per trial ({3600 / pace:,.0f} trials/hour)" if pace else noise
                print(f"--jobs {jobs} --trials-per-gpu {packed}: 1 trial {short:.1f} s, {1 + args.trials} trials "
                      f"{long:.1f} s: {said}{syncs}", flush=True)
    first = next(iter(paces.values()))
    if first is None:
        print(f"trials/hour against the first layout: none, for the first layout {noise}")
        return
    print("trials/hour against the first layout: " + ", ".join(
        f"{jobs}x{packed} " + (f"{first / pace:.2f}x" if pace else "? (within the noise)")
        for (jobs, packed), pace in paces.items()))

if __name__ == "__main__":
    main()

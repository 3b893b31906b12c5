"""What a trial costs a study beyond its training: the bookkeeping of ``vit-search run`` per trial.

The trials here train almost nothing (a 1-block, 8-wide ViT on 64 synthetic 8x8 images, 20 epochs of
two batches), so what is left of a trial's time is the study's path: the study lock, asking and
telling Optuna, 20 epoch reports, the MLflow run with its parameters, metrics and weights, the
checkpoints. Each layout runs the study twice in fresh stores, with 1 and with 1 + N trials; the
difference over N is the seconds a trial adds, start-up (imports, store creation) taken out.

With ``--strace`` (Linux, strace installed) it also counts the ``fsync``/``fdatasync`` calls of
each run: the disk waits that SQLite makes per commit, which decide the pace where an fsync is slow.

    python benchmarks/study_overhead.py [--trials 16] [--packed 1,8] [--tmp /dev/shm] [--strace]
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


def one_study(trials: int, packed: int, tmp_root: str | None, trace: bool) -> tuple[float, int | None]:
    """Wall seconds of ``vit-search run`` over ``trials`` trials in fresh stores, and its fsync count."""
    with tempfile.TemporaryDirectory(dir=tmp_root) as tmp:
        spec = Path(tmp) / "study.yaml"
        spec.write_text(yaml.safe_dump(SPEC))
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db"}
        command = [sys.executable, "-m", "vit_search", "run", str(spec), "--n-trials", str(trials),
                   "--jobs", "1", "--trials-per-gpu", str(packed)]
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
    parser.add_argument("--tmp", help="folder for the stores (default: the system's temporary folder)")
    parser.add_argument("--strace", action="store_true", help="count fsync calls (slower: strace stops each)")
    args = parser.parse_args()
    if args.strace and not shutil.which("strace"):
        raise SystemExit("--strace: strace is not installed")
    where = args.tmp or tempfile.gettempdir()
    print(f"stores in {where}; {args.trials} trials of 20 epochs that train almost nothing", flush=True)
    paces = {}
    for packed in (int(k) for k in args.packed.split(",")):
        short, short_syncs = one_study(1, packed, args.tmp, args.strace)
        long, long_syncs = one_study(1 + args.trials, packed, args.tmp, args.strace)
        paces[packed] = (long - short) / args.trials
        syncs = "" if short_syncs is None else (f"; fsyncs: {short_syncs} for start-up and one trial, "
                                                f"{(long_syncs - short_syncs) / args.trials:.1f} per further trial")
        print(f"--trials-per-gpu {packed}: 1 trial {short:.1f} s, {1 + args.trials} trials {long:.1f} s: "
              f"{paces[packed]:.3f} s per trial ({3600 / paces[packed]:,.0f} trials/hour){syncs}", flush=True)
    first = next(iter(paces.values()))
    print("trials/hour against the first layout: " + ", ".join(f"K={k} {first / pace:.2f}x" for k, pace in paces.items()))


if __name__ == "__main__":
    main()

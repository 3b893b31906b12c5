"""Trials per hour with ``--jobs N`` against ``--jobs 1`` on the quickstart study, same trials.

On a GPU machine ``--trials-per-gpu K`` compares K trials packed into each GPU's worker against
one (target 4x for K = 8 on one GPU); there the trials default to the quickstart's 100 epochs, two
per packed slot, so that start-up does not hide the packing. (benchmarks/gpu_suite.py measures
this and the rest of the GPU figures in one command.)

The same configurations are enqueued for both (pruning off, so every trial trains fully), each run
into a fresh MLflow store and Optuna storage; wall time includes every worker's start-up, as a user
would see it. Prints trials/hour of each and the ratio (on 2 CPU cores at most about 1.2x: the
ceiling below; docs/search.md). A study whose trials do not all complete is an error, not a rate.

First it times one trial alone on one thread and on all cores' threads: the better torch's
threads already use the cores, the less separate workers can add (two one-thread workers beat one
two-thread worker by at most 2 / that scaling).

    python benchmarks/jobs_throughput.py [--trials 6] [--epochs 15] [--jobs 2]
    python benchmarks/jobs_throughput.py --trials-per-gpu 8 [--trials 16] [--epochs 100]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from quickstart_points import distinct_points

REPO = Path(__file__).resolve().parents[1]


def timed_study(jobs: int, trials: int, epochs: int, per_gpu: int = 1) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        spec = yaml.safe_load((REPO / "experiments" / "digits.yaml").read_text())
        spec["search"].update(n_trials=trials, pruner="none", timeout=None, enqueue=distinct_points(trials))
        spec["train"]["epochs"] = epochs
        spec["tracking"]["plots"] = False
        path = Path(tmp) / "study.yaml"
        path.write_text(yaml.safe_dump(spec))
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db"}
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "vit_search", "run", str(path), "--jobs", str(jobs),
                               "--trials-per-gpu", str(per_gpu), "--quiet"],
                              cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"the study with --jobs {jobs} exited {done.returncode}: "
                             f"{(done.stderr.strip().splitlines() or [''])[-1]}")
        import optuna

        study = optuna.load_study(study_name=spec["search"].get("study_name") or spec["name"], storage=f"sqlite:///{tmp}/optuna.db")
        complete = sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials(deepcopy=False))
        if complete != trials:  # failed trials are no throughput
            raise SystemExit(f"the study with --jobs {jobs} completed {complete} of its {trials} trials; see "
                             f"vit-search run {path} for why")
        return wall


def train_seconds(threads: int, epochs: int) -> float:
    """Training time of the quickstart model alone in one process with ``threads`` torch threads."""
    with tempfile.TemporaryDirectory() as tmp:  # its checkpoint: never the quickstart's runs/digits-vit/
        out = subprocess.run(
            [sys.executable, "-m", "vit_search", "train", str(REPO / "experiments" / "digits.yaml"),
             f"--set=train.epochs={epochs}", "--set=tracking.enabled=false"], cwd=tmp,
            env={**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)},
            check=True, capture_output=True, text=True,
        ).stdout
    match = re.search(r"([0-9.]+) s training", out)
    assert match, out
    return float(match.group(1))


def thread_ceiling(epochs: int, cores: int) -> None:
    """How well one trial's torch threads already use the cores: the most --jobs can win back."""
    one, many = train_seconds(1, epochs), train_seconds(cores, epochs)
    scaling = one / many
    print(f"one trial alone: {one:.1f} s training on 1 thread, {many:.1f} s on {cores} threads "
          f"(threads scale {scaling:.2f}x): {cores} one-thread workers can be at most "
          f"{cores / scaling:.2f}x faster than one {cores}-thread worker", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, help="enqueued trials (default 6; with GPUs 2 per packed worker)")
    parser.add_argument("--epochs", type=int, help="epochs per trial (default 15; with GPUs 100)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--skip-ceiling", action="store_true", help="skip timing one trial on 1 and all threads")
    parser.add_argument("--trials-per-gpu", type=int, default=0, help="GPU machines: compare K per GPU with 1")
    args = parser.parse_args()
    for flag in ("trials", "epochs", "jobs"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag} {getattr(args, flag)}: must be at least 1")
    if args.trials_per_gpu:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--trials-per-gpu compares packings on a GPU; this machine has none")
        args.trials, args.epochs = args.trials or 2 * args.trials_per_gpu, args.epochs or 100
        one = timed_study(0, args.trials, args.epochs, 1)
        packed = timed_study(0, args.trials, args.epochs, args.trials_per_gpu)
        print(f"--trials-per-gpu 1: {args.trials / one * 3600:.0f} trials/hour; --trials-per-gpu "
              f"{args.trials_per_gpu}: {args.trials / packed * 3600:.0f} trials/hour; ratio {one / packed:.2f}x")
        return
    args.trials, args.epochs = args.trials or 6, args.epochs or 15
    print(f"{os.cpu_count()} cores; {args.trials} enqueued trials of {args.epochs} epochs each, no pruning")
    if not args.skip_ceiling:
        thread_ceiling(args.epochs, os.cpu_count() or 1)
    rates = {}
    for jobs in (1, args.jobs):
        wall = timed_study(jobs, args.trials, args.epochs)
        rates[jobs] = args.trials / wall * 3600
        print(f"--jobs {jobs}: {wall:.1f} s, {rates[jobs]:.0f} trials/hour", flush=True)
    print(f"ratio --jobs {args.jobs} / --jobs 1: {rates[args.jobs] / rates[1]:.2f}x")


if __name__ == "__main__":
    main()

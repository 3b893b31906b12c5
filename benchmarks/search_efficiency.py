"""Search efficiency: TPE with Hyperband pruning against random search without pruning.

Both search the quickstart space (``experiments/digits.yaml``) under the same wall-clock budget,
for several seeds each, with tracking off. For each run it records the best val accuracy reached
and the time until a trial first finished at val accuracy >= 0.95; it prints both medians per
method (TPE + pruning should win on both).

    python benchmarks/search_efficiency.py --budget 240 --seeds 3 --set train.epochs=30
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = {"tpe+hyperband": ["search.sampler=tpe", "search.pruner=hyperband"],
           "random, no pruning": ["search.sampler=random", "search.pruner=none"]}


def one_run(spec_path: str, overrides: list[str], budget: float, seed: int, target: float) -> tuple[float, float]:
    """(best val accuracy, seconds to the first trial reaching ``target``; inf if none) of one study."""
    from optuna.trial import TrialState

    from vit_search.search.run import run_search
    from vit_search.spec import load_spec

    with tempfile.TemporaryDirectory() as tmp:
        spec = load_spec(spec_path, [*overrides, f"seed={seed}", f"search.timeout={budget}", "search.n_trials=1000",
                                     "search.enqueue=[]", "tracking.enabled=false",
                                     f"train.checkpoint_dir={tmp}/ckpt", f"search.study_name=s{seed}"])
        started = time.time()
        result = run_search(spec, storage=f"sqlite:///{tmp}/optuna.db", progress=False)
        best, first = 0.0, float("inf")
        for trial in result.study.get_trials():
            if trial.state != TrialState.COMPLETE:
                continue
            best = max(best, trial.value)
            if trial.value >= target:
                first = min(first, trial.datetime_complete.timestamp() - started)
        return best, first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(REPO / "experiments" / "digits.yaml"))
    parser.add_argument("--budget", type=float, default=240, help="seconds per study")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_TRACKING_URI", "sqlite:///" + tempfile.mkdtemp() + "/mlflow.db")
    results = {}
    for name, method in METHODS.items():
        runs = [one_run(args.spec, [*args.overrides, *method], args.budget, seed, args.target)
                for seed in range(args.seeds)]
        results[name] = runs
        bests, firsts = [r[0] for r in runs], [r[1] for r in runs]
        print(f"{name}: best val accuracy {', '.join(f'{b:.4f}' for b in bests)} (median "
              f"{statistics.median(bests):.4f}); time to {args.target}: "
              f"{', '.join(f'{f:.0f} s' for f in firsts)} (median {statistics.median(firsts):.0f} s)", flush=True)
    (tpe, rnd) = (results[name] for name in METHODS)
    better_best = statistics.median(r[0] for r in tpe) > statistics.median(r[0] for r in rnd)
    faster = statistics.median(r[1] for r in tpe) < statistics.median(r[1] for r in rnd)
    print(f"TPE + pruning better on median best accuracy: {better_best}; faster to {args.target}: {faster}")


if __name__ == "__main__":
    main()

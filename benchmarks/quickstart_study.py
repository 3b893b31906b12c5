"""The quickstart study end to end: wall time, best trial's accuracy, and the search's overhead.

Runs ``experiments/digits.yaml`` as ``vit-search run`` would (tracking on, into a fresh temporary
MLflow store and Optuna storage) and prints:

* the study's wall time (target: at most 600 s on 2 CPU cores);
* the best trial's val and test accuracy (target: test >= 0.985);
* wall time against the sum of the trials' ``train()`` times (target: overhead within 5%).

    python benchmarks/quickstart_study.py [--spec experiments/digits.yaml] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(REPO / "experiments" / "digits.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    spec_path = Path(args.spec).resolve()  # read from where the command was given, not the temporary folder
    home = Path.cwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            _study(spec_path, args.overrides, tmp)
        finally:
            os.chdir(home)  # the folder can be removed


def _study(spec_path: Path, overrides: list[str], tmp: str) -> None:
    """Run the study in ``tmp`` (its stores there) and print the figures."""
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
    started = time.perf_counter()
    from optuna.trial import TrialState

    from vit_search.search.run import run_search
    from vit_search.spec import SpecError, load_spec

    try:
        spec = load_spec(spec_path, overrides)
    except SpecError as err:  # bad input: one line each, exit 2, as the command line says it
        print("\n".join(f"error: {problem}" for problem in err.problems), file=sys.stderr)
        raise SystemExit(2) from None
    result = run_search(spec, storage=f"sqlite:///{tmp}/optuna.db", progress=False)
    wall = time.perf_counter() - started
    study = result.study
    states = [t.state for t in study.get_trials()]
    if TrialState.COMPLETE not in states:
        raise SystemExit(f"error: none of the study's {len(states)} trials completed: no best trial to report")
    best = study.best_trial
    print(f"{spec.name}: {len(states)} trials ({states.count(TrialState.COMPLETE)} complete, "
          f"{states.count(TrialState.PRUNED)} pruned, {states.count(TrialState.FAIL)} failed)")
    print(f"wall time (start-up included): {wall:.1f} s; in run_search: {result.wall_seconds:.1f} s")
    print(f"best trial {best.number}: val_accuracy {best.user_attrs['val_accuracy']:.4f}, "
          f"test_accuracy {best.user_attrs['test_accuracy']:.4f}, params {best.params}")
    print(f"sum of trials' train() time {result.train_seconds:.1f} s; study wall / train sum = "
          f"{result.wall_seconds / result.train_seconds:.3f} (overhead "
          f"{100 * (result.wall_seconds / result.train_seconds - 1):.1f}%)")


if __name__ == "__main__":
    main()

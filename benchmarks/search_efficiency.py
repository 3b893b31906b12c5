"""Search efficiency: random search, TPE with Hyperband pruning and the supernet strategy, side by side.

Each searches one model-size space (depth, dim, per-layer heads and FFN ratio: 1,000+ subnets, so
the supernet can share weights over it) of the quickstart spec (``experiments/digits.yaml``) under the
same wall-clock budget, for several seeds each, tracking off. ``n_trials`` is derived from the budget:
the space's largest and smallest models are timed first, and each study gets the trials of their mean
time that fit (at least 4), so
that TPE's start-up (a quarter of ``n_trials``, 4 to 10) leaves it trials to be guided; with Hyperband
pruning, whose stopped trials count too, ``PRUNED_FIT`` times as many. The supernet
study trains its supernet for the same epochs, scores ``--subnets`` subnets and trains as many
finalists as fit the time left after its phases 1 and 2 (estimated; each run's wall time is printed):
with TPE, the subnets of best inherited val accuracy; with NSGA-II on val accuracy against parameters,
its front first.
Per method it prints the median time until a trained trial first reached ``--target`` val accuracy
(inf: never), the median best test accuracy (of the trial with the best val accuracy), and the
trained trials' test accuracy against parameters front: its points for the median seed and the
median area it dominates (test accuracy times the share of the largest model's parameters saved).

    python benchmarks/search_efficiency.py --budget 600 --seeds 5 --set train.epochs=30
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny models: one thread each is fastest on 2 cores
REPO = Path(__file__).resolve().parents[1]
METHODS = {"random (no pruning)": ["search.sampler=random", "search.pruner=none"],
           "tpe+hyperband": ["search.sampler=tpe", "search.pruner=hyperband"],
           "supernet (tpe)": ["search.sampler=tpe", "search.pruner=none", "search.strategy=supernet"],
           # Phase 2 on two objectives: the finalists are the inherited-weight front of accuracy against size.
           "supernet (nsga2)": ["search.sampler=nsga2", "search.pruner=none", "search.strategy=supernet",
                                "search.metric=[val_accuracy, parameters]", "search.direction=[maximize, minimize]"]}
PHASE_1 = 1.4  # phase 1 against training the largest model alone (benchmarks/supernet.py, random_subnets 1)
PRUNED_FIT = 3  # Hyperband stops most trials after a few epochs: about this many times more trials fit
SCORE_SECONDS = 0.3  # one subnet drawn by TPE and scored, in process (benchmarks/supernet.py's phase 2)


def space() -> dict[str, Any]:
    """Depth 1-4, dim 32-64, heads and FFN ratio per layer: 3 * 4 * (2 * 3) ** 4 points."""
    dims = {"model.depth": {"int": [1, 4]}, "model.dim": {"choice": [32, 48, 64]}}
    for i in range(4):
        dims[f"model.layers.{i}.attention.heads"] = {"choice": [2, 4]}
        dims[f"model.layers.{i}.ffn.ratio"] = {"choice": [1, 2, 4]}
    return dims


def base_raw(spec_path: str) -> dict[str, Any]:
    """The spec with the shared space and no enqueued trial (it would name keys outside the space)."""
    raw = yaml.safe_load(Path(spec_path).read_text())
    raw["search"]["space"] = space()
    raw["search"].pop("enqueue", None)
    raw["model"]["depth"] = 4
    return raw


def seconds_per_trial(raw: dict[str, Any], overrides: list[str], tmp: str) -> tuple[float, float]:
    """Wall time of the space's largest model, and of an average trial estimated as the mean of the
    largest and smallest model's (after an untimed one-epoch warm-up run)."""
    from vit_search.spec import load_spec
    from vit_search.train import train

    plain = {k: v for k, v in raw.items() if k != "search"}
    fixed = [*overrides, "tracking.enabled=false"]
    train(load_spec(plain, [*fixed, "train.epochs=1"]), checkpoint_dir=f"{tmp}/warm", progress=False)
    seconds = []
    for size in (["model.depth=4", "model.dim=64"], ["model.depth=1", "model.dim=32", "model.attention.heads=2",
                                                      "model.ffn.ratio=1"]):
        started = time.perf_counter()
        train(load_spec(plain, [*fixed, *size]), checkpoint_dir=f"{tmp}/one", progress=False)
        seconds.append(time.perf_counter() - started)
    return seconds[0], sum(seconds) / len(seconds)


def front(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """The (parameters, test accuracy) points no other point beats on both (fewer, higher), by size."""
    best, kept = -1.0, []
    for parameters, accuracy in sorted(points, key=lambda p: (p[0], -p[1])):
        if accuracy > best:
            kept.append((parameters, accuracy))
            best = accuracy
    return kept


def front_area(points: list[tuple[int, float]], largest: int) -> float:
    """The area a front dominates in (share of ``largest``'s parameters saved, test accuracy), from (0, 0)."""
    area, previous = 0.0, 0.0
    for parameters, accuracy in reversed(front(points)):  # largest first: each adds a band of savings
        saved = max(0.0, 1 - parameters / largest)
        area += (saved - previous) * accuracy
        previous = max(previous, saved)
    return area


def largest_model_parameters(raw: dict[str, Any], overrides: list[str]) -> int:
    """Parameters of the space's largest model (the front's reference)."""
    from vit_search.model import build_on_meta, count_parameters
    from vit_search.spec import load_spec

    spec = load_spec({k: v for k, v in raw.items() if k != "search"}, [*overrides, "model.depth=4", "model.dim=64",
                                                                       "model.ffn.ratio=4", "tracking.enabled=false"])
    return count_parameters(build_on_meta(spec.model))


def one_run(raw: dict[str, Any], overrides: list[str], budget: float, n_trials: int, seed: int,
            target: float, subnets: int) -> tuple[float, float, int, float, list[tuple[int, float]]]:
    """(best trial's test accuracy, seconds to the first trial reaching ``target`` val accuracy, trials
    trained, wall seconds, the trained trials' (parameters, test accuracy)) of one study; ``budget``
    is the time after which no trial starts."""
    from optuna.trial import TrialState

    from vit_search.search.run import run_search
    from vit_search.search.supernet import run_supernet_search
    from vit_search.spec import load_spec

    with tempfile.TemporaryDirectory() as tmp:
        spec = load_spec(raw, [*overrides, f"seed={seed}", f"search.timeout={budget}", f"search.n_trials={n_trials}",
                               "tracking.enabled=false", f"train.checkpoint_dir={tmp}/ckpt",
                               f"search.study_name=s{seed}", f"search.storage=sqlite:///{tmp}/optuna.db",
                               f"search.supernet.n_subnets={subnets}", "search.supernet.top_runs=0",
                               f"search.supernet.finalists={n_trials}"])
        started = time.time()
        search = run_supernet_search if spec.search.strategy == "supernet" else run_search
        result = search(spec, progress=False)
        complete = [t for t in result.study.get_trials() if t.state == TrialState.COMPLETE]
        reached = [t.datetime_complete.timestamp() - started for t in complete if t.values[0] >= target]
        best = max(complete, key=lambda t: t.values[0]) if complete else None  # val accuracy, first objective
        points = [(t.user_attrs["parameters"], t.user_attrs["test_accuracy"]) for t in complete
                  if "parameters" in t.user_attrs and "test_accuracy" in t.user_attrs]
        return (best.user_attrs.get("test_accuracy", 0.0) if best else 0.0, min(reached, default=float("inf")),
                len(complete), time.time() - started, points)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(REPO / "experiments" / "digits.yaml"))
    parser.add_argument("--budget", type=float, default=600, help="seconds per study")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument("--subnets", type=int, default=100, help="subnets the supernet study scores")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, of: " + ", ".join(METHODS))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    unknown = [name for name in args.methods.split(",") if name not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {', '.join(map(repr, unknown))} (known: {', '.join(METHODS)})")
    if not Path(args.spec).is_file():
        parser.error(f"--spec {args.spec}: no such file")
    if args.seeds < 1 or args.budget <= 0 or args.subnets < 1:
        parser.error(f"--seeds {args.seeds} --budget {args.budget:g} --subnets {args.subnets}: each must be above 0")
    with tempfile.TemporaryDirectory(prefix="vit-search-efficiency-") as tracking:  # MLflow's store, removed at the end
        os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tracking}/mlflow.db")
        compare(args)


def compare(args: argparse.Namespace) -> None:
    """Each method's studies and the lines comparing them."""
    raw = base_raw(args.spec)
    with tempfile.TemporaryDirectory() as tmp:
        largest, per_trial = seconds_per_trial(raw, args.overrides, tmp)
    n_trials = max(4, int(args.budget / per_trial))
    largest_parameters = largest_model_parameters(raw, args.overrides)
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; a trial (mean of largest and smallest) "
          f"{per_trial:.1f} s: n_trials {n_trials} in {args.budget:.0f} s (TPE start-up "
          f"{max(4, min(10, n_trials // 4))})", flush=True)
    phases_1_2 = PHASE_1 * largest + SCORE_SECONDS * args.subnets
    medians = {}
    for name in args.methods.split(","):
        method = METHODS[name]
        trials = n_trials * (PRUNED_FIT if "search.pruner=hyperband" in method else 1)
        # search.timeout bounds phases 2 and 3 each, not phase 1: the supernet's finalists get what is
        # left after the estimated time of its phases 1 and 2 (each run's wall time is printed).
        budget = args.budget - (phases_1_2 if "supernet" in name else 0)
        runs = [one_run(raw, [*args.overrides, *method], max(budget, 1.0), trials, seed, args.target, args.subnets)
                for seed in range(args.seeds)]
        tests, firsts = [r[0] for r in runs], [r[1] for r in runs]
        areas = [front_area(r[4], largest_parameters) for r in runs]
        medians[name] = (statistics.median(tests), statistics.median(firsts), statistics.median(areas))
        median_seed = sorted(range(len(runs)), key=lambda i: areas[i])[len(runs) // 2]
        print(f"{name} (n_trials {trials}): best test accuracy {', '.join(f'{b:.4f}' for b in tests)} "
              f"(median {medians[name][0]:.4f}); "
              f"time to val {args.target}: {', '.join(f'{f:.0f} s' for f in firsts)} (median "
              f"{medians[name][1]:.0f} s); trials trained {', '.join(str(r[2]) for r in runs)}; wall "
              f"{', '.join(f'{r[3]:.0f} s' for r in runs)}; "
              f"load {os.getloadavg()[0]:.2f}", flush=True)
        print(f"  front (test accuracy against parameters): area {', '.join(f'{a:.4f}' for a in areas)} (median "
              f"{medians[name][2]:.4f}); seed {median_seed}'s: "
              f"{', '.join(f'{p:,} {a:.4f}' for p, a in front(runs[median_seed][4])) or 'none'}", flush=True)
    best = max(medians, key=lambda n: medians[n][0])
    reached = [n for n in medians if medians[n][1] != float("inf")]
    fastest = (min(reached, key=lambda n: medians[n][1]) if reached
               else "none, the median run of every method never reached it")
    widest = max(medians, key=lambda n: medians[n][2])
    print(f"best median test accuracy: {best}; fastest median time to val {args.target}: {fastest}; "
          f"largest median front area: {widest}")


if __name__ == "__main__":
    main()

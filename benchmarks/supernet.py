"""Supernet search on digits: what phase 1 costs, how well inherited weights rank subnets, how fast
phase 2 scores them through the command line.

Prints, for each ``--random-subnets`` value (the sandwich rule's random subnets per step): phase-1
wall time against training the largest subnet alone for the same epochs (the ratio), and Kendall tau
between inherited-weight and stand-alone val accuracy over distinct random subnets (stand-alone: mean
over seeds), beside the spread of the stand-alone accuracies and their seed noise. Then phase 2 end to
end: ``vit-search run`` of a supernet study (TPE, MLflow on sqlite), subnets scored per hour from its
first subnet drawn to the command's exit.

    python benchmarks/supernet.py            # 10 subnets x 3 seeds, 10 epochs, k = 0,1,2; 500 subnets
    python benchmarks/supernet.py --quick    # 10 subnets x 2 seeds, 2 epochs, 20 subnets in phase 2: a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import optuna  # noqa: E402
import yaml  # noqa: E402

from vit_search.schema import Spec  # noqa: E402
from vit_search.search.supernet import SubnetScorer  # noqa: E402
from vit_search.search.supernet_space import SupernetSpace, describe_subnet  # noqa: E402
from vit_search.search.supernet_train import SandwichStep, SubnetDraw, supernet_spec  # noqa: E402
from vit_search.spec import load_spec  # noqa: E402
from vit_search.train import train  # noqa: E402


def base_spec(epochs: int, random_subnets: int = 1) -> dict:
    """Dim 16-64, depth 1-4, per-layer heads and FFN ratio: a space whose subnets differ well."""
    space = {"model.depth": {"int": [1, 4]}, "model.dim": {"choice": [16, 32, 48, 64]}}
    for i in range(4):
        space[f"model.layers.{i}.attention.heads"] = {"choice": [2, 4]}
        space[f"model.layers.{i}.ffn.ratio"] = {"choice": [1, 2, 4]}
    return {"name": "bench-supernet", "seed": 0, "data": {"dataset": "digits", "image_size": 8},
            "model": {"dim": 64, "depth": 4, "patch_embed": {"type": "conv", "patch_size": 2},
                      "attention": {"type": "sdpa", "heads": 2}, "ffn": {"type": "mlp", "ratio": 2}},
            "train": {"epochs": epochs, "batch_size": 64, "lr": 3.0e-3, "warmup_epochs": 0.5},
            "tracking": {"enabled": False},
            "search": {"strategy": "supernet", "supernet": {"random_subnets": random_subnets}, "space": space}}


def kendall_tau(a: list[float], b: list[float]) -> float:
    """Kendall's tau-b of two rankings (ties counted as neither concordant nor discordant)."""
    concordant = discordant = ties_a = ties_b = 0
    for i in range(len(a)):
        for j in range(i + 1, len(a)):
            x, y = a[i] - a[j], b[i] - b[j]
            if x == 0 and y == 0:
                continue
            if x == 0:
                ties_a += 1
            elif y == 0:
                ties_b += 1
            elif (x > 0) == (y > 0):
                concordant += 1
            else:
                discordant += 1
    denominator = ((concordant + discordant + ties_a) * (concordant + discordant + ties_b)) ** 0.5
    return (concordant - discordant) / denominator if denominator else 0.0


def distinct_subnets(spec: Spec, space: SupernetSpace, count: int, seed: int = 1) -> list[Spec]:
    """``count`` random subnets, no two the same model (values of layers beyond a subnet's depth are
    unused, so distinct values can make the same model: those are drawn again)."""
    rng, seen, subnets = random.Random(seed), set(), []
    while len(subnets) < count:
        try:
            model = space.model(space.random(rng))
            subnet = load_spec({**{k: v for k, v in spec.raw.items() if k != "search"},
                                "model": model.model_dump(mode="json", by_alias=True)})
        except Exception:  # heads that do not divide dim: drawn again
            continue
        key = json.dumps(subnet.model.model_dump(mode="json"), sort_keys=True)
        if key not in seen:
            seen.add(key)
            subnets.append(subnet)
    return subnets


def phase1(spec: Spec, space: SupernetSpace, folder: Path) -> float:
    """Seconds to train the supernet by the sandwich rule of ``spec``."""
    started = time.perf_counter()
    train(supernet_spec(spec, space), checkpoint_dir=folder, progress=False,
          make_step=partial(SandwichStep, SubnetDraw(space, spec.seed, spec.search.supernet.random_subnets)))
    return time.perf_counter() - started


def phase2_cli(n_subnets: int, tmp: Path) -> None:
    """``vit-search run`` of a supernet study scoring ``n_subnets`` (1 supernet epoch, no finalists)."""
    raw = base_spec(1)
    raw["name"] = "bench-phase2"
    raw["tracking"] = {"enabled": True, "experiment": "bench-phase2", "plots": False}
    raw["search"].update({"sampler": "tpe", "storage": f"sqlite:///{tmp / 'optuna.db'}"})
    raw["search"]["supernet"].update({"n_subnets": n_subnets, "finalists": 0})
    path = tmp / "phase2.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}"}
    started = time.time()
    subprocess.run([sys.executable, "-m", "vit_search", "run", str(path), "--checkpoint-dir", str(tmp / "ckpt")],
                   check=True, env=env, cwd=tmp, capture_output=True)
    ended = time.time()
    trials = optuna.load_study(study_name="bench-phase2:subnets", storage=raw["search"]["storage"]).get_trials()
    first = min(t.datetime_start.timestamp() for t in trials)
    scored = sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    span = ended - first
    print(f"phase 2 through the CLI (TPE, MLflow sqlite, subnets.csv + 10 child runs): {len(trials)} subnets drawn, "
          f"{scored} scored (others rejected), in {span:.1f} s from the first draw to the command's exit: "
          f"{3600 * len(trials) / span:,.0f} subnets per hour (target >= 1,000); whole command {ended - started:.1f} s "
          f"with phase 1 and start-up", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--quick", action="store_true", help="2 epochs, 2 seeds, 20 subnets in phase 2: a smoke run")
    parser.add_argument("--subnets", type=int, default=10, help="distinct random subnets ranked (0: cost only)")
    parser.add_argument("--epochs", type=int, help="default 10 (2 with --quick)")
    parser.add_argument("--seeds", type=int, help="stand-alone seeds per subnet, default 3 (2 with --quick)")
    parser.add_argument("--random-subnets", default="0,1,2", help="sandwich variants compared, comma-separated")
    parser.add_argument("--draw-seed", type=int, default=1, help="seed of the random subnets ranked")
    parser.add_argument("--phase2", type=int, help="subnets scored through the CLI (0: skip; default 500, 20 with "
                                                   "--quick)")
    args = parser.parse_args()
    for flag in ("subnets", "epochs", "seeds", "phase2"):
        if getattr(args, flag) is not None and getattr(args, flag) < (1 if flag in ("epochs", "seeds") else 0):
            parser.error(f"--{flag} {getattr(args, flag)}: too small")
    epochs = args.epochs or (2 if args.quick else 10)
    seeds = args.seeds or (2 if args.quick else 3)
    if args.phase2 is None:
        args.phase2 = 20 if args.quick else 500
    with tempfile.TemporaryDirectory() as tmp:  # stores, checkpoints: nothing is left behind
        measure(args, epochs, seeds, Path(tmp))


def measure(args: argparse.Namespace, epochs: int, seeds: int, tmp: Path) -> None:
    """Phase 1 and its ranking for each sandwich variant, then phase 2 through the command line."""
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores", flush=True)
    if args.phase2:
        phase2_cli(args.phase2, tmp)

    spec = load_spec(base_spec(epochs))
    space = SupernetSpace.of(spec)
    largest = load_spec({**{k: v for k, v in spec.raw.items() if k != "search"},
                         "model": space.model(space.extreme(True)).model_dump(mode="json", by_alias=True)})
    # A first run in a process pays one-off costs (data, kernels): a one-epoch run pays them untimed.
    train(load_spec({**largest.raw, "train": {**largest.raw["train"], "epochs": 1}}), checkpoint_dir=tmp / "warm",
          progress=False)
    subnets = distinct_subnets(spec, space, args.subnets, args.draw_seed)
    inherited: dict[int, list[float]] = {}
    for k in (int(v) for v in args.random_subnets.split(",")):
        variant = load_spec(base_spec(epochs, k))
        seconds = phase1(variant, space, tmp / f"supernet-{k}")
        # The largest alone timed right after each supernet: a shared machine's load drifts.
        started = time.perf_counter()
        train(largest, checkpoint_dir=tmp / f"largest-{k}", progress=False)
        alone = time.perf_counter() - started
        scorer = SubnetScorer(variant, space, tmp / f"supernet-{k}" / "checkpoint.pt")
        started = time.perf_counter()
        inherited[k] = [scorer.score(s)["val_accuracy"] for s in subnets]
        per_subnet = (time.perf_counter() - started) / max(len(subnets), 1)
        print(f"phase 1, random_subnets {k} ({2 + k} subnets per step): {seconds:.1f} s vs largest alone "
              f"{alone:.1f} s for {epochs} epochs: {seconds / alone:.2f}x (target <= 2x); scoring alone "
              f"{per_subnet * 1000:.0f} ms per subnet (load {os.getloadavg()[0]:.2f})", flush=True)
    if not subnets:
        return

    standalone = []
    for i, s in enumerate(subnets):
        accs = [train(load_spec({**s.raw, "seed": seed}), checkpoint_dir=tmp / "alone", progress=False)
                .metrics["val_accuracy"] for seed in range(seeds)]
        standalone.append(accs)
        scores = ", ".join(f"k={k} {v[i]:.3f}" for k, v in inherited.items())
        print(f"  {describe_subnet(s.model)}: alone {statistics.mean(accs):.3f} +- {statistics.pstdev(accs):.3f}; "
              f"inherited {scores}", flush=True)
    means = [statistics.mean(a) for a in standalone]
    noise = statistics.mean(statistics.pstdev(a) for a in standalone)
    spread = statistics.pstdev(means)
    for k, values in inherited.items():
        print(f"ranking, random_subnets {k}: Kendall tau {kendall_tau(values, means):.3f} over {len(subnets)} "
              f"distinct subnets (target >= 0.6); stand-alone val accuracy spread (std over subnets) {spread:.3f}, "
              f"seed noise (mean std over {seeds} seeds) {noise:.3f}")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

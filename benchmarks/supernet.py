"""Supernet search on digits: what phase 1 costs, how well inherited weights rank subnets, how fast
phase 2 scores them.

Prints: phase-1 wall time against training the largest subnet alone for the same epochs (ratio);
Kendall tau between inherited-weight and stand-alone val accuracy over random subnets (mean over
seeds), beside the spread of the stand-alone accuracies and their seed noise; subnets scored per hour.

    python benchmarks/supernet.py            # 10 subnets x 3 seeds, 10 epochs: long on 2 cores
    python benchmarks/supernet.py --quick    # 10 subnets x 2 seeds, 2 epochs: a smoke run
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

from vit_search.search.supernet import SubnetScorer  # noqa: E402
from vit_search.search.supernet_space import SupernetSpace, describe_subnet  # noqa: E402
from vit_search.search.supernet_train import SandwichStep, SubnetDraw, supernet_spec  # noqa: E402
from vit_search.spec import load_spec  # noqa: E402
from vit_search.train import train  # noqa: E402


def base_spec(epochs: int) -> dict:
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
            "search": {"strategy": "supernet", "supernet": {"random_subnets": 2}, "space": space}}


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 epochs, 2 seeds: a smoke run")
    parser.add_argument("--subnets", type=int, default=10)
    args = parser.parse_args()
    epochs, seeds = (2, 2) if args.quick else (10, 3)
    spec = load_spec(base_spec(epochs))
    space = SupernetSpace.of(spec)
    tmp = Path(tempfile.mkdtemp())

    started = time.perf_counter()
    train(supernet_spec(spec, space), checkpoint_dir=tmp / "supernet", progress=False,
          make_step=partial(SandwichStep, SubnetDraw(space, spec.seed, spec.search.supernet.random_subnets)))
    phase1 = time.perf_counter() - started
    largest = load_spec({**{k: v for k, v in spec.raw.items() if k != "search"},
                         "model": space.model(space.extreme(True)).model_dump(mode="json", by_alias=True)})
    started = time.perf_counter()
    train(largest, checkpoint_dir=tmp / "largest", progress=False)
    alone = time.perf_counter() - started
    print(f"phase 1: supernet {phase1:.1f} s vs largest subnet alone {alone:.1f} s for {epochs} epochs: "
          f"{phase1 / alone:.2f}x (target <= 2x; sandwich of {2 + spec.search.supernet.random_subnets} subnets)")

    scorer = SubnetScorer(spec, space, tmp / "supernet" / "checkpoint.pt")
    rng = random.Random(1)
    subnets = []
    while len(subnets) < args.subnets:
        try:
            model = space.model(space.random(rng))
            subnet = load_spec({**{k: v for k, v in spec.raw.items() if k != "search"},
                                "model": model.model_dump(mode="json", by_alias=True)})
        except Exception:  # heads that do not divide dim: drawn again
            continue
        subnets.append(subnet)
    started = time.perf_counter()
    inherited = [scorer.score(s)["val_accuracy"] for s in subnets]
    per_subnet = (time.perf_counter() - started) / len(subnets)
    standalone = []
    for s in subnets:
        accs = [train(load_spec({**s.raw, "seed": seed}), checkpoint_dir=tmp / "alone", progress=False)
                .metrics["val_accuracy"] for seed in range(seeds)]
        standalone.append(accs)
        print(f"  {describe_subnet(s.model)}: inherited {inherited[len(standalone) - 1]:.3f}, "
              f"alone {statistics.mean(accs):.3f} +- {statistics.pstdev(accs):.3f}")
    means = [statistics.mean(a) for a in standalone]
    noise = statistics.mean(statistics.pstdev(a) for a in standalone)
    print(f"ranking: Kendall tau {kendall_tau(inherited, means):.3f} over {len(subnets)} subnets (target >= 0.6); "
          f"stand-alone val accuracy spread (std over subnets) {statistics.pstdev(means):.3f}, "
          f"seed noise (mean std over {seeds} seeds) {noise:.3f}")
    print(f"phase 2: {per_subnet:.3f} s per subnet scored on the val split: {3600 / per_subnet:,.0f} subnets per "
          f"hour (target >= 1,000)")


if __name__ == "__main__":
    main()

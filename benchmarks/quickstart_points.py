"""Distinct points of the quickstart's search space, for benchmarks that enqueue the same trials."""

from __future__ import annotations

import sys


def distinct_points(count: int) -> list[dict]:
    """``count`` distinct points of experiments/digits.yaml's space, spread over it (at most 36)."""
    points = [(d, h, p, lr) for d in (2, 4, 6) for h in (2, 4, 8) for p in ("cls", "mean") for lr in (2e-3, 4e-3)]
    step = max(1, len(points) // count)
    return [{"model.depth": d, "model.attention.heads": h, "model.pooling.type": p, "train.lr": lr}
            for d, h, p, lr in points[::step][:count]]


if __name__ == "__main__":
    print("quickstart_points.py: a helper module, imported by the other benchmarks (gpu_suite.py, jobs_throughput.py); "
          "run one of those", file=sys.stderr)
    raise SystemExit(2)

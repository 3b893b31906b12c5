"""Training throughput: our assembled ViT against torchvision's VisionTransformer, and train()'s overhead.

Part 1 times training steps (forward, backward, AdamW step) of both models with the same
configuration, alternating rounds in one process so that both see the same machine state, and
prints images/second of each and the ratio (ours / torchvision; >= 1.0 is the target).

Part 2 runs ``train()`` on digits end to end (data, evaluation, checkpoints, MLflow logging) for two
epoch counts; the difference gives the cost of one epoch without start-up. It prints that rate
against the bare step rate of the same model and batch (>= 0.90 is the target).

    python benchmarks/train_throughput.py            # all configs
    python benchmarks/train_throughput.py --quick    # fewer rounds
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torchvision.models.vision_transformer import VisionTransformer as TorchvisionViT

from vit_search.model import build_model
from vit_search.spec import load_spec

# name: (image, patch, dim, depth, heads, classes, batch)
CONFIGS = {
    "digits quickstart (16px, patch 4, dim 64, depth 4)": (16, 4, 64, 4, 4, 10, 128),
    "CIFAR-size (32px, patch 4, dim 192, depth 6)": (32, 4, 192, 6, 3, 10, 64),
    "ViT-Ti/16 (224px, dim 192, depth 12)": (224, 16, 192, 12, 3, 1000, 16),
}


def ours(image: int, patch: int, dim: int, depth: int, heads: int, classes: int) -> torch.nn.Module:
    return build_model({
        "dim": dim, "depth": depth, "patch_embed": {"type": "conv", "patch_size": patch},
        "attention": {"type": "sdpa", "heads": heads}, "ffn": {"type": "mlp", "ratio": 4},
        "pooling": {"type": "cls"}, "position": {"type": "learned"},
        "image_size": image, "in_channels": 3, "num_classes": classes,
    })


def theirs(image: int, patch: int, dim: int, depth: int, heads: int, classes: int) -> torch.nn.Module:
    return TorchvisionViT(image_size=image, patch_size=patch, num_layers=depth, num_heads=heads,
                          hidden_dim=dim, mlp_dim=4 * dim, num_classes=classes)


def step_timer(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, clip: float | None = None):
    """A function running ``n`` training steps on one fixed batch and returning the seconds taken."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def run(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
        return time.perf_counter() - start

    return run


def compare(rounds: int) -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 CPU")
    for name, (image, patch, dim, depth, heads, classes, batch) in CONFIGS.items():
        images, labels = torch.randn(batch, 3, image, image), torch.randint(0, classes, (batch,))
        a = step_timer(ours(image, patch, dim, depth, heads, classes), images, labels)
        b = step_timer(theirs(image, patch, dim, depth, heads, classes), images, labels)
        steps = max(2, int(2e10 / (batch * 3 * 2 * depth * 12 * dim * dim * (image // patch) ** 2)))
        a(2), b(2)  # warm-up
        times_a, times_b = [], []
        for _ in range(rounds):
            times_a.append(a(steps))
            times_b.append(b(steps))
        rate_a = batch * steps / statistics.median(times_a)
        rate_b = batch * steps / statistics.median(times_b)
        print(f"{name}: ours {rate_a:,.0f} img/s, torchvision {rate_b:,.0f} img/s, "
              f"ratio {rate_a / rate_b:.2f}x  (batch {batch}, {rounds} rounds of {steps} steps)")


def end_to_end(epochs: tuple[int, int]) -> None:
    from vit_search.train import train

    spec_path = Path(__file__).resolve().parents[1] / "experiments" / "digits.yaml"
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # MLflow puts a sqlite store's artifacts under ./mlruns
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        base = load_spec(spec_path)
        walls = []
        # A first, untimed run creates MLflow's tables and warms every cache the timed runs share.
        train(load_spec(base.to_dict(exclude_search=True), ["train.epochs=1", f"train.checkpoint_dir={tmp}/w"]),
              progress=False)
        for n in epochs:
            spec = load_spec(base.to_dict(exclude_search=True),
                             [f"train.epochs={n}", f"train.checkpoint_dir={tmp}/ckpt{n}"])
            start = time.perf_counter()
            result = train(spec, progress=False)
            walls.append(time.perf_counter() - start)
        per_epoch = (walls[1] - walls[0]) / (epochs[1] - epochs[0])
        cfg = base.train
        model = build_model(base)
        # The same model and batch, bare: no data pipeline, evaluation, checkpoint or logging.
        size = base.model.image_size
        timer = step_timer(model, torch.randn(cfg.batch_size, base.model.in_channels, size, size),
                           torch.randint(0, base.model.num_classes, (cfg.batch_size,)), clip=cfg.grad_clip)
        steps_per_epoch = int(result.history[-1]["images_per_second"] * result.history[-1]["epoch_seconds"]
                              // cfg.batch_size)
        timer(3)
        bare = statistics.median(timer(steps_per_epoch) for _ in range(5))
        print(f"digits end to end: {per_epoch:.3f} s/epoch (train, val, checkpoint, MLflow) vs bare steps "
              f"{bare:.3f} s/epoch ({steps_per_epoch} steps of {cfg.batch_size}): ratio {bare / per_epoch:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and epochs")
    parser.add_argument("--skip-compare", action="store_true")
    parser.add_argument("--skip-end-to-end", action="store_true")
    args = parser.parse_args()
    if not args.skip_compare:
        compare(rounds=3 if args.quick else 7)
    if not args.skip_end_to_end:
        end_to_end((2, 6) if args.quick else (3, 13))

"""Fine-tuning: test accuracy on digits at 32 px after the same few epochs, from scratch and from
pretrained weights, with and without layer decay (CPU, offline).

1. Pretrain ``experiments/pretrain-synthetic.yaml`` (a ViT-Ti with 8x8 patches on the synthetic set)
   into a temporary folder, or take ``--checkpoint`` (e.g. ``runs/pretrain-synthetic/checkpoint.pt``).
2. Train ``experiments/finetune-digits.yaml`` three ways with the same seed, epochs and learning
   rate: the same model with fresh weights; from the pretrained file; from it with layer decay.
3. Print the test (and val) accuracy of each.

    python benchmarks/finetune.py --pretrain-epochs 4 --epochs 5
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def pretrain(epochs: int, folder: str) -> Path:
    """Train the pretraining spec for ``epochs`` and return its checkpoint (which records its model)."""
    from vit_search.spec import load_spec
    from vit_search.train import train

    spec = load_spec(REPO / "experiments" / "pretrain-synthetic.yaml",
                     [f"train.epochs={epochs}", "tracking.enabled=false", f"train.checkpoint_dir={folder}/pretrain"])
    result = train(spec, progress=False)
    print(f"pretrained {spec.name} for {epochs} epochs: test_accuracy {result.metrics['test_accuracy']:.4f} "
          f"({result.train_seconds:.0f} s)")
    return Path(folder) / "pretrain" / "checkpoint.pt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-epochs", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=5, help="fine-tuning epochs, the same for each run")
    parser.add_argument("--layer-decay", type=float, default=0.75)
    parser.add_argument("--checkpoint", help="a pretrained checkpoint to start from instead of pretraining")
    args = parser.parse_args()

    from vit_search.spec import load_spec
    from vit_search.train import train

    with tempfile.TemporaryDirectory() as folder:
        checkpoint = Path(args.checkpoint).resolve() if args.checkpoint else pretrain(args.pretrain_epochs, folder)
        common = [f"train.epochs={args.epochs}", "tracking.enabled=false", f"train.checkpoint_dir={folder}/finetune"]
        pretrained = load_spec(REPO / "experiments" / "finetune-digits.yaml",
                               [*common, f"model.init.path={checkpoint}", "train.layer_decay=null"])
        # From scratch: the very model section the weights gave, without the weights.
        raw = pretrained.to_dict(exclude_search=True)
        raw["model"].pop("init")
        runs = {
            "from scratch": load_spec(raw),
            "pretrained": pretrained,
            f"pretrained, layer_decay {args.layer_decay}": load_spec(
                REPO / "experiments" / "finetune-digits.yaml",
                [*common, f"model.init.path={checkpoint}", f"train.layer_decay={args.layer_decay}"]),
        }
        print(f"digits at 32 px, {args.epochs} epochs, lr {pretrained.train.lr:g}, seed {pretrained.seed}; "
              f"model {pretrained.model.dim} wide, {pretrained.model.depth} blocks")
        rows = []
        for name, spec in runs.items():
            started = time.perf_counter()
            result = train(spec, progress=False)
            rows.append((name, result.metrics["test_accuracy"], result.metrics["val_accuracy"],
                         time.perf_counter() - started))
            print(f"  {name:<28} test_accuracy {rows[-1][1]:.4f}  val_accuracy {rows[-1][2]:.4f}  ({rows[-1][3]:.0f} s)",
                  flush=True)


if __name__ == "__main__":
    main()

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
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRETRAIN, FINETUNE = REPO / "experiments" / "pretrain-synthetic.yaml", REPO / "experiments" / "finetune-digits.yaml"


def pretrain_spec(epochs: int, folder: str):
    """The pretraining spec, trained for ``epochs`` into ``folder``/pretrain."""
    from vit_search.spec import load_spec

    return load_spec(PRETRAIN, [f"train.epochs={epochs}", "tracking.enabled=false",
                                f"train.checkpoint_dir={folder}/pretrain"])


def finetune_specs(args: argparse.Namespace, checkpoint: Path | None, folder: str) -> dict:
    """The three fine-tuning runs by name, starting from ``checkpoint``; with None, the same specs without
    weights (what can be checked before there is a checkpoint: the runs' arguments)."""
    from vit_search.spec import load_spec

    common = [f"train.epochs={args.epochs}", "tracking.enabled=false", f"train.checkpoint_dir={folder}/finetune"]
    init = f"model.init.path={checkpoint}" if checkpoint else "model.init=null"
    pretrained = load_spec(FINETUNE, [*common, init, "train.layer_decay=null"])
    # From scratch: the very model section the weights gave, without the weights.
    raw = pretrained.to_dict(exclude_search=True)
    raw["model"].pop("init", None)
    return {
        "from scratch": load_spec(raw),
        "pretrained": pretrained,
        f"pretrained, layer_decay {args.layer_decay}": load_spec(FINETUNE, [*common, init,
                                                                            f"train.layer_decay={args.layer_decay}"]),
    }


def pretrain(epochs: int, folder: str) -> Path:
    """Train the pretraining spec for ``epochs`` and return its checkpoint (which records its model)."""
    from vit_search.train import train

    spec = pretrain_spec(epochs, folder)
    result = train(spec, progress=False)
    print(f"pretrained {spec.name} for {epochs} epochs: test_accuracy {result.metrics['test_accuracy']:.4f} "
          f"({result.train_seconds:.0f} s)")
    return Path(folder) / "pretrain" / "checkpoint.pt"


def main() -> None:
    description = " ".join(__doc__.split("\n\n")[0].split())  # the first paragraph, on one line
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--pretrain-epochs", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=5, help="fine-tuning epochs, the same for each run")
    parser.add_argument("--layer-decay", type=float, default=0.75)
    parser.add_argument("--checkpoint", help="a pretrained checkpoint to start from instead of pretraining")
    args = parser.parse_args()
    if args.epochs < 1 or args.pretrain_epochs < 1:
        parser.error(f"--epochs {args.epochs} --pretrain-epochs {args.pretrain_epochs}: both must be at least 1")

    from vit_search.spec import SpecError

    try:
        compare(args)
    except SpecError as err:  # a bad argument, said as the spec's problems: one line each
        for problem in err.problems:
            print(f"error: {problem}", file=sys.stderr)
        raise SystemExit(2) from None


def compare(args: argparse.Namespace) -> None:
    """Pretrain (or take --checkpoint), then the three fine-tuning runs; every spec is checked before
    the first minute of training."""
    from vit_search.train import train

    with tempfile.TemporaryDirectory() as folder:
        if args.checkpoint:
            runs = finetune_specs(args, Path(args.checkpoint).resolve(), folder)
        else:
            finetune_specs(args, None, folder)  # the fine-tuning arguments, before minutes of pretraining
            pretrain_spec(args.pretrain_epochs, folder)
            runs = finetune_specs(args, pretrain(args.pretrain_epochs, folder), folder)
        pretrained = runs["pretrained"]
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

"""``vit-search``: the command line. Heavy imports happen inside each command, so --help is instant.

Exit codes: 0 success, 1 a failure at run time, 2 a bad input (spec, arguments, plugin).
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

EXIT_BAD_INPUT = 2


class BadInput(Exception):
    """A user error: printed as one line per problem, exit code 2, no traceback."""


def _spec_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", help="YAML spec file")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
        help="override a spec value, e.g. --set model.depth=6 (repeatable)",
    )


def _load(args: argparse.Namespace, check_model: bool = True):
    from .spec import load_spec

    return load_spec(args.spec, args.overrides, check_model=check_model)


def cmd_blocks(args: argparse.Namespace) -> int:
    """List registered blocks, or describe one."""
    from .registry import KINDS, REGISTRY

    if args.name:
        info = REGISTRY.describe(args.kind, args.name)
        print(f"{info.kind} '{info.name}': {info.summary}")
        dist = REGISTRY.distribution_of(info)
        print(f"  from {info.module}" + (f" (distribution {dist})" if dist else ""))
        if not info.args:
            print("  no arguments")
        for arg in info.args:
            default = "required" if arg.required else f"default {arg.default!r}"
            print(f"  {arg.name}: {arg.type_name} ({default})")
        return 0
    listing = REGISTRY.list(args.kind)
    for kind in KINDS if args.kind is None else (args.kind,):
        print(f"{kind}:")
        for name in listing[kind]:
            print(f"  {name:<12} {REGISTRY.describe(kind, name).summary}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """Check a spec without running anything."""
    spec = _load(args)
    print(f"{args.spec}: ok ({spec.name})")
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    """Print the model's per-stage table, parameters and FLOPs."""
    from .model import build_model
    from .summary import summarize

    spec = _load(args)
    print(f"{spec.name}: image {spec.model.image_size}, {spec.model.in_channels} channels, "
          f"{spec.model.num_classes} classes")
    print(summarize(build_model(spec)).table())
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train one spec (its search section is ignored) and log the run to MLflow."""
    from .train import TrainingDiverged, train

    spec = _load(args)
    try:
        result = train(spec, resume=args.resume, checkpoint_dir=args.checkpoint_dir)
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    from accelerate import PartialState

    if not PartialState().is_main_process:  # under `accelerate launch`, one report is enough
        return 0
    metrics = "  ".join(f"{k} {v:.4f}" for k, v in result.metrics.items())
    print(f"{spec.name}: {metrics}  ({result.parameters:,} parameters, {result.train_seconds:.1f} s training)")
    if result.run_id:
        print(f"mlflow run {result.run_id}")
    return 0


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    _spec_arguments(parser)
    parser.add_argument("--resume", action="store_true", help="continue from the last epoch checkpoint")
    parser.add_argument("--checkpoint-dir", help="where epoch checkpoints go (default: train.checkpoint_dir)")


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], Callable[[argparse.ArgumentParser], None]]] = {
    "blocks": (cmd_blocks, lambda p: (
        p.add_argument("kind", nargs="?", help="block kind (patch_embed, position, attention, ffn, pooling, head)"),
        p.add_argument("name", nargs="?", help="block name, to describe its arguments"),
    )),
    "validate": (cmd_validate, _spec_arguments),
    "summary": (cmd_summary, _spec_arguments),
    "train": (cmd_train, _train_arguments),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command."""
    parser = argparse.ArgumentParser(
        prog="vit-search",
        description="Search Vision Transformer architectures and hyperparameters from YAML specs.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (func, add_arguments) in COMMANDS.items():
        p = sub.add_parser(name, help=(func.__doc__ or "").strip().splitlines()[0])
        add_arguments(p)
        p.set_defaults(func=func)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__

        print(f"vit-search {__version__}")
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_BAD_INPUT
    from .registry import RegistryError
    from .spec import SpecError

    try:
        return args.func(args)
    except SpecError as err:
        for problem in err.problems:
            print(f"error: {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (RegistryError, BadInput) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

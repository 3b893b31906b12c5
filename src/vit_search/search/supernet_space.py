"""The space of a supernet study: what varies, its largest and smallest subnet, the supernet's own
size, random subnets, and the spaces no supernet can share weights over.

Under ``search.strategy: supernet`` the same ``search.space`` keys decide what varies, restricted to
what elastic blocks can change at run time::

    model.depth: {int: [1, 4]}
    model.dim: {choice: [16, 32, 64]}
    model.attention.heads: {choice: [2, 4]}            # every layer alike
    model.layers.0.ffn.ratio: {choice: [2, 3, 4]}      # layer 0 only (0-based; beyond a subnet's depth: unused)

A subnet is a plain model section; the supernet is the one section that holds every subnet's weights.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from typing import Any, Mapping

from ..blocks.elastic import is_elastic
from ..registry import KINDS, REGISTRY
from ..schema import LAYER_KINDS, ModelSpec, Spec, block_type, set_path
from .space import Dimension, parse_space

SIZES = ("depth", "dim")


@dataclass(frozen=True)
class SupernetSpace:
    """The searched dimensions of a supernet study over its base model section."""

    dims: tuple[Dimension, ...]
    base: dict[str, Any]  # the resolved model section (image size, channels and classes filled in)

    @classmethod
    def of(cls, spec: Spec) -> "SupernetSpace":
        """The space of ``spec`` (checked first by :func:`check_supernet_space`)."""
        return cls(tuple(parse_space(spec.search.space)), spec.model.model_dump(mode="json", by_alias=True))

    def model(self, values: Mapping[str, Any]) -> ModelSpec:
        """The subnet with these values (by space key); raises ValueError for one that cannot exist."""
        raw = copy.deepcopy(self.base)
        for dim in self.dims:
            if dim.key in values:
                set_path(raw, dim.path[1:], copy.deepcopy(values[dim.key]))
        depth = raw.get("depth", 1)
        # Layers beyond this subnet's depth are not in it: their values are left unused, not an error.
        raw["layers"] = {i: blocks for i, blocks in (raw.get("layers") or {}).items() if int(i) < depth}
        return ModelSpec.model_validate(raw)

    def extreme(self, largest: bool) -> dict[str, Any]:
        """The values of the largest (or smallest) subnet: every dimension at its top (or bottom)."""
        return {dim.key: (max if largest else min)(_numbers(dim)) for dim in self.dims}

    def capacity(self) -> dict[str, Any]:
        """The values of the supernet itself: each at the end that holds the most weights (the top,
        unless the block declares otherwise in ``elastic_capacity``, as attention's heads do)."""
        values = {}
        for dim in self.dims:
            block = _block_of(self.base, dim.path)
            low = block is not None and getattr(block, "elastic_capacity", {}).get(dim.path[-1]) == "min"
            values[dim.key] = (min if low else max)(_numbers(dim))
        return values

    def random(self, rng: random.Random) -> dict[str, Any]:
        """Values of a subnet drawn uniformly, each dimension on its own."""
        values = {}
        for dim in self.dims:
            if dim.kind == "choice":
                values[dim.key] = rng.choice(dim.choices)
            elif dim.kind == "int":
                values[dim.key] = rng.randrange(int(dim.low), int(dim.high) + 1, int(dim.step or 1))
            else:
                values[dim.key] = rng.choice(dim.grid()) if dim.step else rng.uniform(dim.low, dim.high)
        return values

    def size(self) -> int | None:
        """How many subnets the space holds (None: a continuous range); infeasible ones counted too. A layer's
        values count only at the depths that have the layer (they are not drawn for a subnet without it)."""
        sizes = [dim.size() for dim in self.dims]
        if None in sizes:
            return None
        depth = next((dim for dim in self.dims if dim.path == ("model", "depth")), None)
        depths = ([self.base.get("depth", 1)] if depth is None else list(depth.choices) if depth.kind == "choice"
                  else list(range(int(depth.low), int(depth.high) + 1, int(depth.step or 1))))
        total = 0
        for subnet_depth in depths:
            count = 1
            for dim, size in zip(self.dims, sizes):
                layer = int(dim.path[2]) if dim.path[1] == "layers" else None
                if dim is not depth and (layer is None or layer < subnet_depth):
                    count *= size
            total += count
        return total


def _numbers(dim: Dimension) -> list[Any]:
    return list(dim.choices) if dim.kind == "choice" else [dim.low, dim.high] if dim.kind == "float" \
        else [int(dim.low), int(dim.high)]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _block_of(base: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    """The block class an elastic argument at ``path`` belongs to (None for depth and dim)."""
    kind = path[1] if len(path) == 3 else path[3] if len(path) == 5 else None
    if kind not in KINDS:
        return None
    return REGISTRY.describe(kind, block_type(base, kind)).builder


def init_problem(spec: Spec) -> str:
    """The line refusing ``model.init`` in a supernet study."""
    from ..spec import SUPERNET_INIT

    return f"{spec.locate(('model', 'init'))}: {SUPERNET_INIT}"


def check_supernet_space(spec: Spec) -> list[str]:
    """Why ``spec``'s space cannot be searched by one supernet, one line per key (empty: it can)."""
    base = spec.model.model_dump(mode="json", by_alias=True)
    where = lambda *path: spec.locate(path)  # noqa: E731
    problems = []
    for kind in KINDS:  # every block runs as each subnet, so every block must slice its weights
        name = block_type(base, kind)
        if not is_elastic(REGISTRY.describe(kind, name).builder):
            problems.append(f"{where('model', kind)}: model.{kind}: {kind} '{name}' is not elastic (it declares no "
                            f"elastic_args), so search.strategy supernet cannot share its weights; use an elastic "
                            f"block (vit-search blocks) or strategy: trials")
    if spec.model.init is not None:
        problems.append(init_problem(spec))
    metric = spec.search.metric
    if "train_loss" in ([metric] if isinstance(metric, str) else metric):
        problems.append(f"{where('search', 'metric')}: search.metric: train_loss: phase 2 scores subnets without "
                        f"training them, so they have none; use val_accuracy, val_loss, parameters or flops")
    dims = parse_space(spec.search.space)
    # Sizes are ordered smallest to largest (the supernet, the sandwich rule's ends): numbers only.
    unordered = {d.key: c for d in dims for c in _numbers(d) if not _is_number(c)}
    max_depth = max([spec.model.depth] + [int(v) for d in dims if d.path == ("model", "depth") and d.key not in unordered
                                          for v in _numbers(d)])
    for key in spec.search.space:
        reason = _refusal(key, base, max_depth)
        if reason is None and key in unordered:
            reason = (f"a supernet orders each searched size from smallest to largest, and {unordered[key]!r} is no "
                      f"number; give numbers only (a size that null stands for, written out), or use strategy: trials")
        if reason:
            problems.append(f"{where('search', 'space', key)}: search.space.{key}: {reason}")
    ends = None if problems else _ends_problem(spec)
    if ends:
        problems.append(f"{where('search', 'space')}: search.space: {ends}")
    return problems


def _ends_problem(spec: Spec) -> str | None:
    """Why the supernet, or its largest or smallest subnet, cannot exist (None: they can). Other
    subnets that cannot exist are skipped; these three are trained at every step."""
    import torch

    from ..model.elastic import set_subnet
    from ..model.vit import build_vit

    space = SupernetSpace.of(spec)
    ends = (("the supernet", space.capacity()), ("its largest subnet", space.extreme(True)),
            ("its smallest subnet", space.extreme(False)))
    with torch.device("meta"):  # no memory, no arithmetic
        supernet = None
        for label, values in ends:
            model = space.model(values)
            try:
                if supernet is None:
                    supernet = build_vit(model)
                else:
                    set_subnet(supernet, model)
            except ValueError as err:
                message = str(err).split(": ", 1)[-1] if str(err).startswith("model.") else str(err)
                return (f"{label} ({describe_subnet(model)}) cannot exist, and the sandwich rule trains it at every "
                        f"step: {message}")
    return None


def _refusal(key: str, base: Mapping[str, Any], max_depth: int) -> str | None:
    """Why one space key cannot vary within a supernet (None: it can)."""
    from .space import SpaceError, parse_dimension

    try:
        dim = parse_dimension(key, {"choice": [0]})
    except SpaceError:
        return None  # reported by check_space
    path = dim.path
    if dim.condition is not None:
        return (f"under strategy supernet block types are fixed: write the argument without '[{dim.condition[1]}]' "
                f"(e.g. model.{dim.condition[0][-1]}.{path[-1]})")
    if path[0] != "model":
        return ("strategy supernet searches the model's sizes only (depth, dim, elastic block arguments); fix this "
                "value, or search it with strategy: trials")
    if path[1:] in (("depth",), ("dim",)):
        return None
    if len(path) >= 2 and path[1] in KINDS and (len(path) == 2 or path[2] == "type"):
        return (f"block type choices cannot share weights in one supernet; fix model.{path[1]}.type, or search it "
                f"with strategy: trials")
    if len(path) == 3 and path[1] in KINDS:
        return _not_elastic_in(path[1], block_type(base, path[1]), path[2])
    if len(path) == 5 and path[1] == "layers":
        if not path[2].isdigit() or int(path[2]) >= max_depth:
            return f"layer '{path[2]}' is not one of the supernet's layers 0 to {max_depth - 1}"
        if path[3] not in LAYER_KINDS:
            return f"a layer has its own {' and '.join(LAYER_KINDS)} only, not '{path[3]}'"
        return _not_elastic_in(path[3], block_type(base, path[3]), path[4])
    return ("not a size a supernet can share weights over (searchable: model.depth, model.dim, an elastic block "
            "argument such as model.attention.heads, or model.layers.<i>.<attention|ffn>.<argument>)")


def _not_elastic_in(kind: str, name: str, arg: str) -> str | None:
    builder = REGISTRY.describe(kind, name).builder
    elastic = getattr(builder, "elastic_args", None)
    if not isinstance(elastic, tuple):
        return f"{kind} '{name}' is not elastic (it declares no elastic_args); use strategy: trials"
    if arg not in elastic:
        return (f"{kind} '{name}' is not elastic in '{arg}' (elastic: {', '.join(elastic) or 'dim only'}); fix it, "
                f"or search it with strategy: trials")
    return None


def describe_subnet(model: ModelSpec) -> str:
    """One line: depth, dim, and the per-layer attention and FFN arguments that differ from the model's."""
    parts = [f"depth {model.depth}", f"dim {model.dim}"]
    for kind in LAYER_KINDS:
        per_layer = [model.layer_block(kind, i)[1] for i in range(model.depth)]
        keys = sorted({k for args in per_layer for k in args})
        for key in keys:
            values = [args.get(key, "-") for args in per_layer]
            parts.append(f"{kind}.{key} {values[0] if len(set(map(str, values))) == 1 else values}")
    return ", ".join(parts)

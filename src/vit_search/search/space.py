"""The search space: ``search.space`` of a spec turned into Optuna suggestions.

Keys are dotted paths into the spec; values say how to draw them::

    model.depth: {int: [2, 8]}                           # also step: k, log: true
    train.lr: {float: [1.0e-4, 1.0e-2], log: true}       # also step: x
    model.pooling.type: {choice: [cls, mean]}            # scalars, or whole mappings:
    model.attention: {choice: [{type: sdpa, heads: 4}, {type: einsum, heads: 2}]}
    model.ffn.type: {choice: [mlp, swiglu]}
    model.ffn[mlp].ratio: {choice: [2, 4]}               # searched only when model.ffn.type is mlp
    model.layers.0.attention.heads: {choice: [2, 4]}     # layer 0's own; drawn only when the model has it

A bracket names a block type: ``model.ffn[mlp].ratio`` is drawn only in trials whose ``model.ffn``
is an ``mlp``, so a block's own arguments are searched only where the block is chosen.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Mapping

import yaml

from ..registry import KINDS, did_you_mean
from ..safe_yaml import clip
from ..schema import ModelSpec, block_type, set_path, with_preset
from ..spec import SpecError, freeze_problems, load_spec, parameter_names

_CONDITIONAL = re.compile(r"^(?P<block>[A-Za-z_]\w*(?:\.\w+)*)\[(?P<type>[\w-]+)\]\.(?P<rest>\w+(?:\.\w+)*)$")
_PLAIN = re.compile(r"^[A-Za-z_][\w]*(\.[\w]+)*$")


class SpaceError(ValueError):
    """A malformed search-space entry; ``key`` names it."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


@dataclass(frozen=True)
class Dimension:
    """One searched value: where it goes, how it is drawn, and when it applies."""

    key: str  # as written in the spec: also the Optuna parameter name
    path: tuple[str, ...]  # where the value goes in the spec
    kind: str  # "choice", "int" or "float"
    choices: tuple[Any, ...] = ()
    low: float = 0
    high: float = 0
    step: float | None = None
    log: bool = False
    condition: tuple[tuple[str, ...], str] | None = None  # (block path, block type)

    @property
    def labels(self) -> list[Any]:
        """The choices as Optuna stores them: scalars as they are, mappings and lists as YAML text."""
        return [c if c is None or isinstance(c, (bool, int, float, str)) else _label(c) for c in self.choices]

    @property
    def layer(self) -> int | None:
        """The encoder layer a per-layer key (``model.layers.<i>....``) belongs to, else None."""
        if len(self.path) > 3 and self.path[:2] == ("model", "layers") and self.path[2].isdigit():
            return int(self.path[2])
        return None

    def applies(self, spec: Mapping[str, Any]) -> bool:
        """Whether this dimension is drawn for a (partly filled) spec: a per-layer key only where the
        model has that layer, a block's own argument only where the block is of its type."""
        if self.layer is not None and self.layer >= model_depth(spec):
            return False
        if self.condition is None:
            return True
        block_path, wanted = self.condition
        return block_type_of(spec, block_path) == wanted

    def suggest(self, trial: Any) -> Any:
        """Draw this dimension's value in an Optuna trial."""
        if self.kind == "choice":
            return self.value_of(trial.suggest_categorical(self.key, self.labels))
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def distribution(self) -> Any:
        """The Optuna distribution :meth:`suggest` draws from."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.kind == "choice":
            return CategoricalDistribution(self.labels)
        if self.kind == "int":
            return IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def value_of(self, param: Any) -> Any:
        """The spec value of an Optuna parameter value (a choice's label -> the choice itself)."""
        if self.kind == "choice" and param in self.labels:
            return copy.deepcopy(self.choices[self.labels.index(param)])
        return param

    def size(self) -> int | None:
        """How many values this dimension has (None: a continuous range), counted, not listed: a seed's
        range has four billion."""
        if self.kind == "choice":
            return len(self.choices)
        if self.kind == "int":
            return (int(self.high) - int(self.low)) // int(self.step or 1) + 1
        if self.step is None:
            return None
        return math.floor((self.high - self.low) / self.step + 1e-9) + 1

    def values_to_check(self) -> list[Any]:
        """Values that together exercise this dimension's range: every choice, or both ends."""
        if self.kind == "choice":
            return list(self.choices)
        if self.kind == "int":
            return [int(self.low), int(self.high)]
        return [self.low, self.high]

    def grid(self) -> list[Any]:
        """Every value, for grid search (choices, or each step of an int/float range)."""
        if self.kind == "choice":
            return self.labels
        if self.kind == "float" and self.step is None:
            raise SpaceError(self.key, GRID_NEEDS_STEP)
        if self.size() > MAX_GRID_POINTS:
            raise SpaceError(self.key, f"{self.size():,} values are too many to list for grid search (at most "
                                       f"{MAX_GRID_POINTS:,}); widen the step, narrow the range, or use another "
                                       f"search.sampler")
        if self.kind == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        # As Optuna does: the last value is the highest step at or below high, never above it.
        count = math.floor((self.high - self.low) / self.step + 1e-9)
        return [min(self.high, float(f"{self.low + i * self.step:.12g}")) for i in range(count + 1)]


MAX_GRID_POINTS = 1_000_000  # a grid is listed whole (Optuna's GridSampler lists every point): ~100 MB at most
GRID_NEEDS_STEP = ("grid search needs a step for float ranges; add one (e.g. step: 0.01), use choice, "
                   "or another search.sampler")


def _number(value: Any) -> Any:
    """A bound written as text that reads as a finite number (YAML 1.1 reads ``1.0e3`` and ``1e-3`` as
    text, which the spec's float fields accept as numbers), as that float; anything else as it is."""
    if not isinstance(value, str):
        return value
    try:
        number = float(value)
    except ValueError:
        return value
    return number if math.isfinite(number) else value


def _text_hint(values: list[Any], kind: str = "float") -> str:
    """What is wrong with the first of ``values`` that is text, for a message ('' if none is)."""
    text = next((v for v in values if isinstance(v, str)), None)
    if text is None:
        return ""
    number = _number(text)
    if isinstance(number, float) and (kind == "float" or number.is_integer()):
        written = yaml.safe_dump(int(number) if kind == "int" else number).split("\n", 1)[0]
        how = f"write it as {written}" + ("" if kind == "int" else "; YAML reads 1.0e+3 as a number, 1e3 and 1.0e3 "
                                                                     "as text")
    else:
        how = "write a number"
    return f"; {clip(text, 40)!r} is text, not a number ({how})"


def _label(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False).strip()


def _get(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = tree
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


def model_depth(spec: Mapping[str, Any]) -> int:
    """The depth of a raw spec's model: as written, else its preset's, else the schema's default."""
    model = _get(spec, ("model",))
    try:
        depth = with_preset(model if isinstance(model, Mapping) else {}).get("depth")
    except ValueError:
        depth = None
    return depth if isinstance(depth, int) else ModelSpec.model_fields["depth"].default


def block_type_of(spec: Mapping[str, Any], block_path: tuple[str, ...]) -> Any:
    """The type of the block at ``block_path`` in a raw spec: as written (``{type: mlp}`` or ``mlp``),
    else, for a model block left out or written without a type, the preset's or the default one."""
    if len(block_path) == 2 and block_path[0] == "model" and block_path[1] in KINDS:
        return block_type(_get(spec, ("model",)), block_path[1])
    block = _get(spec, block_path)
    return block.get("type") if isinstance(block, Mapping) else block


def parse_dimension(key: str, raw: Any) -> Dimension:
    """One ``search.space`` entry -> :class:`Dimension`; raises :class:`SpaceError` when malformed."""
    match = _CONDITIONAL.match(key)
    if match:
        block = tuple(match["block"].split("."))
        path, condition = block + tuple(match["rest"].split(".")), (block, match["type"])
    elif _PLAIN.match(key):
        path, condition = tuple(key.split(".")), None
    else:
        raise SpaceError(key, "a key is a dotted path such as model.depth, or model.ffn[mlp].ratio for a "
                              "block's own argument")
    if path[0] in ("search", "name", "plugins"):
        raise SpaceError(key, f"'{path[0]}' cannot be searched")
    if not isinstance(raw, Mapping):
        raise SpaceError(key, "expected {choice: [...]}, {int: [low, high]} or {float: [low, high]}")
    kinds = [k for k in ("choice", "int", "float") if k in raw]
    extra = set(raw) - {"choice", "int", "float", "step", "log"}
    if len(kinds) != 1 or extra:
        raise SpaceError(key, "give exactly one of choice, int or float (with optional step and log)"
                         + (f"; unknown: {', '.join(sorted(extra))}" if extra else ""))
    kind = kinds[0]
    if kind == "choice":
        choices = raw["choice"]
        if not isinstance(choices, list) or not choices:
            raise SpaceError(key, "choice needs a non-empty list")
        if "step" in raw or "log" in raw:
            raise SpaceError(key, "step and log apply to int and float ranges, not choice")
        return Dimension(key, path, kind, choices=tuple(choices), condition=condition)
    bounds = raw[kind]
    if kind == "float" and isinstance(bounds, list):
        bounds = [_number(b) for b in bounds]
    if not (isinstance(bounds, list) and len(bounds) == 2 and all(isinstance(b, (int, float)) for b in bounds)):
        raise SpaceError(key, f"{kind} needs [low, high]" + (_text_hint(bounds, kind) if isinstance(bounds, list) else ""))
    low, high = bounds
    if kind == "int" and not all(isinstance(b, int) and not isinstance(b, bool) for b in bounds):
        raise SpaceError(key, "int bounds must be integers")
    if any(isinstance(b, bool) for b in bounds):
        raise SpaceError(key, f"{kind} bounds must be numbers")
    if low > high:
        raise SpaceError(key, f"low {low} is above high {high}")
    log, step = raw.get("log", False), raw.get("step")
    if kind == "float":
        step = _number(step)
    if not isinstance(log, bool):
        raise SpaceError(key, f"log must be true or false, got {log!r}")
    if log and low <= 0:
        raise SpaceError(key, "a log range needs low > 0")
    if step is not None and (not isinstance(step, (int, float)) or isinstance(step, bool) or step <= 0):
        raise SpaceError(key, "step must be positive" + _text_hint([step]))
    if step is not None and kind == "int" and not isinstance(step, int):
        raise SpaceError(key, f"an int range needs an integer step, got {step!r}")
    if log and step is not None and kind == "float":
        raise SpaceError(key, "a float range takes step or log, not both")
    if log and step is not None and step != 1:  # Optuna draws log-scaled ints with step 1 only
        raise SpaceError(key, "a log int range takes no step (other than 1)")
    if step is not None and not log:
        high = _reached(low, high, step)
    return Dimension(key, path, kind, low=low, high=high, step=step, log=log, condition=condition)


def _reached(low: Any, high: Any, step: Any) -> Any:
    """The highest value ``step`` reaches from ``low`` at or below ``high``: what Optuna draws up to (it
    lowers such a high itself, with a warning at every draw). The supernet's ends and the values
    checked before a trial are then values that can be drawn."""
    span, q = Decimal(str(high)) - Decimal(str(low)), Decimal(str(step))
    if span < 0 or span % q == 0:
        return high
    top = (span // q) * q + Decimal(str(low))
    return int(top) if isinstance(high, int) and isinstance(low, int) else float(top)


def parse_space(space: Mapping[str, Any]) -> list[Dimension]:
    """All dimensions, unconditional ones first (conditions read the values those set), and each
    after any whose path contains its own (``model.attention`` before ``model.attention.heads``,
    which then sets heads in the drawn block instead of being overwritten by it)."""
    dims = [parse_dimension(key, raw) for key, raw in space.items()]

    def order(dim: Dimension) -> tuple[bool, int]:
        parents = sum(1 for o in dims if len(o.path) < len(dim.path) and dim.path[: len(o.path)] == o.path)
        return dim.condition is not None or dim.layer is not None, parents  # after depth, which they read

    return sorted(dims, key=order)


def sample(dims: list[Dimension], base: Mapping[str, Any], trial: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Draw a trial's values; returns (the filled raw spec, {key: value} of what was drawn)."""
    raw = copy.deepcopy(dict(base))
    drawn: dict[str, Any] = {}
    for dim in dims:
        if dim.applies(raw):
            value = dim.suggest(trial)
            set_path(raw, dim.path, value)
            drawn[dim.key] = value
    return raw, drawn


def fill(dims: list[Dimension], base: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """The raw spec with given values set (for enqueued configurations and exported best trials)."""
    raw = copy.deepcopy(dict(base))
    for dim in dims:
        if dim.key in values and dim.applies(raw):
            value = values[dim.key]
            if dim.kind == "choice" and value in dim.labels and value not in dim.choices:
                value = dim.choices[dim.labels.index(value)]
            set_path(raw, dim.path, copy.deepcopy(value))
    return raw


def check_space(spec: Any) -> list[str]:
    """Problems with ``spec.search.space``, one line each (file:line, key, reason), before any trial.

    Every key must parse, every path must exist in the spec schema (block arguments included), and
    every choice and both ends of every range must validate when set into the spec; a model, data or
    ``train.freeze`` value must also build, as a trial's spec does (:func:`_check_built`). A block's own
    argument (``model.ffn[mlp].ratio``) must name a type the block can take, and every key of an
    enqueued configuration must be a key of the space.
    """
    if spec.search is None:
        return []
    problems = []
    base = spec.raw
    base.pop("search", None)
    names: list[str] | None = None  # the parameters of the base's model, once a train.freeze value needs them
    dims: dict[str, Dimension] = {}
    for key, raw_dim in spec.search.space.items():
        try:
            dims[key] = parse_dimension(key, raw_dim)
        except SpaceError as err:
            problems.append(f"{spec.locate(('search', 'space', key))}: search.space.{err}")
    grid = spec.search.sampler == "grid"
    sizes = [dim.size() for dim in dims.values()]
    if grid and None not in sizes and math.prod(sizes) > MAX_GRID_POINTS:  # Optuna would list every point first
        problems.append(f"{spec.locate(('search', 'space'))}: search.space: the grid has {math.prod(sizes):,} points, "
                        f"too many to list (at most {MAX_GRID_POINTS:,}); widen steps, narrow ranges, or use another "
                        f"search.sampler")
    for key, dim in dims.items():
        where = spec.locate(("search", "space", key))
        if grid and dim.kind == "float" and dim.step is None:
            problems.append(f"{where}: search.space.{key}: {GRID_NEEDS_STEP}")
            continue
        whole = _whole_block(dims, dim)
        if whole is not None:
            problems.append(f"{where}: search.space.{key}: overlaps search.space.{whole}, which draws the whole "
                            f"block, its type included; search one of them (a block's own arguments go under "
                            f"{whole}[TYPE].ARGUMENT)")
            continue
        for value in dim.values_to_check():
            trial_raw = _with(base, dim, value)  # a block's own argument: its block freshly chosen
            try:
                trial = load_spec(trial_raw, check_model=False)
                if _built_to_check(dim.path):  # what the trial's build would refuse (on the meta device)
                    if names is None and _sets_the_freeze(dim.path):
                        names = parameter_names(spec.model)
                    _check_built(dims, dim, value, base, trial, names)
            except SpecError as err:
                reason = err.problems[0].split(": ", 1)[-1]
                problems.append(f"{where}: search.space.{key}: value {value!r} does not fit the spec: {reason}")
                break
        else:
            if dim.condition is not None and dim.condition[1] not in _block_types(list(dims.values()), base,
                                                                                  dim.condition[0]):
                block = ".".join(dim.condition[0])
                problems.append(f"{where}: search.space.{key}: never drawn: {block} is never a '{dim.condition[1]}' "
                                f"(search {block}.type with a choice that includes it)")
    for i, values in enumerate(spec.search.enqueue):
        for name in values:
            if name not in spec.search.space:
                keys = list(spec.search.space)
                hint = did_you_mean(name, keys) or (f"; keys: {', '.join(keys)}" if keys else
                                                    "; search.space is empty: add it there, or leave it out here")
                problems.append(f"{spec.locate(('search', 'enqueue', str(i), str(name)))}: search.enqueue.{i}: "
                                f"'{name}' is not a key of search.space{hint}")
                break
            outside = _outside(dims[name], values[name]) if name in dims else None
            if outside is not None:
                problems.append(f"{spec.locate(('search', 'enqueue', str(i), str(name)))}: search.enqueue.{i}.{name}: "
                                f"{clip(repr(values[name]))} {outside}; enqueue a value search.space.{name} can draw")
                break
    return problems


def _built_to_check(path: tuple[str, ...]) -> bool:
    """Whether a value set at ``path`` is checked by building the trial's model, as a trial's spec is:
    a model value (``model.attention.heads`` 3 with a fixed ``dim`` 16 never builds), a data value
    (``data.image_size``: the patch size must divide it) or ``train.freeze`` (its patterns must match a
    parameter, and leave one to train). A value that builds beside another searched value passes: the
    combinations that cannot be built are pruned as infeasible (``run --dry-run`` shows which). The
    rest (``train.lr``...) leave the model as the base's, already built by ``load_spec``."""
    return path[0] in ("model", "data") or _sets_the_freeze(path)


def _sets_the_freeze(path: tuple[str, ...]) -> bool:
    return path[0] == "train" and (len(path) == 1 or path[1] == "freeze")


def _check_built(dims: Mapping[str, Dimension], dim: Dimension, value: Any, base: Mapping[str, Any], trial: Any,
                 names: list[str] | None) -> None:
    """Raise :class:`SpecError` with what a trial's build finds wrong with ``value`` in the base spec
    (``trial``: that spec, loaded without building), unless one other searched value that changes the
    model or the freeze (a depth, a patch size, another weights file) makes it build: the value then
    fits some trials, and the others are pruned as infeasible combinations.

    A ``train.freeze`` value leaves the base's model, so its patterns are matched against the base's
    parameter ``names``, built once; others are built on the meta device, milliseconds for a small
    model, tens for a ViT-L. The other values are tried only once the value fails with the base's."""
    try:
        if names is not None and dim.path[0] == "train":
            if problems := freeze_problems(names, trial.train.freeze, trial.locate):
                raise SpecError(problems)
        else:
            load_spec(_with(base, dim, value), check_model=True)
    except SpecError as err:
        for other in dims.values():
            if not _may_make_it_build(other, dim):
                continue
            for beside in other.values_to_check():
                try:
                    load_spec(_with(_with(base, other, beside), dim, value), check_model=True)
                    return
                except SpecError:
                    continue
        raise err


def _may_make_it_build(other: Dimension, dim: Dimension) -> bool:
    """Whether ``other``'s values, set beside ``dim``'s, may change what the build finds: another
    unconditional model, data or freeze value, not one inside ``dim``'s path or around it."""
    if other is dim or other.condition is not None or other.layer is not None:
        return False
    if other.path[:len(dim.path)] == dim.path or dim.path[:len(other.path)] == other.path:
        return False
    return other.path[0] in ("model", "data") or _sets_the_freeze(other.path)


def _with(raw: Mapping[str, Any], dim: Dimension, value: Any) -> dict[str, Any]:
    """A copy of ``raw`` with ``value`` set at ``dim``'s path (its block freshly chosen for a block's own argument)."""
    raw = copy.deepcopy(dict(raw))
    if dim.condition is not None:
        set_path(raw, dim.condition[0], {"type": dim.condition[1]})
    set_path(raw, dim.path, copy.deepcopy(value))
    return raw


def _whole_block(dims: Mapping[str, Dimension], dim: Dimension) -> str | None:
    """The key drawing the whole block whose type ``dim`` would set over it, if any (``model.ffn`` for
    ``model.ffn.type``): the block drawn would keep its own arguments under another type."""
    if dim.path[-1] != "type" or dim.condition is not None:
        return None
    return next((o.key for o in dims.values() if o.path == dim.path[:-1] and o.condition is None), None)


def _outside(dim: Dimension, value: Any) -> str | None:
    """Why ``value`` is no value ``dim`` draws (None: it is one): Optuna would prune it, or fail."""
    if dim.kind == "choice":
        # A yes/no matches only a yes/no choice: to Python, true is 1 (docs/spec.md refuses it as a number).
        if any(isinstance(value, bool) == isinstance(c, bool) and value == c for c in dim.choices):
            if isinstance(value, float) and not any(isinstance(c, float) and value == c for c in dim.choices):
                # 2.0 for the choice 2 would train with 2, while the spec and its records said 2.0
                return f"is a decimal number; its choices are integers ({clip(', '.join(map(str, dim.labels)))})"
            return None
        if isinstance(value, str) and value in dim.labels:
            return None
        what = "is a yes/no value, not one of its choices" if isinstance(value, bool) else "is not one of its choices"
        return f"{what} ({clip(', '.join(str(label) for label in dim.labels))})"
    if isinstance(value, str):
        return _text_hint([value], dim.kind).removeprefix("; ").split(" ", 1)[1]  # "is text, not a number (...)"
    if dim.kind == "int" and (not isinstance(value, int) or isinstance(value, bool)):
        return "is not an integer"
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return "is not a number"
    if not dim.low <= value <= dim.high:
        return f"is outside its range [{dim.low:g}, {dim.high:g}]"
    if dim.step is not None:
        steps = (value - dim.low) / dim.step
        if abs(steps - round(steps)) > 1e-9 * max(1.0, abs(steps)):
            return f"is not on its steps of {dim.step:g} from {dim.low:g}"
    return None


def _block_types(dims: list[Dimension], base: Mapping[str, Any], block_path: tuple[str, ...]) -> set[Any]:
    """The types the block at ``block_path`` can take: as in the spec, or drawn by a dimension."""
    types = [block_type_of(base, block_path)]
    for dim in dims:
        if dim.kind == "choice" and dim.path == block_path + ("type",):
            types.extend(dim.choices)
        elif dim.kind == "choice" and dim.path == block_path:  # whole blocks, or blocks named by type
            types.extend(block_type_of({"block": c}, ("block",)) for c in dim.choices)
    return {t for t in types if isinstance(t, str)}


def to_params(dims: list[Dimension], values: Mapping[str, Any]) -> dict[str, Any]:
    """Values as Optuna stores them (mapping choices as their YAML labels), for ``enqueue_trial``."""
    params = dict(values)
    for dim in dims:
        if dim.kind == "choice" and dim.key in params and params[dim.key] in dim.choices:
            params[dim.key] = dim.labels[dim.choices.index(params[dim.key])]
    return params

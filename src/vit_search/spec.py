"""YAML -> validated :class:`~vit_search.schema.Spec`: errors name the file, the line and the field path.

A spec is read as YAML within bounds (:mod:`.safe_yaml`: size, depth, aliases, finite numbers),
overridden with ``--set a.b=value`` pairs, validated against the schema (:mod:`.schema`), then
checked against the block registry (unknown blocks and arguments) and built once on torch's meta
device (:func:`~vit_search.model.build_on_meta`), so impossible shapes (dim not divisible by heads,
image not divisible by patch) fail here, before anything runs or is written.
"""

from __future__ import annotations

import copy
import errno
import importlib.machinery
import io
import os
import re
import stat
import sys
import types
from pathlib import Path
from typing import Any, Iterable, Mapping, Union, get_args, get_origin

from pydantic import ValidationError

from .errors import UserError
from .redaction import remember_passwords
from .registry import KINDS, REGISTRY, RegistryError, did_you_mean
from .safe_yaml import MAX_CHARS, YamlError, clip, load_yaml, load_yaml_value
from .schema import ModelSpec, Spec, set_path


# -- errors -------------------------------------------------------------------------------------
class SpecError(UserError):
    """An invalid spec: one line per problem, each naming file:line and the field path."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


class _Locator:
    """Maps a field path to where it came from: a file line, or a ``--set`` override."""

    def __init__(self, source: str, lines: dict[tuple[str, ...], int], overrides: Iterable[str]):
        self.source = source
        self.lines = lines
        self.overrides = {tuple(o.split("=", 1)[0].strip().split(".")): o for o in overrides}

    def __call__(self, path: tuple[str, ...]) -> str:
        for key, item in self.overrides.items():
            if key[: len(path)] == path and path:  # an override inside the failing field
                return f"--set {item}"
        # An override of the field or of a section above it replaced what the file says there.
        overridden = next((path[:n] for n in range(len(path), 0, -1) if path[:n] in self.overrides), None)
        if overridden is not None:
            return f"--set {self.overrides[overridden]}"
        depth = next((n for n in range(len(path), -1, -1) if path[:n] in self.lines), None)
        if depth != len(path):
            # The file does not write the field: an override in the same section (`--set model.dim=true` for a
            # problem found at model.attention) is nearer the cause than the section's line, or line 1.
            def shared(key: tuple[str, ...]) -> int:
                return next((n for n in range(min(len(key), len(path)), 0, -1) if key[:n] == path[:n]), 0)

            nearest = max(self.overrides, key=shared, default=None)
            if nearest is not None and shared(nearest) >= max(depth or 0, 1):
                return f"--set {self.overrides[nearest]}"
        line = None if depth is None else self.lines[path[:depth]]
        return self.source if line is None else f"{self.source}:{line}"


def _fields_at(loc: tuple[str, ...]) -> list[str]:
    """The field names a pydantic model accepts at ``loc`` (for did-you-mean on unknown keys)."""
    cls: Any = Spec
    for part in loc:
        fields = getattr(cls, "model_fields", None)
        by_key = {field.alias or name: field for name, field in (fields or {}).items()}
        if part not in by_key:
            return []
        cls = by_key[part].annotation
        while get_origin(cls) in (Union, types.UnionType):
            cls = next((a for a in get_args(cls) if a is not type(None)), cls)
    return [field.alias or name for name, field in getattr(cls, "model_fields", {}).items()]


_SCHEMA_PART = re.compile(r"^(int|str|float|bool|bytes|none|(tuple|list|dict|set|literal|union|function-\w+)\[.*\])$")


_NAMED_FIELD = re.compile(r"([a-z_]+(?:\.[a-z_]+)+) (?=\S)")  # "model.num_classes 3 is fewer than ..."


def _pydantic_problems(err: ValidationError, where: _Locator) -> list[str]:
    problems = []
    errors = [(tuple(str(p) for p in e["loc"] if not (isinstance(p, str) and _SCHEMA_PART.match(p))), e)
              for e in err.errors()]
    locs = [loc for loc, _ in errors]
    said: set[tuple[str, ...]] = set()
    for loc, e in errors:
        # Union members and validators show up as extra loc parts ("int", "tuple[int, int]",
        # "function-after[...]"): keep the field path, and every key, whatever its name begins with.
        # A union gives one error per member it tried (`metric: x` is no objective, and no list of them):
        # one line per field, the one naming an item where there is one.
        deeper = any(len(other) > len(loc) and other[:len(loc)] == loc for other in locs)
        if loc in said or (deeper and e["type"] not in ("extra_forbidden", "missing")):
            continue
        said.add(loc)
        path = ".".join(loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            known = _fields_at(loc[:-1])
            hint = did_you_mean(loc[-1], known) or (f"; allowed: {', '.join(known)}" if known else "")
            message = f"unknown key '{loc[-1]}'{hint}"
        elif e["type"] == "missing":
            message = "required field is missing"
        else:
            message = e["msg"].removeprefix("Value error, ")
            if e["type"] not in ("value_error", "assertion_error") and "input" in e:
                message += f" (got {clip(repr(e['input']))})"
            named = _NAMED_FIELD.match(message) if not loc else None
            if named:  # a check across sections names its field first: located there, not at the top
                loc, path, message = tuple(named.group(1).split(".")), named.group(1), message[named.end():]
        problems.append(f"{where(loc)}: {path}: {message}")
    return problems


# -- loading ------------------------------------------------------------------------------------
def parse_override(item: str) -> tuple[list[str], Any]:
    """``"model.depth=6"`` -> (["model", "depth"], 6); the value is read as YAML."""
    if "=" not in item or not item.split("=", 1)[0].strip():
        raise SpecError([f"--set {item}: expected PATH=VALUE, e.g. --set model.depth=6"])
    path, value = item.split("=", 1)
    keys = path.strip().split(".")
    try:
        parsed = load_yaml_value(value, f"--set {item}", unique_keys=True, field=tuple(keys)) if value.strip() else None
    except YamlError as err:
        raise SpecError([err.problem]) from None
    return keys, parsed


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """A copy of ``raw`` with each ``PATH=VALUE`` override set (intermediate mappings created)."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        keys, value = parse_override(item)
        try:
            set_path(raw, keys, value)
        except ValueError as err:
            raise SpecError([f"--set {item}: {err}"]) from None
    return raw


def _strings_in(value: Any) -> Iterable[str]:
    """Every string in a raw spec (bounded by the YAML limits: 20,000 values, 50 levels)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _strings_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings_in(item)


def load_spec(
    source: str | os.PathLike[str] | Mapping[str, Any],
    overrides: Iterable[str] = (),
    check_model: bool = True,
) -> Spec:
    """Load, override and validate a spec from a YAML file path or a mapping.

    Plugins listed in the spec are imported (relative paths resolve against the spec's folder).
    With ``check_model``, the model is built on the meta device to catch impossible shapes.
    Raises :class:`SpecError` listing every problem found.
    """
    overrides = list(overrides)
    if isinstance(source, Mapping):
        raw, name, lines, base_dir = dict(source), "<spec>", {}, Path.cwd()
    else:
        path = Path(source)
        name, base_dir = str(path), path.parent
        text = _read_spec(path, name)
        try:
            raw, lines = load_yaml(text, name, unique_keys=True)
        except YamlError as err:
            raise SpecError([err.problem]) from None
        if raw is None:
            raise SpecError([f"{name}: the file is empty; a spec needs at least 'name:' (see experiments/)"])
        if not isinstance(raw, dict):
            raise SpecError([f"{name}:1: a spec is a mapping of keys (name, data, model, ...), got {type(raw).__name__}"])
    # A storage or tracking URL's password: masked in every error line.
    remember_passwords([*_strings_in(raw), *overrides])
    where = _Locator(name, lines, overrides)
    raw = apply_overrides(raw, overrides)
    REGISTRY.list()  # built-ins and installed plugins first: their failure is not this spec's

    plugins = raw.get("plugins")
    if plugins is not None and not isinstance(plugins, list):  # a string was imported a letter at a time
        example = f"[{plugins}]" if isinstance(plugins, str) else "[my_blocks.py]"
        raise SpecError([f"{where(('plugins',))}: plugins: a list of modules or .py files, got "
                         f"{type(plugins).__name__}; write it as a list, e.g. plugins: {clip(example, 80)}"])
    if isinstance(raw.get("plugins"), list):  # file paths made absolute: the raw spec loads from anywhere
        raw["plugins"] = [_absolute_plugin(p, base_dir) for p in raw["plugins"]]
    if isinstance(raw.get("search"), Mapping):  # so are searched weights files: a trial's spec is a mapping
        raw["search"] = _absolute_searched_weights(raw["search"], base_dir)
    # Plugins first: they may register the blocks the model section names.
    for i, plugin in enumerate(raw.get("plugins") or []):
        try:
            REGISTRY.load_plugin(str(plugin), base_dir)
        except RegistryError as err:
            raise SpecError([f"{where(('plugins', str(i)))}: plugins.{i}: {err.message}"]) from None

    weights, validated = _on_init_weights(raw, base_dir, where)
    try:
        spec = Spec.model_validate(validated)
    except ValidationError as err:
        raise SpecError(_pydantic_problems(err, where)) from None
    spec._source = None if isinstance(source, Mapping) else str(source)
    spec._raw = raw
    spec._where = where

    problems = check_blocks(spec.model, where)
    if not problems and weights is not None:
        from .model.pretrained import fit_problems

        problems = [f"{where(path)}: {'.'.join(path)}: {message}" for path, message in fit_problems(spec.model, weights)]
    if not problems and check_model:
        problems = _check_build(spec, where)
    if problems and overrides and not isinstance(source, Mapping):
        problems = _blame_overrides(problems, source, overrides, check_model)
    if problems:
        raise SpecError(problems)
    return spec


def _blame_overrides(problems: list[str], source: str | os.PathLike[str], overrides: list[str],
                     check_model: bool) -> list[str]:
    """Problems located in the file that the file alone does not have (a derived size: ``--set
    data.image_size=10`` that the patch size no longer divides) are the overrides' doing: said so."""
    if all(problem.startswith("--set ") for problem in problems):
        return problems
    try:
        load_spec(source, (), check_model)
    except SpecError:
        return problems  # the file has problems of its own: its lines stay
    named = " ".join(f"--set {override}" for override in overrides)
    return [problem if problem.startswith("--set ") else f"{named}: {problem.split(': ', 1)[-1]}"
            for problem in problems]


_NOT_A_FILE = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a pipe (FIFO)"), (stat.S_ISCHR, "a device"),
               (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket"))


def _read_spec(path: Path, name: str) -> str:
    """The text of the spec file at ``path``, read in bounded time and memory: a device (/dev/zero),
    a pipe (which blocks until written) or anything else but a regular file is refused before it is
    opened, and at most the size limit and one more character is read (a file may grow meanwhile)."""
    limit = MAX_CHARS * 4  # bytes: UTF-8 takes up to 4 a character
    try:
        mode = path.stat().st_mode
        if not stat.S_ISREG(mode):
            kind = next((k for test, k in _NOT_A_FILE if test(mode)), "not a regular file")
            raise SpecError([f"{name}: is {kind}, not a spec file; give the path of a YAML file"])
        # Non-blocking: should a pipe take the file's place after the check, opening it does not wait.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with open(fd, "rb", closefd=True) as handle:
            opened = os.fstat(handle.fileno())
            if not stat.S_ISREG(opened.st_mode):
                raise SpecError([f"{name}: is not a regular file, not a spec file; give the path of a YAML file"])
            # Before reading, as far as the size is known; and never past the limit, should the file grow.
            data = handle.read(limit + 1) if opened.st_size <= limit else b""
            size = max(len(data), opened.st_size)
        if size > limit:  # read no further: a spec is a few KB
            raise SpecError([f"{name}: the file is {size:,} bytes; a spec is a few KB (at most "
                             f"{MAX_CHARS:,} characters)"])
        try:
            return io.TextIOWrapper(io.BytesIO(data)).read()  # as Path.read_text decodes it
        except UnicodeDecodeError as err:
            line = data[: err.start].count(b"\n") + 1
            raise SpecError([f"{name}:{line}: byte 0x{data[err.start]:02x} cannot be decoded as {err.encoding} text; "
                             f"save the spec as {err.encoding.upper()}"]) from None
    except FileNotFoundError:
        raise SpecError([f"{name}: no such file; check the path"]) from None
    except PermissionError:
        raise SpecError([f"{name}: cannot read the spec: permission denied; make it readable (chmod u+r)"]) from None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise SpecError([f"{name}: its symbolic links form a loop; give the path of the spec file itself"]) from None
        raise SpecError([f"{name}: cannot read the spec: {err.strerror or err}"]) from None


SUPERNET_INIT = "model.init: a supernet starts from fresh weights; remove model.init or use strategy: trials"
"""Why a supernet study takes no ``model.init``: its searched sizes would each be judged against the weights."""


def _on_init_weights(raw: dict[str, Any], base_dir: Path, where: _Locator) -> tuple[Any, dict[str, Any]]:
    """(what ``model.init``'s weights fix, the raw spec to validate: its model section on top of them).

    The init section is completed in ``raw`` itself (a relative path made absolute, an MLflow run's
    store), so that the raw spec loads from anywhere: a trial's spec, an exported best spec. Without
    an init, or with one the schema will reject, the raw spec is validated as it is.
    """
    model = raw.get("model")
    if not isinstance(model, Mapping) or not isinstance(model.get("init"), Mapping):
        return None, raw
    search = raw.get("search")
    if isinstance(search, Mapping) and search.get("strategy") == "supernet":  # before the weights' fit is judged
        raise SpecError([f"{where(('model', 'init'))}: {SUPERNET_INIT}"])
    from .schema import InitSpec

    init_raw = dict(model["init"])
    if init_raw.get("from") == "file" and "path" in init_raw:
        init_raw["path"] = _absolute_weights(init_raw["path"], base_dir)
    if init_raw.get("from") == "mlflow" and not init_raw.get("uri"):
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (raw.get("tracking") or {}).get("uri")
        if isinstance(uri, str) and uri:
            init_raw["uri"] = uri
    raw["model"] = {**model, "init": init_raw}
    try:
        init = InitSpec.model_validate(init_raw)
    except ValidationError:
        return None, raw  # reported by the schema, at the right key
    from .errors import WeightsError
    from .model.pretrained import describe, heads_written, merge_onto_weights

    try:
        weights = describe(init, heads_written(model))
        for kind in KINDS:  # a checkpoint's recorded section is read, not built: its blocks are looked up here
            block = weights.section.get(kind)
            if isinstance(block, Mapping) and isinstance(block.get("type"), str):
                REGISTRY.get(kind, block["type"])
    except WeightsError as err:
        raise SpecError([f"{where(('model', 'init'))}: model.init: {err}"]) from None
    except RegistryError as err:  # weights whose model is made of a plugin's blocks, which this spec does not load
        raise SpecError([f"{where(('model', 'init'))}: model.init: the weights' model needs a block this spec does not "
                         f"load ({err.message}); list the plugin that registers it under plugins:, as the spec that "
                         f"trained it did"]) from None
    return weights, {**raw, "model": merge_onto_weights(weights.section, raw["model"])}


def _absolute_weights(path: Any, base_dir: Path) -> Any:
    """A weights file path (``model.init.path``) relative to the spec's folder, made absolute; anything but
    a non-empty text is left for the schema to refuse."""
    if not isinstance(path, str) or not path:
        return path
    target = base_dir / Path(path).expanduser()
    try:
        target = target.resolve()
    except (OSError, RuntimeError):  # a loop of symbolic links: the weights reader says so in one line
        target = target.absolute()
    return str(target)


_WEIGHTS_PATH = ("model", "init", "path")


def _absolute_searched_weights(search: Mapping[str, Any], base_dir: Path) -> Mapping[str, Any]:
    """``search`` with the weights files its space draws (``model.init.path: {choice: [...]}``, or the
    paths in whole ``model.init`` or ``model`` choices) and its enqueued values for them made absolute,
    as the spec's own ``model.init.path`` is: a trial's spec, a mapping, then reads them from the
    spec's folder, not from the working directory. Malformed entries are left for the checks to name."""
    space, enqueue = search.get("space"), search.get("enqueue")
    if not isinstance(space, Mapping):
        return search
    below = {key: _WEIGHTS_PATH[len(key.split(".")):] for key in space
             if isinstance(key, str) and tuple(key.split(".")) == _WEIGHTS_PATH[:len(key.split("."))]}
    if not below:
        return search

    def absolute(value: Any, rest: tuple[str, ...]) -> Any:
        if not rest:
            return _absolute_weights(value, base_dir)
        if not isinstance(value, Mapping) or rest[0] not in value:
            return value
        if rest == ("path",) and value.get("from") != "file":  # only a file source reads a path
            return value
        return {**value, rest[0]: absolute(value[rest[0]], rest[1:])}

    space = dict(space)
    for key, rest in below.items():
        entry = space[key]
        if isinstance(entry, Mapping) and isinstance(entry.get("choice"), list):
            space[key] = {**entry, "choice": [absolute(choice, rest) for choice in entry["choice"]]}
    if isinstance(enqueue, list):
        enqueue = [{name: absolute(value, below[name]) if name in below else value for name, value in item.items()}
                   if isinstance(item, Mapping) else item for item in enqueue]
        return {**search, "space": space, "enqueue": enqueue}
    return {**search, "space": space}


def _absolute_plugin(plugin: Any, base_dir: Path) -> Any:
    """A plugin as the spec's folder or the working directory gave it, made an absolute path: a
    relative ``.py`` path, or a module name that only a file or a package beside the spec (or in the
    working directory) provides. An exported best spec then loads its plugin from any folder. Module names
    on ``sys.path`` (installed ones) stay names."""
    if not isinstance(plugin, str) or not plugin:
        return plugin
    if plugin.endswith(".py") or "/" in plugin:
        relative = plugin
    elif plugin.isidentifier() and importlib.machinery.PathFinder.find_spec(plugin, sys.path) is None:
        relative = f"{plugin}.py"
    else:
        return plugin
    if Path(relative).is_absolute():
        return plugin
    for folder in (Path(base_dir), Path(".")):
        if (folder / relative).is_file():
            return str((folder / relative).resolve())
        if relative == f"{plugin}.py" and (folder / plugin / "__init__.py").is_file():
            # A package: its folder, which the registry imports by its name (its own relative imports need that).
            return str((folder / plugin).resolve())
    return plugin


def check_blocks(model: ModelSpec, where: _Locator | None = None) -> list[str]:
    """Every block named in ``model`` exists and gets only arguments its signature accepts."""
    where = where or _Locator("<spec>", {}, ())
    problems = []
    for kind in KINDS:
        name, kwargs = model.block(kind)
        try:
            REGISTRY.check_args(kind, name, kwargs, f"model.{kind}")
        except RegistryError as err:
            path = tuple((err.path or f"model.{kind}").split("."))
            if err.message.startswith("unknown "):  # unknown block: point at its type key
                path = ("model", kind, "type")
            problems.append(f"{where(path)}: {'.'.join(path)}: {err.message}")
    return problems


MAX_PARAMETERS = 100_000_000_000  # a model beyond this is a typo (ViT-22B has 2.2e10)


def _check_build(spec: Spec, where: _Locator) -> list[str]:
    from .model import build_on_meta, count_parameters
    from .model.cost import run_one_image
    from .model.shapes import BATCH, BlockContractError, check_declarations, forward_checked

    try:
        model = build_on_meta(spec.model)
        parameters = count_parameters(model)
        if parameters > MAX_PARAMETERS:
            return [f"{where(('model',))}: model: {parameters:,} parameters is more than {MAX_PARAMETERS:,}; "
                    f"check dim, depth and the blocks' sizes"]
    except RegistryError as err:
        path = tuple((err.path or "model").split("."))
        return [f"{where(path)}: {err.message}"]
    except Exception as err:  # a plugin block failing in its own way: still one line, not a traceback
        first = clip(str(err).strip().split("\n", 1)[0], 200)  # torch's C++ errors carry a frame dump below
        if isinstance(err, OverflowError) or "overflow" in first.lower():  # a size past any integer torch takes
            return [f"{where(('model',))}: model: its sizes overflow, far more than {MAX_PARAMETERS:,} parameters; "
                    f"check dim, depth and the blocks' sizes"]
        return [f"{where(('model',))}: model: building it failed: {type(err).__name__}: {first}"]
    # A plugin's block must chain with the others: a batch through the model, on the meta device, each
    # block's output held to its kind's convention, says so. (Ours are tested to; the check costs a
    # second of imports, torch's meta kernels.)
    # Whose code: the modules' classes, and the builders the spec names (a plugin's factory returns torch's modules).
    plugins = {type(m).__module__ for m in model.modules()} | {
        REGISTRY.describe(kind, spec.model.block(kind)[0]).module for kind in KINDS}
    if any(not name.startswith(("vit_search.", "torch.")) for name in plugins - {""}):
        try:
            check_declarations(model, spec.model)
            run_one_image(spec.model, forward_checked(spec.model), batch=BATCH)
        except BlockContractError as err:
            return [f"{where(('model', err.kind))}: {err}"]
        except UserError as err:
            return [f"{where(('model',))}: {err}"]
    return freeze_problems([name for name, _ in model.named_parameters()], spec.train.freeze, where)


def parameter_names(model: ModelSpec) -> list[str] | None:
    """The parameter names of ``model``, built on the meta device; None if it cannot be built (the
    build check says why, in one line)."""
    from .model import build_on_meta

    try:
        return [name for name, _ in build_on_meta(model).named_parameters()]
    except Exception:
        return None


def freeze_problems(names: list[str], freeze: list[str], where: Any) -> list[str]:
    """What is wrong with ``train.freeze`` for a model whose parameters are ``names`` (a pattern matching
    none of them, or patterns freezing them all), one line located by ``where``; [] when nothing is."""
    from .finetune import frozen, unmatched

    for i, pattern in enumerate(freeze):
        if unmatched(names, [pattern]):
            path = ("train", "freeze", str(i))
            return [f"{where(path)}: train.freeze.{i}: '{pattern}' matches no parameter; names look like "
                    f"patch_embed.proj.weight, blocks.0.attn.qkv.weight, head.fc.weight (fnmatch patterns)"]
    if freeze and len(frozen(names, freeze)) == len(names):
        return [f"{where(('train', 'freeze'))}: train.freeze: freezes every parameter, so nothing would train; "
                f"leave the head (head.*) out of it"]
    return []

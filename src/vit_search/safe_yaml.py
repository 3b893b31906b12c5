"""YAML that any input reads in bounded time and memory: data and line map from one parse.

``yaml.safe_load`` trusts its input: a few hundred bytes of nested anchors ("billion laughs")
expand to billions of values, a deeply nested document overflows the composer's recursion, a
5,000-digit integer trips Python's int-string limit, and ``.inf`` reads as a number. Here the
text is composed once with :class:`yaml.SafeLoader` under limits (size, nesting depth, values
after alias expansion), the node graph is checked (scalars, keys) while the line map is built,
and only then are Python objects constructed. Every failure is one :class:`YamlError` line.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import yaml
from yaml.events import AliasEvent, MappingStartEvent, SequenceStartEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

MAX_CHARS = 1 << 20  # a spec is a few KB; checked first, as pure-Python PyYAML reads ~30,000 values/s
MAX_DEPTH = 50  # nested mappings/sequences; far below the recursion limit the composer needs
MAX_VALUES = 20_000  # values after alias expansion (what pydantic, deepcopy and printing see); a
# spec has about a hundred; 20,000 plain values, the slowest input allowed, parse in ~0.5 s on 2 cores
MAX_DIGITS = 100  # an integer longer than this is no setting, and int() of 4,301+ digits raises
SHOWN = 80  # a value quoted in a message is cut to this many characters

_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_NOT_KEYS = {"tag:yaml.org,2002:null": "null", "tag:yaml.org,2002:bool": "a true/false value"}
_MERGE = "tag:yaml.org,2002:merge"  # `<<: *base`: its keys may be given again, to override them
# Tags whose constructors raise a plain ValueError on odd text (``!!int x``, ``2001-13-45``):
# constructed while the path and line are still known.
_CHECKED = {_INT: "integer", _FLOAT: "number", "tag:yaml.org,2002:timestamp": "date"}
# YAML 1.1 types no spec value is: bytes, a set (a mapping of nulls), ordered pairs (lists of tuples).
_REFUSED = {"tag:yaml.org,2002:binary": "binary data", "tag:yaml.org,2002:set": "a set",
            "tag:yaml.org,2002:omap": "an ordered mapping", "tag:yaml.org,2002:pairs": "a list of pairs"}


class YamlError(ValueError):
    """YAML that cannot be read or breaks a limit; ``problem`` is one line naming where."""

    def __init__(self, problem: str):
        # One line whatever the input held: file names and YAML messages may carry newlines.
        self.problem = " ".join(problem.split())
        super().__init__(self.problem)


def clip(text: str, limit: int = SHOWN) -> str:
    """``text`` on one line, cut to ``limit`` characters with its full length said."""
    head = " ".join(text[: limit + 40].split())  # cut before splitting: text may be megabytes
    if len(text) <= limit and len(head) <= limit:
        return head
    return f"{head[: limit - 1]}…({len(text)} characters)"


class _Problem(Exception):
    """Internal: a limit or check failed at ``line`` (1-based, None: unknown) of the text."""

    def __init__(self, line: int | None, message: str, path: tuple[str, ...] | None = None):
        super().__init__(message)
        self.line, self.message, self.path = line, message, path


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader whose composer counts depth and values (aliases expanded) as it goes."""

    def __init__(self, text: str):
        super().__init__(text)
        self._depth = 0  # collections open right now (the composer's recursion depth / 3)
        self._values = 0  # values so far with every alias counted as the whole value it names
        self._aliased = False  # whether an alias was met: names the cause when the count overflows
        self._sizes: dict[Node, int] = {}  # anchored node -> values it expands to
        self._heights: dict[Node, int] = {}  # collection node -> nesting depth with aliases expanded

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        event = self.peek_event()
        line = event.start_mark.line + 1
        if isinstance(event, AliasEvent):
            node = super().compose_node(parent, index)  # raises for an undefined alias
            size = self._sizes.get(node)
            if size is None:  # the anchor's own value is still open: `&a [*a]` never ends
                raise _Problem(line, f"the YAML alias *{clip(event.anchor, 40)} refers to a value that contains "
                                     "it; write the values out instead")
            self._aliased = True
            self._count(size, line)
            return node
        collection = isinstance(event, (SequenceStartEvent, MappingStartEvent))
        if collection:
            # Checked before descending: PyYAML's composer recurses three frames per level.
            if self._depth >= MAX_DEPTH:
                raise _Problem(line, f"YAML nested more than {MAX_DEPTH} levels deep; a spec needs a few")
            self._depth += 1
        before = self._values
        self._count(1, line)
        try:
            node = super().compose_node(parent, index)
        finally:
            if collection:
                self._depth -= 1
        if collection:
            children = node.value if isinstance(node, SequenceNode) else [n for kv in node.value for n in kv]
            height = 1 + max((self._heights.get(c, 0) for c in children), default=0)
            if height > MAX_DEPTH:  # only aliases get here: each nests an anchor one level deeper
                raise _Problem(line, f"YAML aliases nest values more than {MAX_DEPTH} levels deep; "
                                     "write the values out instead of nesting anchors")
            self._heights[node] = height
        if event.anchor is not None:
            self._sizes[node] = self._values - before
        return node

    def _count(self, values: int, line: int) -> None:
        self._values += values
        if self._values > MAX_VALUES:
            if self._aliased:
                raise _Problem(line, f"YAML aliases expand to more than {MAX_VALUES} values; "
                                     "write the values out instead of nesting anchors")
            raise _Problem(line, f"the YAML holds more than {MAX_VALUES} values; a spec needs far fewer")


def _check_scalar(loader: _BoundedLoader, node: ScalarNode, path: tuple[str, ...]) -> None:
    """Refuse an over-long integer, a non-finite float, a base-60 number, or a typed value its constructor rejects."""
    kind = _CHECKED.get(node.tag)
    if kind is None:
        return
    line = node.start_mark.line + 1
    if node.tag in (_INT, _FLOAT) and ":" in node.value:
        # YAML 1.1 reads `1:20` as 80 (base 60), which YAML 1.2 and every other reader take as text.
        raise _Problem(line, f"{clip(node.value, 20)} is a YAML 1.1 base-60 number; write it in decimal, "
                             f"or quote it for text", path)
    if node.tag == _INT and len(node.value.lstrip("+-").replace("_", "")) > MAX_DIGITS:
        raise _Problem(line, f"{clip(node.value, 20)} has more than {MAX_DIGITS} digits; "
                             "a setting needs far fewer", path)
    try:
        # Memoised by the loader: construct_document reuses this object.
        value = loader.construct_object(node)
    except (ValueError, OverflowError, yaml.YAMLError):
        raise _Problem(line, f"{clip(node.value)} is not a valid {kind}", path) from None
    if isinstance(value, float) and not math.isfinite(value):
        raise _Problem(line, f"{clip(node.value)} is not a finite number", path)


def _refuse_type(node: Node, path: tuple[str, ...]) -> None:
    """Refuse a node tagged with a YAML type that no spec value has (``!!binary``, ``!!set``, ...)."""
    if node.tag in _REFUSED:
        raise _Problem(node.start_mark.line + 1, f"!!{node.tag.rsplit(':', 1)[1]} makes {_REFUSED[node.tag]}, "
                                                 "which no spec value is; write plain YAML values", path)


def _walk(loader: _BoundedLoader, root: Node, unique_keys: bool = False) -> dict[tuple[str, ...], int]:
    """Field path -> line, as ``spec._line_map`` gives, checking keys and scalars on the way.

    With ``unique_keys``, a key given twice in one mapping is refused at its second line (PyYAML
    would keep the last silently); keys a merge (``<<: *base``) brings in may still be overridden.

    Iterative and pre-order like the recursive original, so the assignments come in the same
    order and duplicate keys resolve the same way. Aliases are walked into as the original
    does; the composer's value count has already bounded how far that goes.
    """
    lines: dict[tuple[str, ...], int] = {(): 1}
    checked: set[Node] = set()  # a scalar named by many aliases is checked once
    # (node, its path, the line to record for that path before walking it; None for the root)
    stack: list[tuple[Node, tuple[str, ...], int | None]] = [(root, (), None)]
    while stack:
        node, path, line = stack.pop()
        if line is not None:
            lines[path] = line
        _refuse_type(node, path)
        if isinstance(node, ScalarNode):
            if node not in checked:
                checked.add(node)
                _check_scalar(loader, node, path)
            continue
        children: list[tuple[Node, tuple[str, ...], int | None]] = []
        if isinstance(node, MappingNode):
            seen: dict[str, int] = {}  # key -> the line it was first given on
            for key, value in node.value:
                if not isinstance(key, ScalarNode):  # unhashable in Python, and no field name
                    raise _Problem(key.start_mark.line + 1, "a mapping key must be a plain value, not a list "
                                   "or mapping", path)
                if key.tag in _NOT_KEYS:  # no field is named so, and pydantic would name it `None` or `1`
                    raise _Problem(key.start_mark.line + 1, f"the key {clip(key.value, 20)} reads as "
                                   f"{_NOT_KEYS[key.tag]} in YAML; quote it if a field is so named", path)
                sub = path + (str(key.value),)
                if unique_keys and key.tag != _MERGE:
                    if str(key.value) in seen:
                        raise _Problem(key.start_mark.line + 1, f"'{clip(str(key.value), 40)}' is given twice in this "
                                       f"mapping (first on line {seen[str(key.value)]}); keep one", sub)
                    seen[str(key.value)] = key.start_mark.line + 1
                if key not in checked:
                    checked.add(key)
                    _refuse_type(key, sub)
                    _check_scalar(loader, key, sub)
                children.append((value, sub, key.start_mark.line + 1))
        else:
            children = [(item, path + (str(i),), item.start_mark.line + 1) for i, item in enumerate(node.value)]
        stack.extend(reversed(children))
    return lines


def _load(text: str, where: Callable[[int | None], str], with_lines: bool, unique_keys: bool = False,
          field: tuple[str, ...] = ()) -> tuple[Any, dict[tuple[str, ...], int]]:
    """Compose once under the limits, walk the nodes, construct; every failure one YamlError."""
    if len(text) > MAX_CHARS:  # before parsing: 50 MB would take minutes and gigabytes
        raise YamlError(f"{where(None)}: the YAML is {len(text)} characters, more than the {MAX_CHARS} "
                        "(1 MiB) allowed; a spec is a few KB")
    loader: _BoundedLoader | None = None
    try:
        loader = _BoundedLoader(text)  # its reader rejects control characters right here
        root = loader.get_single_node()
        if root is None:
            return None, {}
        lines = _walk(loader, root, unique_keys)
        data = loader.construct_document(root)
        return data, lines if with_lines else {}
    except _Problem as problem:
        # A --set value's own top level is the field its flag names: no path to add.
        top = problem.path == () and not with_lines
        path = None if problem.path is None else field + problem.path  # a --set value's paths start at its field
        field = "" if path is None or top else f"{clip('.'.join(path)) or '(top level)'}: "
        raise YamlError(f"{where(problem.line)}: {field}{problem.message}") from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        message = err.problem or err.context or "unreadable"
        if err.context and message.startswith("but "):  # "expected a single document..., but found another"
            message = f"{err.context}, {message}"
        kind = "YAML error" if isinstance(err, yaml.constructor.ConstructorError) else "YAML syntax error"
        raise YamlError(f"{where(mark.line + 1 if mark else None)}: {kind}: {clip(message, 160)}") from None
    except yaml.reader.ReaderError as err:  # a control character: its position, not a mark
        line = text.count("\n", 0, err.position) + 1
        raise YamlError(f"{where(line)}: YAML syntax error: unacceptable character #x{err.character:04x}: "
                        "special characters are not allowed") from None
    except yaml.YAMLError as err:
        raise YamlError(f"{where(None)}: YAML syntax error: {clip(str(err), 160)}") from None
    except (ValueError, TypeError, OverflowError, RecursionError, MemoryError) as err:
        # Backstop only: the limits above keep these from happening on any input we know of.
        raise YamlError(f"{where(None)}: the YAML cannot be read: {type(err).__name__}: {clip(str(err))}") from None
    finally:
        if loader is not None:
            loader.dispose()


def load_yaml(text: str, source: str, unique_keys: bool = False) -> tuple[Any, dict[tuple[str, ...], int]]:
    """The data in ``text`` (as ``yaml.safe_load`` gives it) and field path -> 1-based line.

    ``source`` names the file in messages (``source:line: field: problem``). Raises
    :class:`YamlError` for invalid YAML and for input beyond the module's limits, and, with
    ``unique_keys``, for a key given twice in one mapping (which ``yaml.safe_load`` lets the last win).
    """
    return _load(text, lambda line: source if line is None else f"{source}:{line}", with_lines=True,
                 unique_keys=unique_keys)


def load_yaml_value(text: str, where: str, unique_keys: bool = False, field: tuple[str, ...] = ()) -> Any:
    """The data in a ``--set PATH=VALUE`` value, under the same limits as :func:`load_yaml`.

    ``where`` (e.g. ``--set seed=...``) starts each message, cut to a readable length; the
    value itself is never repeated in full. ``field`` (the PATH) starts the field path a
    message names inside the value (``train.betas.0``, not ``0``).
    """
    label = clip(where)
    multiline = "\n" in text.strip()
    return _load(text, lambda line: f"{label} (line {line})" if multiline and line else label, with_lines=False,
                 unique_keys=unique_keys, field=field)[0]

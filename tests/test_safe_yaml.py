"""safe_yaml: hostile YAML fails fast with one line; ordinary YAML reads as yaml.safe_load does."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from vit_search.safe_yaml import MAX_CHARS, MAX_VALUES, YamlError, load_yaml, load_yaml_value

REPO = Path(__file__).resolve().parents[1]

# 9 levels of 9 aliases: 9**9 (387 million) strings once expanded ("billion laughs").
BOMB = "a0: &a0 [" + ", ".join(["lol"] * 9) + "]\n" + "".join(
    f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]\n" for i in range(1, 9)
)
# The same as one flow sequence, as `--set 'seed=[&a0 [...], ...]'` would give it.
FLOW_BOMB = "[" + ", ".join(["&a0 [" + ", ".join(["lol"] * 9) + "]"] + [
    f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)
]) + "]"
NESTED_BOMB = "name: x\nmodel:\n  attention:\n    type: sdpa\n" + textwrap.indent(BOMB, "    ")
EXPANDS = f"YAML aliases expand to more than {MAX_VALUES} values; write the values out instead of nesting anchors"
TOO_DEEP = "YAML nested more than 50 levels deep; a spec needs a few"

# The hostile text is built inside the child from these expressions (a 50 MB string is not
# worth piping). The child runs under a 1 GiB address-space cap and a CPU-time cap, so a
# regression that expands the input fails on memory (or is killed) instead of on a clock.
CHILD = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
resource.setrlimit(resource.RLIMIT_CPU, (30, 30))
from vit_search.safe_yaml import YamlError, load_yaml, load_yaml_value
BOMB = {bomb!r}
NESTED_BOMB = {nested!r}
FLOW_BOMB = {flow!r}
text = eval(sys.argv[2])
try:
    if sys.argv[1] == "file":
        load_yaml(text, "spec.yaml")
    else:
        load_yaml_value(text, "--set seed=" + text)
except YamlError as err:
    print(err.problem)
else:
    print("loaded")
"""


# The line map spec.py built before safe_yaml (a second, recursive parse): the reference.
def _line_map(text: str) -> dict[tuple[str, ...], int]:
    """Field path -> 1-based line of its key, from the YAML node tree."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                sub = path + (str(key.value),)
                lines[sub] = key.start_mark.line + 1
                walk(value, sub)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[path + (str(i),)] = item.start_mark.line + 1
                walk(item, path + (str(i),))

    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if root is not None:
        lines[()] = 1
        walk(root, ())
    return lines



def hostile(kind: str, expression: str) -> str:
    """The one line a fresh, memory-capped process prints for the text ``expression`` builds."""
    script = CHILD.format(bomb=BOMB, nested=NESTED_BOMB, flow=FLOW_BOMB)
    run = subprocess.run([sys.executable, "-c", script, kind, expression], capture_output=True, text=True,
                         cwd=REPO, timeout=300)
    assert run.returncode == 0 and not run.stderr, f"rc {run.returncode}: {run.stderr[-2000:]}"
    assert run.stdout.count("\n") == 1, run.stdout[:2000]
    line = run.stdout.strip()
    assert len(line) < 300, line[:2000]  # no expanded value in the message
    return line


@pytest.mark.parametrize(
    "kind, expression, expected",
    [
        ("file", "BOMB", f"spec.yaml:5: {EXPANDS}"),
        ("file", "NESTED_BOMB", f"spec.yaml:9: {EXPANDS}"),
        ("file", "BOMB + '? *a8\\n: 1\\n'", f"spec.yaml:5: {EXPANDS}"),
        ("value", "FLOW_BOMB", EXPANDS),
        ("value", "'[&a [1, 2, 3], ' + ', '.join(['*a'] * 50000) + ']'", EXPANDS),
        ("file", "'seed: ' + '[' * 20000 + ']' * 20000", f"spec.yaml:1: {TOO_DEEP}"),
        ("file", "'seed:\\n' + '- ' * 20000 + 'x\\n'", f"spec.yaml:2: {TOO_DEEP}"),
        ("file", "''.join('  ' * i + '-\\n' for i in range(1000))", f"spec.yaml:51: {TOO_DEEP}"),
        ("value", "'{a: ' * 20000 + '1' + '}' * 20000", TOO_DEEP),
        ("file", "''.join(f'- &a{i} [*a{i - 1}]\\n' if i else '- &a0 [1]\\n' for i in range(200))",
         "spec.yaml:51: YAML aliases nest values more than 50 levels deep"),
        ("file", "'a: &a [*a]\\n'", "spec.yaml:1: the YAML alias *a refers to a value that contains it"),
        ("file", "'name: x\\nseed: ' + '7' * 5000", "spec.yaml:2: seed: 7777777777777777777…(5000 characters) "
                                                  "has more than 100 digits"),
        ("value", "'9' * 5000", "--set seed=9999"),
        ("file", "'name: x\\n' + '# padding\\n' * 5_000_000", "spec.yaml: the YAML is 50000008 characters, "
                                                            "more than the 1048576 (1 MiB) allowed"),
    ],
    ids=["bomb", "bomb-nested", "bomb-as-key", "bomb-set-flow", "aliases-set", "deep-flow", "deep-block",
         "deep-indented", "deep-set-mapping", "alias-chain", "alias-loop", "int-5000-digits", "int-set",
         "50MB"],
)
def test_hostile_input_fails_with_one_line(kind: str, expression: str, expected: str):
    line = hostile(kind, expression)
    assert expected in line, line
    if kind == "value":
        assert line.startswith("--set seed=") and "…(" in line  # the value is cut, not echoed


@pytest.mark.parametrize(
    "value, line, shown",
    [(".inf", 3, ".inf"), ("-.inf", 3, "-.inf"), (".NaN", 3, ".NaN"), ("1.0e+999", 3, "1.0e+999")],
)
def test_non_finite_numbers_are_refused(value: str, line: int, shown: str):
    text = f"name: x\ntrain:\n  lr: {value}\n"
    with pytest.raises(YamlError) as err:
        load_yaml(text, "spec.yaml")
    assert err.value.problem == f"spec.yaml:{line}: train.lr: {shown} is not a finite number"
    with pytest.raises(YamlError, match=r"^--set train.lr=x: 1: .* is not a finite number$"):
        load_yaml_value(f"[1, {value}]", "--set train.lr=x")


def test_long_integers_up_to_the_limit_still_load():
    assert load_yaml("seed: " + "9" * 100, "s")[0] == {"seed": int("9" * 100)}
    with pytest.raises(YamlError, match=r"^s:1: seed: 9+…\(101 characters\) has more than 100 digits"):
        load_yaml("seed: " + "9" * 101, "s")


def test_oversized_text_is_refused_before_parsing():
    text = "a: [" * MAX_CHARS  # would also be far too deep, but size is checked first
    with pytest.raises(YamlError) as err:
        load_yaml(text, "big.yaml")
    assert err.value.problem.startswith(f"big.yaml: the YAML is {len(text)} characters, more than")


def test_the_quickstart_spec_loads_as_safe_load_with_spec_line_map():
    text = (REPO / "experiments" / "digits.yaml").read_text()
    data, lines = load_yaml(text, "digits.yaml")
    assert data == yaml.safe_load(text)
    assert lines == _line_map(text)
    assert list(lines) == list(_line_map(text))  # same order too: pre-order, as the original


MODEST = """\
name: anchors
defaults: &attn {type: sdpa, heads: 4}
base: &base {dim: 64, depth: 4}
model:
  <<: *base
  attention: *attn
  ffn: {type: mlp, ratio: 4}
search:
  space:
    model.depth: &depths {int: [2, 6]}
    model.dim: *depths
  enqueue:
    - {model.depth: 4}
    - {model.depth: 4}
seed: 1
seed: 2
when: 2001-12-14
"""


def test_modest_anchors_aliases_merge_keys_and_duplicates_match_safe_load():
    data, lines = load_yaml(MODEST, "spec.yaml")
    assert data == yaml.safe_load(MODEST)
    assert data["model"] == {"dim": 64, "depth": 4, "attention": {"type": "sdpa", "heads": 4},
                             "ffn": {"type": "mlp", "ratio": 4}}
    assert lines == _line_map(MODEST)
    assert lines[("seed",)] == 16 and lines[("model", "attention", "heads")] == 2


@pytest.mark.parametrize("text", ["", "# only a comment\n", "~", "3", "[1, 2]", "a: b", "t: '1:20'", "u: 1:x"])
def test_small_documents_match_safe_load(text: str):
    data, lines = load_yaml(text, "s")
    assert data == yaml.safe_load(text)
    assert lines == _line_map(text)
    assert load_yaml_value(text, "--set x=...") == yaml.safe_load(text)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a: [1, 2\nb: 3", "s:2: YAML syntax error: expected ',' or ']', but got ':'"),
        ("a: 1\n---\nb: 2", "s:2: YAML syntax error: expected a single document in the stream, but found another"),
        ("a: *nowhere", "s:1: YAML syntax error: found undefined alias 'nowhere'"),
        ("a: 1\nb: \x07", "s:2: YAML syntax error: unacceptable character #x0007"),
        ("a: !!python/object/apply:os.system [ls]", "s:1: YAML error: could not determine a constructor"),
        ("? [a, b]\n: 1", "s:1: (top level): a mapping key must be a plain value, not a list or mapping"),
        ("d: 2001-13-45", "s:1: d: 2001-13-45 is not a valid date"),
        ("n: !!int twelve", "s:1: n: twelve is not a valid integer"),
        ("k: !" + "t" * 5000 + " v", "s:1: YAML error: could not determine a constructor for the tag '!ttttt"),
        ("train:\n  epochs: 1:20", "s:2: train.epochs: 1:20 is a YAML 1.1 base-60 number; write it in decimal"),
        ("lr: -1:30.5", "s:1: lr: -1:30.5 is a YAML 1.1 base-60 number"),
        ("name: !!binary aGVsbG8=", "s:1: name: !!binary makes binary data, which no spec value is"),
        ("? !!binary aGVsbG8=\n: 1", "s:1: aGVsbG8=: !!binary makes binary data"),
        ("plugins: !!set {a, b}", "s:1: plugins: !!set makes a set, which no spec value is"),
        ("a:\n  b: !!omap [x: 1]", "s:2: a.b: !!omap makes an ordered mapping"),
        ("model:\n  dim: 1\n  null: 3", "s:3: model: the key null reads as null in YAML; quote it"),
        ("train:\n  yes: 3", "s:2: train: the key yes reads as a true/false value in YAML; quote it"),
    ],
)
def test_errors_are_one_short_line(text: str, expected: str):
    with pytest.raises(YamlError) as err:
        load_yaml(text, "s")
    problem = err.value.problem
    assert problem.startswith(expected), problem
    assert "\n" not in problem and len(problem) < 300 and str(err.value) == problem

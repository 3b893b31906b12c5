"""The house: each name table and the schema read from it agree, modules import without circles, and
commands that read no data import no data code."""

from __future__ import annotations

import ast
import itertools
import re
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest

from vit_search.data.sources import DATASETS
from vit_search.init_sources import INIT_KEYS, INIT_SOURCES
from vit_search.registry import KINDS, REGISTRY
from vit_search.schema import AugmentSpec, DataSpec, InitSpec, ModelSpec, SearchSpec, Spec, TrackingSpec, TrainSpec
from vit_search.search.samplers import PRUNERS, SAMPLERS

SRC = Path(__file__).resolve().parents[1] / "src" / "vit_search"
DOCS = Path(__file__).resolve().parents[1] / "docs"


def allowed(model, field: str) -> set[str]:
    return set(get_args(model.model_fields[field].annotation))


def test_the_schema_takes_samplers_pruners_and_data_sets_from_their_tables():
    assert allowed(SearchSpec, "sampler") == set(SAMPLERS)
    assert allowed(SearchSpec, "pruner") == set(PRUNERS)
    assert allowed(DataSpec, "dataset") == set(DATASETS)


def test_every_init_source_in_the_table_is_in_the_schema_has_a_reader_and_a_valid_example():
    from vit_search.model.weight_sources import READERS

    assert allowed(InitSpec, "source") == set(INIT_SOURCES) == set(READERS)
    for name, source in INIT_SOURCES.items():
        example = __import__("yaml").safe_load(source.example)
        assert example["from"] == name and set(example) - {"from"} == set(source.required)
        assert InitSpec.model_validate(example).source == name
        assert set(source.required + source.optional) <= set(INIT_KEYS)


def test_every_block_kind_is_a_model_field_with_a_registered_default_and_a_stage():
    from vit_search.model import build_model

    kind_fields = [f for f in ModelSpec.model_fields if f in KINDS]
    assert kind_fields == list(KINDS)
    for name, kind in KINDS.items():
        assert ModelSpec().block(name)[0] == kind.default
        assert kind.default in REGISTRY.list(name)[name]
    model = build_model({"dim": 16, "depth": 1, "image_size": 8, "in_channels": 1, "num_classes": 2,
                         "patch_embed": {"type": "conv", "patch_size": 4}, "attention": {"type": "sdpa", "heads": 2}})
    staged = {type(module) for _, module in model.stages()}
    assert all(type(getattr(model, attr)) in staged for attr in ("patch_embed", "pos_embed", "pool", "head"))


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_in_the_table_draws_a_study(name, tmp_path):
    from vit_search.search.study import open_study, sample_spec, worker_loop
    from vit_search.spec import load_spec

    metrics = ["val_accuracy", "parameters"] if name == "nsga2" else "val_accuracy"
    directions = ["maximize", "minimize"] if name == "nsga2" else "maximize"
    spec = load_spec({"name": f"table-{name}", "tracking": {"enabled": False}, "search": {
        "n_trials": 3, "sampler": name, "metric": metrics, "direction": directions,
        "storage": f"sqlite:///{tmp_path / 'optuna.db'}",
        "space": {"model.depth": {"int": [1, 3]}, "train.lr": {"float": [1e-3, 1e-2], "step": 1e-3}}}})
    handle = open_study(spec)
    worker_loop(handle, 3, lambda trial: sample_spec(spec, trial),
                lambda trial, drawn: [drawn[0].model.depth / 3] + ([1.0] if name == "nsga2" else []))
    assert len(handle.study.get_trials()) == 3


@pytest.mark.parametrize("name", sorted(PRUNERS))
def test_every_pruner_in_the_table_is_made(name):
    import optuna

    assert isinstance(PRUNERS[name](10), optuna.pruners.BasePruner)


def test_samplers_and_pruners_are_made_with_the_settings_search_md_gives_them():
    # docs/search.md's tables: TPE's 4 to 10 start-up trials (a quarter of n_trials), group,
    # multivariate and the constant liar; each pruner's resources in epochs.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna's experimental-feature warnings
        tpe = {n: SAMPLERS["tpe"](0, [], n) for n in (8, 16, 60, None)}
    assert {n: s._n_startup_trials for n, s in tpe.items()} == {8: 4, 16: 4, 60: 10, None: 5}
    assert all(s._multivariate and s._group and s._constant_liar for s in tpe.values())
    hyperband = PRUNERS["hyperband"](27)
    assert (hyperband._min_resource, hyperband._max_resource, hyperband._reduction_factor) == (1, 27, 3)
    median = PRUNERS["median"](27)
    assert (median._n_startup_trials, median._n_warmup_steps) == (4, 5)
    assert PRUNERS["median"](3)._n_warmup_steps == 1
    halving = PRUNERS["successive_halving"](27)
    assert (halving._min_resource, halving._reduction_factor) == (1, 3)


def test_docs_name_every_sampler_pruner_data_set_and_block_kind():
    search, spec = (DOCS / "search.md").read_text(), (DOCS / "spec.md").read_text()
    assert all(f"`{name}`" in search for name in [*SAMPLERS, *PRUNERS])
    assert all(f"`{name}`" in spec for name in [*DATASETS, *KINDS, *INIT_SOURCES])


def _imports(path: Path) -> set[str]:
    """The vit_search modules a source file imports, at the top or inside functions."""
    module = ".".join(path.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__")
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    tree = ast.parse(path.read_text())
    for block in ast.walk(tree):  # imports for type checkers only never run
        if isinstance(block, ast.If) and getattr(block.test, "id", "") == "TYPE_CHECKING":
            block.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if node.module is None:  # `from . import x`: the submodules named
                found |= {f"{target}.{alias.name}" for alias in node.names}
            else:  # `from .search import run`: the package, and the submodule when one is named
                found.add(target)
                found |= {f"{target}.{alias.name}" for alias in node.names if _is_module(f"{target}.{alias.name}")}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return {name for name in found if name.startswith("vit_search")}


def _is_module(name: str) -> bool:
    """Whether the dotted ``name`` is a module or package of vit_search."""
    path = SRC.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def test_no_module_imports_one_that_imports_it_back():
    files = {".".join(p.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__"): p
             for p in SRC.rglob("*.py")}
    graph = {name: {i for i in _imports(path) if i in files and i != name} for name, path in files.items()}
    # A package's __init__ is imported with each of its modules: an edge into a module is one into its packages.
    for name in list(graph):
        graph[name] |= {p for i in graph[name] for p in _parents(i) if p in files and p != name and
                        not name.startswith(p + ".")}
    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(2, len(parts))]


def _module_name(relative: str) -> str:
    """``model/vit.py`` -> ``vit_search.model.vit``; a package's ``__init__.py`` is the package."""
    return ".".join(["vit_search", *relative.removesuffix(".py").split("/")]).removesuffix(".__init__")


def _listed(cell: str) -> list[str] | None:
    """The names of a cell that is a comma-separated list of backticked names, else None."""
    if not re.fullmatch(r"`[^`]+`(, `[^`]+`)*", cell):
        return None
    return re.findall(r"`([^`]+)`", cell)


def _rooms() -> list[list[str]]:
    """ARCHITECTURE.md's Rooms table: (modules, concern, imports) cells of each row under the header."""
    text = (SRC.parents[1] / "ARCHITECTURE.md").read_text()
    assert "\n## Rooms\n" in text, "ARCHITECTURE.md has no Rooms section"
    lines = text.split("\n## Rooms\n", 1)[1].strip().splitlines()
    table = list(itertools.takewhile(lambda line: line.startswith("|"), lines))
    assert table[0].startswith("| module |") and len(table) > 2, "the Rooms table's header has moved"
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in table[2:]]
    assert all(len(row) == 3 for row in rows), [row for row in rows if len(row) != 3]
    return rows


def test_architecture_md_names_every_module_and_what_each_imports():
    # The convention the Rooms table is read by: a row's module cell lists backticked paths relative to
    # src/vit_search (`errors.py`, `model/vit.py`), one or several; its imports cell says "nothing" or lists
    # backticked dotted names relative to vit_search (`errors`, `data.sources`, `model` for the package): the
    # union of what the row's modules import, imports among them and the root's `__version__` left out.
    # Not rows: the __init__.py files, which only re-export (checked at the end: nothing from outside their
    # package that its modules do not import already). __main__.py shares cli.py's row, whose imports cell may
    # begin "everything" (cli.py imports nearly every module): then only "nothing else imports cli.py" is checked.
    files = {path.relative_to(SRC).as_posix(): path for path in SRC.rglob("*.py")}
    problems, named = [], []
    for module_cell, _, imports_cell in _rooms():
        modules = _listed(module_cell) or []
        unknown = [m for m in modules if m not in files or m.endswith("__init__.py")]
        if not modules or unknown:
            problems.append(f"module cell {module_cell!r}: not a list of backticked files under src/vit_search")
            continue
        named += modules
        own = {_module_name(m) for m in modules}
        imported = set().union(*(_imports(files[m]) for m in modules)) - own - {"vit_search.__version__"}
        if "cli.py" in modules and imports_cell.startswith("everything"):
            importers = sorted(rel for rel, path in files.items()
                               if rel not in modules and "vit_search.cli" in _imports(path))
            if importers:
                problems.append(f"{module_cell}: says everything, yet imported by {importers}")
            continue
        written = [] if imports_cell == "nothing" else _listed(imports_cell)
        if written is None:
            problems.append(f"{module_cell}: imports cell {imports_cell!r} is neither 'nothing' nor backticked names")
            continue
        actual = {name.removeprefix("vit_search.") for name in imported}
        if unnamed := sorted(actual - set(written)):
            problems.append(f"{module_cell}: imports {unnamed}, which the row does not name")
        if unused := sorted(set(written) - actual):
            problems.append(f"{module_cell}: does not import {unused}, which the row names")
    problems += [f"{rel}: in no row" for rel in sorted(files)
                 if rel not in named and not rel.endswith("__init__.py")]
    problems += [f"{rel}: in {named.count(rel)} rows" for rel in sorted(set(named)) if named.count(rel) > 1]
    for rel, path in sorted(files.items()):
        if rel.endswith("__init__.py"):
            package = _module_name(rel)
            inside = {_module_name(r): p for r, p in files.items() if _module_name(r).startswith(package + ".")}
            reexported = set(inside).union(*(_imports(p) for p in inside.values()))
            if extra := sorted(_imports(path) - reexported):
                problems.append(f"{rel}: imports {extra}, which no module of its package does: give it a row")
    assert not problems, "ARCHITECTURE.md's Rooms table and the code disagree:\n" + "\n".join(problems)


@pytest.mark.parametrize("command", [["--help"], ["blocks"], ["validate", "experiments/digits.yaml"],
                                     ["summary", "experiments/digits.yaml"]])
def test_commands_that_read_no_data_import_no_data_code(command):
    probe = ("import sys, contextlib, io\nfrom vit_search.cli import main\n"
             "with contextlib.redirect_stdout(io.StringIO()):\n"
             "    try:\n        main(sys.argv[1:])\n    except SystemExit:\n        pass\n"
             "print(sorted(m for m in sys.modules if m.startswith(('vit_search.data.loading', 'torchvision', 'sklearn', "
             "'vit_search.train', 'optuna', 'mlflow'))))")
    out = subprocess.run([sys.executable, "-c", probe, *command], capture_output=True, text=True,
                         cwd=SRC.parents[1], timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_a_spec_round_trips_through_its_yaml():
    from vit_search.spec import load_spec

    spec = load_spec(SRC.parents[1] / "experiments" / "digits.yaml")
    again = load_spec(__import__("yaml").safe_load(spec.to_yaml()))
    assert again.to_dict() == spec.to_dict() and isinstance(again, Spec)


@pytest.mark.parametrize("command, torn_down", [
    (["blocks"], False), (["validate", "experiments/digits.yaml"], False), (["validate", "no-such.yaml"], False),
    (["summary", "experiments/digits.yaml"], False), (["--version"], False),
    (["best", "experiments/digits.yaml", "--storage", "sqlite:///{tmp}/none.db"], True)])
def test_commands_that_leave_nothing_open_skip_the_teardown_and_lose_no_output(command, torn_down, tmp_path):
    command = [part.format(tmp=tmp_path) for part in command]
    # The program (entry) against main in a process of its own: the same words and code, through a pipe.
    probe = ("import atexit, sys\natexit.register(lambda: print('torn down', file=sys.stderr))\n"
             "from vit_search.cli import entry, main\nhow, sys.argv = sys.argv[1], ['vit-search', *sys.argv[2:]]\n"
             "entry() if how == 'entry' else sys.exit(main(sys.argv[1:]))")
    entry, main = (subprocess.run([sys.executable, "-c", probe, how, *command], capture_output=True, text=True,
                                  cwd=SRC.parents[1], timeout=120) for how in ("entry", "main"))
    assert (entry.returncode, entry.stdout) == (main.returncode, main.stdout) and (main.stdout or main.returncode == 2)
    assert entry.stderr.replace("torn down\n", "") == main.stderr.replace("torn down\n", "")
    assert ("torn down" in entry.stderr) is torn_down and "torn down" in main.stderr


def _documented_defaults() -> list[tuple[str, str, str]]:
    """(section heading, key, default as written) for every row of docs/spec.md's key tables whose
    default is a literal value in backticks."""
    import re

    rows, section = [], None
    for line in (DOCS / "spec.md").read_text().splitlines():
        if line.startswith("## ") or line.startswith("### "):
            section = line.lstrip("#").strip()
        match = re.match(r"\| `([\w.]+)` \| [^|]+ \| `([^`]+)` \|", line)
        if match and section in _SECTIONS:
            rows.append((section, *match.groups()))
    return rows


_SECTIONS = {"Top level": Spec, "data": DataSpec, "data.augment": AugmentSpec, "model": ModelSpec,
             "train": TrainSpec, "search": SearchSpec, "tracking": TrackingSpec}


def _default(section: type, key: str):
    """The schema's default of a (dotted) key, as plain JSON-like data."""
    import json

    model, *rest = key.split(".")
    field = section.model_fields[model]
    value = field.get_default(call_default_factory=True)
    if rest:
        return _default(type(value), ".".join(rest))
    value = value.model_dump(exclude_defaults=True) if hasattr(value, "model_dump") else value
    return json.loads(json.dumps(value, default=str))


def test_every_default_docs_spec_md_gives_is_the_schemas():
    import yaml

    def same(text: str, default) -> bool:
        written = yaml.safe_load(text)  # YAML 1.1 reads 1e-6 as text; the schema takes it as the float
        return written == default or (isinstance(default, float) and isinstance(written, str)
                                      and float(written) == default)

    rows = _documented_defaults()
    assert len(rows) > 60  # the tables were read
    wrong = [f"{section}: {key}: docs `{text}`, schema {_default(_SECTIONS[section], key)!r}"
             for section, key, text in rows if not same(text, _default(_SECTIONS[section], key))]
    assert not wrong, wrong

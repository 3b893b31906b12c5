"""Plugins, for real: a module or a .py file named in a spec, an installed entry point, failures.

Also the example plugin package's block itself (examples/vit-search-cosine-attention): its
forward shape, its formula, its parameter layout, and that it trains.

Plugins register into the global registry, so every test here runs under ``clean_registry``,
which puts the registry and ``sys.modules`` back as they were: a block registered here must not
show up in another test's "registered: ..." list.
"""

from __future__ import annotations

import importlib
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vit_search.registry import AUTOLOAD_ENV, REGISTRY, PluginError
from vit_search.spec import SpecError, load_spec

from conftest import registry_restored

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "vit-search-cosine-attention"
EXAMPLE_SPEC = EXAMPLE / "cosine-digits.yaml"
PLUGIN_MODULE_PREFIXES = ("plugtest_", "vit_search_plugin_", "vit_search_cosine")

# A plugin module as a user would write it: one attention block registered by name.
MIX_BLOCK = '''
from torch import nn

from vit_search import register


@register("attention", "{name}")
class TokenMix(nn.Module):
    """Adds a share of the mean token to every token, then projects (a test block)."""

    def __init__(self, dim: int, share: float = 0.5):
        super().__init__()
        self.share = share
        self.proj = nn.Linear(dim, dim)

    def forward(self, tokens):
        return self.proj(tokens + self.share * tokens.mean(dim=1, keepdim=True))
'''


@pytest.fixture(autouse=True)
def clean_registry():
    """Undo what a test's plugins registered, and forget the plugin modules it imported."""
    with registry_restored(PLUGIN_MODULE_PREFIXES):
        yield


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def _spec_using(attention: str, plugins: list[str], args: str = ", share: 0.25") -> str:
    """A small spec listing ``plugins`` one per line (from line 3 on) and using ``attention``."""
    items = "".join(f"\n  - {p}" for p in plugins)
    return f"""\
name: plugin-test
plugins:{items}
data: {{dataset: digits, image_size: 16}}
model:
  dim: 32
  depth: 2
  attention: {{type: {attention}{args}}}
"""


# -- a module name under plugins: ------------------------------------------------------------------
def test_module_named_in_plugins_is_imported_and_its_block_builds(tmp_path, monkeypatch):
    import torch

    from vit_search import build_model

    _write(tmp_path / "plugtest_module_blocks.py", MIX_BLOCK.format(name="plugtest_module_mix"))
    monkeypatch.syspath_prepend(str(tmp_path))
    spec_path = _write(tmp_path / "spec.yaml", _spec_using("plugtest_module_mix", ["plugtest_module_blocks"]))

    spec = load_spec(spec_path)

    info = REGISTRY.describe("attention", "plugtest_module_mix")
    assert info.module == "plugtest_module_blocks"
    assert [(a.name, a.default) for a in info.args] == [("share", 0.5)]
    model = build_model(spec)
    attn = model.blocks[0].attn
    assert type(attn).__name__ == "TokenMix" and attn.share == 0.25
    assert model(torch.zeros(2, 1, 16, 16)).shape == (2, 10)


def test_module_plugin_argument_is_checked_against_its_signature(tmp_path, monkeypatch):
    _write(tmp_path / "plugtest_checked_blocks.py", MIX_BLOCK.format(name="plugtest_checked_mix"))
    monkeypatch.syspath_prepend(str(tmp_path))
    spec_path = _write(tmp_path / "spec.yaml",
                       _spec_using("plugtest_checked_mix", ["plugtest_checked_blocks"], ", shares: 0.25"))

    with pytest.raises(SpecError) as err:
        load_spec(spec_path)

    assert err.value.problems == [
        f"{spec_path}:8: model.attention.shares: model.attention (plugtest_checked_mix): "
        "unknown argument 'shares'; did you mean 'share'?"
    ]


# -- a .py file under plugins: ---------------------------------------------------------------------
def test_py_file_in_plugins_resolves_against_the_spec_folder_not_the_cwd(tmp_path, monkeypatch):
    _write(tmp_path / "project" / "blocks" / "plugtest_file_blocks.py", MIX_BLOCK.format(name="plugtest_file_mix"))
    spec_path = _write(tmp_path / "project" / "spec.yaml",
                       _spec_using("plugtest_file_mix", ["blocks/plugtest_file_blocks.py"]))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")

    spec = load_spec(spec_path)

    assert spec.model.attention == {"type": "plugtest_file_mix", "share": 0.25}
    assert REGISTRY.describe("attention", "plugtest_file_mix").summary.startswith("Adds a share of the mean token")


def test_loading_a_spec_with_a_py_plugin_twice_does_not_register_twice(tmp_path):
    block_file = _write(tmp_path / "project" / "blocks" / "plugtest_twice_blocks.py",
                        MIX_BLOCK.format(name="plugtest_twice_mix"))
    spec_path = _write(tmp_path / "project" / "spec.yaml",
                       _spec_using("plugtest_twice_mix", ["blocks/plugtest_twice_blocks.py"]))
    # Another spec reaching the same file by another relative path, and one by its absolute path.
    other = _write(tmp_path / "other" / "spec.yaml",
                   _spec_using("plugtest_twice_mix", ["../project/blocks/plugtest_twice_blocks.py"]))
    absolute = _write(tmp_path / "absolute.yaml", _spec_using("plugtest_twice_mix", [str(block_file)]))

    load_spec(spec_path)
    builder = REGISTRY.get("attention", "plugtest_twice_mix")
    load_spec(spec_path)
    load_spec(other)
    load_spec(absolute)

    assert REGISTRY.get("attention", "plugtest_twice_mix") is builder


# -- a missing or broken plugin in a spec ----------------------------------------------------------
@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("plugtest_no_such_module",
         "plugin 'plugtest_no_such_module' not found: no module named 'plugtest_no_such_module'"),
        ("blocks/plugtest_absent.py", "plugin file 'blocks/plugtest_absent.py' not found"),
        # Python's own `code` module would be imported in silence, whatever lies beside the spec
        ("code", "plugin 'code' names a module of Python's standard library, which is imported instead of yours; "
                 "rename your module (e.g. 'code_blocks') or list its file ('code.py')"),
    ],
    ids=["module", "py-file", "stdlib-name"],
)
def test_missing_plugin_is_a_spec_error_at_its_line_and_exit_code_2(tmp_path, capsys, ref, message):
    from vit_search.cli import main

    _write(tmp_path / "plugtest_present_blocks.py", MIX_BLOCK.format(name=f"plugtest_present_{len(ref)}"))
    spec_path = _write(tmp_path / "spec.yaml", _spec_using("sdpa", ["plugtest_present_blocks.py", ref], ""))
    expected = f"{spec_path}:4: plugins.1: {message}"  # the second item of the list, on line 4

    with pytest.raises(SpecError) as err:
        load_spec(spec_path)
    assert len(err.value.problems) == 1 and err.value.problems[0].startswith(expected)

    assert main(["validate", str(spec_path)]) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith(f"error: {expected}") and len(stderr.strip().splitlines()) == 1


def test_a_module_name_is_looked_up_on_sys_path_then_beside_the_spec_then_in_the_working_directory(
        tmp_path, monkeypatch):
    # docs/plugins.md: the same module name in three places, each registering its own block name
    places = {"path": tmp_path / "on-path", "spec": tmp_path / "specs", "cwd": tmp_path / "cwd"}
    for place, folder in places.items():
        _write(folder / "plugtest_where.py", MIX_BLOCK.format(name=f"plugtest_where_{place}"))
    monkeypatch.chdir(places["cwd"])

    def found_in() -> str:
        sys.modules.pop("plugtest_where", None)
        REGISTRY.load_plugin("plugtest_where", base_dir=places["spec"])
        return sys.modules["plugtest_where"].__file__.split(os.sep)[-2]

    assert found_in() == "specs"  # beside the spec before the working directory
    (places["spec"] / "plugtest_where.py").unlink()
    assert found_in() == "cwd"
    monkeypatch.syspath_prepend(str(places["path"]))
    (places["spec"] / "plugtest_where.py").write_text("raise RuntimeError('not this one')\n")
    assert found_in() == "on-path"  # sys.path first
    assert str(places["spec"]) not in sys.path and str(places["cwd"]) not in sys.path  # lent for the import only


def test_a_module_plugin_found_beside_the_spec_is_kept_as_its_file_so_an_exported_spec_loads_anywhere(
        tmp_path, monkeypatch):
    # `best --export best.yaml` writes the trial's spec into another folder: a bare name found only beside
    # the first spec was not found from there ("plugin 'plugtest_beside' not found").
    _write(tmp_path / "specs" / "plugtest_beside.py", MIX_BLOCK.format(name="plugtest_beside_mix"))
    spec = load_spec(_write(tmp_path / "specs" / "spec.yaml", _spec_using("plugtest_beside_mix", ["plugtest_beside"], "")))
    assert spec.raw["plugins"] == [str(tmp_path / "specs" / "plugtest_beside.py")]
    exported = _write(tmp_path / "exports" / "best.yaml", spec.to_yaml(exclude_search=True))
    monkeypatch.chdir(_write(tmp_path / "elsewhere" / "x", "").parent)
    assert load_spec(exported).model.attention["type"] == "plugtest_beside_mix"

    # The same file imported by its module name (the user's own import) is not run twice: no "already registered"
    monkeypatch.syspath_prepend(str(tmp_path / "specs"))
    REGISTRY._blocks["attention"].pop("plugtest_beside_mix")
    for name in [n for n in sys.modules if n.startswith("vit_search_plugin_")]:
        sys.modules.pop(name)
    importlib.import_module("plugtest_beside")
    assert load_spec(exported).model.attention["type"] == "plugtest_beside_mix"
    # A name that sys.path provides stays a name, as before
    assert load_spec(tmp_path / "specs" / "spec.yaml").raw["plugins"] == ["plugtest_beside"]


def test_a_package_plugin_found_beside_the_spec_is_kept_as_its_folder_so_an_exported_spec_loads_anywhere(
        tmp_path, monkeypatch):
    # It stayed a bare name: the `best --export` and `train best.yaml` that `run` prints failed from any other folder.
    package = tmp_path / "specs" / "plugtest_package"
    _write(package / "blocks.py", MIX_BLOCK.format(name="plugtest_package_mix"))
    _write(package / "__init__.py", "from . import blocks  # noqa: F401  (a relative import: imported as a package)\n")
    spec = load_spec(_write(tmp_path / "specs" / "spec.yaml", _spec_using("plugtest_package_mix", ["plugtest_package"], "")))
    assert spec.raw["plugins"] == [str(package)]
    exported = _write(tmp_path / "exports" / "best.yaml", spec.to_yaml(exclude_search=True))
    REGISTRY._blocks["attention"].pop("plugtest_package_mix")  # a fresh process: nothing imported yet
    for name in [n for n in sys.modules if n.startswith("plugtest_package")]:
        sys.modules.pop(name)
    monkeypatch.chdir(_write(tmp_path / "elsewhere" / "x", "").parent)
    assert load_spec(exported).model.attention["type"] == "plugtest_package_mix"


def test_plugin_whose_own_import_is_missing_is_reported_as_failing_not_as_not_found(tmp_path, monkeypatch):
    # The plugin exists; a module it imports does not. Its name being a prefix of the plugin's
    # must not make the plugin itself look missing.
    _write(tmp_path / "plugtest_dep_blocks.py", "import plugtest_dep  # a dependency nobody installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    with pytest.raises(PluginError) as err:
        REGISTRY.load_plugin("plugtest_dep_blocks")

    assert str(err.value) == (
        "plugin 'plugtest_dep_blocks' failed to import: ModuleNotFoundError: No module named 'plugtest_dep'"
    )


def test_missing_submodule_of_a_missing_package_is_reported_as_not_found():
    with pytest.raises(PluginError) as err:
        REGISTRY.load_plugin("plugtest_nopkg.blocks")

    assert str(err.value).startswith("plugin 'plugtest_nopkg.blocks' not found: no module named 'plugtest_nopkg'")


# -- an installed distribution with a vit_search.plugins entry point -------------------------------
@pytest.fixture(scope="module")
def installed_cosine(tmp_path_factory) -> Path:
    """The example plugin pip-installed (no deps, no build isolation) into a folder of its own."""
    root = tmp_path_factory.mktemp("cosine-plugin")
    source = root / "source"  # a copy: an in-tree build would leave build/ and *.egg-info in examples/
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = root / "site"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "--quiet", "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return target


@pytest.fixture(scope="module")
def broken_distribution(tmp_path_factory) -> Path:
    """A folder holding an 'installed' distribution whose vit_search.plugins entry point raises."""
    root = tmp_path_factory.mktemp("broken-plugin")
    _write(root / "vit_search_broken_plugin-0.0.1.dist-info" / "METADATA",
           "Metadata-Version: 2.1\nName: vit-search-broken-plugin\nVersion: 0.0.1\n")
    _write(root / "vit_search_broken_plugin-0.0.1.dist-info" / "entry_points.txt",
           "[vit_search.plugins]\nbroken = vit_search_broken_plugin\n")
    _write(root / "vit_search_broken_plugin.py", 'raise RuntimeError("compiled kernel missing")\n')
    return root


def _listed(stdout: str) -> list[str]:
    """Block names from `vit-search blocks KIND` output."""
    return [line.split()[0] for line in stdout.splitlines() if line.startswith("  ")]


def test_an_entry_point_naming_a_function_is_called_with_the_registry(tmp_path, monkeypatch):
    # docs/plugins.md: `name = "module:function"` registers through the function, given the registry
    from vit_search.registry import Registry

    _write(tmp_path / "plugtest_setup_dist-0.1.dist-info" / "METADATA",
           "Metadata-Version: 2.1\nName: plugtest-setup-dist\nVersion: 0.1\n")
    _write(tmp_path / "plugtest_setup_dist-0.1.dist-info" / "entry_points.txt",
           "[plugtest.entry_points]\nmix = plugtest_setup:setup\n")
    _write(tmp_path / "plugtest_setup.py", """
        from torch import nn

        CALLS = []


        class Mix(nn.Module):
            def __init__(self, dim: int, heads: int, share: float = 0.5):
                super().__init__()


        def setup(registry):
            CALLS.append(registry)
            registry.add("attention", "plugtest_setup_mix", Mix)
        """)
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = Registry(builtin_module=None, entry_point_group="plugtest.entry_points")

    info = registry.describe("attention", "plugtest_setup_mix")

    assert sys.modules["plugtest_setup"].CALLS == [registry]  # once, with this registry, not the global one
    assert registry.distribution_of(info) == "plugtest-setup-dist"
    assert "plugtest_setup_mix" not in REGISTRY.list("attention")["attention"]


def test_installed_plugin_is_listed_by_blocks(cli, installed_cosine):
    result = cli("blocks", "attention", env={"PYTHONPATH": str(installed_cosine)})

    assert result.returncode == 0, result.stderr
    assert _listed(result.stdout) == ["cosine", "einsum", "sdpa"]
    assert "  cosine       Scaled cosine attention (Swin V2)" in result.stdout


def test_describing_an_installed_block_names_its_distribution_and_arguments(cli, installed_cosine):
    result = cli("blocks", "attention", "cosine", env={"PYTHONPATH": str(installed_cosine)})

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1] == "  from vit_search_cosine (distribution vit-search-cosine-attention)"
    assert lines[2:] == [
        "  heads: int (default 8)",
        "  qkv_bias: bool (default True)",
        "  attn_dropout: float (default 0.0)",
        "  proj_dropout: float (default 0.0)",
        "  init_logit_scale: float (default 10.0)",
    ]


def test_example_spec_validates_with_the_installed_plugin(cli, installed_cosine):
    result = cli("validate", str(EXAMPLE_SPEC), env={"PYTHONPATH": str(installed_cosine)})

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{EXAMPLE_SPEC}: ok (cosine-digits)"


def test_disabling_autoload_hides_installed_plugins_even_broken_ones(cli, installed_cosine, broken_distribution):
    path = os.pathsep.join([str(installed_cosine), str(broken_distribution)])
    result = cli("blocks", "attention", env={"PYTHONPATH": path, AUTOLOAD_ENV: "1"})

    assert result.returncode == 0, result.stderr
    assert _listed(result.stdout) == ["einsum", "sdpa"]
    refused = cli("validate", str(EXAMPLE_SPEC), env={"PYTHONPATH": path, AUTOLOAD_ENV: "1"})
    assert refused.returncode == 2 and refused.stderr.rstrip().endswith(
        f"unknown attention 'cosine'; registered: einsum, sdpa (installed plugins are not loaded: {AUTOLOAD_ENV} is set)")


def test_plugin_failing_to_import_is_one_error_line_naming_it_and_its_distribution(cli, broken_distribution):
    result = cli("blocks", "attention", env={"PYTHONPATH": str(broken_distribution)})

    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: plugin 'broken' (vit_search_broken_plugin) from distribution 'vit-search-broken-plugin' failed to "
        "load: RuntimeError: compiled kernel missing; fix or uninstall 'vit-search-broken-plugin', "
        f"or set {AUTOLOAD_ENV}=1"
    ]


# -- the example's block: scaled cosine attention --------------------------------------------------
@pytest.fixture
def cosine(monkeypatch):
    """The example plugin's module, imported from its source folder (registers 'cosine')."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    return importlib.import_module("vit_search_cosine")


def test_cosine_attention_keeps_the_token_shape(cosine):
    import torch

    attn = cosine.CosineAttention(dim=32, heads=4)
    out = attn(torch.randn(3, 17, 32))
    assert out.shape == (3, 17, 32) and torch.isfinite(out).all()


def test_cosine_attention_rejects_dim_not_divisible_by_heads(cosine):
    with pytest.raises(ValueError, match="dim 30 is not divisible by heads 4"):
        cosine.CosineAttention(dim=30, heads=4)


def test_cosine_spec_with_indivisible_heads_points_at_the_override(cosine):
    with pytest.raises(SpecError) as err:
        load_spec(EXAMPLE_SPEC, ["plugins=[vit_search_cosine]", "model.attention.heads=5"])

    assert err.value.problems == [
        "--set model.attention.heads=5: model.attention (cosine): "
        "dim 64 is not divisible by heads 5; choose heads that divide dim"
    ]


def test_cosine_attention_is_scaled_cosine_similarity_with_the_scale_clamped_at_100(cosine):
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    attn = cosine.CosineAttention(dim=16, heads=4).eval()
    with torch.no_grad():
        attn.logit_scale.copy_(torch.tensor([1.0, 10.0, 100.0, 1000.0]).log())
    x = torch.randn(2, 5, 16)

    # Written out independently: qkv laid out as (3, heads, head_dim) along the features.
    q, k, v = attn.qkv(x).reshape(2, 5, 3, 4, 4).permute(2, 0, 3, 1, 4)
    cos = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
    scale = torch.tensor([1.0, 10.0, 100.0, 100.0]).view(1, 4, 1, 1)  # 1000 is clamped to 100
    expected = attn.proj(((cos * scale).softmax(dim=-1) @ v).transpose(1, 2).reshape(2, 5, 16))

    torch.testing.assert_close(attn(x), expected, rtol=1e-4, atol=1e-5)
    assert math.isclose(cosine.MAX_LOGIT_SCALE, math.log(100))


def test_cosine_attention_has_the_builtin_parameter_layout_plus_a_per_head_scale(cosine):
    from vit_search.blocks.attention import SDPAttention

    builtin = SDPAttention(dim=32, heads=4).state_dict()
    attn = cosine.CosineAttention(dim=32, heads=4)

    result = attn.load_state_dict(builtin, strict=False)
    assert result.missing_keys == ["logit_scale"] and result.unexpected_keys == []
    assert attn.logit_scale.shape == (4,)


def test_cosine_attention_trains(cosine):
    import torch

    torch.manual_seed(0)
    # A task that needs attention: every token must become the mean of all tokens.
    x = torch.randn(64, 6, 16)
    target = x.mean(dim=1, keepdim=True).expand_as(x)
    attn = cosine.CosineAttention(dim=16, heads=2)
    optimizer = torch.optim.Adam(attn.parameters(), lr=1e-2)

    losses = []
    for _ in range(40):
        loss = torch.nn.functional.mse_loss(attn(x), target)
        optimizer.zero_grad()
        loss.backward()
        if not losses:
            assert attn.logit_scale.grad is not None and attn.logit_scale.grad.abs().sum() > 0
        optimizer.step()
        losses.append(loss.item())

    assert losses[-1] < 0.5 * losses[0], losses


# -- blocks declare what the trainer needs ---------------------------------------------------------
DECLARING_BLOCKS = '''
import torch
import torch.nn.functional as F
from torch import nn

from vit_search import register


@register("attention", "plugtest_sdpa")
class PlainSDPA(nn.Module):
    """Separate q, k, v projections and torch's fused attention (a test block)."""

    fused_attn = True  # it calls F.scaled_dot_product_attention

    def __init__(self, dim: int, heads: int = 2):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, tokens):
        b, n, d = tokens.shape
        split = lambda x: x.view(b, n, self.heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(split(self.q(tokens)), split(self.k(tokens)), split(self.v(tokens)))
        return self.out(out.transpose(1, 2).reshape(b, n, d))


@register("ffn", "plugtest_gated")
class Gated(nn.Module):
    """An MLP with a learned 2-D gate table that weight decay must not shrink (a test block)."""

    def __init__(self, dim: int):
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.gate = nn.Parameter(torch.ones(4, dim))

    def no_weight_decay(self):
        return {"gate"}

    def forward(self, tokens):
        return self.fc(tokens) * self.gate.mean(0)
'''


def test_a_plugin_attention_that_calls_sdpa_is_tagged_with_its_kernel(tmp_path):
    from accelerate import Accelerator

    from vit_search import build_model
    from vit_search.train import _attention_kernel

    _write(tmp_path / "declaring.py", DECLARING_BLOCKS)
    spec = load_spec(_write(tmp_path / "spec.yaml", _spec_using("plugtest_sdpa", ["declaring.py"], args="")))
    kernel = _attention_kernel(build_model(spec), Accelerator(cpu=True), "no")
    assert kernel in {"flash", "efficient", "math"}  # not "none": the block said it calls SDPA


def test_a_plugin_parameter_can_opt_out_of_weight_decay(tmp_path):
    from vit_search import build_model
    from vit_search.train import param_groups

    _write(tmp_path / "declaring.py", DECLARING_BLOCKS)
    text = _spec_using("sdpa", ["declaring.py"], args=", heads: 2") + "  ffn: plugtest_gated\n"
    model = build_model(load_spec(_write(tmp_path / "spec.yaml", text)))
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): name for name, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert {"blocks.0.ffn.gate", "blocks.1.ffn.gate", "pool.cls_token", "pos_embed.weight"} <= skipped
    assert "blocks.0.ffn.fc.weight" in {names[id(p)] for p in decay["params"]} and decay["weight_decay"] == 0.05


def test_a_plugin_block_that_fails_in_training_is_one_line_naming_its_file_and_the_run_is_failed(tmp_path, cli_here):
    import mlflow

    _write(tmp_path / "fails_in_training.py", """
        import torch
        from vit_search import register


        @register("ffn", "test_fails_in_training")
        class FailsInTraining(torch.nn.Linear):
            def __init__(self, dim: int):
                super().__init__(dim, dim)

            def forward(self, tokens):
                if self.training:  # validate's check runs in eval mode: this passes it
                    raise RuntimeError("boom in training")
                return super().forward(tokens)
        """)
    spec = _write(tmp_path / "spec.yaml", """
        name: fails-in-training
        plugins: [fails_in_training.py]
        data: {dataset: digits, image_size: 8}
        model: {dim: 16, depth: 1, patch_embed: {type: conv, patch_size: 2}, ffn: {type: test_fails_in_training}}
        train: {epochs: 1, batch_size: 64}
        tracking: {experiment: fails-in-training}
        """)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    said = cli_here("train", spec, "--checkpoint-dir", tmp_path / "runs", env={"MLFLOW_TRACKING_URI": store},
                    cwd=tmp_path)  # a new store's artifacts go to ./mlruns
    (line,) = [line for line in said.stderr.splitlines() if line.startswith("error:")]  # MLflow's notes aside
    assert said.returncode == 1 and "Traceback" not in said.stderr, said.stderr
    assert line == (f"error: RuntimeError: boom in training (at {tmp_path / 'fails_in_training.py'}:12 in forward); "
                    f"set VIT_SEARCH_TRACEBACK=1 to see the traceback")
    (run,) = mlflow.search_runs(experiment_names=["fails-in-training"], output_format="list")
    assert run.info.status == "FAILED" and "boom in training" in run.data.tags["error"]


def test_a_py_plugin_imports_a_helper_file_beside_it(tmp_path):
    _write(tmp_path / "widths_helper_for_test.py", "WIDTH = 3\n")
    _write(tmp_path / "uses_helper.py", """
        from torch import nn

        from vit_search import register
        from widths_helper_for_test import WIDTH


        @register("ffn", "test_uses_helper")
        class UsesHelper(nn.Sequential):
            def __init__(self, dim: int):
                super().__init__(nn.Linear(dim, WIDTH * dim), nn.Linear(WIDTH * dim, dim))
        """)
    spec = load_spec({"name": "helped", "plugins": [str(tmp_path / "uses_helper.py")],
                      "data": {"dataset": "digits", "image_size": 8},
                      "model": {"dim": 16, "depth": 1, "patch_embed": {"type": "conv", "patch_size": 2},
                                "ffn": {"type": "test_uses_helper"}}})
    assert spec.model.ffn["type"] == "test_uses_helper"
    assert str(tmp_path) not in sys.path  # only while the plugin ran


def test_a_plugin_file_that_failed_halfway_loads_once_fixed(tmp_path):
    plugin = tmp_path / "halfway.py"
    text = """
        import torch
        from vit_search import register


        @register("ffn", "test_halfway_first")
        class First(torch.nn.Identity):
            def __init__(self, dim: int):
                super().__init__()

        BUG
        """
    _write(plugin, text)
    with pytest.raises(PluginError, match="failed to import: NameError: name 'BUG' is not defined"):
        REGISTRY.load_plugin(str(plugin))
    assert "test_halfway_first" not in REGISTRY.list("ffn")["ffn"]  # what it registered went with it
    _write(plugin, text.replace("BUG", ""))
    REGISTRY.load_plugin(str(plugin))  # fixed: no "already registered" by its own first try
    assert "test_halfway_first" in REGISTRY.list("ffn")["ffn"]


def test_an_edited_plugin_file_is_read_again_by_the_next_load_in_the_same_process(tmp_path):
    # A notebook: load a spec, edit the plugin, load again; no kernel restart, no "already registered".
    plugin = tmp_path / "edited.py"
    text = """
        import torch
        from vit_search import register


        @register("ffn", "test_edited_{version}")
        class Edited(torch.nn.Identity):
            WIDTH = {version}

            def __init__(self, dim: int):
                super().__init__()
        """
    _write(plugin, text.format(version=1))
    REGISTRY.load_plugin(str(plugin))
    REGISTRY.load_plugin(str(plugin))  # unchanged: not run again
    assert REGISTRY.get("ffn", "test_edited_1").WIDTH == 1
    _write(plugin, text.format(version=22))  # another size: a new stamp even within one clock tick
    REGISTRY.load_plugin(str(plugin))
    names = REGISTRY.list("ffn")["ffn"]
    assert "test_edited_22" in names and "test_edited_1" not in names  # the old file's blocks went with it
    assert REGISTRY.get("ffn", "test_edited_22").WIDTH == 22


def test_blocks_describes_a_spec_plugins_block_given_its_file_and_says_how_without_it(tmp_path, cli_here):
    _write(tmp_path / "listed.py", """
        from torch import nn

        from vit_search import register


        @register("ffn", "test_listed")
        class Listed(nn.Linear):
            \"\"\"A block that only a spec's plugins list names.\"\"\"

            def __init__(self, dim: int, hidden_dim: int = 8):
                super().__init__(dim, dim)


        @register("ffn", "test_open")
        def test_open(dim: int, **options):
            \"\"\"Takes whatever the spec gives.\"\"\"
            return nn.Identity()
        """)
    without = cli_here("blocks", "ffn", "test_listed", cwd=tmp_path)
    assert without.returncode == 2 and without.stderr.startswith("error: unknown ffn 'test_listed'; registered: ")
    assert without.stderr.endswith("(a block of a spec's plugins: add --plugin FILE.py or --plugin MODULE)\n")
    described = cli_here("blocks", "ffn", "test_listed", "--plugin", "listed.py", cwd=tmp_path)
    assert described.returncode == 0 and described.stdout.splitlines() == [
        "ffn 'test_listed': A block that only a spec's plugins list names.",
        f"  from {tmp_path / 'listed.py'}", "  hidden_dim: int (default 8)"], described.stdout
    described = cli_here("blocks", "ffn", "test_open", "--plugin", "listed.py", cwd=tmp_path)
    assert described.returncode == 0 and described.stdout.splitlines()[2:] == [
        "  any other key: passed to it unchecked (it takes **kwargs)"], described.stdout  # not "no arguments"


def test_a_logged_run_or_checkpoint_whose_model_needs_an_unlisted_plugin_block_says_so_at_model_init(tmp_path, monkeypatch):
    from vit_search.train import train

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)  # a new store's artifacts go to ./mlruns
    _write(tmp_path / "pooled.py", """
        import torch
        from vit_search import register


        @register("pooling", "test_max_pool")
        class MaxPool(torch.nn.Module):
            num_prefix_tokens = 0

            def __init__(self, dim: int):
                super().__init__()

            def prepend(self, tokens):
                return tokens

            def forward(self, tokens):
                return tokens.amax(1)
        """)
    raw = {"name": "trained", "plugins": [str(tmp_path / "pooled.py")], "data": {"dataset": "digits", "image_size": 8},
           "model": {"dim": 16, "depth": 1, "patch_embed": {"type": "conv", "patch_size": 2},
                     "pooling": {"type": "test_max_pool"}},
           "train": {"epochs": 1, "batch_size": 64}, "tracking": {"experiment": "unlisted", "plots": False}}
    run_id = train(load_spec(raw), checkpoint_dir=tmp_path / "runs").run_id
    REGISTRY._blocks["pooling"].pop("test_max_pool")  # a new session, whose spec lists no plugin
    with pytest.raises(SpecError) as refused:
        load_spec({"name": "again", "data": {"dataset": "digits", "image_size": 8},
                   "model": {"init": {"from": "mlflow", "run": run_id}}})
    expected = ("<spec>: model.init: the weights' model needs a block this spec does not load (unknown pooling "
                "'test_max_pool'; registered: cls, mean); list the plugin that registers it under plugins:, as the spec "
                "that trained it did")
    assert refused.value.problems == [expected]
    # The checkpoint that train wrote records the same model section: the same line, not one at a key nobody wrote.
    with pytest.raises(SpecError) as refused:
        load_spec({"name": "again", "data": {"dataset": "digits", "image_size": 8},
                   "model": {"init": {"from": "file", "path": str(tmp_path / "runs" / "checkpoint.pt")}}})
    assert refused.value.problems == [expected]

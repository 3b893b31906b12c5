"""The block registry: registration, lookup errors, descriptions, argument checks."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import registry_restored

from vit_search.registry import PLUGIN_FILE_PREFIX, REGISTRY, PluginError, Registry, RegistryError


@pytest.fixture
def registry() -> Registry:
    return Registry(builtin_module=None)


@pytest.fixture
def default_registry() -> Registry:
    """The default registry, which a plugin file's ``register`` fills, put back as it was afterwards."""
    with registry_restored((PLUGIN_FILE_PREFIX,)) as registry:
        yield registry


def _plugin(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def test_register_then_get_returns_the_builder(registry):
    @registry.register("ffn", "double")
    class Double:
        def __init__(self, dim: int, factor: float = 2.0):
            self.factor = factor

    assert registry.get("ffn", "double") is Double
    assert registry.list("ffn") == {"ffn": ["double"]}


def test_registering_a_taken_name_raises_unless_override(registry):
    registry.add("head", "h", lambda dim, num_classes: None)
    with pytest.raises(RegistryError, match="already registered.*override=True"):
        registry.add("head", "h", lambda dim, num_classes: None)
    replacement = lambda dim, num_classes: "new"  # noqa: E731
    registry.add("head", "h", replacement, override=True)
    assert registry.get("head", "h") is replacement


def test_unknown_name_suggests_the_closest_and_lists_registered():
    with pytest.raises(RegistryError) as err:
        REGISTRY.get("attention", "sdpaa")
    assert str(err.value) == "unknown attention 'sdpaa'; did you mean 'sdpa'? registered: einsum, sdpa"


def test_unknown_kind_is_an_error(registry):
    with pytest.raises(RegistryError, match="unknown block kind 'atention'; did you mean 'attention'"):
        registry.register("atention", "x")


def test_describe_reads_arguments_types_defaults_and_docstring():
    info = REGISTRY.describe("ffn", "mlp")
    args = {a.name: a for a in info.args}
    assert "dim" not in args  # set by the model, not a YAML key
    assert args["ratio"].type_name == "float" and args["ratio"].default == 4.0
    assert info.summary.startswith("Linear, activation")
    assert info.module == "vit_search.blocks.ffn"


def test_check_args_names_path_block_and_suggestion():
    with pytest.raises(RegistryError) as err:
        REGISTRY.check_args("ffn", "mlp", {"ratoi": 2}, "model.ffn")
    assert str(err.value) == "model.ffn (mlp): unknown argument 'ratoi'; did you mean 'ratio'?"


def test_check_args_rejects_wrong_types_and_converts_right_ones():
    with pytest.raises(RegistryError, match="argument 'heads' must be int"):
        REGISTRY.check_args("attention", "sdpa", {"heads": "four"}, "model.attention")
    assert REGISTRY.check_args("patch_embed", "conv", {"patch_size": [4, 2]}, "model.patch_embed") == {
        "patch_size": (4, 2)
    }


def test_check_args_rejects_arguments_the_model_sets():
    with pytest.raises(RegistryError, match="'dim' is set by the model"):
        REGISTRY.check_args("attention", "sdpa", {"dim": 8}, "model.attention")


def test_builder_value_error_becomes_a_registry_error_naming_the_block():
    with pytest.raises(RegistryError, match=r"model.attention \(sdpa\): dim 10 is not divisible by heads 4"):
        REGISTRY.build("attention", "sdpa", {"heads": 4}, {"dim": 10}, "model.attention")


def test_validation_survives_python_dash_O():
    # Checks are exceptions, not asserts, so they hold under -O too.
    code = (
        "from vit_search.registry import REGISTRY, RegistryError\n"
        "try:\n    REGISTRY.check_args('ffn', 'mlp', {'ratoi': 2}, 'model.ffn')\n"
        "except RegistryError as e:\n    print('raised', e)\n"
    )
    out = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("raised model.ffn (mlp): unknown argument 'ratoi'")


def test_a_name_defaults_to_the_builders_and_a_missing_required_argument_is_said(registry):
    @registry.register("ffn")
    def gated(dim: int, hidden: int):
        """A builder with a required argument of its own."""

    assert registry.get("ffn", "gated") is gated
    with pytest.raises(RegistryError) as err:
        registry.check_args("ffn", "gated", {}, "model.ffn")
    assert str(err.value) == "model.ffn (gated): missing required argument 'hidden'"


def test_a_builder_taking_kwargs_accepts_any_key_unchecked(registry):
    @registry.register("ffn", "open")
    def open_ffn(dim: int, **options):
        """Takes whatever the spec gives."""

    assert registry.check_args("ffn", "open", {"anything": [1, "x"]}, "model.ffn") == {"anything": [1, "x"]}


def test_a_block_name_a_search_space_cannot_name_is_refused_and_a_summary_is_the_blocks_own_docstring():
    from torch import nn

    registry = Registry()
    for name in ("my.ffn", "My FFN", "a[b]"):
        with pytest.raises(RegistryError, match=f"cannot register ffn '{re.escape(name)}': a block name is letters"):
            registry.add("ffn", name, nn.Identity)

    class Undocumented(nn.Module):
        pass

    registry.add("ffn", "undocumented-ffn", Undocumented)
    assert registry.describe("ffn", "undocumented-ffn").summary == ""  # not nn.Module's "Base class for all ..."


def test_an_unhashable_callable_builder_is_checked_like_any_other(registry):
    # Signatures and type adapters are read once per builder and annotation; a builder that cannot be a
    # cache key (a callable dataclass instance) is read each time instead of failing.
    class Factory:
        __hash__ = None  # as a dataclass with eq and without frozen has it

        def __call__(self, dim: int, ratio: float = 4.0, gates: list[int] | None = None):
            return ratio

    registry.add("ffn", "factory", Factory())
    assert registry.check_args("ffn", "factory", {"ratio": "2.5", "gates": [1]}, "model.ffn") == {"ratio": 2.5,
                                                                                                "gates": [1]}
    with pytest.raises(RegistryError, match=r"argument 'ratio' must be float, got 'wide'"):
        registry.check_args("ffn", "factory", {"ratio": "wide"}, "model.ffn")


def _needs_an_optional_dependency(dim: int):
    import test_missing_optional_dependency  # noqa: F401


def _refuses(dim: int):
    raise RuntimeError("I refuse to be built\nsecond line")


def _divides_by_zero(dim: int, heads: int = 0):
    return dim // heads


@pytest.mark.parametrize("builder, says", [
    (_needs_an_optional_dependency, "ModuleNotFoundError: No module named 'test_missing_optional_dependency'"),
    (_refuses, "RuntimeError: I refuse to be built"),
    (_divides_by_zero, "ZeroDivisionError: integer division or modulo by zero"),
])
def test_a_builder_failing_with_any_exception_is_named_with_its_key_block_and_file(registry, builder, says):
    registry.add("attention", "flash", builder)
    with pytest.raises(RegistryError) as err:
        registry.build("attention", "flash", {}, {"dim": 8}, "model.attention")
    assert err.value.path == "model.attention"  # the spec's line of the block, not of model:
    assert str(err.value) == f"model.attention (flash): building it failed: {says} (in {__file__})"


def test_a_plugin_constructor_missing_an_optional_dependency_is_refused_at_its_blocks_line_naming_its_file(
        default_registry, tmp_path):
    from vit_search.spec import SpecError, load_spec

    plugin = _plugin(tmp_path / "lazy.py", """
        from vit_search import register


        @register("attention", "test_lazy_flash")
        def flash(dim: int, heads: int = 2):
            \"\"\"Needs an optional dependency when built.\"\"\"
            import test_missing_optional_dependency  # noqa: F401
        """)
    spec = tmp_path / "lazy.yaml"
    spec.write_text("name: lazy\nplugins: [lazy.py]\ndata: {dataset: digits, image_size: 8}\nmodel:\n  dim: 16\n"
                    "  depth: 1\n  patch_embed: {type: conv, patch_size: 2}\n  attention: {type: test_lazy_flash}\n")
    with pytest.raises(SpecError) as refused:
        load_spec(spec)
    assert refused.value.problems == [
        f"{spec}:8: model.attention (test_lazy_flash): building it failed: ModuleNotFoundError: No module named "
        f"'test_missing_optional_dependency' (in {plugin})"]


def test_allocation_failures_and_overflows_in_a_builder_are_raised_as_they_are(registry):
    for error in (MemoryError("no memory"), RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried"),
                  OverflowError("Python int too large to convert to C long")):
        def failing(dim: int, error=error):
            raise error

        registry.add("ffn", "failing", failing, override=True)
        with pytest.raises(type(error)):  # to the trainer's out-of-memory line, the build check's overflow line
            registry.build("ffn", "failing", {}, {"dim": 8}, "model.ffn")


def test_ctrl_c_while_a_plugin_file_imports_leaves_nothing_and_the_next_load_imports_it_again(default_registry, tmp_path):
    stop = tmp_path / "stop"
    stop.touch()
    plugin = _plugin(tmp_path / "slow.py", f"""
        import os
        from vit_search import register

        register("ffn", "test_before_ctrl_c")(lambda dim: None)
        if os.path.exists({str(stop)!r}):
            raise KeyboardInterrupt  # the user pressed Stop while it imported
        register("ffn", "test_after_ctrl_c")(lambda dim: None)
        """)
    with pytest.raises(KeyboardInterrupt):
        default_registry.load_plugin(str(plugin))
    assert "test_before_ctrl_c" not in default_registry.list("ffn")["ffn"]
    assert not [name for name in sys.modules if name.startswith(PLUGIN_FILE_PREFIX) and "slow_py" in name]
    stop.unlink()
    default_registry.load_plugin(str(plugin))  # the same file, unchanged: imported again, not taken as loaded
    assert {"test_before_ctrl_c", "test_after_ctrl_c"} <= set(default_registry.list("ffn")["ffn"])


def test_a_plugin_files_override_is_undone_when_the_file_fails_and_when_it_is_edited(default_registry, tmp_path):
    builtin = default_registry.describe("ffn", "mlp")
    override = textwrap.dedent("""
        from vit_search import register


        @register("ffn", "mlp", override=True)
        def mine(dim: int, ratio: float = 4.0):
            \"\"\"My mlp.\"\"\"
        """)
    failing = _plugin(tmp_path / "failing.py", override + "\nraise ImportError('fails after registering')\n")
    with pytest.raises(PluginError, match="failed to import: ImportError: fails after registering"):
        default_registry.load_plugin(str(failing))
    assert default_registry.describe("ffn", "mlp") == builtin  # the half-loaded plugin replaced nothing

    edited = _plugin(tmp_path / "edited.py", override)
    default_registry.load_plugin(str(edited))
    assert default_registry.describe("ffn", "mlp").summary == "My mlp."
    _plugin(edited, override.replace('"mlp", override=True', '"test_no_override_now"'))  # another size: read again
    default_registry.load_plugin(str(edited))
    assert default_registry.describe("ffn", "mlp") == builtin  # what the old version replaced is back
    assert "test_no_override_now" in default_registry.list("ffn")["ffn"]


def test_undoing_a_files_override_keeps_a_later_files_override_and_passes_it_what_was_there_before(
        default_registry, tmp_path):
    builtin = default_registry.describe("ffn", "mlp")
    override = textwrap.dedent("""
        from vit_search import register


        @register("ffn", "mlp", override=True)
        def mine(dim: int, ratio: float = 4.0):
            \"\"\"SUMMARY\"\"\"
        """)
    first = _plugin(tmp_path / "first.py", override.replace("SUMMARY", "First."))
    second = _plugin(tmp_path / "second.py", override.replace("SUMMARY", "Second."))
    default_registry.load_plugin(str(first))
    default_registry.load_plugin(str(second))
    _plugin(first, override.replace('"mlp", override=True', '"test_first_now"').replace("SUMMARY", "First, edited."))
    default_registry.load_plugin(str(first))  # its override undone: the second file's stays
    assert default_registry.describe("ffn", "mlp").summary == "Second."
    _plugin(second, override.replace('"mlp", override=True', '"test_second_now"').replace("SUMMARY", "Second, edited."))
    default_registry.load_plugin(str(second))  # the first file no longer overrides: the built-in is back
    assert default_registry.describe("ffn", "mlp") is builtin


def test_a_name_taken_by_a_plugin_file_is_said_with_the_files_path_and_an_installed_ones_with_its_module(
        default_registry, tmp_path):
    text = """
        from vit_search import register

        register("ffn", "test_shared")(lambda dim: None)
        """
    first, second = _plugin(tmp_path / "p_a.py", text), _plugin(tmp_path / "p_b.py", text)
    default_registry.load_plugin(str(first))
    with pytest.raises(PluginError) as err:
        default_registry.load_plugin(str(second))
    assert f"ffn 'test_shared' is already registered by {first.resolve()}; pick another name" in str(err.value)
    with pytest.raises(RegistryError, match=r"ffn 'mlp' is already registered by vit_search\.blocks\.ffn; "):
        default_registry.add("ffn", "mlp", lambda dim: None)  # a module (ours, an installed plugin's): its name

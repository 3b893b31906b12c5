"""The block registry: registration, lookup errors, descriptions, argument checks."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from vit_search.registry import REGISTRY, Registry, RegistryError


@pytest.fixture
def registry() -> Registry:
    return Registry(builtin_module=None)


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

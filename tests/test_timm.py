"""timm ViT weights: the imported model computes timm's logits; position embeddings resample as timm's."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from vit_search.errors import WeightsError
from vit_search.model import from_timm, resample_position_embedding

timm = pytest.importorskip("timm", reason="timm is needed to compare against it: pip install 'vit-search[timm]'")

TOLERANCE = 1e-5


def randomised_timm(name: str, **kwargs) -> nn.Module:
    """A timm model (no download) with every weight redrawn, so no parameter is left at a trivial
    init (zero biases, unit norms, zero class token) that would hide a wrong mapping."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs)
    with torch.no_grad():
        for param in model.parameters():
            nn.init.normal_(param, std=0.05)
    return model.eval()


def max_diff(reference: nn.Module, ours: nn.Module) -> float:
    """Max-abs logit difference on two random images at the model's input size."""
    torch.manual_seed(1)
    size = reference.patch_embed.img_size
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        expected, actual = reference(images), ours.eval()(images)
    assert actual.shape == expected.shape
    assert expected.abs().max() > 1e-2, "logits too small for the comparison to mean anything"
    return (actual - expected).abs().max().item()


MODELS = {
    "vit_tiny": ("vit_tiny_patch16_224", {}),
    "vit_small": ("vit_small_patch16_224", {}),
    "vit_base": ("vit_base_patch16_224", {}),
    "deit_tiny": ("deit_tiny_patch16_224", {}),
    # Global average pooling without a class token: norm on every token, then the mean.
    "vit_tiny_gap": ("vit_tiny_patch16_224", {"global_pool": "avg", "class_token": False, "fc_norm": False}),
    # timm's own gap preset: width 512 with 8 heads, no qkv bias, LayerScale, 256 px.
    "vit_medium_gap_256": ("vit_medium_patch16_gap_256", {}),
    "vit_tiny_qk_norm_layerscale": ("vit_tiny_patch16_224", {"qk_norm": True, "init_values": 1e-5}),
    # Class-token pooling with the norm after pooling: the same as our per-token final norm.
    "vit_tiny_token_fc_norm": ("vit_tiny_patch16_224", {"fc_norm": True}),
}


@pytest.mark.parametrize("key", MODELS)
def test_module_import_matches_timm(key: str):
    name, kwargs = MODELS[key]
    reference = randomised_timm(name, **kwargs)
    assert max_diff(reference, from_timm(reference)) <= TOLERANCE


def test_state_dict_and_file_match_timm(tmp_path):
    reference = randomised_timm("vit_tiny_patch16_224")
    assert max_diff(reference, from_timm(reference.state_dict())) <= TOLERANCE
    path = tmp_path / "vit_tiny.pth"
    torch.save({"state_dict": reference.state_dict(), "epoch": 3}, path)
    assert max_diff(reference, from_timm(path)) <= TOLERANCE
    torch.save({"model": reference.state_dict()}, path)
    assert max_diff(reference, from_timm(str(path))) <= TOLERANCE


def test_gap_state_dict_needs_heads_for_a_nonstandard_width():
    reference = randomised_timm("vit_medium_patch16_gap_256")
    with pytest.raises(WeightsError, match="heads for width 512"):
        from_timm(reference.state_dict())
    ours = from_timm(reference.state_dict(), heads=8)
    assert ours.pool.num_prefix_tokens == 0
    assert max_diff(reference, ours) <= TOLERANCE


def test_state_dict_import_does_not_import_timm(tmp_path):
    path = tmp_path / "vit_tiny.pth"
    torch.save(randomised_timm("vit_tiny_patch16_224").state_dict(), path)
    script = textwrap.dedent(f"""
        import sys
        import torch
        from vit_search.model import from_timm
        model = from_timm(torch.load({str(path)!r}, weights_only=True))
        model = from_timm({str(path)!r})
        loaded = sorted(m for m in sys.modules if m == "timm" or m.startswith("timm."))
        assert not loaded, loaded
        print("ok", type(model).__name__)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "ok VisionTransformer" in result.stdout


@pytest.mark.parametrize("image_size", [384, 160])
def test_resample_matches_timm(image_size: int):
    torch.manual_seed(0)
    weight = torch.randn(1, 1 + 14 * 14, 192)
    new_grid = image_size // 16
    expected = timm.layers.resample_abs_pos_embed(weight, new_size=[new_grid, new_grid], num_prefix_tokens=1)
    actual = resample_position_embedding(weight, new_grid)
    assert actual.shape == (1, 1 + new_grid**2, 192)
    assert torch.equal(actual[:, :1], weight[:, :1])
    assert (actual - expected).abs().max().item() <= 1e-6
    # The same with the old grid given, and with no prefix token (a gap model's embedding).
    assert torch.allclose(resample_position_embedding(weight, (new_grid, new_grid), old_grid=14), actual, atol=0)
    gap = resample_position_embedding(weight[:, 1:], new_grid, num_prefix_tokens=0)
    assert (gap - expected[:, 1:]).abs().max().item() <= 1e-6


def test_resample_rejects_a_non_square_grid():
    with pytest.raises(WeightsError, match="not a square grid"):
        resample_position_embedding(torch.zeros(1, 1 + 14 * 13, 8), 24)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (lambda: randomised_timm("deit_tiny_distilled_patch16_224").state_dict(), "distillation token"),
        (lambda: randomised_timm("deit_tiny_distilled_patch16_224"), "distillation token"),
        (lambda: {"foo": torch.zeros(3), "bar": torch.ones(2)}, "unexpected key 'foo'"),
        (lambda: {}, "not a timm VisionTransformer"),
        (lambda: {"epoch": 3}, "values other than tensors"),
        (lambda: nn.Linear(2, 2), "not a timm VisionTransformer"),
        (lambda: 42, "expected a timm ViT"),
        # timm's default for avg pooling is fc_norm: LayerNorm(mean(x)) is not our mean(LayerNorm(x)).
        (lambda: randomised_timm("vit_tiny_patch16_224", global_pool="avg", class_token=False), "fc_norm"),
        (lambda: randomised_timm("vit_tiny_patch16_224", global_pool="avg", class_token=False).state_dict(), "fc_norm"),
        (lambda: randomised_timm("vit_tiny_patch16_224", global_pool="avg", fc_norm=False), "avg' with a class token"),
        (lambda: randomised_timm("vit_tiny_patch16_224", reg_tokens=4), "register tokens"),
        (lambda: randomised_timm("vit_tiny_patch16_224", reg_tokens=4).state_dict(), "register tokens"),
        (lambda: randomised_timm("vit_tiny_patch16_224", no_embed_class=True), "no_embed_class"),
        (lambda: randomised_timm("vit_tiny_patch16_224", no_embed_class=True).state_dict(), "no_embed_class"),
        (lambda: randomised_timm("vit_tiny_patch16_224", pre_norm=True).state_dict(), "pre_norm"),
        (lambda: randomised_timm("vit_tiny_patch16_224", num_classes=0).state_dict(), "num_classes=0"),
    ],
    ids=[
        "deit_distilled_state_dict",
        "deit_distilled_module",
        "random_dict",
        "empty_dict",
        "no_tensors",
        "other_module",
        "not_a_mapping",
        "avg_fc_norm_module",
        "avg_fc_norm_state_dict",
        "avg_with_class_token",
        "reg_tokens_module",
        "reg_tokens_state_dict",
        "no_embed_class_module",
        "no_embed_class_state_dict",
        "pre_norm",
        "headless",
    ],
)
def test_unsupported_inputs_raise(source, message: str):
    with pytest.raises(WeightsError, match=message):
        from_timm(source())


@pytest.mark.parametrize("name, says", [
    ("vit_tiny_patch16_224.nosuchtag", "model.init: timm's vit_tiny_patch16_224 has no pretrained tag 'nosuchtag'; its "
                                       "tags: augreg_in21k, augreg_in21k_ft_in1k (name it as vit_tiny_patch16_224.TAG, or "
                                       "vit_tiny_patch16_224 for timm's default)"),
    ("vit_tiny_patch16_244", "model.init: timm has no model 'vit_tiny_patch16_244'; did you mean 'vit_tiny_patch16_224'"),
], ids=["tag", "name"])
def test_a_timm_name_or_weights_tag_timm_lacks_is_one_line_at_validate(cli_here, write_spec, name, says):
    path = write_spec(f"name: ft\ndata: {{dataset: digits, image_size: 32}}\nmodel: {{init: {{from: timm, name: {name}}}}}\n")
    result = cli_here("validate", str(path))
    assert result.returncode == 2 and result.stdout == "", result.stderr
    (line,) = result.stderr.splitlines()
    assert says in line, line

"""Each built-in block kind, and the encoder assembled from them."""

from __future__ import annotations

import time

import pytest
import torch

from vit_search.blocks.attention import EinsumAttention, SDPAttention
from vit_search.blocks.ffn import Mlp, SwiGLU
from vit_search.blocks.head import LinearHead
from vit_search.blocks.patch_embed import ConvPatchEmbed, LinearPatchEmbed
from vit_search.blocks.pooling import ClsPooling, MeanPooling
from vit_search.blocks.position import LearnedPosition, NoPosition, SinCos2dPosition
from vit_search.model import build_model


def small_model(**model):
    section = {"dim": 32, "depth": 2, "patch_embed": {"type": "conv", "patch_size": 4},
               "attention": {"type": "sdpa", "heads": 4}, "image_size": 16, "in_channels": 3, "num_classes": 5}
    return build_model({**section, **model})


def test_conv_and_linear_patch_embeddings_agree_with_the_same_weights():
    torch.manual_seed(0)
    conv = ConvPatchEmbed(in_channels=3, dim=8, image_size=(8, 12), patch_size=4)
    linear = LinearPatchEmbed(in_channels=3, dim=8, image_size=(8, 12), patch_size=4)
    # The linear form flattens each patch as (p1 p2 c): reorder the conv kernel the same way.
    linear.proj.weight.data = conv.proj.weight.permute(0, 2, 3, 1).reshape(8, -1)
    linear.proj.bias.data = conv.proj.bias.data
    images = torch.randn(2, 3, 8, 12)
    assert conv.grid == (2, 3) and conv.num_patches == 6  # non-square images are fine
    torch.testing.assert_close(linear(images), conv(images), atol=1e-5, rtol=1e-5)
    assert conv(images).shape == (2, 6, 8)


def test_image_size_not_divisible_by_patch_size_is_refused():
    with pytest.raises(ValueError, match="not divisible by patch size"):
        ConvPatchEmbed(in_channels=3, dim=8, image_size=30, patch_size=4)


def test_sdpa_and_einsum_attention_give_the_same_outputs_for_the_same_weights():
    torch.manual_seed(0)
    for qk_norm in (False, True):
        sdpa = SDPAttention(dim=48, heads=6, qk_norm=qk_norm).eval()
        einsum = EinsumAttention(dim=48, heads=6, qk_norm=qk_norm).eval()
        einsum.load_state_dict(sdpa.state_dict())
        tokens = torch.randn(3, 17, 48)
        torch.testing.assert_close(einsum(tokens), sdpa(tokens), atol=1e-5, rtol=1e-5)


def test_attention_scales_scores_by_sqrt_head_dim_before_softmax():
    attn = EinsumAttention(dim=16, heads=2).eval()
    tokens = torch.randn(1, 5, 16)
    q, k, v = attn._split_heads(tokens)
    weights = (q @ k.transpose(-2, -1) / (8 ** 0.5)).softmax(-1)
    expected = attn._merge_heads(weights @ v)
    torch.testing.assert_close(attn(tokens), expected)


def test_attention_refuses_dim_not_divisible_by_heads():
    with pytest.raises(ValueError, match="dim 30 is not divisible by heads 4"):
        SDPAttention(dim=30, heads=4)


@pytest.mark.parametrize("activation", ["gelu", "relu", "silu"])
def test_mlp_maps_tokens_to_tokens_with_named_activation(activation):
    mlp = Mlp(dim=16, ratio=2, activation=activation)
    assert mlp.fc1.out_features == 32
    assert mlp(torch.randn(2, 5, 16)).shape == (2, 5, 16)


def test_swiglu_keeps_an_mlps_parameter_budget():
    mlp, swiglu = Mlp(dim=48, ratio=4), SwiGLU(dim=48, ratio=4)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert abs(count(swiglu) - count(mlp)) / count(mlp) < 0.02
    assert swiglu(torch.randn(2, 5, 48)).shape == (2, 5, 48)


def test_cls_pooling_prepends_one_token_and_pools_it():
    pool = ClsPooling(dim=8)
    tokens = pool.prepend(torch.randn(2, 4, 8))
    assert tokens.shape == (2, 5, 8)
    torch.testing.assert_close(pool(tokens), pool.cls_token.expand(2, 1, 8)[:, 0])


def test_mean_pooling_averages_patch_tokens_only():
    pool = MeanPooling(dim=8)
    patches = torch.randn(2, 4, 8)
    assert pool.prepend(patches) is patches and pool.num_prefix_tokens == 0
    torch.testing.assert_close(pool(patches), patches.mean(1))


def test_mean_pooled_model_has_no_cls_token_and_ignores_token_order():
    model = small_model(pooling={"type": "mean"}, position={"type": "none"}).eval()
    assert not any("cls_token" in name for name, _ in model.named_parameters())
    # Without positions or a cls token, permuting the patches must not change the pooled output.
    tokens = model.patch_embed(torch.randn(1, 3, 16, 16))
    x = tokens
    for blk in model.blocks:
        x = blk(x)
    permuted = tokens[:, torch.randperm(tokens.shape[1])]
    y = permuted
    for blk in model.blocks:
        y = blk(y)
    torch.testing.assert_close(model.pool(model.norm(x)), model.pool(model.norm(y)), atol=1e-5, rtol=1e-5)


def test_learned_position_includes_the_cls_slot():
    pos = LearnedPosition(dim=8, num_patches=16, grid=(4, 4), num_prefix_tokens=1)
    assert pos.weight.shape == (1, 17, 8)
    assert small_model().pos_embed.weight.shape == (1, 17, 32)
    assert small_model(pooling={"type": "mean"}).pos_embed.weight.shape == (1, 16, 32)


def test_sincos2d_position_is_fixed_and_zero_on_prefix_tokens():
    pos = SinCos2dPosition(dim=8, num_patches=6, grid=(2, 3), num_prefix_tokens=1)
    assert list(pos.parameters()) == [] and "table" not in pos.state_dict()
    out = pos(torch.zeros(1, 7, 8))
    assert torch.equal(out[0, 0], torch.zeros(8))
    assert len({tuple(row.tolist()) for row in out[0, 1:]}) == 6  # every patch position differs


def test_no_position_leaves_tokens_unchanged():
    tokens = torch.randn(2, 4, 8)
    assert torch.equal(NoPosition(dim=8, num_patches=4, grid=(2, 2), num_prefix_tokens=0)(tokens), tokens)


def test_linear_head_with_optional_norm():
    head = LinearHead(dim=8, num_classes=3, norm=True)
    assert isinstance(head.norm, torch.nn.LayerNorm)
    assert head(torch.randn(4, 8)).shape == (4, 3)


def test_parameters_have_stable_readable_names():
    names = set(small_model(layer_scale=1e-5).state_dict())
    for expected in ["patch_embed.proj.weight", "pos_embed.weight", "pool.cls_token", "blocks.1.norm1.weight",
                     "blocks.1.attn.qkv.weight", "blocks.1.attn.proj.bias", "blocks.1.ffn.fc1.weight",
                     "blocks.1.ffn.fc2.bias", "blocks.1.ls1.gamma", "norm.weight", "head.fc.weight"]:
        assert expected in names
    assert not any(part.isdigit() for name in names for part in name.split(".")[2:])


def test_stochastic_depth_grows_linearly_over_depth():
    model = small_model(depth=5, drop_path_rate=0.2)
    rates = [0.0 if isinstance(b.drop_path1, torch.nn.Identity) else b.drop_path1.p for b in model.blocks]
    assert rates == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])


def test_encoder_block_is_pre_norm_with_residuals():
    model = small_model(depth=1).eval()
    blk = model.blocks[0]
    x = torch.randn(2, 17, 32)
    mid = x + blk.attn(blk.norm1(x))
    torch.testing.assert_close(blk(x), mid + blk.ffn(blk.norm2(mid)))


def test_model_maps_images_to_logits_and_trains():
    torch.manual_seed(0)
    model = small_model(ffn={"type": "swiglu"}, position={"type": "sincos2d"})
    images, labels = torch.randn(8, 3, 16, 16), torch.randint(0, 5, (8,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert model(images).shape == (8, 5)
    assert losses[-1] < losses[0] * 0.5


def test_a_models_cost_is_counted_once_and_again_when_a_block_name_gets_another_class(monkeypatch):
    from torch import nn

    from vit_search.model import cost
    from vit_search.model.cost import model_cost
    from vit_search.registry import register
    from vit_search.schema import ModelSpec

    def ffn_of(layers: int) -> type:
        class Ffn(nn.Module):
            def __init__(self, dim: int):
                super().__init__()
                self.layers = nn.Sequential(*(nn.Linear(dim, dim) for _ in range(layers)))

            def forward(self, tokens):
                return self.layers(tokens)

        return Ffn

    section = ModelSpec(dim=32, depth=2, image_size=16, in_channels=3, num_classes=5,
                        patch_embed={"type": "conv", "patch_size": 4}, attention={"type": "sdpa", "heads": 4},
                        ffn={"type": "test_cost_ffn"})
    counted, count = [], cost.flop_count
    monkeypatch.setattr(cost, "flop_count", lambda *args: counted.append(1) or count(*args))
    register("ffn", "test_cost_ffn")(ffn_of(1))
    one = model_cost(section)
    assert model_cost(section) == one and len(counted) == 1  # counted before: not counted again
    register("ffn", "test_cost_ffn", override=True)(ffn_of(2))  # same name and section, another block
    params, flops = model_cost(section)
    assert len(counted) == 2
    assert params == one[0] + 2 * (32 * 32 + 32) and flops == one[1] + 2 * 2 * 17 * 32 * 32  # 16 patches + cls


class _ReadsValues(torch.nn.Module):
    """An FFN whose forward reads a value back to the host (research code does): no meta tensor holds one."""

    def __init__(self, dim: int, fail: bool = False):
        super().__init__()
        self.fc, self.fail = torch.nn.Linear(dim, dim), fail

    def forward(self, tokens):
        if self.fail and float(tokens.detach().abs().amax()) >= 0:
            raise ValueError("this block always fails")
        return self.fc(tokens) if float(tokens.detach().abs().amax()) < 1e30 else tokens


def test_a_block_that_reads_values_is_counted_and_summarized_on_the_cpu_without_touching_the_seed(
        write_spec, cli_here):
    from vit_search.model.cost import _FLOPS, flop_count, model_cost
    from vit_search.model.vit import build_vit
    from vit_search.registry import REGISTRY, register
    from vit_search.schema import ModelSpec

    register("ffn", "test_reads_values")(_ReadsValues)
    try:
        section = ModelSpec(dim=16, depth=1, image_size=8, in_channels=1, num_classes=10,  # the digits spec below
                            patch_embed={"type": "conv", "patch_size": 4}, attention={"type": "sdpa", "heads": 2},
                            ffn={"type": "test_reads_values"})
        _FLOPS.clear()
        torch.manual_seed(0)
        expected = torch.rand(3)
        torch.manual_seed(0)
        parameters, flops = model_cost(section)
        assert torch.equal(torch.rand(3), expected)  # built on the CPU to count: the seeded draws go on as before
        on_cpu = build_vit(section).eval()
        assert (parameters, flops) == (sum(p.numel() for p in on_cpu.parameters()),
                                       flop_count(on_cpu, torch.zeros(1, 1, 8, 8)))
        path = write_spec("""
            name: reads
            data: {dataset: digits, image_size: 8}
            model: {dim: 16, depth: 1, patch_embed: {type: conv, patch_size: 4}, attention: {type: sdpa, heads: 2},
                    ffn: {type: test_reads_values}}
        """)
        said = cli_here("summary", path)
        assert said.returncode == 0 and f"forward FLOPs per image: {flops:,}" in said.stdout, said.stderr
        register("ffn", "test_reads_values", override=True)(lambda dim: _ReadsValues(dim, fail=True))
        said = cli_here("summary", path)
        assert said.returncode == 2 and said.stderr.strip().splitlines() == [  # validate's check, at the block
            f"error: {path}:4: model.ffn (test_reads_values): its forward fails on a batch of 2: ValueError: this block "
            f"always fails"], said.stderr
    finally:
        REGISTRY._blocks["ffn"].pop("test_reads_values", None)


def test_counting_a_models_flops_on_the_meta_device_counts_its_attention_and_leaves_sdpa_alone():
    import threading

    from vit_search.model import cost
    from vit_search.model.vit import build_vit
    from vit_search.schema import ModelSpec

    section = ModelSpec(dim=32, depth=2, image_size=16, in_channels=3, num_classes=5,
                        patch_embed={"type": "conv", "patch_size": 4}, attention={"type": "sdpa", "heads": 4})
    counted_on_cpu = cost.flop_count(build_vit(section).eval(), torch.zeros(1, 3, 16, 16))  # the math kernel's
    assert cost.model_cost(section)[1] == counted_on_cpu
    # Trials packed into threads train while another counts: torch's SDPA kernel choice is
    # process-wide, and a capture meanwhile would keep the math kernel for its whole trial.
    seen, done = set(), threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.add(torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled())
            time.sleep(0)  # lets the count go on

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for depth in range(3, 7):  # architectures not counted before
            cost.model_cost(section.model_copy(update={"depth": depth}))
    finally:
        done.set()
        watcher.join()
    assert seen == {True}

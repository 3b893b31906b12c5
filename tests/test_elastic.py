"""Elastic blocks: a supernet run as a subnet computes what the subnet's own model computes with the
sliced weights (weight entanglement), for every built-in block."""

from __future__ import annotations

import pytest
import torch

from vit_search.model.elastic import NotElastic, extract_subnet, set_subnet, subnet_state_dict
from vit_search.model.vit import build_vit
from vit_search.schema import ModelSpec

BASE = {"image_size": 8, "in_channels": 3, "num_classes": 5}


def section(**model) -> ModelSpec:
    return ModelSpec.model_validate({**BASE, **model})


def supernet(**model):
    torch.manual_seed(0)
    net = build_vit(section(**model)).eval()
    with torch.no_grad():  # random biases and norm scales too, so that a wrong slice shows
        for param in net.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return net


CASES = [
    # (supernet, subnet): every patch embedding, attention, FFN, position and pooling block
    ({"dim": 32, "depth": 3, "patch_embed": {"type": "conv", "patch_size": 2}, "attention": {"type": "sdpa", "heads": 2},
      "ffn": {"type": "mlp", "ratio": 4}, "pooling": "cls", "layer_scale": 0.5},
     {"dim": 16, "depth": 2, "patch_embed": {"type": "conv", "patch_size": 2}, "attention": {"type": "sdpa", "heads": 4},
      "ffn": {"type": "mlp", "ratio": 2}, "pooling": "cls", "layer_scale": 0.5,
      "layers": {1: {"attention": {"heads": 2}, "ffn": {"ratio": 3}}}}),
    ({"dim": 32, "depth": 2, "patch_embed": {"type": "linear", "patch_size": 4},
      "attention": {"type": "einsum", "heads": 2, "qk_norm": True}, "ffn": {"type": "swiglu", "ratio": 4},
      "pooling": "mean", "position": "sincos2d", "head": {"type": "linear", "norm": True}},
     {"dim": 24, "depth": 1, "patch_embed": {"type": "linear", "patch_size": 4},
      "attention": {"type": "einsum", "heads": 3, "qk_norm": True}, "ffn": {"type": "swiglu", "ratio": 2},
      "pooling": "mean", "position": "sincos2d", "head": {"type": "linear", "norm": True}}),
    ({"dim": 16, "depth": 2, "patch_embed": {"type": "conv", "patch_size": 4}, "attention": {"type": "sdpa", "heads": 2},
      "ffn": {"type": "mlp", "hidden_dim": 40}, "position": "none"},
     {"dim": 8, "depth": 2, "patch_embed": {"type": "conv", "patch_size": 4}, "attention": {"type": "sdpa", "heads": 1},
      "ffn": {"type": "mlp", "hidden_dim": 12}, "position": "none"}),
]


@pytest.mark.parametrize("big,small", CASES)
def test_a_subnet_computes_what_its_own_model_computes_with_the_sliced_weights(big, small):
    net, sub = supernet(**big), section(**small)
    images = torch.randn(3, 3, 8, 8)
    set_subnet(net, sub)
    with torch.no_grad():
        shared = net(images)
        alone = extract_subnet(net, sub).eval()(images)
    assert shared.shape == (3, 5)
    torch.testing.assert_close(shared, alone, atol=1e-6, rtol=1e-6)


def test_the_whole_supernet_runs_as_built_once_the_subnet_is_cleared():
    net = supernet(**CASES[0][0])
    images = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        before = net(images)
        set_subnet(net, section(**CASES[0][1]))
        net(images)
        set_subnet(net, None)
        torch.testing.assert_close(net(images), before, atol=0, rtol=0)


def test_subnet_weights_are_leading_slices_each_of_q_k_and_v():
    net = supernet(**CASES[0][0])
    sub = section(**CASES[0][1])
    weights = subnet_state_dict(net, sub)
    qkv = net.state_dict()["blocks.0.attn.qkv.weight"]
    torch.testing.assert_close(weights["blocks.0.attn.qkv.weight"],
                               torch.cat([qkv[:16, :16], qkv[32:48, :16], qkv[64:80, :16]]))
    assert "blocks.2.attn.qkv.weight" not in weights  # depth 2 of 3


def test_gradients_of_a_subnet_reach_only_its_slices():
    net = supernet(**CASES[0][0]).train()
    set_subnet(net, section(**CASES[0][1]))
    net(torch.randn(2, 3, 8, 8)).sum().backward()
    grad = net.blocks[0].ffn.fc1.weight.grad
    assert grad[:32, :16].abs().sum() > 0 and grad[32:].abs().sum() == 0 and grad[:, 16:].abs().sum() == 0
    assert net.blocks[2].attn.qkv.weight.grad is None  # the third layer is not in the subnet


def test_heads_that_do_not_divide_the_subnet_dim_are_refused():
    net = supernet(**CASES[0][0])
    with pytest.raises(ValueError, match="not divisible by heads"):
        set_subnet(net, section(**{**CASES[0][1], "attention": {"type": "sdpa", "heads": 3}}))


def test_a_block_without_elastic_args_cannot_run_a_subnet(monkeypatch):
    net = supernet(**CASES[0][0])
    monkeypatch.setattr(type(net.head), "elastic_args", None)
    with pytest.raises(NotElastic, match="model.head"):
        set_subnet(net, section(**CASES[0][1]))

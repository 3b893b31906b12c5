"""Weights from elsewhere: a torchvision ``VisionTransformer``'s state dict mapped onto our parameter names."""

from __future__ import annotations

import math
import os
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ..errors import WeightsError
from ..presets import HEADS_BY_DIM
from .vit import VisionTransformer, build_vit


def _torchvision_key(key: str) -> str | None:
    """Our parameter name for one torchvision ``VisionTransformer`` state-dict key (None: unknown)."""
    fixed = {
        "conv_proj.weight": "patch_embed.proj.weight",
        "conv_proj.bias": "patch_embed.proj.bias",
        "class_token": "pool.cls_token",
        "encoder.pos_embedding": "pos_embed.weight",
        "encoder.ln.weight": "norm.weight",
        "encoder.ln.bias": "norm.bias",
        "heads.head.weight": "head.fc.weight",
        "heads.head.bias": "head.fc.bias",
    }
    if key in fixed:
        return fixed[key]
    if not key.startswith("encoder.layers.encoder_layer_"):
        return None
    index, _, rest = key.removeprefix("encoder.layers.encoder_layer_").partition(".")
    if not index.isdigit():
        return None
    # torchvision's MultiheadAttention packs q, k, v row-wise, each (heads * head_dim): the layout of
    # our fused qkv, so the weights copy over unchanged.
    layer = {
        "ln_1.weight": "norm1.weight",
        "ln_1.bias": "norm1.bias",
        "ln_2.weight": "norm2.weight",
        "ln_2.bias": "norm2.bias",
        "self_attention.in_proj_weight": "attn.qkv.weight",
        "self_attention.in_proj_bias": "attn.qkv.bias",
        "self_attention.out_proj.weight": "attn.proj.weight",
        "self_attention.out_proj.bias": "attn.proj.bias",
        "mlp.0.weight": "ffn.fc1.weight",
        "mlp.0.bias": "ffn.fc1.bias",
        "mlp.3.weight": "ffn.fc2.weight",
        "mlp.3.bias": "ffn.fc2.bias",
        "mlp.linear_1.weight": "ffn.fc1.weight",  # torchvision < 0.13 names
        "mlp.linear_1.bias": "ffn.fc1.bias",
        "mlp.linear_2.weight": "ffn.fc2.weight",
        "mlp.linear_2.bias": "ffn.fc2.bias",
    }
    ours = layer.get(rest)
    return f"blocks.{int(index)}.{ours}" if ours else None


def _model_section_from_state_dict(
    state: Mapping[str, Tensor], heads: int | None, norm_eps: float | None = None
) -> dict[str, Any]:
    """The model section of the torchvision ViT whose state dict is ``state``; shapes give all but heads."""
    if any(k.startswith("heads.pre_logits") for k in state):
        raise WeightsError("torchvision ViTs with a representation (pre_logits) layer are not supported")

    def tensor(*keys: str) -> Tensor:
        for key in keys:
            if key in state:
                return state[key]
        raise WeightsError(
            f"the state dict has no '{keys[0]}': not a torchvision VisionTransformer's "
            "(conv-stem ones are not supported)"
        )

    dim, in_channels, patch, patch_w = tensor("conv_proj.weight").shape
    if patch != patch_w:
        raise WeightsError(f"cannot import non-square {patch}x{patch_w} patches")
    tokens = tensor("encoder.pos_embedding").shape[1] - 1
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise WeightsError(f"cannot infer a square image from {tokens} position embeddings")
    layers = {k.split(".")[2] for k in state if k.startswith("encoder.layers.")}
    depth = len(layers)
    if layers != {f"encoder_layer_{i}" for i in range(depth)}:
        raise WeightsError(f"the state dict's encoder layers are not numbered 0..{depth - 1}: {sorted(layers)}")
    hidden = tensor("encoder.layers.encoder_layer_0.mlp.0.weight", "encoder.layers.encoder_layer_0.mlp.linear_1.weight")
    heads = heads or HEADS_BY_DIM.get(dim)
    if heads is None:
        raise WeightsError(
            f"cannot infer the number of heads for width {dim} from a state dict "
            f"(known widths: {sorted(HEADS_BY_DIM)}); pass heads= or the torchvision module itself"
        )
    section = {
        "dim": dim,
        "depth": depth,
        "patch_embed": {"type": "conv", "patch_size": patch},
        "position": {"type": "learned"},
        "attention": {"type": "sdpa", "heads": heads},
        "ffn": {"type": "mlp", "hidden_dim": hidden.shape[0], "activation": "gelu"},
        "pooling": {"type": "cls"},
        "head": {"type": "linear"},
        "image_size": side * patch,
        "in_channels": in_channels,
        "num_classes": tensor("heads.head.weight").shape[0],
    }
    if norm_eps is not None:
        section["norm_eps"] = norm_eps
    return section


def convert_torchvision_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A torchvision ``VisionTransformer`` state dict under our parameter names (the same tensors);
    raises :class:`~vit_search.errors.WeightsError` for a key that has no counterpart."""
    ours: dict[str, Tensor] = {}
    for key, value in state.items():
        target = _torchvision_key(key)
        if target is None:
            if key.startswith("heads.pre_logits"):
                raise WeightsError("torchvision ViTs with a representation (pre_logits) layer are not supported")
            raise WeightsError(f"unexpected key '{key}' in the torchvision state dict")
        if target in ours:
            raise WeightsError(f"the state dict holds '{target}' twice (old and new torchvision names?)")
        ours[target] = value
    return ours


def torchvision_module_facts(module: nn.Module) -> tuple[int, float | None]:
    """(heads, LayerNorm epsilon) of a torchvision ``VisionTransformer``: what its state dict does not record."""
    layers = getattr(getattr(module, "encoder", None), "layers", None)
    if not layers:
        raise WeightsError(f"{type(module).__name__} is not a torchvision VisionTransformer (no encoder.layers)")
    return layers[0].self_attention.num_heads, getattr(module.encoder.ln, "eps", None)


def from_torchvision(
    source: nn.Module | Mapping[str, Tensor] | str | os.PathLike[str],
    heads: int | None = None,
) -> VisionTransformer:
    """Our ViT with a torchvision ``VisionTransformer``'s weights copied in, ready to fine-tune.

    ``source`` is the torchvision module, its state dict, or a checkpoint file holding the state
    dict (read with ``torch.load(weights_only=True)``). ``heads`` is needed only for a state dict
    of a width outside the paper's sizes (a module records its own, and its LayerNorm epsilon).
    The weights are copied: the result shares no storage with ``source``. Raises
    :class:`~vit_search.errors.WeightsError` for a state dict that is not a supported torchvision ViT's.
    """
    norm_eps = None
    if isinstance(source, (str, os.PathLike)):
        source = torch.load(source, map_location="cpu", weights_only=True)
    if isinstance(source, nn.Module):
        module_heads, norm_eps = torchvision_module_facts(source)
        heads = heads or module_heads
        source = source.state_dict()
    if not isinstance(source, Mapping):
        raise WeightsError(f"expected a torchvision ViT, its state dict or a path to one, got {type(source).__name__}")
    state = dict(source)
    ours = convert_torchvision_state(state)
    model = build_vit(_model_section_from_state_dict(state, heads, norm_eps))
    try:
        model.load_state_dict(ours, strict=True)
    except RuntimeError as err:
        raise WeightsError(f"the torchvision state dict does not fit the model inferred from it: {err}") from err
    return model

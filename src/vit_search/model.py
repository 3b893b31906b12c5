"""The Vision Transformer assembled from a model spec, its presets, and torchvision weight import.

Dosovitskiy et al., "An image is worth 16x16 words" (ICLR 2021): patches -> tokens, optional
[class] token, position embedding, pre-norm encoder blocks, final norm, pooling, head.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .registry import REGISTRY, Registry, RegistryError


class LayerScale(nn.Module):
    """Per-channel learnable scale of a residual branch (Touvron et al., CaiT)."""

    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class EncoderBlock(nn.Module):
    """Pre-norm block: x + drop_path(attn(norm(x))), then x + drop_path(ffn(norm(x)))."""

    def __init__(
        self,
        dim: int,
        attn: nn.Module,
        ffn: nn.Module,
        drop_path: float = 0.0,
        layer_scale: float | None = None,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        if drop_path > 0:
            # Imported here: torchvision takes seconds to import, and most small models skip it.
            from torchvision.ops import StochasticDepth
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = attn
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.drop_path1 = StochasticDepth(drop_path, mode="row") if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.ffn = ffn
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.drop_path2 = StochasticDepth(drop_path, mode="row") if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.ffn(self.norm2(x))))


class VisionTransformer(nn.Module):
    """Blocks from the registry, wired as in the paper; parameters have stable, readable names."""

    def __init__(self, model: Any, registry: Registry = REGISTRY):
        super().__init__()
        if model.image_size is None or model.in_channels is None or model.num_classes is None:
            raise RegistryError("model: image_size, in_channels and num_classes must be set (or come from data)")
        dim = model.dim

        def block(kind: str, **context: Any) -> nn.Module:
            name, kwargs = model.block(kind)
            return registry.build(kind, name, kwargs, context, f"model.{kind}")

        self.patch_embed = block("patch_embed", in_channels=model.in_channels, dim=dim, image_size=model.image_size)
        self.pool = block("pooling", dim=dim)
        self.pos_embed = block(
            "position",
            dim=dim,
            num_patches=self.patch_embed.num_patches,
            grid=self.patch_embed.grid,
            num_prefix_tokens=self.pool.num_prefix_tokens,
        )
        self.pos_drop = nn.Dropout(model.pos_dropout)
        # Stochastic depth grows linearly from 0 at the first block to drop_path_rate at the last.
        rates = [model.drop_path_rate * i / max(model.depth - 1, 1) for i in range(model.depth)]
        self.blocks = nn.ModuleList(
            EncoderBlock(dim, block("attention", dim=dim), block("ffn", dim=dim), rate, model.layer_scale, model.norm_eps)
            for rate in rates
        )
        self.norm = nn.LayerNorm(dim, eps=model.norm_eps)
        self.head = block("head", dim=dim, num_classes=model.num_classes)
        self.num_classes = model.num_classes
        self.image_size = model.image_size
        self.in_channels = model.in_channels
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each encoder block in backward instead of keeping its activations."""
        self.grad_checkpointing = enable

    def forward_features(self, images: Tensor) -> Tensor:
        """Images (B, C, H, W) -> normalised tokens (B, N, D), prefix tokens included."""
        x = self.pos_drop(self.pos_embed(self.pool.prepend(self.patch_embed(images))))
        for blk in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return self.norm(x)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.pool(self.forward_features(images)))


def build_model(spec: Any, registry: Registry = REGISTRY) -> VisionTransformer:
    """Build the ViT of a :class:`~vit_search.spec.Spec`, its ``model`` section, a mapping or a YAML path."""
    from .spec import ModelSpec, Spec, load_spec

    if isinstance(spec, (str, os.PathLike)):
        spec = load_spec(spec, registry=registry, check_model=False)
    if isinstance(spec, Spec):
        spec = spec.model
    elif isinstance(spec, Mapping):
        spec = ModelSpec.model_validate(spec)
    return VisionTransformer(spec, registry)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (shared ones once)."""
    return sum(p.numel() for p in model.parameters())


# -- presets ------------------------------------------------------------------------------------
# The paper's Table 1 (and DeiT's Ti and S): width, depth, heads; MLP ratio 4 throughout.
_SIZES = {"ti": (192, 12, 3), "s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16), "h": (1280, 32, 16)}

PRESETS: dict[str, dict[str, Any]] = {
    f"vit_{size}_{patch}": {
        "dim": dim,
        "depth": depth,
        "patch_embed": {"type": "conv", "patch_size": patch},
        "position": {"type": "learned"},
        "attention": {"type": "sdpa", "heads": heads},
        "ffn": {"type": "mlp", "ratio": 4.0, "activation": "gelu"},
        "pooling": {"type": "cls"},
        "head": {"type": "linear"},
    }
    for size, (dim, depth, heads) in _SIZES.items()
    for patch in (16, 32)
}
"""Named model sections a spec can start from: ``model: {preset: vit_b_16, depth: 6}``."""


# -- torchvision weights ------------------------------------------------------------------------
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


# Heads by width for the paper's sizes: a state dict alone does not record them.
_HEADS_BY_DIM = {dim: heads for dim, _, heads in _SIZES.values()}


def _model_section_from_state_dict(
    state: Mapping[str, Tensor], heads: int | None, norm_eps: float | None = None
) -> dict[str, Any]:
    """The model section of the torchvision ViT whose state dict is ``state``; shapes give all but heads."""
    if any(k.startswith("heads.pre_logits") for k in state):
        raise RegistryError("torchvision ViTs with a representation (pre_logits) layer are not supported")

    def tensor(*keys: str) -> Tensor:
        for key in keys:
            if key in state:
                return state[key]
        raise RegistryError(
            f"the state dict has no '{keys[0]}': not a torchvision VisionTransformer's "
            "(conv-stem ones are not supported)"
        )

    dim, in_channels, patch, patch_w = tensor("conv_proj.weight").shape
    if patch != patch_w:
        raise RegistryError(f"cannot import non-square {patch}x{patch_w} patches")
    tokens = tensor("encoder.pos_embedding").shape[1] - 1
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise RegistryError(f"cannot infer a square image from {tokens} position embeddings")
    layers = {k.split(".")[2] for k in state if k.startswith("encoder.layers.")}
    depth = len(layers)
    if layers != {f"encoder_layer_{i}" for i in range(depth)}:
        raise RegistryError(f"the state dict's encoder layers are not numbered 0..{depth - 1}: {sorted(layers)}")
    hidden = tensor("encoder.layers.encoder_layer_0.mlp.0.weight", "encoder.layers.encoder_layer_0.mlp.linear_1.weight")
    heads = heads or _HEADS_BY_DIM.get(dim)
    if heads is None:
        raise RegistryError(
            f"cannot infer the number of heads for width {dim} from a state dict "
            f"(known widths: {sorted(_HEADS_BY_DIM)}); pass heads= or the torchvision module itself"
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


def from_torchvision(
    source: nn.Module | Mapping[str, Tensor] | str | os.PathLike[str],
    heads: int | None = None,
    registry: Registry = REGISTRY,
) -> VisionTransformer:
    """Our ViT with a torchvision ``VisionTransformer``'s weights copied in, ready to fine-tune.

    ``source`` is the torchvision module, its state dict, or a checkpoint file holding the state
    dict (read with ``torch.load(weights_only=True)``). ``heads`` is needed only for a state dict
    of a width outside the paper's sizes (a module records its own, and its LayerNorm epsilon).
    The weights are copied: the result shares no storage with ``source``. Raises
    :class:`RegistryError` for a state dict that is not a supported torchvision ViT's.
    """
    norm_eps = None
    if isinstance(source, (str, os.PathLike)):
        source = torch.load(source, map_location="cpu", weights_only=True)
    if isinstance(source, nn.Module):
        layers = getattr(getattr(source, "encoder", None), "layers", None)
        if not layers:
            raise RegistryError(f"{type(source).__name__} is not a torchvision VisionTransformer (no encoder.layers)")
        heads = heads or layers[0].self_attention.num_heads
        norm_eps = getattr(source.encoder.ln, "eps", None)
        source = source.state_dict()
    if not isinstance(source, Mapping):
        raise RegistryError(f"expected a torchvision ViT, its state dict or a path to one, got {type(source).__name__}")
    state = dict(source)
    ours = {}
    for key, value in state.items():
        target = _torchvision_key(key)
        if target is None:
            if key.startswith("heads.pre_logits"):
                raise RegistryError("torchvision ViTs with a representation (pre_logits) layer are not supported")
            raise RegistryError(f"unexpected key '{key}' in the torchvision state dict")
        if target in ours:
            raise RegistryError(f"the state dict holds '{target}' twice (old and new torchvision names?)")
        ours[target] = value
    model = build_model(_model_section_from_state_dict(state, heads, norm_eps), registry=registry)
    try:
        model.load_state_dict(ours, strict=True)
    except RuntimeError as err:
        raise RegistryError(f"the torchvision state dict does not fit the model inferred from it: {err}") from err
    return model

"""The Vision Transformer assembled from a model spec's blocks.

Dosovitskiy et al., "An image is worth 16x16 words" (ICLR 2021): patches -> tokens, optional
[class] token, position embedding, pre-norm encoder blocks, final norm, pooling, head.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..blocks.elastic import ElasticLayerNorm
from ..registry import REGISTRY, RegistryError
from ..schema import ModelSpec, Spec


class LayerScale(nn.Module):
    """Per-channel learnable scale of a residual branch (Touvron et al., CaiT)."""

    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: Tensor) -> Tensor:
        width = x.shape[-1]  # a narrower subnet (supernet search) scales with the leading entries
        return x * (self.gamma if width == self.gamma.shape[0] else self.gamma[:width])


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
        self.norm1 = ElasticLayerNorm(dim, eps=norm_eps)
        self.attn = attn
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.drop_path1 = StochasticDepth(drop_path, mode="row") if drop_path > 0 else nn.Identity()
        self.norm2 = ElasticLayerNorm(dim, eps=norm_eps)
        self.ffn = ffn
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.drop_path2 = StochasticDepth(drop_path, mode="row") if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.ffn(self.norm2(x))))


class VisionTransformer(nn.Module):
    """Blocks from the registry, wired as in the paper; parameters have stable, readable names."""

    def __init__(self, model: ModelSpec):
        super().__init__()
        if model.image_size is None or model.in_channels is None or model.num_classes is None:
            raise RegistryError("model: image_size, in_channels and num_classes must be set (or come from data)")
        dim = model.dim

        def block(kind: str, layer: int | None = None, **context: Any) -> nn.Module:
            if layer is None:
                name, kwargs = model.block(kind)
                return REGISTRY.build(kind, name, kwargs, context, f"model.{kind}")
            name, kwargs = model.layer_block(kind, layer)
            where = f"model.layers.{layer}.{kind}" if kind in model.layers.get(layer, {}) else f"model.{kind}"
            return REGISTRY.build(kind, name, kwargs, context, where)

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
            EncoderBlock(dim, block("attention", i, dim=dim), block("ffn", i, dim=dim), rate, model.layer_scale,
                         model.norm_eps)
            for i, rate in enumerate(rates)
        )
        self.norm = ElasticLayerNorm(dim, eps=model.norm_eps)
        self.head = block("head", dim=dim, num_classes=model.num_classes)
        self.num_classes = model.num_classes
        self.image_size = model.image_size
        self.in_channels = model.in_channels
        self.grad_checkpointing = False
        self.active_depth: int | None = None  # a supernet's subnet runs the first blocks only (None: all)

    def stages(self) -> list[tuple[str, nn.Module]]:
        """The model's stages in the order ``forward`` runs them, by name (for summaries)."""
        named = [("patch_embed", self.patch_embed), ("pos_embed", self.pos_embed)]
        named += [(f"blocks.{i}", blk) for i, blk in enumerate(self.blocks)]
        return named + [("norm", self.norm), ("pool", self.pool), ("head", self.head)]

    def no_weight_decay(self) -> set[str]:
        """Parameters that weight decay must leave alone, as the blocks declare them (timm's
        convention: a module's ``no_weight_decay()`` names its own parameters). Norm scales and biases
        (1-D) are left alone by the trainer anyway."""
        names = set()
        for prefix, module in self.named_modules():
            if module is not self and callable(getattr(module, "no_weight_decay", None)):
                names |= {f"{prefix}.{name}" for name in module.no_weight_decay()}
        return names

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each encoder block in backward instead of keeping its activations."""
        self.grad_checkpointing = enable

    def forward_features(self, images: Tensor) -> Tensor:
        """Images (B, C, H, W) -> normalised tokens (B, N, D), prefix tokens included."""
        x = self.pos_drop(self.pos_embed(self.pool.prepend(self.patch_embed(images))))
        for blk in self.blocks if self.active_depth is None else self.blocks[: self.active_depth]:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return self.norm(x)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.pool(self.forward_features(images)))


def build_vit(spec: Spec | ModelSpec | Mapping[str, Any]) -> VisionTransformer:
    """The ViT of a :class:`~vit_search.schema.Spec`, its ``model`` section, or a mapping of one, with
    fresh weights (``model.init`` is :func:`~vit_search.model.build_model`'s to apply)."""
    if isinstance(spec, Spec):
        spec = spec.model
    elif not isinstance(spec, ModelSpec):
        spec = ModelSpec.model_validate(spec)
    return VisionTransformer(spec)


def build_on_meta(model: ModelSpec) -> VisionTransformer:
    """The model built on torch's meta device (shapes only: no memory, no arithmetic, no weights read),
    so that an impossible combination fails as it would for real; raises what building raises."""
    with torch.device("meta"):
        return build_vit(model)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (shared ones once)."""
    return sum(p.numel() for p in model.parameters())

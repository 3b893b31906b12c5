"""Pooling: how the encoder's token sequence becomes one vector per image."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..registry import register
from .elastic import Elastic


@register("pooling", "cls")
class ClsPooling(Elastic, nn.Module):
    """Prepend a learnable [class] token before the encoder; pool by taking it afterwards."""

    elastic_args = ()  # elastic in dim: the token's leading channels, as wide as the patch tokens

    num_prefix_tokens = 1

    def __init__(self, dim: int):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        # std 1e-6 as in timm; truncated (at +-2, which never binds) because normal_ on the meta
        # device, where specs are checked, imports torch's compiler: 1-2 s per command.
        nn.init.trunc_normal_(self.cls_token, std=1e-6)

    def no_weight_decay(self) -> set[str]:
        return {"cls_token"}

    def prepend(self, tokens: Tensor) -> Tensor:
        token = self.cls_token[..., : tokens.shape[-1]]  # the whole token unless a subnet is narrower
        return torch.cat([token.expand(tokens.shape[0], -1, -1), tokens], dim=1)

    def forward(self, tokens: Tensor) -> Tensor:
        return tokens[:, 0]


@register("pooling", "mean")
class MeanPooling(Elastic, nn.Module):
    """Average the patch tokens (global average pooling); adds no token, so none is averaged in."""

    elastic_args = ()  # no weights: any width

    num_prefix_tokens = 0

    def __init__(self, dim: int):
        super().__init__()

    def prepend(self, tokens: Tensor) -> Tensor:
        return tokens

    def forward(self, tokens: Tensor) -> Tensor:
        return tokens.mean(dim=1)

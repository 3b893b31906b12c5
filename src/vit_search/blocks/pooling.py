"""Pooling: how the encoder's token sequence becomes one vector per image."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..registry import register


@register("pooling", "cls")
class ClsPooling(nn.Module):
    """Prepend a learnable [class] token before the encoder; pool by taking it afterwards."""

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
        return torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)

    def forward(self, tokens: Tensor) -> Tensor:
        return tokens[:, 0]


@register("pooling", "mean")
class MeanPooling(nn.Module):
    """Average the patch tokens (global average pooling); adds no token, so none is averaged in."""

    num_prefix_tokens = 0

    def __init__(self, dim: int):
        super().__init__()

    def prepend(self, tokens: Tensor) -> Tensor:
        return tokens

    def forward(self, tokens: Tensor) -> Tensor:
        return tokens.mean(dim=1)

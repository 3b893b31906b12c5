"""Position embeddings, added to the token sequence (prefix tokens such as cls included)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..registry import register
from .elastic import Elastic


@register("position", "learned")
class LearnedPosition(Elastic, nn.Module):
    """A learned vector per token position (1-D), including the slots of prefix tokens."""

    elastic_args = ()  # elastic in dim: each position's leading channels

    def __init__(self, dim: int, num_patches: int, grid: tuple[int, int], num_prefix_tokens: int, std: float = 0.02):
        super().__init__()
        if not std >= 0:  # NaN too
            raise ValueError(f"std {std:g} must be at least 0 (0.02 in the paper's code)")
        self.weight = nn.Parameter(torch.empty(1, num_prefix_tokens + num_patches, dim))
        nn.init.trunc_normal_(self.weight, std=std)

    def no_weight_decay(self) -> set[str]:
        return {"weight"}

    def forward(self, tokens: Tensor) -> Tensor:
        width = tokens.shape[-1]
        return tokens + (self.weight if width == self.weight.shape[-1] else self.weight[..., :width])


def sincos_2d(grid: tuple[int, int], dim: int, temperature: float = 10000.0) -> Tensor:
    """Fixed 2-D sine-cosine embedding (rows, cols) -> (rows*cols, dim), as in MoCo v3 and Simple ViT."""
    if dim % 4:
        raise ValueError(f"sincos2d needs dim divisible by 4, got {dim}")
    if not temperature > 0:  # 0 gives infinite frequencies: a NaN table, a NaN loss blamed on the learning rate
        raise ValueError(f"temperature {temperature:g} must be above 0 (10000, as in the Transformer)")
    rows, cols = torch.meshgrid(
        torch.arange(grid[0], dtype=torch.float32), torch.arange(grid[1], dtype=torch.float32), indexing="ij"
    )
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32) / max(quarter - 1, 1))
    y = rows.flatten()[:, None] * omega[None, :]
    x = cols.flatten()[:, None] * omega[None, :]
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)


@register("position", "sincos2d")
class SinCos2dPosition(Elastic, nn.Module):
    """Fixed 2-D sine-cosine embedding of the patch grid; prefix tokens get zeros."""

    elastic_args = ()  # no weights: a narrower subnet gets the table of its own width (not a slice)

    def __init__(
        self, dim: int, num_patches: int, grid: tuple[int, int], num_prefix_tokens: int, temperature: float = 10000.0
    ):
        super().__init__()
        table = torch.cat([torch.zeros(num_prefix_tokens, dim), sincos_2d(grid, dim, temperature)])
        # Not persistent: it is a function of the shapes, so checkpoints need not carry it.
        self.register_buffer("table", table[None], persistent=False)
        self.grid, self.num_prefix_tokens, self.temperature = grid, num_prefix_tokens, temperature

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.shape[-1] == self.table.shape[-1]:
            return tokens + self.table.to(tokens.dtype)
        width = tokens.shape[-1]
        table = torch.cat([torch.zeros(self.num_prefix_tokens, width), sincos_2d(self.grid, width, self.temperature)])
        return tokens + table.to(tokens.device, tokens.dtype)


@register("position", "none")
class NoPosition(Elastic, nn.Module):
    """No position information (a bag of patches)."""

    elastic_args = ()

    def __init__(self, dim: int, num_patches: int, grid: tuple[int, int], num_prefix_tokens: int):
        super().__init__()

    def forward(self, tokens: Tensor) -> Tensor:
        return tokens

"""Position embeddings, added to the token sequence (prefix tokens such as cls included)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..registry import register


@register("position", "learned")
class LearnedPosition(nn.Module):
    """A learned vector per token position (1-D), including the slots of prefix tokens."""

    def __init__(self, dim: int, num_patches: int, grid: tuple[int, int], num_prefix_tokens: int, std: float = 0.02):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(1, num_prefix_tokens + num_patches, dim))
        nn.init.trunc_normal_(self.weight, std=std)

    def no_weight_decay(self) -> set[str]:
        return {"weight"}

    def forward(self, tokens: Tensor) -> Tensor:
        return tokens + self.weight


def sincos_2d(grid: tuple[int, int], dim: int, temperature: float = 10000.0) -> Tensor:
    """Fixed 2-D sine-cosine embedding (rows, cols) -> (rows*cols, dim), as in MoCo v3 and Simple ViT."""
    if dim % 4:
        raise ValueError(f"sincos2d needs dim divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(
        torch.arange(grid[0], dtype=torch.float32), torch.arange(grid[1], dtype=torch.float32), indexing="ij"
    )
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32) / max(quarter - 1, 1))
    y = rows.flatten()[:, None] * omega[None, :]
    x = cols.flatten()[:, None] * omega[None, :]
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)


@register("position", "sincos2d")
class SinCos2dPosition(nn.Module):
    """Fixed 2-D sine-cosine embedding of the patch grid; prefix tokens get zeros."""

    def __init__(
        self, dim: int, num_patches: int, grid: tuple[int, int], num_prefix_tokens: int, temperature: float = 10000.0
    ):
        super().__init__()
        table = torch.cat([torch.zeros(num_prefix_tokens, dim), sincos_2d(grid, dim, temperature)])
        # Not persistent: it is a function of the shapes, so checkpoints need not carry it.
        self.register_buffer("table", table[None], persistent=False)

    def forward(self, tokens: Tensor) -> Tensor:
        return tokens + self.table.to(tokens.dtype)


@register("position", "none")
class NoPosition(nn.Module):
    """No position information (a bag of patches)."""

    def __init__(self, dim: int, num_patches: int, grid: tuple[int, int], num_prefix_tokens: int):
        super().__init__()

    def forward(self, tokens: Tensor) -> Tensor:
        return tokens

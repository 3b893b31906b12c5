"""Classification heads: pooled features (B, D) to logits (B, num_classes)."""

from __future__ import annotations

from torch import Tensor, nn

from ..registry import register


@register("head", "linear")
class LinearHead(nn.Module):
    """Optional LayerNorm and dropout, then one Linear layer."""

    def __init__(self, dim: int, num_classes: int, norm: bool = False, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6) if norm else nn.Identity()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, pooled: Tensor) -> Tensor:
        return self.fc(self.drop(self.norm(pooled)))

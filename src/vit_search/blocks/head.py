"""Classification heads: pooled features (B, D) to logits (B, num_classes)."""

from __future__ import annotations

from torch import Tensor, nn

from ..registry import register
from .elastic import Elastic, ElasticLayerNorm, sliced_linear


@register("head", "linear")
class LinearHead(Elastic, nn.Module):
    """Optional LayerNorm and dropout, then one Linear layer."""

    elastic_args = ()  # elastic in dim only: it takes the leading columns for a narrower input

    def __init__(self, dim: int, num_classes: int, norm: bool = False, dropout: float = 0.0):
        super().__init__()
        self.norm = ElasticLayerNorm(dim, eps=1e-6) if norm else nn.Identity()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, pooled: Tensor) -> Tensor:
        features = self.drop(self.norm(pooled))
        return self.fc(features) if self.sample is None else sliced_linear(self.fc, features, self.fc.out_features)

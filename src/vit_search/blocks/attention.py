"""Multi-head self-attention: softmax(Q K^T / sqrt(d_head)) V over all tokens.

Both blocks share parameter names (``qkv``, ``proj``, ``q_norm``, ``k_norm``), so their weights are
interchangeable: ``einsum`` is the formula written out, ``sdpa`` the fused kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..registry import register
from .elastic import Elastic, norm, sliced_linear


def _check_heads(dim: int, heads: int) -> None:
    """Refuse a head count that cannot split ``dim`` (a count below 1 is said as such, not as a remainder)."""
    if heads < 1:
        raise ValueError(f"heads {heads}: must be at least 1")
    if dim % heads:
        raise ValueError(f"dim {dim} is not divisible by heads {heads}; choose heads that divide dim")


class _MultiHeadSelfAttention(Elastic, nn.Module):
    """Shared parameters: one fused qkv projection, optional per-head q/k LayerNorm, output proj.

    Elastic in dim and heads: a subnet of width d uses q, k and v's leading d rows (and columns) and
    splits them into its own heads of d / heads channels each.
    """

    elastic_args = ("heads",)
    weight_chunks = {"qkv.weight": 3, "qkv.bias": 3}  # q, k, v: each keeps its own leading rows
    # Fewer heads are wider: the per-head q/k norms of the fewest heads hold every subnet's.
    elastic_capacity = {"heads": "min"}

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        attn_dropout: float = 0.0,
        proj_dropout: float = 0.0,
    ):
        super().__init__()
        _check_heads(dim, heads)
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim**-0.5  # 1/sqrt(d_head), applied before the softmax
        self.attn_dropout = attn_dropout
        self.attn_drop = nn.Dropout(attn_dropout)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = norm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_dropout)

    def set_sample_config(self, dim: int | None = None, heads: int = 8) -> None:
        """Run as the subnet of width ``dim`` and ``heads`` heads (``dim=None``: as built)."""
        if dim is not None:
            _check_heads(dim, heads)
        super().set_sample_config(dim, heads=heads)

    def _split_heads(self, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.sample is None:
            qkv, heads = self.qkv(tokens), self.heads
        else:
            qkv, heads = sliced_linear(self.qkv, tokens, 3 * self.sample["dim"], chunks=3), self.sample["heads"]
        q, k, v = rearrange(qkv, "b n (qkv h d) -> qkv b h n d", qkv=3, h=heads).unbind(0)
        return self.q_norm(q), self.k_norm(k), v

    def _merge_heads(self, out: Tensor) -> Tensor:
        merged = rearrange(out, "b h n d -> b n (h d)")
        projected = self.proj(merged) if self.sample is None else sliced_linear(self.proj, merged, merged.shape[-1])
        return self.proj_drop(projected)


@register("attention", "sdpa")
class SDPAttention(_MultiHeadSelfAttention):
    """Fused qkv and torch's scaled_dot_product_attention (flash / memory-efficient kernels)."""

    fused_attn = True  # calls F.scaled_dot_product_attention: the trainer tags the kernel it gets

    def forward(self, tokens: Tensor) -> Tensor:
        q, k, v = self._split_heads(tokens)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_dropout if self.training else 0.0)
        return self._merge_heads(out)


@register("attention", "einsum")
class EinsumAttention(_MultiHeadSelfAttention):
    """The same attention written out with einsum, for reading and for checking ``sdpa``."""

    fused_attn = False

    def forward(self, tokens: Tensor) -> Tensor:
        q, k, v = self._split_heads(tokens)
        scores = torch.einsum("b h i d, b h j d -> b h i j", q, k) * q.shape[-1] ** -0.5  # = self.scale as built
        weights = self.attn_drop(scores.softmax(dim=-1))
        return self._merge_heads(torch.einsum("b h i j, b h j d -> b h i d", weights, v))

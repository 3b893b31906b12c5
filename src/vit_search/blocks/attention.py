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


class _MultiHeadSelfAttention(nn.Module):
    """Shared parameters: one fused qkv projection, optional per-head q/k LayerNorm, output proj."""

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
        if heads <= 0 or dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}; choose heads that divide dim")
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim**-0.5  # 1/sqrt(d_head), applied before the softmax
        self.attn_dropout = attn_dropout
        self.attn_drop = nn.Dropout(attn_dropout)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_dropout)

    def _split_heads(self, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = rearrange(self.qkv(tokens), "b n (qkv h d) -> qkv b h n d", qkv=3, h=self.heads).unbind(0)
        return self.q_norm(q), self.k_norm(k), v

    def _merge_heads(self, out: Tensor) -> Tensor:
        return self.proj_drop(self.proj(rearrange(out, "b h n d -> b n (h d)")))


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
        scores = torch.einsum("b h i d, b h j d -> b h i j", q, k) * self.scale
        weights = self.attn_drop(scores.softmax(dim=-1))
        return self._merge_heads(torch.einsum("b h i j, b h j d -> b h i d", weights, v))

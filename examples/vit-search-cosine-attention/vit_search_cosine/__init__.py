"""Scaled cosine attention (Liu et al., "Swin Transformer V2", CVPR 2022) as a vit-search block.

Dot-product attention lets the logits of a few token pairs grow without bound as training goes on,
so that a handful of pairs dominate each head. Cosine attention bounds them: the logit of tokens i
and j is ``cos(q_i, k_j) * s_h``, where ``s_h`` is a learnable per-head scale (kept in log space and
clamped at log(100), so at most 100), replacing the fixed ``1/sqrt(d_head)``.

The parameter layout is the built-in attention's (a fused ``qkv`` Linear and an output ``proj``
Linear), plus one ``logit_scale`` of shape (heads,). It is 1-D, like a bias, so that trainers that
skip weight decay on 1-D parameters (timm's rule) leave it undecayed, as Swin V2 does.

Importing this module registers the block; the package's entry point does that for you.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from vit_search import register
from vit_search.blocks.elastic import Elastic, sliced_linear

__all__ = ["CosineAttention"]

MAX_LOGIT_SCALE = math.log(100.0)  # Swin V2 clamps the per-head scale at 100


@register("attention", "cosine")
class CosineAttention(Elastic, nn.Module):
    """Scaled cosine attention (Swin V2): cos(q, k) times a learnable per-head scale, at most 100."""

    fused_attn = True  # it calls F.scaled_dot_product_attention: runs are tagged with the kernel it gets
    # Elastic (search.strategy: supernet): a subnet of width d and h heads uses q, k and v's leading d
    # rows and the first h per-head scales; the supernet holds the most heads (the default capacity).
    elastic_args = ("heads",)
    weight_chunks = {"qkv.weight": 3, "qkv.bias": 3}

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        qkv_bias: bool = True,
        attn_dropout: float = 0.0,
        proj_dropout: float = 0.0,
        init_logit_scale: float = 10.0,
    ):
        super().__init__()
        if heads <= 0 or dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}; choose heads that divide dim")
        if not 0 < init_logit_scale <= 100:
            raise ValueError(f"init_logit_scale must be in (0, 100], got {init_logit_scale}")
        self.heads, self.head_dim = heads, dim // heads
        self.attn_dropout = attn_dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        # log of each head's scale; exp(clamp(.)) keeps the scale positive and at most 100
        self.logit_scale = nn.Parameter(torch.full((heads,), math.log(init_logit_scale)))
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_dropout)

    def set_sample_config(self, dim: int | None = None, heads: int = 8) -> None:
        """Run as the subnet of width ``dim`` with ``heads`` heads (``dim=None``: as built)."""
        if dim is not None and (heads <= 0 or dim % heads or heads > self.heads):
            raise ValueError(f"dim {dim} and heads {heads}: heads must divide dim and be at most {self.heads}")
        super().set_sample_config(dim, heads=heads)

    def forward(self, tokens: Tensor) -> Tensor:
        if self.sample is None:
            qkv, heads = self.qkv(tokens), self.heads
        else:
            qkv, heads = sliced_linear(self.qkv, tokens, 3 * self.sample["dim"], chunks=3), self.sample["heads"]
        q, k, v = rearrange(qkv, "b n (qkv h d) -> qkv b h n d", qkv=3, h=heads).unbind(0)
        scale = self.logit_scale[:heads].clamp(max=MAX_LOGIT_SCALE).exp().view(-1, 1, 1)  # (heads, 1, 1)
        # cos(q, k) * s = (s * q/|q|) . (k/|k|): fold the scale into q and let SDPA do the rest
        q = F.normalize(q, dim=-1) * scale
        k = F.normalize(k, dim=-1)
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_dropout if self.training else 0.0, scale=1.0
        )
        merged = rearrange(out, "b h n d -> b n (h d)")
        projected = self.proj(merged) if self.sample is None else sliced_linear(self.proj, merged, merged.shape[-1])
        return self.proj_drop(projected)

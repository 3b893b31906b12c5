"""Feed-forward blocks applied to each token: dim -> hidden -> dim."""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import register
from .elastic import Elastic, sliced_linear

ACTIVATIONS = {"gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "relu": nn.ReLU, "silu": nn.SiLU}


def hidden_size(dim: int, ratio: float, hidden_dim: int | None) -> int:
    """The hidden width: ``hidden_dim`` when given, else ``ratio * dim``."""
    hidden = hidden_dim if hidden_dim is not None else int(round(dim * ratio))
    if hidden <= 0:
        raise ValueError(f"hidden size must be positive, got {hidden} (dim {dim}, ratio {ratio})")
    return hidden


@register("ffn", "mlp")
class Mlp(Elastic, nn.Module):
    """Linear, activation, dropout, Linear, dropout: the paper's MLP."""

    elastic_args = ("ratio", "hidden_dim")  # a subnet keeps the leading hidden units and channels

    def __init__(
        self,
        dim: int,
        ratio: float = 4.0,
        hidden_dim: int | None = None,
        activation: Literal["gelu", "gelu_tanh", "relu", "silu"] = "gelu",
        dropout: float = 0.0,
    ):
        super().__init__()
        hidden = hidden_size(dim, ratio, hidden_dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = ACTIVATIONS[activation]()
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(dropout)

    def set_sample_config(self, dim: int | None = None, ratio: float = 4.0, hidden_dim: int | None = None) -> None:
        """Run as the subnet of width ``dim`` and this ratio or hidden width (``dim=None``: as built)."""
        super().set_sample_config(dim, ratio=ratio, hidden_dim=hidden_dim)
        if dim is not None:
            self.sample["hidden"] = hidden_size(dim, ratio, hidden_dim)

    def forward(self, tokens: Tensor) -> Tensor:
        if self.sample is None:
            return self.drop2(self.fc2(self.drop1(self.act(self.fc1(tokens)))))
        hidden = self.drop1(self.act(sliced_linear(self.fc1, tokens, self.sample["hidden"])))
        return self.drop2(sliced_linear(self.fc2, hidden, tokens.shape[-1]))


@register("ffn", "swiglu")
class SwiGLU(Elastic, nn.Module):
    """Gated SiLU unit (Shazeer, 2020): fc2(silu(x W) * (x V)); hidden is 2/3 of ratio*dim by default."""

    elastic_args = ("ratio", "hidden_dim")
    weight_chunks = {"fc1.weight": 2, "fc1.bias": 2}  # gate and value: each keeps its own leading rows

    def __init__(self, dim: int, ratio: float = 4.0, hidden_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        # Two-thirds keeps the parameter count of an MLP of the same ratio.
        hidden = hidden_size(dim, ratio * 2 / 3, hidden_dim)
        self.fc1 = nn.Linear(dim, 2 * hidden)  # gate and value, fused
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, dim)

    def set_sample_config(self, dim: int | None = None, ratio: float = 4.0, hidden_dim: int | None = None) -> None:
        """Run as the subnet of width ``dim`` and this ratio or hidden width (``dim=None``: as built)."""
        super().set_sample_config(dim, ratio=ratio, hidden_dim=hidden_dim)
        if dim is not None:
            self.sample["hidden"] = hidden_size(dim, ratio * 2 / 3, hidden_dim)

    def forward(self, tokens: Tensor) -> Tensor:
        if self.sample is None:
            gate, value = self.fc1(tokens).chunk(2, dim=-1)
            return self.drop(self.fc2(self.drop(F.silu(gate) * value)))
        gate, value = sliced_linear(self.fc1, tokens, 2 * self.sample["hidden"], chunks=2).chunk(2, dim=-1)
        return self.drop(sliced_linear(self.fc2, self.drop(F.silu(gate) * value), tokens.shape[-1]))

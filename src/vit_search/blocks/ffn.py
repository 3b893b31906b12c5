"""Feed-forward blocks applied to each token: dim -> hidden -> dim."""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import register

ACTIVATIONS = {"gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "relu": nn.ReLU, "silu": nn.SiLU}


def hidden_size(dim: int, ratio: float, hidden_dim: int | None) -> int:
    """The hidden width: ``hidden_dim`` when given, else ``ratio * dim``."""
    hidden = hidden_dim if hidden_dim is not None else int(round(dim * ratio))
    if hidden <= 0:
        raise ValueError(f"hidden size must be positive, got {hidden} (dim {dim}, ratio {ratio})")
    return hidden


@register("ffn", "mlp")
class Mlp(nn.Module):
    """Linear, activation, dropout, Linear, dropout: the paper's MLP."""

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

    def forward(self, tokens: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(tokens)))))


@register("ffn", "swiglu")
class SwiGLU(nn.Module):
    """Gated SiLU unit (Shazeer, 2020): fc2(silu(x W) * (x V)); hidden is 2/3 of ratio*dim by default."""

    def __init__(self, dim: int, ratio: float = 4.0, hidden_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        # Two-thirds keeps the parameter count of an MLP of the same ratio.
        hidden = hidden_size(dim, ratio * 2 / 3, hidden_dim)
        self.fc1 = nn.Linear(dim, 2 * hidden)  # gate and value, fused
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, tokens: Tensor) -> Tensor:
        gate, value = self.fc1(tokens).chunk(2, dim=-1)
        return self.drop(self.fc2(self.drop(F.silu(gate) * value)))

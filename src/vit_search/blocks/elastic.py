"""Elastic blocks: one set of weights that serves every smaller subnet (weight entanglement).

AutoFormer (Chen et al., ICCV 2021) trains one supernet whose subnets share weights: a subnet of width
``d`` uses the leading ``d`` rows and columns of each weight of the largest one. A block takes part by
declaring, in the timm style of class attributes the trainer reads:

* ``elastic_args``: its own YAML arguments a subnet may change at run time (``("heads",)``); an empty
  tuple still makes it elastic in ``dim``, the width every block is given;
* ``set_sample_config(dim, **args)``: run as the subnet of that width and those arguments from now on
  (``dim=None``: the block as built);
* ``weight_chunks`` (optional): parameters whose first axis holds equal parts each sliced on its own,
  e.g. ``{"qkv.weight": 3}``: q, k and v each keep their leading rows;
* ``elastic_capacity`` (optional): for an argument whose *smallest* value holds the most weights (heads
  with per-head norms), ``{"heads": "min"}``; the supernet is built with that value.

Blocks whose weights only follow the width of their input (norms, position tables, tokens, the head)
slice themselves from ``tokens.shape[-1]`` and need no configuration.
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import torch.nn.functional as F
from torch import Tensor, nn


def leading_slice(tensor: Tensor, shape: Sequence[int], chunks: int = 1) -> Tensor:
    """The leading ``shape`` of ``tensor`` (each axis cut to its first entries); with ``chunks`` > 1 the
    first axis is cut into that many equal parts, each keeping its own leading entries."""
    if tuple(tensor.shape) == tuple(shape):
        return tensor  # the full block: the tensor itself, no copy
    rest = tuple(slice(0, n) for n in shape[1:])
    if chunks == 1:
        return tensor[(slice(0, shape[0]),) + rest]
    parts = tensor.unflatten(0, (chunks, tensor.shape[0] // chunks))
    return parts[(slice(None), slice(0, shape[0] // chunks)) + rest].flatten(0, 1)


class Elastic:
    """Mixin of an elastic block: it runs as any subnet set by :meth:`set_sample_config`."""

    elastic_args: ClassVar[tuple[str, ...]] = ()
    weight_chunks: ClassVar[dict[str, int]] = {}
    elastic_capacity: ClassVar[dict[str, str]] = {}
    sample: dict[str, Any] | None = None  # the subnet this block runs as (None: as built)

    def set_sample_config(self, dim: int | None = None, **args: Any) -> None:
        """Run as the subnet of width ``dim`` with these elastic arguments (``dim=None``: as built)."""
        unknown = set(args) - set(self.elastic_args)
        if unknown:
            raise ValueError(f"{type(self).__name__} is not elastic in {', '.join(sorted(unknown))}")
        self.sample = None if dim is None else {"dim": dim, **args}


class ElasticLayerNorm(nn.LayerNorm):
    """A LayerNorm over the width of its input, with the leading entries of its scale and bias."""

    def forward(self, x: Tensor) -> Tensor:
        width = x.shape[-1]
        if (width,) == tuple(self.normalized_shape) or self.weight is None:
            return super().forward(x)
        bias = None if self.bias is None else self.bias[:width]
        return F.layer_norm(x, (width,), self.weight[:width], bias, self.eps)


def sliced_linear(layer: nn.Linear, x: Tensor, out_features: int, chunks: int = 1) -> Tensor:
    """``layer`` applied as its leading (out_features, x's width) part (its bias's leading entries)."""
    shape = (out_features, x.shape[-1])
    if shape == (layer.out_features, layer.in_features):
        return layer(x)
    bias = None if layer.bias is None else leading_slice(layer.bias, shape[:1], chunks)
    return F.linear(x, leading_slice(layer.weight, shape, chunks), bias)


def norm(dim: int, eps: float = 1e-6) -> nn.Module:
    """The LayerNorm every elastic block uses (same parameter names as ``nn.LayerNorm``)."""
    return ElasticLayerNorm(dim, eps=eps)


def is_elastic(block: Any) -> bool:
    """Whether a block class or instance declares elasticity (``elastic_args`` and ``set_sample_config``)."""
    return isinstance(getattr(block, "elastic_args", None), tuple) and callable(getattr(block, "set_sample_config",
                                                                                       None))


__all__ = ["Elastic", "ElasticLayerNorm", "is_elastic", "leading_slice", "norm", "sliced_linear"]

"""What a model costs: parameters and forward FLOPs per image, counted on the meta device."""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ..schema import ModelSpec
from ..sizes import pair
from .vit import build_vit, count_parameters


def flop_count(model: nn.Module, images: torch.Tensor) -> int:
    """Forward FLOPs of ``model`` on ``images`` (torch.utils.flop_counter; a multiply-add is 2)."""
    counter = FlopCounterMode(display=False)
    # The counter has no formula for some fused CPU attention kernels; the math backend is plain
    # matmuls and softmax, which it counts, and computes the same thing. On the meta device SDPA is
    # that already, and the restriction is left out: it is torch's global setting, under which
    # trials packed into other threads would train, or capture their steps, meanwhile.
    math_only = sdpa_kernel(SDPBackend.MATH) if images.device.type != "meta" else contextlib.nullcontext()
    with counter, torch.no_grad(), math_only:
        model(images)
    return counter.get_total_flops()


def model_cost(model: ModelSpec) -> tuple[int, int]:
    """(parameters, forward FLOPs per image) of a model section, built on the meta device: no memory,
    no arithmetic, so a ViT-H costs what a ViT-Ti does.

    Counting FLOPs runs the forward pass through Python (tens of milliseconds); a model counted
    before in this process, with the same section and the same block classes, is not counted again
    (a search checks each trial's size, then trains it; trials often differ only in training keys)."""
    with torch.device("meta"):
        built = build_vit(model).eval()
        key = (model.model_dump_json(), frozenset(type(module) for module in built.modules()))
        flops = _FLOPS.get(key)
        if flops is None:
            flops = flop_count(built, torch.empty(1, model.in_channels, *pair(model.image_size)))
            if len(_FLOPS) >= _FLOPS_KEPT:
                _FLOPS.pop(next(iter(_FLOPS)), None)  # the oldest
            _FLOPS[key] = flops
    return count_parameters(built), flops


_FLOPS: dict[tuple[str, frozenset[type]], int] = {}
_FLOPS_KEPT = 256

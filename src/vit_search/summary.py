"""Per-stage table of a model: output shapes, parameters, and forward FLOPs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from .model import VisionTransformer, count_parameters


@dataclass
class Stage:
    """One row of the summary."""

    name: str
    output_shape: tuple[int, ...]
    parameters: int


@dataclass
class Summary:
    """Stages in execution order, total parameters and forward FLOPs for one image."""

    stages: list[Stage]
    parameters: int
    flops: int

    def table(self) -> str:
        """The summary as an aligned text table."""
        rows = [("stage", "output shape", "parameters")]
        rows += [(s.name, "x".join(map(str, s.output_shape)), f"{s.parameters:,}") for s in self.stages]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}" for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        lines.append("-" * len(lines[0]))
        lines.append(f"total parameters: {self.parameters:,}")
        lines.append(f"forward FLOPs per image: {self.flops:,} ({self.flops / 1e9:.3f} GFLOPs)")
        return "\n".join(lines)


def _stages(model: VisionTransformer) -> list[tuple[str, nn.Module]]:
    named = [("patch_embed", model.patch_embed), ("pos_embed", model.pos_embed)]
    named += [(f"blocks.{i}", blk) for i, blk in enumerate(model.blocks)]
    return named + [("norm", model.norm), ("pool", model.pool), ("head", model.head)]


def flop_count(model: nn.Module, images: torch.Tensor) -> int:
    """Forward FLOPs of ``model`` on ``images`` (torch.utils.flop_counter; a multiply-add is 2)."""
    counter = FlopCounterMode(display=False)
    # The counter has no formula for some fused CPU attention kernels; the math backend is plain
    # matmuls and softmax, which it counts, and computes the same thing.
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(images)
    return counter.get_total_flops()


def summarize(model: VisionTransformer) -> Summary:
    """Run one image through ``model`` on the CPU and record each stage."""
    height, width = (model.image_size, model.image_size) if isinstance(model.image_size, int) else model.image_size
    images = torch.zeros(1, model.in_channels, height, width)
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [
        module.register_forward_hook(lambda _m, _i, out, name=name: shapes.__setitem__(name, tuple(out.shape)))
        for name, module in _stages(model)
    ]
    was_training = model.training
    model.eval()
    try:
        flops = flop_count(model, images)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    stages = [Stage(name, shapes[name], count_parameters(module)) for name, module in _stages(model)]
    return Summary(stages, count_parameters(model), flops)


"""Per-stage table of a model: output shapes, parameters, and forward FLOPs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..sizes import pair
from .cost import flop_count
from .vit import VisionTransformer, count_parameters


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


def summarize(model: VisionTransformer) -> Summary:
    """Run one image through ``model`` (on its device: the meta device gives shapes without arithmetic)
    and record each stage."""
    device = next(model.parameters()).device
    images = torch.zeros(1, model.in_channels, *pair(model.image_size), device=device)
    stages = model.stages()
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [
        module.register_forward_hook(lambda _m, _i, out, name=name: shapes.__setitem__(name, tuple(out.shape)))
        for name, module in stages
    ]
    was_training = model.training
    model.eval()
    try:
        flops = flop_count(model, images)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    rows = [Stage(name, shapes[name], count_parameters(module)) for name, module in stages]
    return Summary(rows, count_parameters(model), flops)

"""Per-stage table of a model: output shapes, parameters, and forward FLOPs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..schema import ModelSpec
from .cost import flop_count, run_one_image
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


def summarize(model: ModelSpec) -> Summary:
    """Run one image through the model of ``model`` (on the meta device: shapes without arithmetic;
    on the CPU where a block reads values, see :func:`~vit_search.model.cost.run_one_image`) and
    record each stage."""

    def record(built: VisionTransformer, images: torch.Tensor) -> Summary:
        stages = built.stages()
        shapes: dict[str, tuple[int, ...]] = {}
        hooks = [
            module.register_forward_hook(lambda _m, _i, out, name=name: shapes.__setitem__(name, tuple(out.shape)))
            for name, module in stages
        ]
        try:
            flops = flop_count(built, images)
        finally:
            for hook in hooks:
                hook.remove()
        rows = [Stage(name, shapes[name], count_parameters(module)) for name, module in stages]
        return Summary(rows, count_parameters(built), flops)

    return run_one_image(model, record)

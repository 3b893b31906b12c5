"""What a model costs: parameters and forward FLOPs per image, counted on the meta device.

A block whose forward reads a value back to the host (``.item()``, ``float(tensor)``, ``if
tensor.any():``) cannot run there: meta tensors hold no values. Such a model is counted on the CPU
instead, built there with one image of zeros (:func:`run_one_image`).
"""

from __future__ import annotations

import contextlib
from typing import Callable, TypeVar

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ..errors import UserError
from ..schema import ModelSpec
from ..sizes import pair
from .vit import VisionTransformer, build_vit, count_parameters

T = TypeVar("T")
MAX_CPU_FALLBACK_PARAMETERS = 1_000_000_000  # 4 GB of fp32 weights, built only to count a forward pass


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


def run_one_image(model: ModelSpec, use: Callable[[VisionTransformer, torch.Tensor], T],
                  on_meta: VisionTransformer | None = None, batch: int = 1) -> T:
    """``use(built, images)`` on the model of ``model`` in eval mode and one image of zeros (``batch``
    of them): on the meta device (no memory, no arithmetic; ``on_meta``, when the caller built it
    there already), or on the CPU where a block's forward reads values, which meta tensors do not
    hold. Raises UserError when the forward pass fails on the CPU too, or ``use`` raises one."""
    built = on_meta
    if built is None:
        with torch.device("meta"):
            built = build_vit(model).eval()
    shape = (batch, model.in_channels, *pair(model.image_size))
    try:
        return use(built, torch.zeros(shape, device="meta"))
    except UserError:  # ``use`` found what it checks for: the CPU would say the same
        raise
    except Exception:
        parameters = count_parameters(built)
    if parameters > MAX_CPU_FALLBACK_PARAMETERS:
        raise UserError(f"model: its forward pass does not run on the meta device (a block reads values back: "
                        f".item(), float(tensor)), and at {parameters:,} parameters it is too large to run once "
                        f"on the CPU instead; make the blocks' forward free of such reads")
    # Building initialises weights from the global generator: the caller's seeded draws stay as they were.
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        built = build_vit(model).eval()
    from ..train_step import CAPTURE_GATE  # here: commands that train nothing do not import the trainer

    try:
        # SDPA's math kernel alone is torch's process-wide setting (see flop_count): trials packed into
        # other threads neither step nor capture meanwhile.
        with CAPTURE_GATE.exclusive():
            return use(built, torch.zeros(shape))
    except UserError:
        raise
    except Exception as err:
        line = (str(err).strip().splitlines() or [""])[0][:300]
        images = "one image" if batch == 1 else f"a batch of {batch}"
        raise UserError(f"model: its forward pass fails on {images}: {type(err).__name__}: {line}") from None


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
        flops = run_one_image(model, flop_count, on_meta=built)
        if len(_FLOPS) >= _FLOPS_KEPT:
            _FLOPS.pop(next(iter(_FLOPS)), None)  # the oldest
        _FLOPS[key] = flops
    return count_parameters(built), flops


_FLOPS: dict[tuple[str, frozenset[type]], int] = {}
_FLOPS_KEPT = 256

"""A ViT run as one of its subnets: the supernet of weight-sharing search.

A supernet is an ordinary :class:`~.vit.VisionTransformer` built at the largest size a search space
allows; :func:`set_subnet` makes it run as any smaller model section (fewer layers, narrower, other
heads or FFN widths per layer) using the leading slices of its weights, and :func:`subnet_state_dict`
cuts those slices out, so that the subnet's own stand-alone model loads them and computes the same.
What each block slices, it declares itself (:mod:`vit_search.blocks.elastic`); nothing here knows a
concrete block.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..blocks.elastic import is_elastic, leading_slice
from ..schema import ModelSpec
from .vit import VisionTransformer, build_vit


class NotElastic(ValueError):
    """A subnet the supernet cannot run: a block that is not elastic, or a non-elastic argument changed."""


def _elastic_args(block: nn.Module, args: dict[str, Any], where: str) -> dict[str, Any]:
    if not is_elastic(block):
        raise NotElastic(f"{where} ({type(block).__name__}) is not elastic: it declares no elastic_args")
    return {key: value for key, value in args.items() if key in block.elastic_args}


def set_subnet(vit: VisionTransformer, model: ModelSpec | None) -> None:
    """Run ``vit`` as the subnet ``model`` describes, its weights the leading slices of ``vit``'s
    (``None``: the whole network as built). Raises :class:`NotElastic` or ``ValueError`` for a subnet
    that does not fit (wider or deeper than ``vit``, heads that do not divide dim)."""
    if model is None:
        vit.active_depth = None
        for module in vit.modules():
            if module is not vit and is_elastic(module):
                module.set_sample_config(None)
        return
    if model.depth > len(vit.blocks):
        raise ValueError(f"a subnet of depth {model.depth} in a supernet of depth {len(vit.blocks)}")
    if model.dim > vit.norm.normalized_shape[0]:
        raise ValueError(f"a subnet of dim {model.dim} in a supernet of dim {vit.norm.normalized_shape[0]}")
    dim = model.dim
    for kind, module in (("patch_embed", vit.patch_embed), ("pooling", vit.pool), ("position", vit.pos_embed),
                         ("head", vit.head)):
        module.set_sample_config(dim, **_elastic_args(module, model.block(kind)[1], f"model.{kind}"))
    for i, blk in enumerate(vit.blocks[: model.depth]):
        for kind, module in (("attention", blk.attn), ("ffn", blk.ffn)):
            module.set_sample_config(dim, **_elastic_args(module, model.layer_block(kind, i)[1], f"model.{kind}"))
    vit.active_depth = model.depth


def weight_chunks(vit: nn.Module) -> dict[str, int]:
    """Parameters whose first axis holds equal parts each sliced on its own, by full name."""
    return {f"{prefix}.{name}" if prefix else name: chunks for prefix, module in vit.named_modules()
            for name, chunks in getattr(module, "weight_chunks", {}).items()}


def subnet_state_dict(vit: VisionTransformer, model: ModelSpec) -> dict[str, Tensor]:
    """The weights of subnet ``model`` cut from supernet ``vit`` (copies): what ``build_vit(model)`` loads
    to compute what ``vit`` computes as that subnet. Also the start of a finalist fine-tuned from them."""
    with torch.device("meta"):
        shapes = {key: value.shape for key, value in build_vit(model).state_dict().items()}
    full, chunks = vit.state_dict(), weight_chunks(vit)
    missing = sorted(set(shapes) - set(full))
    if missing:
        raise NotElastic(f"the supernet has no weight '{missing[0]}' that the subnet needs")
    return {key: leading_slice(full[key], shape, chunks.get(key, 1)).detach().clone() for key, shape in shapes.items()}


def extract_subnet(vit: VisionTransformer, model: ModelSpec) -> VisionTransformer:
    """A stand-alone model of subnet ``model``, loaded with its weights cut from ``vit``."""
    subnet = build_vit(model)
    subnet.load_state_dict(subnet_state_dict(vit, model))
    return subnet.to(next(vit.parameters()).device)

"""The calling convention between blocks, held on one small batch before anything trains; and what
each block declares to the trainer (``no_weight_decay()``), held to timm's convention.

Each block kind has a contract (docs/plugins.md): the patch embedding turns images into tokens
(B, N, D); attention and the feed-forward keep the tokens' shape; the pooling gives (B, D); the head
(B, classes). A plugin block that breaks it is named here, in one line, rather than met in training
as a broadcast error, a loss on the wrong targets, or a model that trains with the wrong number of
outputs. A batch of two: with one image, a block that drops the batch dimension still broadcasts.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..errors import UserError
from ..schema import ModelSpec

BATCH = 2


class BlockContractError(UserError):
    """A block's output breaks its kind's calling convention, or its forward failed: ``kind`` says which."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def _stages(model: nn.Module) -> list[tuple[str, int | None, nn.Module]]:
    """(kind, layer or None, module) of every block of ``model``, in the order the forward meets them."""
    stages: list[tuple[str, int | None, nn.Module]] = [("patch_embed", None, model.patch_embed),
                                                        ("position", None, model.pos_embed)]
    for layer, block in enumerate(model.blocks):
        stages += [("attention", layer, block.attn), ("ffn", layer, block.ffn)]
    return stages + [("pooling", None, model.pool), ("head", None, model.head)]


def forward_checked(spec: ModelSpec) -> Callable[[nn.Module, Tensor], None]:
    """A ``use`` for :func:`~vit_search.model.cost.run_one_image`: the images through the model, each
    block's output checked; raises :class:`BlockContractError` naming the first block that breaks the
    convention, or the block whose forward raised."""

    def use(model: nn.Module, images: Tensor) -> None:
        batch, dim = images.shape[0], spec.dim
        inside: list[tuple[str, int | None]] = []  # blocks entered and not left: the last is where a failure is
        left: list[str] = []  # blocks left, in order
        broken: list[BlockContractError] = []
        patches: list[int] = []  # the patch embedding's token count, once known
        prefix = model.pool.num_prefix_tokens
        pooling = f"model.pooling ({spec.block('pooling')[0]})"

        def name(kind: str, layer: int | None) -> str:
            where = f" in layer {layer}" if layer is not None and len(model.blocks) > 1 else ""
            return f"model.{kind} ({spec.block(kind)[0]}){where}"

        def enter(kind: str, layer: int | None, given: Any) -> None:
            inside.append((kind, layer))
            if kind == "position" and patches and not broken and isinstance(given[0], Tensor) and given[0].dim() == 3:
                # What the pooling's prepend gave the position block: the patches plus the prefix it declares.
                # A prepend that lies about num_prefix_tokens would otherwise be blamed on the position block.
                got = given[0].shape[1]
                if got != patches[0] + prefix:
                    broken.append(BlockContractError("pooling", (
                        f"{pooling}: prepend returns {got} tokens for {patches[0]} patches, but the block declares "
                        f"num_prefix_tokens = {prefix}; make prepend add exactly that many tokens")))

        def check(kind: str, layer: int | None, given: Any, out: Any) -> None:
            inside.pop()
            left.append(kind)
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            if kind == "patch_embed" and isinstance(out, Tensor) and out.dim() == 3:
                patches.append(out.shape[1])
            if kind in ("attention", "ffn", "position"):
                wanted, meaning = tuple(given[0].shape), "the tokens' shape it was given (B, N, D)"
                ok = got == wanted
            elif kind == "patch_embed":
                wanted, meaning = f"({batch}, N, {dim})", "tokens (B, N, D)"
                ok = isinstance(got, tuple) and len(got) == 3 and got[0] == batch and got[2] == dim
            elif kind == "pooling":
                wanted, meaning = (batch, dim), "one vector per image (B, D)"
                ok = got == wanted
            else:
                wanted, meaning = (batch, spec.num_classes), f"one logit per class (B, {spec.num_classes})"
                ok = got == wanted
            if not ok and not broken:
                broken.append(BlockContractError(kind, f"{name(kind, layer)}: returns {got} for a batch of {batch}, "
                                                       f"expected {wanted}: {meaning}; fix its forward"))
            elif isinstance(out, Tensor) and out.dtype != images.dtype and not broken:
                # float64 failed later in another block's kernel, blamed there; an integer output trained, untrainable.
                dtype, wanted_dtype = (str(t).removeprefix("torch.") for t in (out.dtype, images.dtype))
                broken.append(BlockContractError(kind, f"{name(kind, layer)}: returns {dtype} for {wanted_dtype} "
                                                       f"input; return the dtype it was given (autocast sets the "
                                                       f"precision in training); fix its forward"))

        hooks = []
        for kind, layer, module in _stages(model):
            hooks.append(module.register_forward_pre_hook(lambda m, a, k=kind, i=layer: enter(k, i, a)))
            hooks.append(module.register_forward_hook(lambda m, a, out, k=kind, i=layer: check(k, i, a, out)))
        try:
            with torch.no_grad():
                model(images)
        except Exception as err:
            if broken:  # the broken output made a later block fail: the broken one is the news
                raise broken[0] from None
            if images.device.type != "meta":  # on the meta device a read of values fails; the CPU says
                line = (str(err).strip().splitlines() or [""])[0][:300]
                if inside:
                    kind, layer = inside[-1]
                    raise BlockContractError(kind, f"{name(kind, layer)}: its forward fails on a batch of {batch}: "
                                                   f"{type(err).__name__}: {line}") from None
                if left == ["patch_embed"]:  # between the patch embedding and the position block: the prepend
                    raise BlockContractError("pooling", f"{pooling}: its prepend fails on a batch of {batch}: "
                                                        f"{type(err).__name__}: {line}") from None
            raise
        finally:
            for hook in hooks:
                hook.remove()
        if broken:
            raise broken[0]

    return use


def check_declarations(model: nn.Module, spec: ModelSpec) -> None:
    """Each block's ``no_weight_decay()`` as timm's convention has it: a method returning names of the
    block's own parameters. A set written as a class attribute, a string (read letter by letter), or a
    name that is no parameter would leave weight decay on what the block meant to spare, silently;
    BlockContractError naming the block instead."""
    for kind, _, module in _stages(model):
        declared = getattr(module, "no_weight_decay", None)
        if declared is None:
            continue
        where = f"model.{kind} ({spec.block(kind)[0]})"
        if not callable(declared):
            raise BlockContractError(kind, f"{where}: no_weight_decay is a {type(declared).__name__}, not a method; "
                                           f"define def no_weight_decay(self) returning the names of its parameters")
        try:
            names = declared()
        except Exception as err:
            raise BlockContractError(kind, f"{where}: no_weight_decay() fails: {type(err).__name__}: {err}") from None
        if isinstance(names, (str, bytes)) or not all(isinstance(name, str) for name in names):
            raise BlockContractError(kind, f"{where}: no_weight_decay() returns {names!r}; return a set of the "
                                           f"names of its parameters, such as {{'scale'}}")
        own = [name for name, _ in module.named_parameters()]
        unknown = sorted(set(names) - set(own))
        if unknown:
            raise BlockContractError(kind, f"{where}: no_weight_decay() names {', '.join(unknown)}, not a parameter "
                                           f"of the block (its parameters: {', '.join(own) or 'none'})")

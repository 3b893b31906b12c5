"""timm ViT weights: a timm ``VisionTransformer`` (vit_*, deit_*) imported into our model.

Works on a timm module, its state dict or a checkpoint file; timm itself is never imported (a module
handed in brings its own), so checkpoints load where timm is not installed.

What our model can express, and so what imports: a conv patch embedding, one learned position
embedding that covers the class token, pre-norm blocks (fused qkv with or without bias, optional
q/k LayerNorm and LayerScale, a GELU MLP), one LayerNorm over every token after the blocks, then
class-token or mean pooling and a linear head. Pooling maps as follows:

* ``global_pool='token'``: our ``cls`` pooling. timm's ``fc_norm=True`` variant normalises the
  class token after pooling, which equals our per-token final norm followed by taking token 0
  (LayerNorm acts on each token alone), so it imports too, from a module.
* ``global_pool='avg', class_token=False, fc_norm=False`` (e.g. ``vit_medium_patch16_gap_256``):
  our ``mean`` pooling; both normalise every token, then average.
* ``global_pool='avg'`` with ``fc_norm`` (timm's default for avg) is LayerNorm(mean(tokens)), while
  ours is mean(LayerNorm(tokens)); LayerNorm is not linear, so these differ and we raise.
  ``avg`` with a class token averages the patch tokens while a class token takes part in attention;
  our mean pooling adds no token, so we raise for that too.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ..errors import WeightsError
from ..presets import HEADS_BY_DIM
from .vit import VisionTransformer, build_vit

# Our LayerNorm of q and k (blocks/attention.py) has this epsilon fixed, as timm's default has.
_QK_NORM_EPS = 1e-6

# What a timm module says but its state dict cannot record (no tensor depends on it): each fact, where it
# goes in the model section, and timm's default, which a state dict is taken to have.
_UNRECORDED = {"activation": (("ffn", "activation"), "gelu"), "norm_eps": (("norm_eps",), 1e-6)}

# timm keys that name a feature our model lacks, and how to name it in the error.
_UNSUPPORTED = {
    "dist_token": "a distillation token (deit_*_distilled)",
    "head_dist.": "a distillation head (deit_*_distilled)",
    "reg_token": "register tokens (reg_tokens > 0)",
    "norm_pre.": "a norm before the blocks (pre_norm=True, CLIP-style)",
    "attn_pool.": "attention pooling (global_pool='map')",
    "pre_logits.": "a representation layer before the head (representation_size)",
    "patch_embed.backbone.": "a hybrid (conv-stem) patch embedding",
    "patch_embed.norm.": "a norm in the patch embedding (embed_norm_layer)",
}

_FIXED_KEYS = {
    "patch_embed.proj.weight": "patch_embed.proj.weight",
    "patch_embed.proj.bias": "patch_embed.proj.bias",
    "cls_token": "pool.cls_token",
    "pos_embed": "pos_embed.weight",
    "norm.weight": "norm.weight",
    "norm.bias": "norm.bias",
    "head.weight": "head.fc.weight",
    "head.bias": "head.fc.bias",
}
_BLOCK_KEY = re.compile(
    r"blocks\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|attn\.q_norm|attn\.k_norm|mlp\.fc1|mlp\.fc2|ls1|ls2)"
    r"\.(weight|bias|gamma)"
)


def _unsupported(what: str) -> WeightsError:
    return WeightsError(f"cannot import this timm ViT: {what} is not supported by our model")


def timm_module_facts(module: nn.Module) -> dict[str, Any]:
    """What a timm module records beyond its state dict (heads, epsilons, pooling, activation);
    raises WeightsError for a module our model cannot express."""
    blocks = getattr(module, "blocks", None)
    if not isinstance(getattr(module, "patch_embed", None), nn.Module) or not blocks:
        raise WeightsError(f"{type(module).__name__} is not a timm VisionTransformer (no patch_embed and blocks)")
    if getattr(module, "dist_token", None) is not None:
        raise _unsupported(_UNSUPPORTED["dist_token"])
    if getattr(module, "reg_token", None) is not None:
        raise _unsupported(_UNSUPPORTED["reg_token"])
    if getattr(module, "attn_pool", None) is not None:
        raise _unsupported(_UNSUPPORTED["attn_pool."])
    has_cls = getattr(module, "cls_token", None) is not None
    if getattr(module, "no_embed_class", False) and has_cls:
        raise _unsupported("a position embedding without the class token's slot (no_embed_class=True)")
    if not isinstance(getattr(module, "norm_pre", nn.Identity()), nn.Identity):
        raise _unsupported(_UNSUPPORTED["norm_pre."])
    pool = getattr(module, "global_pool", None)
    norm, fc_norm = getattr(module, "norm", nn.Identity()), getattr(module, "fc_norm", nn.Identity())
    final = [n for n in (norm, fc_norm) if not isinstance(n, nn.Identity)]
    if pool not in ("token", "avg"):
        raise _unsupported(f"global_pool={pool!r} (only 'token' and 'avg' are)")
    if pool == "avg" and has_cls:
        raise _unsupported("global_pool='avg' with a class token (our mean pooling adds no class token)")
    if pool == "avg" and final and final[0] is fc_norm:
        raise _unsupported("global_pool='avg' with fc_norm (a LayerNorm after pooling; ours normalises each token before it)")
    if len(final) != 1 or not isinstance(final[0], nn.LayerNorm):
        raise _unsupported("a final norm other than one LayerNorm (final_norm=False or another norm_layer)")

    first = blocks[0]
    names = (type(first).__name__, type(first.attn).__name__, type(first.mlp).__name__)
    if names != ("Block", "Attention", "Mlp"):
        raise _unsupported(f"block, attention, MLP types {names} (only timm's Block, Attention, Mlp are)")
    act = first.mlp.act
    if isinstance(act, nn.GELU):
        activation = "gelu" if act.approximate == "none" else "gelu_tanh"
    elif type(act) in (nn.ReLU, nn.SiLU):
        activation = type(act).__name__.lower()
    else:
        raise _unsupported(f"MLP activation {type(act).__name__}")
    proj = module.patch_embed.proj
    if not isinstance(proj, nn.Conv2d) or proj.stride != proj.kernel_size or proj.padding != (0, 0):
        raise _unsupported("a patch embedding other than a conv with stride = kernel")

    # Our model has one LayerNorm epsilon for every block norm and the final norm.
    norms = [final[0]] + [n for blk in blocks for n in (blk.norm1, blk.norm2)]
    if not all(isinstance(n, nn.LayerNorm) for n in norms) or len({n.eps for n in norms}) != 1:
        raise _unsupported("norms other than LayerNorms sharing one epsilon")
    for qk in (first.attn.q_norm, first.attn.k_norm):
        if not isinstance(qk, nn.Identity) and (not isinstance(qk, nn.LayerNorm) or qk.eps != _QK_NORM_EPS):
            raise _unsupported(f"a q/k norm other than LayerNorm(eps={_QK_NORM_EPS})")
    grid = getattr(module.patch_embed, "grid_size", None)
    return {
        "heads": first.attn.num_heads,
        "norm_eps": norms[0].eps,
        "pool": pool,
        "activation": activation,
        "grid": tuple(grid) if grid is not None else None,
    }


def timm_guesses(facts: Mapping[str, Any]) -> tuple[tuple[str, ...], ...]:
    """The model-section keys :func:`convert_timm_state` fills with timm's defaults because ``facts`` (a
    module's) do not say them: a state dict records neither the activation nor the LayerNorm epsilon."""
    return tuple(path for fact, (path, _) in _UNRECORDED.items() if fact not in facts)


def _our_key(key: str) -> str | None:
    """Our parameter name for one timm key (None: not one we know)."""
    if key in _FIXED_KEYS:
        return _FIXED_KEYS[key]
    match = _BLOCK_KEY.fullmatch(key)
    if not match:
        return None
    index, part, leaf = match.groups()
    return f"blocks.{int(index)}.{part.replace('mlp.', 'ffn.')}.{leaf}"


def convert_timm_state(state: Mapping[str, Tensor], facts: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The model section and our state dict for a timm ViT state dict (``facts``: what a module adds)."""
    has_cls = "cls_token" in state
    if "fc_norm.weight" in state:
        # Only class-token pooling with fc_norm maps (onto our per-token final norm); from a state
        # dict alone it cannot be told apart from global_pool='avg' with a class token.
        if facts.get("pool") != "token":
            raise _unsupported(
                "fc_norm (a LayerNorm after pooling: global_pool='avg' normalises after averaging, ours before; "
                "for global_pool='token' with fc_norm=True pass the timm module itself)"
            )
        state = {("norm." + k.removeprefix("fc_norm.") if k.startswith("fc_norm.") else k): v for k, v in state.items()}

    ours: dict[str, Tensor] = {}
    for key, value in state.items():
        target = _our_key(key)
        if target is None:
            for prefix, what in _UNSUPPORTED.items():
                if key.startswith(prefix):
                    raise _unsupported(what)
            raise WeightsError(f"unexpected key {key!r}: not a supported timm VisionTransformer state dict")
        ours[target] = value

    for key in ("patch_embed.proj.weight", "pos_embed", "blocks.0.mlp.fc1.weight", "blocks.0.attn.qkv.weight"):
        if key not in state:
            raise WeightsError(f"the state dict has no {key!r}: not a timm VisionTransformer's (vit_*, deit_*)")
    if "norm.weight" not in state:
        raise _unsupported("a ViT without a final LayerNorm (final_norm=False)")
    if "head.weight" not in state:
        raise _unsupported("a ViT without a classifier head (num_classes=0)")

    dim, in_channels, patch_h, patch_w = state["patch_embed.proj.weight"].shape
    prefix = 1 if has_cls else 0
    positions = state["pos_embed"].shape[1]
    grid = facts.get("grid")
    if grid is None:
        side = math.isqrt(max(positions - prefix, 0))
        if side * side != positions - prefix:
            if has_cls and math.isqrt(positions) ** 2 == positions:
                raise _unsupported("a position embedding without the class token's slot (no_embed_class=True)")
            raise WeightsError(f"cannot infer a square patch grid from {positions} position embeddings")
        grid = (side, side)
    if grid[0] * grid[1] + prefix != positions:
        raise _unsupported(f"{positions} position embeddings for a {grid[0]}x{grid[1]} grid (no_embed_class=True?)")
    if state["blocks.0.attn.qkv.weight"].shape[0] != 3 * dim:
        raise _unsupported("an attention width other than the embedding width (attn_head_dim)")

    depth = len({int(k.split(".")[1]) for k in state if k.startswith("blocks.")})
    if any(f"blocks.{i}.attn.qkv.weight" not in state for i in range(depth)):
        raise WeightsError(f"the state dict's blocks are not numbered 0..{depth - 1}")
    heads = facts.get("heads") or HEADS_BY_DIM.get(dim)
    if heads is None:
        raise WeightsError(
            f"cannot infer the number of heads for width {dim} from a state dict "
            f"(known widths: {sorted(HEADS_BY_DIM)}); pass heads= or the timm module itself"
        )
    square = patch_h == patch_w and grid[0] == grid[1]
    section: dict[str, Any] = {
        "dim": dim,
        "depth": depth,
        "patch_embed": {"type": "conv", "patch_size": patch_h if patch_h == patch_w else (patch_h, patch_w)},
        "position": {"type": "learned"},
        "attention": {
            "type": "sdpa",
            "heads": heads,
            "qkv_bias": "blocks.0.attn.qkv.bias" in state,
            "qk_norm": "blocks.0.attn.q_norm.weight" in state,
        },
        "ffn": {
            "type": "mlp",
            "hidden_dim": state["blocks.0.mlp.fc1.weight"].shape[0],
            "activation": facts.get("activation", _UNRECORDED["activation"][1]),
        },
        "pooling": {"type": "cls" if has_cls else "mean"},
        "head": {"type": "linear"},
        "image_size": grid[0] * patch_h if square else (grid[0] * patch_h, grid[1] * patch_w),
        "in_channels": in_channels,
        "num_classes": state["head.weight"].shape[0],
        "norm_eps": facts.get("norm_eps", _UNRECORDED["norm_eps"][1]),
    }
    if "blocks.0.ls1.gamma" in state:
        # Any positive value builds the LayerScale modules; the loaded gammas replace it.
        section["layer_scale"] = 1e-5
    return section, ours


def from_timm(
    source: nn.Module | Mapping[str, Any] | str | os.PathLike[str], heads: int | None = None
) -> VisionTransformer:
    """Our ViT with a timm ``VisionTransformer``'s weights copied in, computing the same logits.

    ``source`` is the timm module, its state dict, or a checkpoint file (``torch.load`` with
    ``weights_only=True``) holding the state dict, bare or under ``"state_dict"`` or ``"model"``.
    The number of heads comes from the module, else ``heads``, else the width (192, 384, 768,
    1024, 1280). A state dict with a class token is taken to pool by it (``global_pool='token'``),
    one without by averaging with ``fc_norm=False``. Raises :class:`~vit_search.errors.WeightsError` for a ViT our model
    cannot express exactly (see the module docstring).
    """
    facts: dict[str, Any] = {}
    if isinstance(source, (str, os.PathLike)):
        source = torch.load(source, map_location="cpu", weights_only=True)
    if isinstance(source, nn.Module):
        facts = timm_module_facts(source)
        source = source.state_dict()
    elif isinstance(source, Mapping):
        for wrapper in ("state_dict", "model"):
            if isinstance(source.get(wrapper), Mapping):
                source = source[wrapper]
                break
        if heads is not None:
            facts["heads"] = heads
    else:
        raise WeightsError(f"expected a timm ViT, its state dict or a path to one, got {type(source).__name__}")
    if not all(isinstance(v, Tensor) for v in source.values()):
        raise WeightsError("not a timm VisionTransformer state dict: it holds values other than tensors")

    section, ours = convert_timm_state(source, facts)
    model = build_vit(section)
    try:
        model.load_state_dict(ours, strict=True)
    except RuntimeError as err:
        raise WeightsError(f"the timm state dict does not fit the model inferred from it: {err}") from err
    return model

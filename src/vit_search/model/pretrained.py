"""Weights named by ``model.init``: what they fix about the model, how a spec's model section composes
with them, and copying them into a built model.

A source is read twice. When a spec is loaded, :func:`describe` reads what the weights fix (width,
depth, heads, patch size, pooling, position type...) without reading the weights themselves and
without the network: a torchvision or timm model is built on the meta device, a file's tensors are
mapped, not read, and an MLflow run gives its logged spec. When the model is built, :func:`fetch`
reads the tensors, downloading torchvision and timm weights into torch's cache where they are
missing (unless ``VIT_SEARCH_OFFLINE`` is set), and :func:`load_init_weights` copies them in. Each
source's two readers are in :mod:`vit_search.model.weight_sources`.

What a spec may set on top of the weights: the image size (a learned position embedding is
resampled to the new patch grid), the number of classes (a new head, initialised as usual), the
number of channels (conv patch kernels adapted, as timm does), and what only training reads
(dropouts, stochastic depth). Anything else must agree with the weights; :func:`fit_problems` names
each key that does not.
"""

from __future__ import annotations

import copy
import functools
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from ..errors import WeightsError
from ..registry import KINDS
from ..schema import InitSpec, ModelSpec, with_preset
from .resample import adapt_input_channels, resample_position_embedding
from .vit import VisionTransformer, build_on_meta, build_vit
from .weight_sources import FREE_ARGS, OFFLINE_ENV, READERS, Weights, hub_checkpoints, timm_in_hub_cache

HEAD_KEYS = ("head.fc.weight", "head.fc.bias")
# Where a parameter's name points in the model section, for naming the key that does not fit.
_PART_KEYS = {"patch_embed": "patch_embed", "pos_embed": "position", "pool": "pooling", "head": "head",
              "attn": "attention", "ffn": "ffn"}


# -- the model section: composed from the weights and the spec ------------------------------------------
def merge_onto_weights(section: Mapping[str, Any], raw_model: Mapping[str, Any]) -> dict[str, Any]:
    """A raw model section on top of what the weights fix, as on top of a preset: a block of the same
    type keeps the weights' arguments, another type starts afresh (and :func:`fit_problems` says so)."""
    try:
        raw = with_preset(raw_model)
    except ValueError:  # an unknown preset: the schema reports it
        raw = dict(raw_model)
    merged = copy.deepcopy(dict(section))
    for key, value in raw.items():
        base = merged.get(key)
        if isinstance(value, str) and key in KINDS:  # `ffn: mlp` is short for `ffn: {type: mlp}`
            value = {"type": value}
        if key in KINDS and isinstance(base, dict) and isinstance(value, Mapping) \
                and value.get("type", base["type"]) == base["type"]:
            merged[key] = {**base, **value}
        else:
            merged[key] = value
    return merged


def heads_written(raw_model: Any) -> int | None:
    """The number of heads a raw model section sets, if it sets one (a state dict does not record it)."""
    try:
        attention = with_preset(raw_model).get("attention") if isinstance(raw_model, Mapping) else None
    except ValueError:
        return None
    heads = attention.get("heads") if isinstance(attention, Mapping) else None
    return heads if isinstance(heads, int) and not isinstance(heads, bool) else None


def fit_problems(model: ModelSpec, weights: Weights) -> list[tuple[tuple[str, ...], str]]:
    """(field path, message) for every key of ``model`` that cannot carry ``weights``; empty when it fits."""
    problems: list[tuple[tuple[str, ...], str]] = []

    def differs(path: tuple[str, ...], ours: Any, theirs: Any) -> None:
        if path[1:] in weights.guessed:  # a default the weights do not record: the spec's value may be the truth
            return
        key = ".".join(path)
        problems.append((path, f"{ours!r} does not fit the weights of model.init, which have {theirs!r}; "
                               f"leave {key} out to take it from them"))

    for key, stated in weights.section.items():
        if key in KINDS:
            name, args = model.block(key)
            if name != stated["type"]:
                differs(("model", key, "type"), name, stated["type"])
                continue
            for arg, value in stated.items():
                if arg != "type" and arg not in FREE_ARGS and args.get(arg) != value:
                    differs(("model", key, arg), args.get(arg), value)
        elif key == "layer_scale":  # its value only initialises the scales the weights hold
            if (model.layer_scale is None) != (stated is None):
                differs(("model", key), model.layer_scale, stated)
        elif key == "layers":  # layer numbers come back from JSON records as text
            if model.layers != {int(i): blocks for i, blocks in (stated or {}).items()}:
                differs(("model", key), model.layers, stated)
        elif getattr(model, key) != stated:
            differs(("model", key), getattr(model, key), stated)
    if model.in_channels != weights.in_channels and model.block("patch_embed")[0] != "conv":
        problems.append((("model", "in_channels"), f"{model.in_channels} channels here and {weights.in_channels} in "
                         f"the weights of model.init: only a conv patch embedding adapts; use data with "
                         f"{weights.in_channels} channels"))
    return problems or _shape_problems(model, weights)


def _shape_problems(model: ModelSpec, weights: Weights) -> list[tuple[tuple[str, ...], str]]:
    """The first parameter whose shape differs where no resampling, adapting or new head bridges it."""
    try:
        built = {name: tuple(p.shape) for name, p in build_on_meta(model).state_dict().items()}
    except Exception:  # a model that cannot be built at all: the spec's build check reports it, located
        return []
    odd = sorted(set(built) ^ set(weights.shapes))
    odd += [name for name in built if name in weights.shapes and not _bridgeable(name, built[name], weights.shapes[name])]
    if not odd:
        return []
    name = min(odd, key=_order)
    key = _spec_key(name)
    here = "x".join(map(str, built[name])) if name in built else "absent"
    there = "x".join(map(str, weights.shapes[name])) if name in weights.shapes else "absent"
    if key is not None and key not in weights.section:  # the weights do not fix it: the spec must say what they had
        return [(("model", key), f"does not fit the weights of model.init: {name} is {here} here and {there} in "
                                 f"them; set model.{key} to what they were trained with")]
    implied = _implied_shapes(model, weights)
    if implied is None or (name in implied) == (name in weights.shapes) and (
            name not in implied or _bridgeable(name, implied[name], weights.shapes[name])):
        # The model the weights give alone carries them: a key the spec wrote on top is what does not fit.
        path = ("model", key) if key else ("model",)
        parts = name.split(".")
        if parts[0] == "blocks" and key in (model.layers.get(int(parts[1])) or {}):  # a layer's own block, written
            path = ("model", "layers", parts[1], key)
        return [(path, f"does not fit the weights of model.init: {name} is {here} here and {there} in them; "
                       f"leave {'.'.join(path)} out to take it from them")]
    # Not the spec's doing (it may have written nothing but model.init): the file disagrees with itself.
    theirs = "x".join(map(str, implied[name])) if name in implied else "absent"
    message = (f"the weights of model.init ({weights.origin}) do not match the architecture they give themselves "
               f"(recorded, or read from their shapes): {name} is {there} in them and {theirs} in it; the file was "
               f"damaged or edited by hand: use it as it was saved")
    if weights.origin.endswith("(vit-search state dict)") and here != "absent" != there and not name.startswith("blocks.0."):
        # A bare state dict is read from its first block: a model whose layers differ in size looks damaged
        message += " (or, if its layers differ in size, set model.layers to theirs: a state dict does not record them)"
    return [(("model", "init"), message)]


def _implied_shapes(model: ModelSpec, weights: Weights) -> dict[str, tuple[int, ...]] | None:
    """Parameter shapes of ``model`` with every key the weights fix taken from them (None: it cannot be built)."""
    raw = model.model_dump(mode="json", by_alias=True, exclude={"init"})
    raw.update(copy.deepcopy(weights.section))
    raw["layers"] = weights.section.get("layers") or {}  # per-layer sizes are the weights' too
    try:
        return {name: tuple(p.shape) for name, p in build_on_meta(ModelSpec.model_validate(raw)).state_dict().items()}
    except Exception:
        return None


def _bridgeable(name: str, ours: tuple[int, ...], theirs: tuple[int, ...]) -> bool:
    if ours == theirs:
        return True
    if name == "pos_embed.weight":  # resampled to another grid: the width must agree
        return ours[-1] == theirs[-1]
    if name in HEAD_KEYS:  # a new head for other classes: the input width must agree
        return ours[1:] == theirs[1:]
    if name == "patch_embed.proj.weight" and len(ours) == 4:  # adapted to other channels
        return ours[0] == theirs[0] and ours[2:] == theirs[2:]
    return False


def _order(name: str) -> tuple[int, str]:
    parts = name.split(".")
    return (int(parts[1]) if parts[0] == "blocks" and parts[1].isdigit() else -1), name


def _spec_key(name: str) -> str | None:
    parts = name.split(".")
    part = parts[2] if parts[0] == "blocks" and len(parts) > 2 else parts[0]
    return _PART_KEYS.get(part)


# -- describing and fetching, once per source and version ---------------------------------------------------
def describe(init: InitSpec, heads: int | None = None) -> Weights:
    """What ``init``'s weights fix about the model (offline; read once per source and file version).
    ``heads``: the spec's, used where the weights do not record them. Raises WeightsError."""
    return _describe(_key(init), heads, _version(init))


@functools.lru_cache(maxsize=8)
def _describe(key: tuple[tuple[str, Any], ...], heads: int | None, version: Any) -> Weights:
    init = InitSpec.model_validate(dict(key))
    return READERS[init.source].describe(init, heads)


def fetch(init: InitSpec, heads: int | None = None) -> dict[str, Tensor]:
    """``init``'s tensors under our parameter names, as the source holds them (not yet fitted); a
    torchvision or timm source is downloaded into torch's cache first where it is missing and allowed.
    The last source fetched is kept, so a search's trials read it once. Raises WeightsError."""
    return _fetch(_key(init), heads, _version(init))


@functools.lru_cache(maxsize=1)
def _fetch(key: tuple[tuple[str, Any], ...], heads: int | None, version: Any) -> dict[str, Tensor]:
    init = InitSpec.model_validate(dict(key))
    state = READERS[init.source].fetch(init, heads)
    # Weights from a run that diverged: said here, once, rather than as "loss became nan" in every trial.
    broken = next((name for name, tensor in state.items()
                   if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())), None)
    if broken is not None:
        raise WeightsError(f"the weights hold NaN or infinite values ({broken}, for one), so nothing can be trained "
                           f"from them; use weights from a run that did not diverge")
    return state


def _key(init: InitSpec) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(init.model_dump(by_alias=True).items()))


def _version(init: InitSpec) -> Any:
    """What tells two reads of one source apart: a file's size and time; torch's cache folder, its
    contents' last change (a file put there by hand), whether downloads are allowed, and for timm
    the file Hugging Face's cache holds."""
    if init.source == "file":
        try:
            stat = Path(init.path).stat()
            return stat.st_size, stat.st_mtime_ns
        except OSError:
            return None
    folders = (hub_checkpoints(), hub_checkpoints() / "timm")
    in_hub_cache = timm_in_hub_cache(init.name) if init.source == "timm" else None
    return (tuple(folder.stat().st_mtime_ns if folder.is_dir() else None for folder in folders),
            os.environ.get(OFFLINE_ENV), in_hub_cache)


# -- loading ----------------------------------------------------------------------------------------------
def fit_state(state: Mapping[str, Tensor], model: VisionTransformer, grid: tuple[int, int] | None) -> dict[str, Tensor]:
    """``state`` fitted to ``model``: the position embedding resampled to its grid, the patch kernels
    adapted to its channels, the head left out where its classes differ (the model keeps its fresh one)."""
    own = model.state_dict()
    fitted = dict(state)
    position = fitted.get("pos_embed.weight")
    if position is not None and "pos_embed.weight" in own and position.shape != own["pos_embed.weight"].shape:
        fitted["pos_embed.weight"] = resample_position_embedding(
            position, model.patch_embed.grid, grid, num_prefix_tokens=model.pool.num_prefix_tokens)
    kernels = fitted.get("patch_embed.proj.weight")
    if kernels is not None and kernels.dim() == 4 and kernels.shape[1] != model.in_channels:
        fitted["patch_embed.proj.weight"] = adapt_input_channels(kernels, model.in_channels)
    if any(key in fitted and key in own and fitted[key].shape != own[key].shape for key in HEAD_KEYS):
        for key in HEAD_KEYS:
            fitted.pop(key, None)
    return fitted


def load_init_weights(model: VisionTransformer, spec: ModelSpec) -> VisionTransformer:
    """Copy ``spec.init``'s weights into ``model`` (built from ``spec``), fitted to it; returns it."""
    init = spec.init
    heads = spec.attention.get("heads") if isinstance(spec.attention.get("heads"), int) else None
    weights = describe(init, heads)
    fitted = fit_state(fetch(init, heads), model, weights.grid)
    own = model.state_dict()
    kept_fresh = {key for key in HEAD_KEYS if key in own and key not in fitted}
    wrong = sorted(key for key in set(fitted) & set(own) if fitted[key].shape != own[key].shape)
    missing, unexpected = sorted(set(own) - set(fitted) - kept_fresh), sorted(set(fitted) - set(own))
    if wrong or missing or unexpected:
        detail = (f"{wrong[0]} is {tuple(fitted[wrong[0]].shape)} in them, {tuple(own[wrong[0]].shape)} here" if wrong
                  else f"missing {', '.join(missing[:3])}" if missing else f"unexpected {', '.join(unexpected[:3])}")
        raise WeightsError(f"the weights of model.init ({weights.origin}) do not fit the model: {detail}")
    with torch.no_grad():
        model.load_state_dict({**{k: own[k] for k in kept_fresh}, **fitted}, strict=True)
    return model


def build_model(spec: Any, init_weights: bool = True) -> VisionTransformer:
    """Build the ViT of a :class:`~vit_search.schema.Spec`, its ``model`` section, or a mapping of one.

    With ``model.init`` set, the model starts from those weights: the architecture comes from them
    (a mapping's keys on top), the position embedding is resampled to the image size, the patch
    kernels adapted to the channels, and another number of classes gets a new head. ``init_weights=False``
    builds the same model with fresh weights. Raises WeightsError where the weights cannot be read or fit.
    """
    from ..schema import Spec

    if isinstance(spec, Spec):
        spec = spec.model
    elif not isinstance(spec, ModelSpec):
        raw = dict(spec)
        if raw.get("init") is not None:
            init = InitSpec.model_validate(raw["init"])
            raw = merge_onto_weights(describe(init, heads_written(raw)).section, raw)
        spec = ModelSpec.model_validate(raw)
        if spec.init is not None:
            problems = fit_problems(spec, describe(spec.init, heads_written(raw)))
            if problems:
                path, message = problems[0]
                raise WeightsError(f"{'.'.join(path)}: {message}")
    model = build_vit(spec)
    if spec.init is not None and init_weights:
        load_init_weights(model, spec)
    return model


def prepare(spec: ModelSpec) -> None:
    """Make ``spec.init``'s weights available here before anything runs (downloaded where missing), so
    that a missing file is one error now, not one per trial. Raises WeightsError."""
    if spec.init is not None:
        heads = spec.attention.get("heads") if isinstance(spec.attention.get("heads"), int) else None
        fetch(spec.init, heads)


def init_report(spec: ModelSpec) -> str | None:
    """Where ``spec``'s weights come from and how they are fitted to it, in one line (None: fresh weights)."""
    if spec.init is None:
        return None
    weights = describe(spec.init, spec.attention.get("heads"))
    notes = [weights.origin]
    if weights.grid is not None and spec.position.get("type") == "learned":
        with torch.device("meta"):
            grid = build_vit(spec).patch_embed.grid
        if tuple(grid) != tuple(weights.grid):
            notes.append(f"position embeddings resampled {weights.grid[0]}x{weights.grid[1]} -> {grid[0]}x{grid[1]}")
    if spec.in_channels != weights.in_channels:
        notes.append(f"patch embedding adapted from {weights.in_channels} channels to {spec.in_channels}")
    if spec.num_classes != weights.num_classes:
        notes.append(f"a new head for {spec.num_classes} classes (the weights have {weights.num_classes})")
    return "; ".join(notes)


__all__ = ["build_model", "describe", "fetch", "fit_problems", "fit_state",
           "heads_written", "init_report", "load_init_weights", "merge_onto_weights", "prepare"]

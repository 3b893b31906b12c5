"""Weights named by ``model.init``: what they fix about the model, how a spec's model section composes
with them, and copying them into a built model.

A source is read twice. When a spec is loaded, :func:`describe` reads what the weights fix (width,
depth, heads, patch size, pooling, position type...) without reading the weights themselves and
without the network: a torchvision or timm model is built on the meta device, a file's tensors are
mapped, not read, and an MLflow run gives its logged spec. When the model is built, :func:`fetch`
reads the tensors, downloading torchvision and timm weights into torch's cache where they are
missing (unless ``VIT_SEARCH_OFFLINE`` is set), and :func:`load_init_weights` copies them in.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from ..errors import WeightsError
from ..init_sources import INIT_SOURCES
from ..presets import HEADS_BY_DIM
from ..registry import KINDS
from ..schema import InitSpec, ModelSpec, with_preset
from ..sizes import pair
from .resample import adapt_input_channels, resample_position_embedding, square_grid
from .timm_weights import convert_timm_state, timm_module_facts
from .vit import VisionTransformer, build_on_meta, build_vit
from .weights import _model_section_from_state_dict, convert_torchvision_state, torchvision_module_facts

OFFLINE_ENV = "VIT_SEARCH_OFFLINE"
"""Set to 1 to never download weights: a source that is not cached is an error saying where to put it."""

# Keys the data decides (the weights are fitted to them), and keys only training reads.
DATA_KEYS = ("image_size", "in_channels", "num_classes")
TRAINING_ONLY = ("drop_path_rate", "pos_dropout")
# Block arguments that no weight depends on: dropouts, and the spread of a fresh initialisation.
FREE_ARGS = ("attn_dropout", "proj_dropout", "dropout", "std")
HEAD_KEYS = ("head.fc.weight", "head.fc.bias")
# Where a parameter's name points in the model section, for naming the key that does not fit.
_PART_KEYS = {"patch_embed": "patch_embed", "pos_embed": "position", "pool": "pooling", "head": "head",
              "attn": "attention", "ffn": "ffn"}


@dataclass(frozen=True)
class Weights:
    """What a source's weights fix about the model, read without reading the weights."""

    section: dict[str, Any]  # model keys the weights fix, in our spec's terms (no data keys)
    in_channels: int
    num_classes: int
    grid: tuple[int, int] | None  # the learned position embedding's patch grid (None: none, or unknown)
    shapes: dict[str, tuple[int, ...]] = field(repr=False)  # our parameter name -> shape
    origin: str  # where they come from, for people: "timm vit_small_patch16_224 (cached at ...)"


@dataclass(frozen=True)
class _Reader:
    """How one init source is described (offline) and fetched (tensors under our names)."""

    describe: Callable[[InitSpec, int | None], Weights]
    fetch: Callable[[InitSpec, int | None], dict[str, Tensor]]


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
    path = ("model", key) if key else ("model",)
    fix = (f"leave model.{key} out to take it from them" if key in weights.section
           else f"set {'.'.join(path)} to what they were trained with")
    return [(path, f"does not fit the weights of model.init: {name} is {here} here and {there} in them; {fix}")]


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


# -- describing and fetching ------------------------------------------------------------------------------
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
    return READERS[init.source].fetch(init, heads)


def _key(init: InitSpec) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(init.model_dump(by_alias=True).items()))


def _version(init: InitSpec) -> Any:
    """What tells two reads of one source apart: a file's size and time; torch's cache folder, its
    contents' last change (a file put there by hand) and whether downloads are allowed."""
    if init.source == "file":
        try:
            stat = Path(init.path).stat()
            return stat.st_size, stat.st_mtime_ns
        except OSError:
            return None
    folders = (_hub_checkpoints(), _hub_checkpoints() / "timm")
    return tuple(folder.stat().st_mtime_ns if folder.is_dir() else None for folder in folders), os.environ.get(OFFLINE_ENV)


def _offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _heads_for(dim: int, heads: int | None) -> int:
    """The heads of a state dict of width ``dim``: the spec's, else the paper's for that width."""
    found = heads or HEADS_BY_DIM.get(dim)
    if found is None:
        raise WeightsError(f"the weights do not record the number of heads, and width {dim} is none of the "
                           f"paper's ({', '.join(map(str, sorted(HEADS_BY_DIM)))}); set model.attention.heads")
    return found


def _weights(section: dict[str, Any], state: Mapping[str, Tensor], origin: str) -> Weights:
    """A :class:`Weights` from a full model section (data keys included) and our state dict."""
    section = dict(section)
    image_size, in_channels, num_classes = (section.pop(key, None) for key in DATA_KEYS)
    grid = None
    if "pos_embed.weight" in state:
        patch = pair(section["patch_embed"].get("patch_size", 16))
        grid = (pair(image_size)[0] // patch[0], pair(image_size)[1] // patch[1]) if image_size else None
    for key in TRAINING_ONLY + ("preset", "init"):
        section.pop(key, None)
    for kind in KINDS:
        if isinstance(section.get(kind), dict):  # arguments left at None say nothing about the weights
            section[kind] = {k: v for k, v in section[kind].items() if k not in FREE_ARGS and v is not None}
    ffn = section.get("ffn")
    if isinstance(ffn, dict) and ffn.get("type") == "mlp" and ffn.get("hidden_dim"):
        if ffn["hidden_dim"] % section["dim"] == 0:  # written as the ratio, as specs usually write it
            ffn["ratio"] = float(ffn.pop("hidden_dim") // section["dim"])
    shapes = {name: tuple(tensor.shape) for name, tensor in state.items()}
    return Weights(section, int(in_channels), int(num_classes), grid, shapes, origin)


def _hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _cached(path: Path) -> str:
    return f"cached at {path}" if path.is_file() else f"not cached: downloaded on first use into {path}"


# torchvision ---------------------------------------------------------------------------------------------
def _torchvision_member(init: InitSpec) -> Any:
    import torchvision

    vits = sorted(n for n in torchvision.models.list_models(torchvision.models) if n.startswith("vit_"))
    if init.name not in vits:
        raise WeightsError(f"torchvision has no ViT '{init.name}'; its ViTs: {', '.join(vits)}")
    enum = torchvision.models.get_model_weights(init.name)
    if init.weights not in enum.__members__:
        raise WeightsError(f"torchvision {init.name} has no weights '{init.weights}'; it has: "
                           f"{', '.join(enum.__members__)}")
    return enum[init.weights]


def _torchvision_file(member: Any) -> Path:
    return _hub_checkpoints() / os.path.basename(member.url)


def _describe_torchvision(init: InitSpec, heads: int | None) -> Weights:
    import torchvision

    member = _torchvision_member(init)
    with torch.device("meta"):  # the architecture without its weights: no memory, no download
        module = torchvision.models.get_model_builder(init.name)(
            weights=None, image_size=member.meta["min_size"][0], num_classes=len(member.meta["categories"]))
    module_heads, norm_eps = torchvision_module_facts(module)
    state = module.state_dict()
    section = _model_section_from_state_dict(state, module_heads, norm_eps)
    origin = f"torchvision {init.name} {member} ({_cached(_torchvision_file(member))})"
    return _weights(section, convert_torchvision_state(state), origin)


def _fetch_torchvision(init: InitSpec, heads: int | None) -> dict[str, Tensor]:
    member = _torchvision_member(init)
    path = _torchvision_file(member)
    if not path.is_file():
        _download(member.url, path)
    return convert_torchvision_state(_load_file(path))


def _download(url: str, path: Path) -> None:
    """``url`` into ``path`` (torch's cache), its hash checked as torch.hub does; WeightsError when it cannot."""
    where = f"put the file at {path} (download it from {url} on a machine with a network)"
    if _offline():
        raise WeightsError(f"the weights are not cached and {OFFLINE_ENV} is set: {where}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        hashed = torch.hub.HASH_REGEX.search(path.name)  # torchvision's file names end in their hash's prefix
        torch.hub.download_url_to_file(url, str(path), hash_prefix=hashed.group(1) if hashed else None)
    except Exception as err:  # no network, a proxy, a full disk, a bad hash: one line, and the way out
        raise WeightsError(f"cannot download {url} ({type(err).__name__}: {err}); {where}") from None


# timm ----------------------------------------------------------------------------------------------------
def _timm() -> Any:
    try:
        import timm
    except ImportError:
        raise WeightsError("from timm needs timm: pip install 'vit-search[timm]' (or give the weights file to "
                           "from: file, which does not)") from None
    return timm


_TIMM_SUFFIXES = (".safetensors", ".pth")  # Hugging Face's format, torch's


def _timm_files(name: str) -> list[Path]:
    """Where a timm model's weights may be put by hand: torch's cache, under timm/<name> (any of the suffixes)."""
    return [_hub_checkpoints() / "timm" / f"{name}{suffix}" for suffix in _TIMM_SUFFIXES]


def _timm_url(timm: Any, name: str) -> str:
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is not None and cfg.hf_hub_id:
        return f"https://huggingface.co/{cfg.hf_hub_id}/resolve/main/{cfg.hf_hub_filename or 'model.safetensors'}"
    return getattr(cfg, "url", None) or "timm's model card"


def _timm_module(timm: Any, name: str, **kwargs: Any) -> Any:
    try:
        return timm.create_model(name, **kwargs)
    except RuntimeError as err:
        if "Unknown model" not in str(err):
            raise
        known = timm.list_models("vit_*") + timm.list_models("deit_*")
        from ..registry import did_you_mean

        raise WeightsError(f"timm has no model '{name}'{did_you_mean(name, known) or ''}; "
                           f"see timm.list_models('vit_*', pretrained=True)") from None


def _describe_timm(init: InitSpec, heads: int | None) -> Weights:
    timm = _timm()
    with torch.device("meta"):
        module = _timm_module(timm, init.name, pretrained=False)
    section, ours = convert_timm_state(module.state_dict(), timm_module_facts(module))
    cached = next((path for path in _timm_files(init.name) if path.is_file()), None)
    where = f"cached at {cached}" if cached else "not cached: downloaded through timm on first use"
    return _weights(section, ours, f"timm {init.name} ({where})")


def _fetch_timm(init: InitSpec, heads: int | None) -> dict[str, Tensor]:
    timm = _timm()
    files = _timm_files(init.name)
    cached = next((path for path in files if path.is_file()), None)
    if cached is not None:
        # timm reads the file and filters it as it does its own downloads (the tag's custom loader
        # is for Google's .npz files, which this file is not).
        overlay = {"file": str(cached), "custom_load": False}
        try:
            module = _timm_module(timm, init.name, pretrained=True, pretrained_cfg_overlay=overlay)
        except WeightsError:
            raise
        except Exception as err:
            raise WeightsError(f"{cached}: timm cannot load it as {init.name}'s weights: {type(err).__name__}: "
                               f"{_first_line(err)}") from None
    else:
        where = f"put the file at {files[0]} (download it from {_timm_url(timm, init.name)})"
        if _offline():
            raise WeightsError(f"the timm weights {init.name} are not cached and {OFFLINE_ENV} is set: {where}")
        try:
            module = _timm_module(timm, init.name, pretrained=True)
        except WeightsError:
            raise
        except Exception as err:
            raise WeightsError(f"cannot download the timm weights {init.name} ({type(err).__name__}: "
                               f"{_first_line(err)}); {where}") from None
    _, ours = convert_timm_state(module.state_dict(), timm_module_facts(module))
    return ours


# file ----------------------------------------------------------------------------------------------------
def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0][:300]


def _load_file(path: Path, shapes_only: bool = False) -> Any:
    """A weights file as torch.load(weights_only=True) reads it (mapped, not read, where the format
    allows), or a safetensors file; WeightsError for anything else."""
    if not path.is_file():
        raise WeightsError(f"{path}: no such file (a relative path is read from the spec's folder)")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as handle:
                if shapes_only:
                    return {k: torch.empty(handle.get_slice(k).get_shape(), device="meta") for k in handle.keys()}
                return {k: handle.get_tensor(k) for k in handle.keys()}
        except Exception as err:
            raise WeightsError(f"{path}: not a safetensors file: {_first_line(err)}") from None
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # the legacy format maps not
    except Exception as err:
        raise WeightsError(f"{path}: not a weights file that torch.load(weights_only=True) reads: "
                           f"{_first_line(err)}") from None


def _unwrap(content: Any, path: Path) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """(the state dict, the vit-search model section it records, if any) of a loaded file."""
    recorded = None
    if isinstance(content, Mapping):
        if isinstance(content.get("model_spec"), Mapping):  # `vit-search train`'s checkpoint records its model
            recorded = dict(content["model_spec"])
        for wrapper in ("model", "state_dict"):
            if isinstance(content.get(wrapper), Mapping):
                content = content[wrapper]
                break
    if not isinstance(content, Mapping) or not content or not all(isinstance(v, Tensor) for v in content.values()):
        raise WeightsError(f"{path}: holds no state dict (a mapping of names to tensors, bare or under 'model' "
                           f"or 'state_dict')")
    return dict(content), recorded


def _format(state: Mapping[str, Tensor]) -> str:
    """Which library's names a state dict uses: torchvision, timm or vit-search (ours)."""
    if "conv_proj.weight" in state or any(key.startswith("encoder.layers.") for key in state):
        return "torchvision"
    if any(key in state for key in ("pos_embed.weight", "pool.cls_token", "head.fc.weight")) or any(
            ".ffn." in key for key in state):
        return "vit-search"
    if "patch_embed.proj.weight" in state and any(".mlp." in key for key in state):
        return "timm"
    keys = ", ".join(list(state)[:3])
    raise WeightsError(f"not a torchvision, timm or vit-search ViT state dict (its keys begin {keys})")


def _read_file(init: InitSpec, heads: int | None, shapes_only: bool) -> tuple[dict[str, Any], dict[str, Tensor], str]:
    """(full model section, our state dict, what the file is: "timm state dict", ...) of a weights file."""
    path = Path(init.path)
    state, recorded = _unwrap(_load_file(path, shapes_only), path)
    try:
        kind = _format(state)
        if kind == "torchvision":
            dim = state["conv_proj.weight"].shape[0] if "conv_proj.weight" in state else 0
            section = _model_section_from_state_dict(state, _heads_for(dim, heads), None)
            return section, convert_torchvision_state(state), "torchvision state dict"
        if kind == "timm":
            dim = state["patch_embed.proj.weight"].shape[0]
            return (*convert_timm_state(state, {"heads": _heads_for(dim, heads)}), "timm state dict")
        if recorded is not None:
            return _checked_record(recorded, "the model section it records"), state, "vit-search checkpoint"
        return _our_section(state, heads), state, "vit-search state dict"
    except WeightsError as err:
        raise WeightsError(f"{path}: {err}") from None


def _our_section(state: Mapping[str, Tensor], heads: int | None) -> dict[str, Any]:
    """The model section of a bare vit-search state dict, as far as its names and shapes fix it."""
    for key in ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.ffn.fc2.weight", "head.fc.weight"):
        if key not in state:
            raise WeightsError(f"the vit-search state dict has no '{key}'")
    patch = state["patch_embed.proj.weight"]
    if patch.dim() != 4:
        raise WeightsError("a state dict with linear patches does not record the patch size; use the checkpoint "
                           "`vit-search train` writes (runs/NAME/checkpoint.pt), which records its model, or from: mlflow")
    dim, in_channels, patch_h, patch_w = patch.shape
    fc1, hidden = state["blocks.0.ffn.fc1.weight"].shape[0], state["blocks.0.ffn.fc2.weight"].shape[1]
    prefix = 1 if "pool.cls_token" in state else 0
    section: dict[str, Any] = {
        "dim": dim,
        "depth": len({key.split(".")[1] for key in state if key.startswith("blocks.")}),
        "patch_embed": {"type": "conv", "patch_size": patch_h if patch_h == patch_w else [patch_h, patch_w]},
        "attention": {"type": "sdpa", "heads": _heads_for(dim, heads), "qkv_bias": "blocks.0.attn.qkv.bias" in state,
                      "qk_norm": "blocks.0.attn.q_norm.weight" in state},
        "ffn": {"type": "swiglu" if fc1 == 2 * hidden else "mlp", "hidden_dim": hidden},
        "pooling": {"type": "cls" if prefix else "mean"},
        "head": {"type": "linear", "norm": "head.norm.weight" in state},
        "in_channels": in_channels,
        "num_classes": state["head.fc.weight"].shape[0],
        "layer_scale": 1e-5 if "blocks.0.ls1.gamma" in state else None,  # the value only initialises
    }
    if "pos_embed.weight" in state:  # otherwise sincos2d or none: no weights, so the spec's choice
        rows, cols = square_grid(state["pos_embed.weight"].shape[1] - prefix)
        section["position"] = {"type": "learned"}
        section["image_size"] = rows * patch_h if patch_h == patch_w else [rows * patch_h, cols * patch_w]
    return section


def _describe_file(init: InitSpec, heads: int | None) -> Weights:
    section, state, what = _read_file(init, heads, shapes_only=True)
    return _weights(section, state, f"file {init.path} ({what})")


def _fetch_file(init: InitSpec, heads: int | None) -> dict[str, Tensor]:
    return _read_file(init, heads, shapes_only=False)[1]


def _checked_record(recorded: Mapping[str, Any], what: str) -> dict[str, Any]:
    """A recorded vit-search model section, validated (its own init dropped: these weights replace it)."""
    raw = {key: value for key, value in recorded.items() if key != "init"}
    try:
        return ModelSpec.model_validate(raw).model_dump(mode="json", by_alias=True, exclude={"init"})
    except ValueError as err:
        raise WeightsError(f"{what} is not a valid model section here: {_first_line(err)}") from None


# mlflow --------------------------------------------------------------------------------------------------
def _mlflow_artifact(init: InitSpec, name: str, folder: str) -> Path:
    import mlflow

    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=init.run, artifact_path=f"model/{name}", dst_path=folder,
                                                        tracking_uri=init.uri))
    except Exception as err:
        store = init.uri or mlflow.get_tracking_uri()
        raise WeightsError(f"MLflow run '{init.run}' in {store}: no logged model/{name} ({type(err).__name__}: "
                           f"{_first_line(err)}); was tracking.log_model off, or is the run in another store "
                           f"(model.init.uri, MLFLOW_TRACKING_URI)?") from None


def _describe_mlflow(init: InitSpec, heads: int | None) -> Weights:
    import tempfile

    import yaml

    with tempfile.TemporaryDirectory() as folder:
        logged = yaml.safe_load(_mlflow_artifact(init, "spec.yaml", folder).read_text())
    model = logged.get("model") if isinstance(logged, Mapping) else None
    if not isinstance(model, Mapping):
        raise WeightsError(f"MLflow run '{init.run}': its model/spec.yaml has no model section")
    recorded = _checked_record(model, f"MLflow run '{init.run}': its logged model")
    shapes = build_on_meta(ModelSpec.model_validate(recorded)).state_dict()
    return _weights(recorded, shapes, f"mlflow run {init.run} ({init.uri or 'the default tracking store'})")


def _fetch_mlflow(init: InitSpec, heads: int | None) -> dict[str, Tensor]:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = _mlflow_artifact(init, "state_dict.pt", folder)
        state, _ = _unwrap(_load_file(path), path)
        return {name: tensor.clone() for name, tensor in state.items()}  # not mapped: the file goes


READERS: dict[str, _Reader] = {
    "torchvision": _Reader(_describe_torchvision, _fetch_torchvision),
    "timm": _Reader(_describe_timm, _fetch_timm),
    "file": _Reader(_describe_file, _fetch_file),
    "mlflow": _Reader(_describe_mlflow, _fetch_mlflow),
}
assert set(READERS) == set(INIT_SOURCES), "every init source in the table needs its reader here"


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


__all__ = ["OFFLINE_ENV", "READERS", "Weights", "build_model", "describe", "fetch", "fit_problems", "fit_state",
           "heads_written", "init_report", "load_init_weights", "merge_onto_weights", "prepare"]

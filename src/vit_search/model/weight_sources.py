"""How each source named by ``model.init`` is read: torchvision, timm, a weights file, an MLflow run.

Each source has two readers (:data:`READERS`): one that says what its weights fix about the model
(:class:`Weights`) without reading the tensors or using the network, and one that fetches the tensors
under our parameter names, downloading torchvision and timm weights into torch's cache where they are
missing and allowed (``VIT_SEARCH_OFFLINE``). :mod:`vit_search.model.pretrained` composes a spec with
them and copies them into a model. Adding a source is an entry in :mod:`vit_search.init_sources` and
its two readers here.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from pydantic import ValidationError
from torch import Tensor

from ..errors import WeightsError
from ..files import host_problem, symlink_loop
from ..init_sources import INIT_SOURCES
from ..presets import HEADS_BY_DIM
from ..redaction import redact
from ..registry import KINDS
from ..schema import InitSpec, ModelSpec
from ..sizes import pair
from .resample import square_grid
from .timm_weights import convert_timm_state, timm_guesses, timm_module_facts
from .vit import build_on_meta
from .weights import _model_section_from_state_dict, convert_torchvision_state, torchvision_module_facts

OFFLINE_ENV = "VIT_SEARCH_OFFLINE"
"""Set to 1 to never download weights: a source that is not cached is an error saying where to put it."""

# Keys the data decides (the weights are fitted to them), and keys only training reads.
DATA_KEYS = ("image_size", "in_channels", "num_classes")
TRAINING_ONLY = ("drop_path_rate", "pos_dropout")
# Block arguments that no weight depends on: dropouts, and the spread of a fresh initialisation.
FREE_ARGS = ("attn_dropout", "proj_dropout", "dropout", "std")


@dataclass(frozen=True)
class Weights:
    """What a source's weights fix about the model, read without reading the weights."""

    section: dict[str, Any]  # model keys the weights fix, in our spec's terms (no data keys)
    in_channels: int
    num_classes: int
    grid: tuple[int, int] | None  # the learned position embedding's patch grid (None: none, or unknown)
    shapes: dict[str, tuple[int, ...]] = field(repr=False)  # our parameter name -> shape
    origin: str  # where they come from, for people: "timm vit_small_patch16_224 (cached at ...)"
    # Section keys the weights do not record, filled with their library's defaults (a timm state dict's
    # activation, epsilon): a spec may set them, as it may what a bare vit-search state dict leaves out.
    guessed: tuple[tuple[str, ...], ...] = ()


@dataclass(frozen=True)
class Reader:
    """How one init source is described (offline) and fetched (tensors under our names)."""

    describe: Callable[[InitSpec, int | None], Weights]
    fetch: Callable[[InitSpec, int | None], dict[str, Tensor]]


def _offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _heads_for(dim: int, heads: int | None) -> int:
    """The heads of a state dict of width ``dim``: the spec's, else the paper's for that width."""
    found = heads or HEADS_BY_DIM.get(dim)
    if found is None:
        raise WeightsError(f"the weights do not record the number of heads, and width {dim} is none of the "
                           f"paper's ({', '.join(map(str, sorted(HEADS_BY_DIM)))}); set model.attention.heads")
    return found


def _weights(section: dict[str, Any], state: Mapping[str, Tensor], origin: str,
             guessed: tuple[tuple[str, ...], ...] = ()) -> Weights:
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
    return Weights(section, int(in_channels), int(num_classes), grid, shapes, origin, guessed)


def hub_checkpoints() -> Path:
    """torch.hub's checkpoint folder, where torchvision's downloads go (timm's files by hand under timm/)."""
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
    return hub_checkpoints() / os.path.basename(member.url)


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
    unreachable = host_problem(url)  # a firewall that drops packets would hold torch's download for ever
    if unreachable:
        raise WeightsError(f"cannot download {url} ({unreachable}); {where}")
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
    return [hub_checkpoints() / "timm" / f"{name}{suffix}" for suffix in _TIMM_SUFFIXES]


def _timm_url(timm: Any, name: str) -> str:
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is not None and cfg.hf_hub_id:
        from huggingface_hub import constants

        # The Hub's address as huggingface_hub reaches it (HF_ENDPOINT sets a mirror).
        return f"{constants.ENDPOINT}/{cfg.hf_hub_id}/resolve/main/{cfg.hf_hub_filename or 'model.safetensors'}"
    return getattr(cfg, "url", None) or "timm's model card"


def timm_in_hub_cache(name: str) -> Path | None:
    """timm model ``name``'s weights as an earlier download left them in Hugging Face's cache, or None
    (also when timm is not installed)."""
    try:
        import timm

        return _in_hub_cache(timm, name)
    except (ImportError, RuntimeError):  # no timm, or a tag timm lacks: the description says so
        return None


def _in_hub_cache(timm: Any, name: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not cfg.hf_hub_id:
        return None
    for filename in (cfg.hf_hub_filename, "model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(cfg.hf_hub_id, filename) if filename else None
        if isinstance(found, str):
            return Path(found)
    return None


def _timm_from_file(timm: Any, name: str, path: Path) -> Any:
    """timm's ``name`` with its weights read from ``path``: timm filters them as it does its own
    downloads (the tag's custom loader is for Google's .npz files, which this file is not)."""
    overlay = {"file": str(path), "custom_load": False}
    try:
        return _timm_module(timm, name, pretrained=True, pretrained_cfg_overlay=overlay)
    except WeightsError:
        raise
    except Exception as err:
        raise WeightsError(f"{path}: timm cannot load it as {name}'s weights: {type(err).__name__}: "
                           f"{_first_line(err)}") from None


def _timm_module(timm: Any, name: str, **kwargs: Any) -> Any:
    try:
        return timm.create_model(name, **kwargs)
    except RuntimeError as err:
        if "Invalid pretrained tag" in str(err):  # a known architecture, a weights tag timm does not have
            base, tag = name.split(".", 1)
            tags = [known.split(".", 1)[1] for known in timm.list_pretrained(f"{base}.*")]
            raise WeightsError(f"timm's {base} has no pretrained tag '{tag}'; its tags: {', '.join(tags) or 'none'}"
                               f" (name it as {base}.TAG, or {base} for timm's default)") from None
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
    cached = next((path for path in _timm_files(init.name) if path.is_file()), None) or _in_hub_cache(timm, init.name)
    where = f"cached at {cached}" if cached else "not cached: downloaded through timm on first use"
    return _weights(section, ours, f"timm {init.name} ({where})")


def _fetch_timm(init: InitSpec, heads: int | None) -> dict[str, Tensor]:
    timm = _timm()
    files = _timm_files(init.name)
    cached = next((path for path in files if path.is_file()), None)
    if cached is not None:
        module = _timm_from_file(timm, init.name, cached)
    else:
        module = _timm_downloaded(timm, init.name, files[0])
    _, ours = convert_timm_state(module.state_dict(), timm_module_facts(module))
    return ours


def _timm_downloaded(timm: Any, name: str, put_at: Path) -> Any:
    """timm's ``name`` with the weights timm downloads, or those an earlier download left in Hugging
    Face's cache when the Hub cannot be reached; WeightsError (where to put the file) when neither."""
    url = _timm_url(timm, name)
    where = f"put the file at {put_at} (download it from {url})"
    if _offline():
        raise WeightsError(f"the timm weights {name} are not cached and {OFFLINE_ENV} is set: {where}")
    # Without a network, Hugging Face's client retries each of timm's file names for about 47 s before
    # it looks in its cache: here the cache is read at once, or the line said at once.
    unreachable = host_problem(url) if url.startswith(("http://", "https://")) else None
    if unreachable:
        in_cache = _in_hub_cache(timm, name)
        if in_cache is None:
            raise WeightsError(f"cannot download the timm weights {name} ({unreachable}); {where}")
        return _timm_from_file(timm, name, in_cache)
    try:
        return _timm_module(timm, name, pretrained=True)
    except WeightsError:
        raise
    except Exception as err:
        raise WeightsError(f"cannot download the timm weights {name} ({type(err).__name__}: "
                           f"{_first_line(err)}); {where}") from None


# file ----------------------------------------------------------------------------------------------------
def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0][:300]


# A spec that starts from a train run's checkpoint is often run before that run, or from another folder.
_CHECKPOINT_HINT = (" (`vit-search train` writes runs/NAME/checkpoint.pt under the folder it runs in, or in its "
                    "--checkpoint-dir: train that spec first, or point the path at where it wrote it)")
_SAVE_STATE = "save the state dict alone: torch.save(model.state_dict(), PATH)"
_GLOBAL = re.compile(r"GLOBAL ((?:\w+\.)+\w+)")  # torch's "unsupported GLOBAL argparse.Namespace"


def _load_file(path: Path, shapes_only: bool = False) -> Any:
    """A weights file as torch.load(weights_only=True) reads it (mapped, not read, where the format
    allows), or a safetensors file; WeightsError for anything else."""
    if not path.is_file():
        if symlink_loop(path):
            raise WeightsError(f"{path}: its symbolic links form a loop; point the path at the weights file itself")
        if path.is_dir():
            raise WeightsError(f"{path}: is a folder, not a weights file; name the file in it")
        if path.exists():
            raise WeightsError(f"{path}: is not a regular file (a device, a pipe or a socket); name a weights file")
        # A spec's relative paths are made absolute (from its folder) before they get here: only the
        # Python API passes a relative one, read from the working folder.
        if path.is_absolute():
            raise WeightsError(f"{path}: no such file; check the path" + _CHECKPOINT_HINT * (path.name == "checkpoint.pt"))
        raise WeightsError(f"{path}: no such file in {Path.cwd()} (in a spec, a relative path is read from the spec's folder)")
    if _size(path) == 0:  # torch says nothing (an EOFError without text), safetensors "header too small"
        raise WeightsError(f"{path}: is empty (0 bytes): it was never written, or cut off; copy it again, or {_SAVE_STATE}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as handle:
                if shapes_only:
                    return {k: torch.empty(handle.get_slice(k).get_shape(), device="meta") for k in handle.keys()}
                return {k: handle.get_tensor(k) for k in handle.keys()}
        except Exception as err:
            raise WeightsError(f"{path}: not a safetensors file, or a truncated one ({_first_line(err)}); copy it again, "
                               f"or save it with safetensors.torch.save_file") from None
    try:
        # torch warns of pickle protocols it does not expect (pickle.dump's files): the error line says it all
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:
                if "mmap" not in str(err):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)  # the legacy format maps not
    except Exception as err:  # torch's own text suggests weights_only=False, which could run any code in the file
        raise WeightsError(f"{path}: {_unreadable(path, err)}") from None


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:  # gone since it was checked: reading it says so
        return None


def _unreadable(path: Path, err: BaseException) -> str:
    """What a file that torch.load(weights_only=True) refused is, and the way out, from its first bytes and
    the error (never torch's advice to load it unsafely)."""
    if isinstance(err, OSError):  # no permission, gone since it was checked, a disk error
        return f"cannot be read ({err.strerror or type(err).__name__}); check the path and its permissions"
    found = _GLOBAL.search(str(err)) if isinstance(err, pickle.UnpicklingError) else None
    if found:  # a training script's checkpoint: its args (argparse.Namespace), a whole model, numpy scalars
        return (f"holds Python objects other than tensors (the first: {found.group(1)}), which are not loaded "
                f"(loading them could run any code); {_SAVE_STATE}")
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
    except OSError as cannot:
        return f"cannot be read ({cannot.strerror or type(cannot).__name__}); check the path and its permissions"
    again = f"copy it again, or {_SAVE_STATE}"
    if head.startswith(b"PK\x03\x04"):  # torch.save's zip archive
        return f"a torch.save archive that is truncated or damaged; {again}"
    if head[:1] == b"\x80" and len(head) > 1 and head[1] >= 3:  # torch.save's legacy format is protocol 2
        return (f"a pickle written by pickle.dump (or another tool), not torch.save: torch.load(weights_only=True) "
                f"reads only torch.save's tensors; {_SAVE_STATE}")
    if head[:1] == b"\x80":
        return f"a torch.save file (the legacy format) that is truncated or damaged; {again}"
    return (f"not a torch or safetensors file (it begins {head[:12]!r}); name a file written by torch.save, "
            f"or a safetensors file (its name ending in .safetensors)")


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


def _read_file(init: InitSpec, heads: int | None, shapes_only: bool
               ) -> tuple[dict[str, Any], dict[str, Tensor], str, tuple[tuple[str, ...], ...]]:
    """(full model section, our state dict, what the file is: "timm state dict", ..., the section keys
    guessed: see :attr:`Weights.guessed`) of a weights file."""
    path = Path(init.path)
    state, recorded = _unwrap(_load_file(path, shapes_only), path)
    try:
        kind = _format(state)
        if kind == "torchvision":
            dim = state["conv_proj.weight"].shape[0] if "conv_proj.weight" in state else 0
            section = _model_section_from_state_dict(state, _heads_for(dim, heads), None)
            return section, convert_torchvision_state(state), "torchvision state dict", ()
        if kind == "timm":
            dim = state["patch_embed.proj.weight"].shape[0]
            facts = {"heads": _heads_for(dim, heads)}
            return (*convert_timm_state(state, facts), "timm state dict", timm_guesses(facts))
        if recorded is not None:
            return _checked_record(recorded, "the model section it records"), state, "vit-search checkpoint", ()
        return _our_section(state, heads), state, "vit-search state dict", ()
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
    section, state, what, guessed = _read_file(init, heads, shapes_only=True)
    return _weights(section, state, f"file {init.path} ({what})", guessed)


def _fetch_file(init: InitSpec, heads: int | None) -> dict[str, Tensor]:
    return _read_file(init, heads, shapes_only=False)[1]


def _checked_record(recorded: Mapping[str, Any], what: str) -> dict[str, Any]:
    """A recorded vit-search model section, validated (its own init dropped: these weights replace it)."""
    raw = {key: value for key, value in recorded.items() if key != "init"}
    try:
        return ModelSpec.model_validate(raw).model_dump(mode="json", by_alias=True, exclude={"init"})
    except ValidationError as err:  # pydantic's first line says only how many errors: name the first
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "model"
        raise WeightsError(f"{what} is not a valid model section here: model.{where}: {first['msg']} "
                           f"(got {repr(first.get('input'))[:60]})") from None
    except ValueError as err:
        raise WeightsError(f"{what} is not a valid model section here: {_first_line(err)}") from None


# mlflow --------------------------------------------------------------------------------------------------
def _check_run_store(init: InitSpec) -> None:
    """Refuse, quickly, a store that cannot hold the run: MLflow would retry one that does not answer for
    minutes, and make a SQLite file that is not there (``validate`` writes nothing)."""
    import mlflow

    from ..tracking_store import bound_http_retries, source_store_problem

    bound_http_retries()  # the artifacts' own requests, once the server answers
    problem = source_store_problem(init.uri or mlflow.get_tracking_uri())
    if problem:
        raise WeightsError(f"MLflow run '{init.run}': {problem}; name the store it was logged to in model.init.uri "
                           f"(or MLFLOW_TRACKING_URI), or start it if it is a server")


def _mlflow_artifact(init: InitSpec, name: str, folder: str) -> Path:
    import mlflow

    _check_run_store(init)
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=init.run, artifact_path=f"model/{name}", dst_path=folder,
                                                        tracking_uri=init.uri))
    except Exception as err:
        store = redact(init.uri or mlflow.get_tracking_uri())
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
    return _weights(recorded, shapes, f"mlflow run {init.run} ({redact(init.uri) if init.uri else 'the default tracking store'})")


def _fetch_mlflow(init: InitSpec, heads: int | None) -> dict[str, Tensor]:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = _mlflow_artifact(init, "state_dict.pt", folder)
        state, _ = _unwrap(_load_file(path), path)
        return {name: tensor.clone() for name, tensor in state.items()}  # not mapped: the file goes


READERS: dict[str, Reader] = {
    "torchvision": Reader(_describe_torchvision, _fetch_torchvision),
    "timm": Reader(_describe_timm, _fetch_timm),
    "file": Reader(_describe_file, _fetch_file),
    "mlflow": Reader(_describe_mlflow, _fetch_mlflow),
}
assert set(READERS) == set(INIT_SOURCES), "every init source in the table needs its reader here"

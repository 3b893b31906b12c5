"""YAML -> validated :class:`Spec`: errors name the file, the line and the field path.

A spec is loaded with ``yaml.safe_load``, overridden with ``--set a.b=value`` pairs, validated by
pydantic, then checked against the block registry (unknown blocks and arguments) and built once on
torch's meta device, so impossible shapes (dim not divisible by heads, image not divisible by patch)
fail here, before anything runs or is written.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from .registry import KINDS, REGISTRY, Registry, RegistryError, did_you_mean

Size = Union[int, tuple[int, int]]

# Channels and classes of the built-in data sets (imagefolder and synthetic are read from the spec).
DATASETS: dict[str, tuple[int, int] | None] = {
    "digits": (1, 10),
    "mnist": (1, 10),
    "fashion_mnist": (1, 10),
    "cifar10": (3, 10),
    "cifar100": (3, 100),
    "imagefolder": None,
    "synthetic": None,
}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AugmentSpec(_Section):
    """Training-time augmentation (torchvision.transforms.v2), applied in batches."""

    random_crop_padding: int = Field(0, ge=0, description="pad then randomly crop back (0: off)")
    hflip: bool = Field(False, description="random horizontal flip (not for digits or text-like data)")
    randaugment: bool = Field(False, description="RandAugment with torchvision's defaults")
    mixup_alpha: float = Field(0.0, ge=0, description="MixUp's Beta(alpha, alpha) (0: off)")
    cutmix_alpha: float = Field(0.0, ge=0, description="CutMix's Beta(alpha, alpha) (0: off)")
    randaugment_chunk: int = Field(
        16, gt=0, description="tensor-held sets: images sharing one RandAugment draw (1: per image, slowest)"
    )


class DataSpec(_Section):
    """Where images come from and how they are split and transformed."""

    dataset: Literal["digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "imagefolder", "synthetic"] = "digits"
    image_size: Size = Field(16, description="images are resized to this (int or [height, width])")
    root: str | None = Field(None, description="data directory (torchvision sets, imagefolder)")
    download: bool = Field(False, description="let torchvision download a missing data set")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="share of the training data held out for validation")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="share held out for test where no test split exists")
    channels: int = Field(3, gt=0, description="synthetic: image channels")
    num_classes: int = Field(10, gt=1, description="synthetic: number of classes")
    num_samples: int = Field(1024, gt=0, description="synthetic: number of images before splitting")
    augment: AugmentSpec = Field(default_factory=AugmentSpec)
    normalize: bool = Field(True, description="standardise with the training set's per-channel mean and std")
    on_device: Literal["auto", "yes", "no"] = Field(
        "auto", description="hold the whole set as tensors on the training device (auto: small sets)"
    )
    max_on_device_mb: float = Field(
        2048, gt=0, description="on_device auto: hold as tensors when the float32 images take at most this many MB"
    )
    num_workers: int = Field(2, ge=0, description="DataLoader workers for large sets")

    @field_validator("image_size")
    @classmethod
    def _positive_size(cls, value: Size) -> Size:
        sizes = (value,) if isinstance(value, int) else value
        if any(s <= 0 for s in sizes):
            raise ValueError(f"image_size must be positive, got {value}")
        return value

    @model_validator(mode="after")
    def _dataset_readable(self) -> "DataSpec":
        dataset_shape(self)  # an imagefolder without class folders fails here, at data
        return self


BlockSpec = dict[str, Any]


def _block(default_type: str) -> Any:
    return Field(default_factory=lambda: {"type": default_type})


class ModelSpec(_Section):
    """The ViT: sizes, one block spec per kind (``{type: name, **arguments}``), regularisation."""

    preset: str | None = Field(None, description="start from a named preset (vit_b_16, ...) and override")
    dim: int = Field(64, gt=0, description="token width D")
    depth: int = Field(4, gt=0, description="number of encoder blocks")
    patch_embed: BlockSpec = _block("conv")
    position: BlockSpec = _block("learned")
    attention: BlockSpec = _block("sdpa")
    ffn: BlockSpec = _block("mlp")
    pooling: BlockSpec = _block("cls")
    head: BlockSpec = _block("linear")
    drop_path_rate: float = Field(0.0, ge=0, lt=1, description="stochastic depth at the last block (linear ramp)")
    layer_scale: float | None = Field(None, gt=0, description="LayerScale initial value (None: off)")
    pos_dropout: float = Field(0.0, ge=0, lt=1, description="dropout after the position embedding")
    norm_eps: float = Field(1e-6, gt=0, description="LayerNorm epsilon")
    image_size: Size | None = Field(None, description="derived from data.image_size")
    in_channels: int | None = Field(None, gt=0, description="derived from the data set")
    num_classes: int | None = Field(None, gt=0, description="derived from the data set")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, raw: Any) -> Any:
        if not isinstance(raw, Mapping) or not raw.get("preset"):
            return raw
        from .model import PRESETS

        name = raw["preset"]
        if name not in PRESETS:
            raise ValueError(f"unknown preset '{name}'{did_you_mean(name, PRESETS) or ';'} presets: {', '.join(PRESETS)}")
        merged = copy.deepcopy(PRESETS[name])
        for key, value in raw.items():
            base = merged.get(key)
            # A block of the same type keeps the preset's arguments; another type starts afresh.
            if isinstance(base, dict) and isinstance(value, Mapping) and value.get("type", base["type"]) == base["type"]:
                merged[key] = {**base, **value}
            else:
                merged[key] = value
        return merged

    @field_validator(*KINDS, mode="before")
    @classmethod
    def _block_spec(cls, value: Any) -> Any:
        if isinstance(value, str):  # `attention: sdpa` is short for `attention: {type: sdpa}`
            return {"type": value}
        if not isinstance(value, Mapping) or not isinstance(value.get("type"), str):
            raise ValueError("a block is a mapping with a 'type' naming a registered block, e.g. {type: sdpa}")
        return dict(value)

    def block(self, kind: str) -> tuple[str, dict[str, Any]]:
        """The (type, own arguments) of the block of ``kind``."""
        spec = dict(getattr(self, kind))
        return spec.pop("type"), spec


class TrainSpec(_Section):
    """Optimisation: AdamW with cosine schedule and linear warmup, through Accelerate."""

    epochs: int = Field(10, gt=0)
    batch_size: int = Field(128, gt=0, description="per process")
    lr: float = Field(1e-3, gt=0, description="peak learning rate")
    min_lr: float = Field(0.0, ge=0, description="learning rate at the end of the cosine")
    weight_decay: float = Field(0.05, ge=0, description="decoupled; not applied to norms, biases and tokens")
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_epochs: float = Field(1.0, ge=0, description="linear warmup length, in epochs")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    grad_clip: float | None = Field(1.0, gt=0, description="max global gradient norm (None: off)")
    grad_accum_steps: int = Field(1, gt=0)
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field(
        "auto", description="auto: bf16 on GPUs that support it, fp32 elsewhere"
    )
    tf32: bool = Field(True, description="fp32 matmuls on TF32 tensor cores (CUDA only)")
    fused_optimizer: bool = Field(True, description="fused AdamW kernel (CUDA only)")
    activation_checkpointing: bool = Field(False, description="recompute encoder blocks in backward: less memory")
    peak_tflops: float | None = Field(None, gt=0, description="device peak for MFU (default: known GPUs)")
    compile: bool = Field(False, description="torch.compile the model")
    cpu: bool = Field(False, description="train on the CPU even where a GPU is present")
    checkpoint_dir: str | None = Field(None, description="where epoch checkpoints go (default runs/<name>)")


Direction = Literal["maximize", "minimize"]
# Objectives: per-epoch validation metrics, or model size. Never a test metric: the test split
# takes no part in search decisions.
Objective = Literal["val_accuracy", "val_loss", "train_loss", "parameters", "flops"]


class SearchSpec(_Section):
    """The Optuna study; only ``vit-search run`` reads it."""

    n_trials: int | None = Field(20, gt=0, description="trials in the whole study, all workers together")
    timeout: float | None = Field(None, gt=0, description="seconds after which a worker starts no new trial")
    metric: Objective | list[Objective] = Field("val_accuracy", description="objective(s) of the study")
    direction: Direction | list[Direction] = "maximize"
    sampler: Literal["tpe", "random", "grid", "cmaes", "gp", "nsga2"] = "tpe"
    pruner: Literal["hyperband", "median", "successive_halving", "none"] = "hyperband"
    storage: str | None = Field(None, description="Optuna storage URL or journal file (default: optuna.db)")
    study_name: str | None = Field(None, description="default: the spec's name")
    space: dict[str, Any] = Field(default_factory=dict, description="dotted path -> {choice|int|float: ...}")
    constraints: dict[Literal["max_params", "min_params", "max_flops", "min_flops"], float] = Field(
        default_factory=dict, description="trials outside these bounds are pruned before training"
    )
    enqueue: list[dict[str, Any]] = Field(default_factory=list, description="configurations tried first")
    heartbeat_seconds: float = Field(10.0, gt=0, description="how often a running trial says it is alive")
    grace_seconds: float = Field(60.0, gt=0, description="silence after which a trial's worker counts as dead")

    @model_validator(mode="after")
    def _objectives_match(self) -> "SearchSpec":
        metrics = [self.metric] if isinstance(self.metric, str) else self.metric
        directions = [self.direction] if isinstance(self.direction, str) else self.direction
        if len(metrics) != len(directions):
            raise ValueError(f"{len(metrics)} metric(s) but {len(directions)} direction(s); give one direction each")
        if self.grace_seconds < 2 * self.heartbeat_seconds:
            # A late beat or two must not get a live worker's trial failed and trained twice.
            raise ValueError(f"grace_seconds {self.grace_seconds:g} is less than twice heartbeat_seconds "
                             f"{self.heartbeat_seconds:g}; raise grace_seconds or lower heartbeat_seconds")
        return self


class TrackingSpec(_Section):
    """MLflow: where runs go (MLFLOW_TRACKING_URI wins over ``uri``) and what is logged."""

    experiment: str | None = Field(None, description="MLflow experiment (default: the spec's name)")
    uri: str | None = Field(None, description="tracking URI (default: MLFLOW_TRACKING_URI, else MLflow's own)")
    enabled: bool = True
    log_model: bool = Field(True, description="log the trained weights as an artifact")
    plots: bool = Field(True, description="a study's parent run gets Optuna's plots (PNG)")


class Spec(_Section):
    """A whole experiment: data, model, training, and optionally a search."""

    name: str = Field(min_length=1)
    seed: int = 0
    plugins: list[str] = Field(default_factory=list, description="modules or .py files registering blocks")
    data: DataSpec = Field(default_factory=DataSpec)
    model: ModelSpec = Field(default_factory=ModelSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    search: SearchSpec | None = None
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)

    _source: str | None = PrivateAttr(None)
    _raw: dict[str, Any] = PrivateAttr(default_factory=dict)
    _where: Any = PrivateAttr(None)

    @model_validator(mode="after")
    def _derive(self) -> "Spec":
        channels, classes = dataset_shape(self.data)
        model = self.model
        if model.image_size is None:
            model.image_size = self.data.image_size
        if model.in_channels is None:
            model.in_channels = channels
        if model.num_classes is None:
            model.num_classes = classes
        return self

    @property
    def raw(self) -> dict[str, Any]:
        """The spec as written (overrides applied), before defaults and derived values."""
        return copy.deepcopy(self._raw)

    def locate(self, path: tuple[str, ...]) -> str:
        """Where a field path was written: ``file:line``, a ``--set`` flag, or the file name."""
        return self._where(path) if self._where else "<spec>"

    @property
    def source(self) -> str | None:
        """The file this spec was loaded from, if any."""
        return self._source

    def to_dict(self, exclude_search: bool = False) -> dict[str, Any]:
        """The resolved spec as plain data (what a YAML file would hold)."""
        data = self.model_dump(mode="json", exclude={"search"} if exclude_search else None)
        if data.get("search") is None:
            data.pop("search", None)
        return data

    def to_yaml(self, exclude_search: bool = False) -> str:
        """The resolved spec as YAML; loading it gives the same spec."""
        return yaml.safe_dump(self.to_dict(exclude_search), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """Every resolved value under its dotted path (``model.attention.type``), search excluded."""
        return flatten(self.to_dict(exclude_search=True))


def dataset_shape(data: DataSpec) -> tuple[int, int]:
    """(channels, classes) of the configured data set."""
    if data.dataset == "synthetic":
        return data.channels, data.num_classes
    if data.dataset == "imagefolder":
        root = Path(data.root or ".")
        train = root / "train" if (root / "train").is_dir() else root
        classes = [p for p in train.iterdir() if p.is_dir()] if train.is_dir() else []
        if not classes:
            raise ValueError(f"data.root '{root}' has no class folders; imagefolder expects root/<class>/<image>")
        return 3, len(classes)
    shape = DATASETS[data.dataset]
    assert shape is not None
    return shape


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> {"a.b.c": value}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, path + "."))
        else:
            flat[path] = value
    return flat


# -- errors -------------------------------------------------------------------------------------
class SpecError(ValueError):
    """An invalid spec: one line per problem, each naming file:line and the field path."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


class _Locator:
    """Maps a field path to where it came from: a file line, or a ``--set`` override."""

    def __init__(self, source: str, lines: dict[tuple[str, ...], int], overrides: Iterable[str]):
        self.source = source
        self.lines = lines
        self.overrides = {tuple(o.split("=", 1)[0].strip().split(".")): o for o in overrides}

    def __call__(self, path: tuple[str, ...]) -> str:
        for key, item in self.overrides.items():
            if key[: len(path)] == path and path:  # an override inside the failing field
                return f"--set {item}"
        for n in range(len(path), -1, -1):
            if path[:n] in self.overrides:
                return f"--set {self.overrides[path[:n]]}"
            if path[:n] in self.lines:
                return f"{self.source}:{self.lines[path[:n]]}"
        return self.source


def _line_map(text: str) -> dict[tuple[str, ...], int]:
    """Field path -> 1-based line of its key, from the YAML node tree."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                sub = path + (str(key.value),)
                lines[sub] = key.start_mark.line + 1
                walk(value, sub)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[path + (str(i),)] = item.start_mark.line + 1
                walk(item, path + (str(i),))

    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if root is not None:
        lines[()] = 1
        walk(root, ())
    return lines


def _fields_at(loc: tuple[str, ...]) -> list[str]:
    """The field names a pydantic model accepts at ``loc`` (for did-you-mean on unknown keys)."""
    cls: Any = Spec
    for part in loc:
        fields = getattr(cls, "model_fields", None)
        if not fields or part not in fields:
            return []
        cls = fields[part].annotation
        while get_origin(cls) in (Union, getattr(__import__("types"), "UnionType", Union)):
            cls = next((a for a in get_args(cls) if a is not type(None)), cls)
    return list(getattr(cls, "model_fields", {}))


def _pydantic_problems(err: ValidationError, where: _Locator) -> list[str]:
    problems = []
    for e in err.errors():
        loc = tuple(str(p) for p in e["loc"] if not str(p).startswith("function-"))
        # Union members show up as extra loc parts ("int", "tuple[int, int]"): keep the field path.
        loc = tuple(p for p in loc if not p.startswith(("int", "tuple[", "str", "float", "list[", "dict[")))
        path = ".".join(loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            known = _fields_at(loc[:-1])
            hint = did_you_mean(loc[-1], known) or (f"; allowed: {', '.join(known)}" if known else "")
            message = f"unknown key '{loc[-1]}'{hint}"
        elif e["type"] == "missing":
            message = "required field is missing"
        else:
            message = e["msg"].removeprefix("Value error, ")
            if e["type"] not in ("value_error", "assertion_error") and "input" in e:
                message += f" (got {e['input']!r})"
        problems.append(f"{where(loc)}: {path}: {message}")
    return problems


# -- loading ------------------------------------------------------------------------------------
def parse_override(item: str) -> tuple[list[str], Any]:
    """``"model.depth=6"`` -> (["model", "depth"], 6); the value is read as YAML."""
    if "=" not in item:
        raise SpecError([f"--set {item}: expected PATH=VALUE, e.g. --set model.depth=6"])
    path, value = item.split("=", 1)
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        raise SpecError([f"--set {item}: the value is not valid YAML"]) from None
    return path.strip().split("."), parsed


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """A copy of ``raw`` with each ``PATH=VALUE`` override set (intermediate mappings created)."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        keys, value = parse_override(item)
        node = raw
        for key in keys[:-1]:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[keys[-1]] = value
    return raw


def load_spec(
    source: str | os.PathLike[str] | Mapping[str, Any],
    overrides: Iterable[str] = (),
    registry: Registry = REGISTRY,
    check_model: bool = True,
) -> Spec:
    """Load, override and validate a spec from a YAML file path or a mapping.

    Plugins listed in the spec are imported (relative paths resolve against the spec's folder).
    With ``check_model``, the model is built on the meta device to catch impossible shapes.
    Raises :class:`SpecError` listing every problem found.
    """
    overrides = list(overrides)
    if isinstance(source, Mapping):
        raw, name, lines, base_dir = dict(source), "<spec>", {}, Path.cwd()
    else:
        path = Path(source)
        name, base_dir = str(path), path.parent
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise SpecError([f"{name}: no such file; check the path"]) from None
        except (IsADirectoryError, PermissionError, UnicodeDecodeError) as err:
            raise SpecError([f"{name}: cannot read the spec: {err}"]) from None
        try:
            raw = yaml.safe_load(text)
            lines = _line_map(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"{name}:{mark.line + 1}" if mark else name
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise SpecError([f"{where}: YAML syntax error: {problem}"]) from None
        if raw is None:
            raise SpecError([f"{name}: the file is empty; a spec needs at least 'name:' (see experiments/)"])
        if not isinstance(raw, dict):
            raise SpecError([f"{name}:1: a spec is a mapping of keys (name, data, model, ...), got {type(raw).__name__}"])
    where = _Locator(name, lines, overrides)
    raw = apply_overrides(raw, overrides)
    registry.list()  # built-ins and installed plugins first: their failure is not this spec's

    if isinstance(raw.get("plugins"), list):  # file paths made absolute: the raw spec loads from anywhere
        raw["plugins"] = [_absolute_plugin(p, base_dir) for p in raw["plugins"]]
    # Plugins first: they may register the blocks the model section names.
    for i, plugin in enumerate(raw.get("plugins") or []):
        try:
            registry.load_plugin(str(plugin), base_dir)
        except RegistryError as err:
            raise SpecError([f"{where(('plugins', str(i)))}: plugins.{i}: {err.message}"]) from None

    try:
        spec = Spec.model_validate(raw)
    except ValidationError as err:
        raise SpecError(_pydantic_problems(err, where)) from None
    spec._source = None if isinstance(source, Mapping) else str(source)
    spec._raw = raw
    spec._where = where

    problems = check_blocks(spec.model, registry, where)
    if not problems and check_model:
        problems = _check_build(spec.model, registry, where)
    if problems:
        raise SpecError(problems)
    return spec


def _absolute_plugin(plugin: Any, base_dir: Path) -> Any:
    """A plugin file path relative to the spec's folder, made absolute (module names stay)."""
    if isinstance(plugin, str) and (plugin.endswith(".py") or "/" in plugin) and not Path(plugin).is_absolute():
        candidate = Path(base_dir) / plugin
        if candidate.is_file():
            return str(candidate.resolve())
    return plugin


def check_blocks(model: ModelSpec, registry: Registry, where: _Locator | None = None) -> list[str]:
    """Every block named in ``model`` exists and gets only arguments its signature accepts."""
    where = where or _Locator("<spec>", {}, ())
    problems = []
    for kind in KINDS:
        name, kwargs = model.block(kind)
        try:
            registry.check_args(kind, name, kwargs, f"model.{kind}")
        except RegistryError as err:
            path = tuple((err.path or f"model.{kind}").split("."))
            if err.message.startswith("unknown "):  # unknown block: point at its type key
                path = ("model", kind, "type")
            problems.append(f"{where(path)}: {'.'.join(path)}: {err.message}")
    return problems


def _check_build(model: ModelSpec, registry: Registry, where: _Locator) -> list[str]:
    import torch

    from .model import build_model

    try:
        with torch.device("meta"):
            build_model(model, registry=registry)
    except RegistryError as err:
        path = tuple((err.path or "model").split("."))
        return [f"{where(path)}: {err.message}"]
    except Exception as err:  # a plugin block failing in its own way: still one line, not a traceback
        return [f"{where(('model',))}: model: building it failed: {type(err).__name__}: {err}"]
    return []

"""The spec's schema: every section and key, its type, default and check, as pydantic models.

Names that must agree with an implementation come from that implementation's table: block kinds
from :data:`~vit_search.registry.KINDS`, data sets from :data:`~vit_search.data.sources.DATASETS`,
samplers and pruners from :mod:`~vit_search.search.samplers`, presets from
:mod:`~vit_search.presets`, init sources from :data:`~vit_search.init_sources.INIT_SOURCES`.
Loading YAML into these models, with errors located in the file, and composing a model section with
the weights ``model.init`` names, is :mod:`~vit_search.spec`'s job. Nothing here imports torch.
"""

from __future__ import annotations

import copy
import functools
import os
from typing import Annotated, Any, Literal, Mapping

import yaml
from pydantic import (
    BaseModel, ConfigDict, Field, PrivateAttr, TypeAdapter, ValidationError, ValidationInfo, create_model,
    field_validator, model_serializer, model_validator,
)

from .data.sources import DATASETS
from .init_sources import INIT_KEYS, INIT_SOURCES
from .presets import PRESETS
from .redaction import redact
from .registry import KINDS, did_you_mean
from .search.samplers import PRUNERS, SAMPLERS
from .sizes import Size, pair


MAX_IMAGE_SIDE = 8192  # pixels: beyond any ViT, and bounded so that no size estimate overflows
MAX_NAME = 100  # characters of a name that is also a folder (runs/<name>/): well below a file system's 255 bytes
MAX_SEED = 2**32 - 1  # what numpy's and torch's generators take
MAX_TAG_KEY, MAX_TAG_VALUE = 250, 5000  # an MLflow tag's key, and what of its value we keep (as error tags)


def folder_name(value: str) -> str:
    """``value`` if it can name a folder of its own (runs/<name>/): one path component, printable, short."""
    if value in (".", ".."):
        raise ValueError(f"'{value}' would name the folder above or this one (runs/{value}); "
                         "give a word, e.g. digits-vit")
    if value != value.strip():  # `name: "  "`, or a folder `runs/digits /` that looks like runs/digits/
        raise ValueError(f"{_clip_name(value)!r} " + ("is only spaces" if not value.strip() else "starts or ends with a space")
                         + "; give a word, e.g. digits-vit")
    if "/" in value or "\\" in value:
        raise ValueError(f"'{_clip_name(value)}' names a folder under runs/ and cannot hold '/' or '\\'; "
                         "use '-' or '_' instead")
    if "'" in value and '"' in value:
        raise ValueError(f"{_clip_name(value)!r} holds both kinds of quote, which no MLflow search of its runs can "
                         "quote; drop one kind")
    if any(not ch.isprintable() for ch in value):
        raise ValueError(f"{_clip_name(value)!r} holds a control character (a tab, newline, ...); "
                         "use letters, digits, '-', '_' and '.'")
    if len(value) > MAX_NAME or len(value.encode()) > 2 * MAX_NAME:
        raise ValueError(f"{len(value)} characters, more than the {MAX_NAME} a folder name under runs/ "
                         "may have; shorten it")
    return value


def _clip_name(value: str) -> str:
    return value if len(value) <= 60 else f"{value[:59]}…"


class _Section(BaseModel):
    # No infinities or NaNs: a learning rate of .inf validates, then trains to NaN.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_yes_no_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # YAML reads `yes` and `true` as booleans, which pydantic's lax mode takes as 1 for a number.
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(value, bool) and not _takes(annotation, True):
            text = str(value).lower()
            if _takes(annotation, 1):
                raise ValueError(f"{text} is a yes/no value; write a number")
            if _takes(annotation, text):
                raise ValueError(f"{text} is a yes/no value; quote it ('{text}') to mean the text")
            raise ValueError(f"{text} is a yes/no value; write a value of the type docs/spec.md gives")
        return value


def _takes(annotation: Any, value: Any) -> bool:
    try:
        _adapter(annotation).validate_python(value, strict=True)
    except ValidationError:
        return False
    return True


@functools.lru_cache(maxsize=None)  # every yes/no key of every trial's spec asks: build each adapter once
def _adapter(annotation: Any) -> TypeAdapter:
    return TypeAdapter(annotation)


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

    dataset: Literal[tuple(DATASETS)] = "digits"  # type: ignore[valid-type]
    image_size: Size = Field(16, description="images are resized to this (int or [height, width])")
    root: str | None = Field(None, description="data directory (torchvision sets, imagefolder)")
    download: bool = Field(False, description="let torchvision download a missing data set")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="share of the training data held out for validation")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="share held out for test where no test split exists")
    channels: int = Field(3, gt=0, le=64, description="synthetic: image channels")
    num_classes: int = Field(10, gt=1, le=1_000_000, description="synthetic: number of classes")
    num_samples: int = Field(1024, gt=0, le=10_000_000, description="synthetic: number of images before splitting")
    augment: AugmentSpec = Field(default_factory=AugmentSpec)
    normalize: bool = Field(True, description="standardise with the training set's per-channel mean and std")
    on_device: Literal["auto", "yes", "no"] = Field(
        "auto", description="hold the whole set as tensors on the training device (auto: small sets)"
    )
    max_on_device_mb: float = Field(
        2048, gt=0, description="on_device auto: hold as tensors when the float32 images take at most this many MB"
    )
    num_workers: int = Field(2, ge=0, description="DataLoader workers for large sets")
    cache: str = Field(
        "auto", min_length=1, max_length=4096,
        description="decoded uint8 cache: auto (where the set is not held as float32 tensors), off, or its folder",
    )

    @field_validator("on_device", "cache", mode="before")
    @classmethod
    def _yes_no_as_written(cls, value: Any, info: ValidationInfo) -> Any:
        # YAML reads the documented `cache: off` and `on_device: no` (or yes) as booleans: take them as written.
        if isinstance(value, bool):
            return ("yes" if value else "no") if info.field_name == "on_device" else ("auto" if value else "off")
        return value

    @field_validator("image_size")
    @classmethod
    def _positive_size(cls, value: Size) -> Size:
        sizes = (value,) if isinstance(value, int) else value
        if any(s <= 0 or s > MAX_IMAGE_SIDE for s in sizes):
            raise ValueError(f"image_size must be between 1 and {MAX_IMAGE_SIDE} pixels a side, got {value}")
        return value

    @model_validator(mode="after")
    def _dataset_readable(self) -> "DataSpec":
        side = self.image_size if isinstance(self.image_size, int) else max(self.image_size)
        padding = self.augment.random_crop_padding
        if padding > side:  # the batch is padded whole: time and memory would grow as the padding squared
            raise ValueError(f"augment.random_crop_padding {padding} is more than the image side {side}; a few pixels "
                             f"(2 to 4 at 16-32 px) is what random crops need")
        channels, _ = dataset_shape(self)  # an imagefolder without class folders fails here, at data
        if self.augment.randaugment and channels not in (1, 3):  # torchvision's RandAugment takes grey or RGB only
            raise ValueError(f"data.augment.randaugment needs 1 or 3 channels, the data has {channels}")
        return self


BlockSpec = dict[str, Any]
LAYER_KINDS = ("attention", "ffn")  # the kinds each encoder layer has its own block of


def with_preset(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A raw model section with its preset filled in: the preset's section, with what ``raw`` sets on
    top (a block of the same type keeps the preset's arguments; another type starts afresh)."""
    name = raw.get("preset")
    if not name:
        return dict(raw)
    if name not in PRESETS:
        raise ValueError(f"unknown preset '{name}'{did_you_mean(name, PRESETS) or ';'} presets: {', '.join(PRESETS)}")
    merged = copy.deepcopy(PRESETS[name])
    for key, value in raw.items():
        base = merged.get(key)
        if isinstance(base, dict) and isinstance(value, Mapping) and value.get("type", base["type"]) == base["type"]:
            merged[key] = {**base, **value}
        else:
            merged[key] = value
    return merged


def block_type(raw_model: Any, kind: str) -> Any:
    """The type of the ``kind`` block in a raw model section: as written (``{type: mlp}`` or ``mlp``),
    else its preset's, else (left out, or written without a type) the kind's default. The one resolver
    the schema and the search share."""
    raw = raw_model if isinstance(raw_model, Mapping) else {}
    try:
        raw = with_preset(raw)
    except ValueError:  # an unknown preset: reported by the schema, not here
        pass
    block = raw.get(kind, {})
    return block.get("type", KINDS[kind].default) if isinstance(block, Mapping) else block


class InitSpec(_Section):
    """Where the model's starting weights come from (``model.init``); the model section is taken from them."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    source: Literal[tuple(INIT_SOURCES)] = Field(  # type: ignore[valid-type]
        alias="from", description="torchvision, timm, file or mlflow"
    )
    name: str | None = Field(None, min_length=1, description="torchvision, timm: the model's name")
    weights: str | None = Field(None, min_length=1, description="torchvision: the weights enum's member")
    path: str | None = Field(None, min_length=1, description="file: a state dict or checkpoint (relative: to the spec)")
    run: str | None = Field(None, min_length=1, description="mlflow: the run id of a run or trial")
    uri: str | None = Field(None, min_length=1, description="mlflow: the run's tracking store (default: this spec's)")

    @model_validator(mode="after")
    def _keys_of_the_source(self) -> "InitSpec":
        entry = INIT_SOURCES[self.source]
        given = {key for key in INIT_KEYS if getattr(self, key) is not None}
        missing = [key for key in entry.required if key not in given]
        extra = sorted(given - set(entry.required) - set(entry.optional))
        if missing or extra:
            takes = ", ".join(entry.required + entry.optional)
            wrong = f"missing {', '.join(missing)}" if missing else f"'{extra[0]}' is not one of its keys"
            raise ValueError(f"from {self.source} takes {takes}: {wrong}; e.g. {entry.example}")
        return self

    @model_serializer(mode="wrap")
    def _only_the_keys_given(self, handler: Any) -> dict[str, Any]:
        # Each source takes a few of the keys: the others are left out of the YAML and the params.
        return {key: value for key, value in handler(self).items() if value is not None}


class _ModelSizes(_Section):
    init: InitSpec | None = Field(None, description="start from these weights; the model section is taken from them")
    preset: str | None = Field(None, description="start from a named preset (vit_b_16, ...) and override")
    dim: int = Field(64, gt=0, le=65_536, description="token width D")
    depth: int = Field(4, gt=0, le=1024, description="number of encoder blocks")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, raw: Any) -> Any:
        if not isinstance(raw, Mapping):
            return raw
        raw = with_preset(raw)
        for kind in KINDS:  # `attention: {heads: 4}`: the default block with 4 heads (a preset's is filled in above)
            if isinstance(raw.get(kind), Mapping) and "type" not in raw[kind]:
                raw[kind] = {"type": KINDS[kind].default, **raw[kind]}
        return raw

    @field_validator(*KINDS, mode="before", check_fields=False)
    @classmethod
    def _block_spec(cls, value: Any) -> Any:
        if isinstance(value, str):  # `attention: sdpa` is short for `attention: {type: sdpa}`
            return {"type": value}
        if not isinstance(value, Mapping) or not isinstance(value.get("type"), str):
            raise ValueError("a block is a mapping with a 'type' naming a registered block, e.g. {type: sdpa}")
        return dict(value)


# One field per block kind, in the order of KINDS, each defaulting to the kind's default block.
_ModelBlocks: Any = create_model("_ModelBlocks", __base__=_ModelSizes, **{
    name: (BlockSpec, Field(default_factory=lambda kind=kind: {"type": kind.default},
                            description=f"{name} block: {kind.role}"))
    for name, kind in KINDS.items()
})


class ModelSpec(_ModelBlocks):
    """The ViT: sizes, one block spec per kind (``{type: name, **arguments}``), regularisation."""

    drop_path_rate: float = Field(0.0, ge=0, lt=1, description="stochastic depth at the last block (linear ramp)")
    layer_scale: float | None = Field(None, gt=0, description="LayerScale initial value (None: off)")
    pos_dropout: float = Field(0.0, ge=0, lt=1, description="dropout after the position embedding")
    norm_eps: float = Field(1e-6, gt=0, description="LayerNorm epsilon")
    image_size: Size | None = Field(None, description="derived from data.image_size")
    in_channels: int | None = Field(None, gt=0, description="derived from the data set")
    num_classes: int | None = Field(None, gt=0, description="derived from the data set")
    layers: dict[int, dict[Literal[LAYER_KINDS], dict[str, Any]]] = Field(  # type: ignore[valid-type]
        default_factory=dict, description="per encoder layer (0-based): own arguments of its attention or ffn "
                                          "over the model's, e.g. {0: {attention: {heads: 2}}}")

    @model_validator(mode="after")
    def _layers_exist(self) -> "ModelSpec":
        for index, blocks in self.layers.items():
            if not 0 <= index < self.depth:
                raise ValueError(f"layers.{index}: there is no layer {index} in a model of depth {self.depth} "
                                 f"(layers are numbered 0 to {self.depth - 1}); remove it or raise depth")
            for kind, args in blocks.items():
                if "type" in args:
                    raise ValueError(f"layers.{index}.{kind}: a layer sets its block's arguments, not its type; "
                                     f"remove 'type' (model.{kind}.type is every layer's)")
        return self

    @model_serializer(mode="wrap")
    def _layers_only_when_set(self, handler: Any) -> dict[str, Any]:
        # Most models set no layer of their own: their YAML, params and exports stay as they were.
        data = handler(self)
        if not data.get("layers"):
            data.pop("layers", None)
        return data

    def block(self, kind: str) -> tuple[str, dict[str, Any]]:
        """The (type, own arguments) of the block of ``kind``."""
        spec = dict(getattr(self, kind))
        return spec.pop("type"), spec

    def layer_block(self, kind: str, index: int) -> tuple[str, dict[str, Any]]:
        """The (type, own arguments) of layer ``index``'s ``kind`` block: the model's, with the layer's on top."""
        name, args = self.block(kind)
        return name, {**args, **self.layers.get(index, {}).get(kind, {})}


class TrainSpec(_Section):
    """Optimisation: AdamW with cosine schedule and linear warmup, through Accelerate."""

    epochs: int = Field(10, gt=0, le=1_000_000)
    batch_size: int = Field(128, gt=0, le=1_048_576, description="per process")
    lr: float = Field(1e-3, gt=0, description="peak learning rate")
    min_lr: float = Field(0.0, ge=0, description="learning rate at the end of the cosine")
    weight_decay: float = Field(0.05, ge=0, description="decoupled; not applied to norms, biases and tokens")
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = Field(
        (0.9, 0.999), description="AdamW's (beta1, beta2), each in [0, 1)"
    )
    warmup_epochs: float = Field(1.0, ge=0, description="linear warmup length, in epochs")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    grad_clip: float | None = Field(1.0, gt=0, description="max global gradient norm (None: off)")
    grad_accum_steps: int = Field(1, gt=0, le=65_536)
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field(
        "auto", description="auto: bf16 on GPUs that support it, fp32 elsewhere"
    )
    tf32: bool = Field(True, description="fp32 matmuls on TF32 tensor cores (CUDA only)")
    fused_optimizer: bool = Field(True, description="fused AdamW kernel (CUDA only)")
    activation_checkpointing: bool = Field(False, description="recompute encoder blocks in backward: less memory")
    peak_tflops: float | None = Field(None, gt=0, description="device peak for MFU (default: known GPUs)")
    compile: bool = Field(False, description="torch.compile the model")
    cuda_graph: bool = Field(True, description="capture each training step as one CUDA graph where it applies "
                                               "(CUDA, data on the device, fp32/bf16, no accumulation)")
    eval_batch_size: int | None = Field(None, gt=0, description="batch size for validation and test (default: "
                                                                  "4 x batch_size; no gradients are kept)")
    cpu: bool = Field(False, description="train on the CPU even where a GPU is present")
    checkpoint_dir: str | None = Field(None, description="where epoch checkpoints go (default runs/<name>)")
    layer_decay: float | None = Field(
        None, gt=0, le=1, description="layer-wise lr decay: the head at lr, each block below it scaled by this (None: off)"
    )
    freeze: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list, description="parameter-name patterns (fnmatch) left untrained, e.g. patch_embed.*"
    )

    @field_validator("checkpoint_dir")
    @classmethod
    def _home_expanded(cls, value: str | None) -> str | None:
        # `~/x` is the home's, as data.root's is, for every reader of the value (train, a study's trials, a supernet):
        # never a folder named `~` in the working directory, which `rm -rf ~` would then "clean up".
        return os.path.expanduser(value) if value else value


Direction = Literal["maximize", "minimize"]
# Objectives: per-epoch validation metrics, or model size. Never a test metric: the test split
# takes no part in search decisions.
Objective = Literal["val_accuracy", "val_loss", "train_loss", "parameters", "flops"]


class SupernetSpec(_Section):
    """``search.strategy: supernet``: one weight-sharing supernet, its subnets scored, finalists trained."""

    epochs: int | None = Field(None, gt=0, le=1_000_000, description="phase 1: supernet epochs (default train.epochs)")
    random_subnets: int = Field(1, ge=0, le=64, description="phase 1, sandwich rule: random subnets per step "
                                                            "besides the largest and the smallest")
    n_subnets: int = Field(200, gt=0, le=10_000_000, description="phase 2: subnets Optuna scores with inherited "
                                                                 "weights (all workers together)")
    finalists: int = Field(3, ge=0, le=1000, description="phase 3: best subnets trained as ordinary trials")
    finalists_init: Literal["scratch", "inherited"] = Field(
        "scratch", description="phase 3: finalists start from fresh weights or from the supernet's slices")
    top_runs: int = Field(10, ge=0, le=1000, description="phase 2: best scored subnets logged as child runs "
                                                         "(all of them go to one table artifact)")


class SearchSpec(_Section):
    """The Optuna study; only ``vit-search run`` reads it."""

    strategy: Literal["trials", "supernet"] = Field(
        "trials", description="trials: each trial trained from scratch; supernet: weight-sharing one-shot search")
    supernet: SupernetSpec = Field(default_factory=SupernetSpec, description="settings of strategy: supernet")

    n_trials: int | None = Field(20, gt=0, description="trials in the whole study, all workers together")
    timeout: float | None = Field(None, gt=0, description="seconds after which a worker starts no new trial")
    metric: Objective | list[Objective] = Field("val_accuracy", description="objective(s) of the study")
    direction: Direction | list[Direction] = "maximize"
    sampler: Literal[tuple(SAMPLERS)] = "tpe"  # type: ignore[valid-type]
    pruner: Literal[tuple(PRUNERS)] = "hyperband"  # type: ignore[valid-type]
    storage: str | None = Field(None, description="Optuna storage URL or journal file (default: optuna.db)")
    study_name: str | None = Field(None, min_length=1, description="default: the spec's name")
    space: dict[str, Any] = Field(default_factory=dict, description="dotted path -> {choice|int|float: ...}")
    constraints: dict[Literal["max_params", "min_params", "max_flops", "min_flops"], float] = Field(
        default_factory=dict, description="trials outside these bounds are pruned before training"
    )
    enqueue: list[dict[str, Any]] = Field(default_factory=list, description="configurations tried first")
    # At most a day: beyond that, no worker would ever be found dead (and the heartbeat thread's wait
    # overflows the platform's time_t near 1e300).
    heartbeat_seconds: float = Field(10.0, gt=0, le=86400, description="how often a running trial says it is alive")
    grace_seconds: float = Field(60.0, gt=0, le=86400, description="silence after which a trial's worker counts as dead")

    @field_validator("study_name")
    @classmethod
    def _study_name_is_a_folder(cls, value: str | None) -> str | None:
        # Checkpoints go to runs/<study_name>/; the study of a supernet's subnets is '<study_name>:subnets'.
        if value is not None:
            folder_name(value.removesuffix(":subnets"))
        return value

    @field_validator("constraints")
    @classmethod
    def _bounds_in_order(cls, value: dict[str, float]) -> dict[str, float]:
        for key, bound in value.items():
            if bound < 0 or (key.startswith("max_") and bound == 0):
                raise ValueError(f"{key} {bound:g} is no size a model can have, so every trial would be pruned; give a "
                                 f"positive bound, or leave {key} out")
        for what in ("params", "flops"):
            low, high = value.get(f"min_{what}"), value.get(f"max_{what}")
            if low is not None and high is not None and low > high:
                raise ValueError(f"min_{what} {low:g} is above max_{what} {high:g}, so every trial would be pruned; "
                                 f"lower min_{what} or raise max_{what}")
        return value

    @model_validator(mode="after")
    def _objectives_match(self) -> "SearchSpec":
        metrics = [self.metric] if isinstance(self.metric, str) else self.metric
        directions = [self.direction] if isinstance(self.direction, str) else self.direction
        if not metrics:
            raise ValueError("metric: [] names no objective; give a metric (val_accuracy, by default) or leave it out")
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
    tags: dict[str, str] = Field(default_factory=dict, description="MLflow tags on the run (a study's: on every run)")

    @field_validator("tags")
    @classmethod
    def _tags_mlflow_takes(cls, value: dict[str, str]) -> dict[str, str]:
        for key, text in value.items():
            if not key.strip() or len(key) > MAX_TAG_KEY:
                raise ValueError(f"tag key {key[:40]!r}: give 1 to {MAX_TAG_KEY} characters (MLflow's limit)")
            if key.startswith("mlflow."):
                raise ValueError(f"tag key {key[:40]!r}: mlflow.* tags are MLflow's own; choose another name")
            if len(text) > MAX_TAG_VALUE:
                raise ValueError(f"tag {key[:40]!r}: {len(text):,} characters, more than the {MAX_TAG_VALUE:,} MLflow "
                                 f"keeps; shorten it")
        return value


class Spec(_Section):
    """A whole experiment: data, model, training, and optionally a search."""

    name: str = Field(min_length=1, description="names the run, and its folder runs/<name>/")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seeds every random generator")
    plugins: list[str] = Field(default_factory=list, description="modules or .py files registering blocks")
    data: DataSpec = Field(default_factory=DataSpec)
    model: ModelSpec = Field(default_factory=ModelSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    search: SearchSpec | None = None
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)

    _source: str | None = PrivateAttr(None)
    _raw: dict[str, Any] = PrivateAttr(default_factory=dict)
    _where: Any = PrivateAttr(None)

    @field_validator("name")
    @classmethod
    def _name_is_a_folder(cls, value: str) -> str:
        return folder_name(value)

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
        elif model.num_classes < classes:  # a label past the head's outputs would end training in a traceback
            raise ValueError(f"model.num_classes {model.num_classes} is fewer than the {classes} classes of the data "
                             f"({self.data.dataset}); leave model.num_classes out to take it from the data")
        if pair(model.image_size) != pair(self.data.image_size):  # the position embedding would meet another grid
            raise ValueError(f"model.image_size {model.image_size} is not data.image_size {self.data.image_size}, the size "
                             f"the model sees; leave model.image_size out to take it from the data")
        if model.in_channels != channels:  # the patch embedding would meet other images than it was built for
            raise ValueError(f"model.in_channels {model.in_channels} is not the {channels} channel(s) of the data "
                             f"({self.data.dataset}); leave model.in_channels out to take it from the data")
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
        """The resolved spec as plain data (what a YAML file would hold), passwords in URLs as ``***``:
        what is written of a spec (artifacts, exports) never carries a secret."""
        data = self.model_dump(mode="json", by_alias=True, exclude={"search"} if exclude_search else None)
        data["model"] = model_record(self.model)
        if data.get("search") is None:
            data.pop("search", None)
        elif data["search"].get("storage"):
            data["search"]["storage"] = redact(data["search"]["storage"])
        if data["tracking"].get("uri"):
            data["tracking"]["uri"] = redact(data["tracking"]["uri"])
        return data

    def to_yaml(self, exclude_search: bool = False) -> str:
        """The resolved spec as YAML; loading it gives the same spec."""
        return yaml.safe_dump(self.to_dict(exclude_search), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """Every resolved value under its dotted path (``model.attention.type``), search excluded."""
        return flatten(self.to_dict(exclude_search=True))


def model_record(model: ModelSpec) -> dict[str, Any]:
    """The model section as written out (a spec's artifacts and exports, a checkpoint's record), without
    the password of ``model.init.uri``: that URI is left out, and a spec loaded again takes it from
    ``MLFLOW_TRACKING_URI`` (or ``tracking.uri``), where it came from unless the spec wrote it."""
    data = model.model_dump(mode="json", by_alias=True)
    init = data.get("init")
    if isinstance(init, dict) and isinstance(init.get("uri"), str) and redact(init["uri"]) != init["uri"]:
        del init["uri"]
    return data


def dataset_shape(data: DataSpec) -> tuple[int, int]:
    """(channels, classes) of the configured data set, without reading its images."""
    return DATASETS[data.dataset].shape(data)


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


def set_path(tree: dict[str, Any], path: tuple[str, ...] | list[str], value: Any) -> None:
    """Set ``tree[a][b]... = value``, creating mappings (a block given by name becomes {type: name}).

    A list on the way is indexed by position (``train.betas.0``); an index it does not have raises
    ValueError, as a mapping in its place would no longer be the list the field needs."""
    node: Any = tree
    for depth, key in enumerate(path):
        slot: Any = key
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                have = f"a list of {len(node)}: give a position from 0 to {len(node) - 1}, not {key!r}," if node else \
                    f"an empty list, with no position {key!r}:"
                raise ValueError(f"{'.'.join(path[:depth])} is {have} or set the whole list")
            slot = int(key)
        if depth == len(path) - 1:
            node[slot] = value
            return
        child = node[slot] if isinstance(node, list) else node.get(key)
        if isinstance(child, str):  # `ffn: mlp` written short
            child = {"type": child}
        if not isinstance(child, (dict, list)):
            child = {}
        node[slot] = child
        node = child

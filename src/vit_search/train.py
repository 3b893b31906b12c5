"""One training run of a Spec through Hugging Face Accelerate, logged to MLflow.

Accelerate does device placement, mixed precision, gradient accumulation, data sharding across
processes and metric gathering; this module only says what to train and in what order.
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
import sys
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .data.batches import DeviceBatches
from .data.loading import DataSplits, load_data, make_loader
from .errors import CheckpointMismatch, DataError, UserError
from .finetune import frozen, lr_scale
from .model import build_model, build_on_meta, count_parameters
from .model.cost import model_cost
from .performance import (
    RunSeconds, cpu_only, enable_tf32, fused_attention_kernel, mfu, peak_memory_mb, peak_tflops,
    resolve_mixed_precision,
)
from .checkpoints import (
    CHECKPOINT_FILE, CheckpointWriter, TrainingFailed, check_resume_settings, check_resume_spec, check_writable,
    checkpoint_dir_of, load_checkpoint, resume_settings, rng_state, set_rng_state, spec_record,
)
from .schema import Spec, model_record
from .stopping import interruption
from .tracking import Tracker, check_resumable, finished_metrics, mark_run
from .train_step import CAPTURE_GATE, EagerStep, GraphedStep, device_learning_rates, graph_blocker

EpochCallback = Callable[[int, dict[str, float]], None]
# (model, optimizer, scheduler, criterion, grad_clip, accelerator) -> step(images, labels, sync) -> loss:
# a training step of the caller's own, such as the supernet's sandwich step.
StepFactory = Callable[..., Callable[..., torch.Tensor]]
# Held while Accelerate builds an Accelerator or prepares a run: its process-wide state is shared by
# trials packed into threads, and around each kwargs handler it empties os.environ and puts it back,
# which two threads at once would leave empty.
_ACCELERATE_STATE = threading.Lock()
# DDP warns once per process when a gradient's strides differ from its bucket's only in a dimension
# of size 1 (the patch embedding's weight on 1-channel images): the memory layout is the same, so
# the warning is spurious (pytorch/pytorch#47163). Strides that really differ still warn.
warnings.filterwarnings("ignore", r"Grad strides do not match bucket view strides(?s:.)*grad\.sizes\(\) = "
                                  r"\[(?:\d+, )*1(?:, \d+)*\]")


class TrainingDiverged(TrainingFailed):
    """The loss became NaN or infinite."""


class TrainingOutOfMemory(TrainingFailed):
    """An allocation failed: the model, its optimizer state or a batch does not fit the device."""


class LaunchBroken(TrainingFailed):
    """Another process of the ``accelerate launch`` went away mid-run (killed, out of memory): no collective of
    this one can finish. ``what`` says so without the way on, which a study's and a run's differ in."""

    def __init__(self, what: str, fix: str) -> None:
        super().__init__(f"{what}; {fix}")
        self.what = what


def peer_lost(err: BaseException) -> bool:
    """Whether ``err`` is a collective that failed because another process of the launch went away."""
    import torch.distributed

    if isinstance(err, LaunchBroken):
        return True
    text = str(err)
    return isinstance(err, getattr(torch.distributed, "DistBackendError", ())) or (
        isinstance(err, RuntimeError) and any(word in text for word in (
            "Connection reset by peer", "Connection closed by peer", "Broken pipe", "NCCL communicator was aborted")))


@contextlib.contextmanager
def _peer_loss_in_one_line(num_processes: int) -> Iterator[None]:
    """A collective broken by a lost peer, raised as LaunchBroken (the backend's text: a source path, a port,
    "GLHF"), so that the run's error tag and the line say what happened."""
    try:
        yield
    except Exception as err:
        if num_processes > 1 and not isinstance(err, LaunchBroken) and peer_lost(err):
            raise LaunchBroken("another process of the launch stopped (its connection to this one was lost)",
                               "run the same command with --resume to go on") from err
        raise


@contextlib.contextmanager
def _out_of_memory_in_one_line(device: torch.device) -> Iterator[None]:
    """A failed allocation (the GPU's memory, or the host's) ends the run in one line, with what to
    lower, and lets go of the tensors the failed step held, so that a study's next trial has them."""
    try:
        yield
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as err:
        said = str(err).strip()
        if not isinstance(err, (torch.OutOfMemoryError, MemoryError)) \
                and "can't allocate memory" not in said and "out of memory" not in said.lower():
            raise
        traceback.clear_frames(err.__traceback__)  # their locals hold the failed step's tensors
        said = re.sub(r"^\[enforce fail at [^\]]*\] err == 0\. ", "", said.splitlines()[0] if said else "")
        raise TrainingOutOfMemory(
            f"out of memory on {device}: {said[:240] or type(err).__name__}; lower train.batch_size or the model's "
            f"size (dim, depth, mlp ratio), or set train.mixed_precision") from None


def _check_model_fits(spec: Spec, device: torch.device) -> None:
    """Refuse (one line, exit 2) a model whose weights alone outgrow the device's whole memory, before
    anything is allocated: on the CPU it would take the host's memory a gigabyte at a time until the
    kernel's OOM killer ended the process. (Training needs about four times the weights: a model that
    fits its weights but not the rest fails at its first allocation, in one line, exit 1.)"""
    total = _memory_of(device)
    if total is None:
        return
    parameters = count_parameters(build_on_meta(spec.model))  # not model_cost: no FLOPs counted through Python
    need = parameters * 4  # fp32
    if need > total:
        raise UserError(f"model: {parameters:,} parameters need {need / 2**30:,.1f} GiB for their weights alone, more "
                        f"than the {total / 2**30:,.1f} GiB of {device}; lower model.dim, model.depth or the blocks' "
                        f"sizes", settings=("model",))


def _memory_of(device: torch.device) -> int | None:
    """The whole memory of ``device`` in bytes: a GPU's, or the host's RAM for the CPU (None: unknown)."""
    import os

    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):  # not a POSIX system that says
            return None
    return None


@dataclass
class TrainResult:
    """What a run produced: final metrics, per-epoch history, model size, MLflow run id."""

    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    parameters: int = 0
    flops: int = 0
    run_id: str | None = None
    train_seconds: float = 0.0
    trainable_parameters: int = 0
    seconds: RunSeconds = field(default_factory=RunSeconds)  # where the run's wall time went, phase by phase
    already_finished: bool = False  # resumed after its end: read back from its run, nothing trained or logged


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float | None = None) -> list[dict[str, Any]]:
    """AdamW groups: decay on weight matrices only; not on 1-D parameters (norm scales, biases), nor on
    what the model's blocks declare in ``no_weight_decay()`` (tokens, position embeddings, a plugin's own).
    Frozen parameters (``requires_grad`` off) are left out.

    With ``layer_decay``, each layer gets its own pair of groups, whose ``lr_scale`` is
    ``layer_decay ** (depth + 1 - layer)`` (:func:`~vit_search.finetune.lr_scale`): the head at the
    full rate, each block below at ``layer_decay`` times the one above. Without, one pair at scale 1.
    """
    declared = model.no_weight_decay() if callable(getattr(model, "no_weight_decay", None)) else set()
    depth = len(getattr(model, "blocks", ()))
    groups: dict[tuple[float, bool], dict[str, Any]] = {}
    if layer_decay is None:  # the two groups exist even when one is empty, in this order
        groups = {(1.0, True): {"params": [], "weight_decay": weight_decay, "lr_scale": 1.0},
                  (1.0, False): {"params": [], "weight_decay": 0.0, "lr_scale": 1.0}}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = not (param.ndim <= 1 or name in declared)
        scale = lr_scale(name, depth, layer_decay)
        group = groups.setdefault((scale, decay), {"params": [], "weight_decay": weight_decay if decay else 0.0,
                                                   "lr_scale": scale})
        group["params"].append(param)
    return list(groups.values())


def freeze(model: nn.Module, patterns: list[str]) -> int:
    """Turn off the gradients of the parameters that ``patterns`` match (``train.freeze``); returns
    the number of trainable parameters left."""
    names = frozen([name for name, _ in model.named_parameters()], patterns)
    for name, param in model.named_parameters():
        if name in names:
            param.requires_grad_(False)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float) -> Callable[[int], float]:
    """Learning-rate factor: linear warmup to 1, then cosine down to ``min_ratio``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


@dataclass
class _Setup:
    """Everything a run trains with, prepared by Accelerate."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loaders: dict[str, Any]
    augment: Any
    criterion: nn.Module
    parameters: int
    flops: int
    graph_blocker: str | None  # why the step cannot be a CUDA graph (None: it can)
    trainable: int
    step: Callable[..., torch.Tensor] | None = None  # made once the state is final
    data_tags: dict[str, str] = field(default_factory=dict)  # where the images were read from


def _setup(spec: Spec, accelerator: Any, precision: str, init_weights: bool = True,
           data: DataSplits | None = None) -> _Setup:
    from accelerate.utils import set_seed

    cfg = spec.train
    if data is None:
        data = load_data(spec.data, spec.seed, device=accelerator.device)
    # Whatever the data path drew from the generators (an image folder decoded without the cache did), the
    # model's initial weights and the training's draws come from the seed alone: data.cache says how fast.
    with CAPTURE_GATE.shared():  # reseeds the CUDA generator: not while a packed neighbour captures
        set_seed(spec.seed)
    model = build_model(spec, init_weights=init_weights)  # a resumed run's weights come from its checkpoint
    parameters, flops = model_cost(spec.model)
    trainable = freeze(model, cfg.freeze)
    model.set_grad_checkpointing(cfg.activation_checkpointing)
    blocker = graph_blocker(accelerator.device, data.on_device, precision, cfg, accelerator.num_processes) \
        if cfg.cuda_graph else "train.cuda_graph is false"
    fused = cfg.fused_optimizer and accelerator.device.type == "cuda"
    groups = param_groups(model, cfg.weight_decay, cfg.layer_decay)
    for group in groups:  # the schedule scales each group's own rate, so the layers' ratios hold
        group["lr"] = cfg.lr * group["lr_scale"]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fused, capturable=blocker is None)
    if blocker is None:
        device_learning_rates(optimizer)
    workers = 0 if data.on_device else spec.data.num_workers
    shard = {"rank": accelerator.process_index, "num_processes": accelerator.num_processes}
    eval_batch = cfg.eval_batch_size or 4 * cfg.batch_size
    loaders = {
        "train": make_loader(data.train, cfg.batch_size, shuffle=True, seed=spec.seed, num_workers=workers,
                             drop_last=True, **shard),
        "val": make_loader(data.val, eval_batch, shuffle=False, seed=spec.seed, num_workers=workers, **shard),
        "test": make_loader(data.test, eval_batch, shuffle=False, seed=spec.seed, num_workers=workers, **shard),
    }
    # Accelerate shards DataLoaders; device-held splits are drawn and sharded on the device already.
    to_prepare = [name for name, loader in loaders.items() if not isinstance(loader, DeviceBatches)]
    with _ACCELERATE_STATE:
        model, optimizer, *prepared = accelerator.prepare(model, optimizer, *(loaders[name] for name in to_prepare))
    loaders.update(zip(to_prepare, prepared))
    if len(loaders["train"]) == 0:  # drop_last: not one full batch per process
        raise _no_full_batch(cfg.batch_size, accelerator.num_processes, len(data.train))
    if cfg.compile:
        model = torch.compile(model)
    # Stepped by us once per optimizer step on every process (not prepared: Accelerate would step
    # it once per process per step). Accelerate steps at every accumulation boundary and at the end
    # of the epoch.
    steps_per_epoch = math.ceil(len(loaders["train"]) / cfg.grad_accum_steps)
    # On the AdamW inside Accelerate's wrapper: that is what a captured step steps (and the
    # scheduler checks that something stepped before it).
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        getattr(optimizer, "optimizer", optimizer),
        warmup_cosine(steps_per_epoch * cfg.epochs, round(steps_per_epoch * cfg.warmup_epochs), cfg.min_lr / cfg.lr),
    )
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    data_tags = {} if data.cache is None else {  # the decoded cache: where, how large
        "data_cache": str(data.cache.folder), "data_cache_bytes": str(data.cache.nbytes),
        "data_cache_read": "batches" if not data.on_device else "filled the tensors"}
    return _Setup(model, optimizer, scheduler, loaders, data.augment, criterion, parameters, flops, blocker, trainable,
                  data_tags=data_tags)


def _no_full_batch(batch_size: int, processes: int, images: int) -> DataError:
    return DataError(f"train.batch_size {batch_size} x {processes} process(es) is more than the {images} training "
                     "images: not one full batch; lower train.batch_size", settings=("data", "train.batch_size"))


def _make_step(spec: Spec, run: _Setup, accelerator: Any, make_step: StepFactory | None = None) -> str:
    """Give ``run`` its step, captured as a CUDA graph where it can be; returns the ``cuda_graph`` tag.

    Called once the weights, optimizer state and random state are final (a resumed run's loaded):
    a graph keeps the addresses of the tensors it was captured with.
    """
    if make_step is not None:  # the caller's step (several forward passes a step): never captured
        run.step = make_step(run.model, run.optimizer, run.scheduler, run.criterion, spec.train.grad_clip, accelerator)
        return "off: a step of the caller's own"
    eager = EagerStep(run.model, run.optimizer, run.scheduler, run.criterion, spec.train.grad_clip, accelerator)
    run.step = eager
    if run.graph_blocker is not None:
        return f"off: {run.graph_blocker}"
    optimizer = getattr(run.optimizer, "optimizer", run.optimizer)  # Accelerate's wrapper holds the AdamW
    try:
        # The shapes, without drawing the run's numbers; no packed neighbour draws while the state is swapped.
        with CAPTURE_GATE.exclusive(), torch.random.fork_rng(devices=[accelerator.device]):
            images, labels = next(iter(run.loaders["train"]))
            if run.augment.enabled:
                images, labels = run.augment(images, labels)
            run.step = GraphedStep(run.model, optimizer, run.scheduler, run.criterion, spec.train.grad_clip,
                                   images, labels)
    except (RuntimeError, torch.cuda.OutOfMemoryError) as err:  # capture failed: the eager step it is
        return f"off: capture failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
    return "on"


def train(
    spec: Spec,
    on_epoch: EpochCallback | None = None,
    resume: bool = False,
    checkpoint_dir: str | Path | None = None,
    parent_run_id: str | None = None,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
    progress: bool = True,
    stop: threading.Event | None = None,
    make_step: StepFactory | None = None,
    run_id: str | None = None,
    seconds: RunSeconds | None = None,
    on_run_start: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train and evaluate ``spec``; returns final val and test metrics.

    ``on_epoch(epoch, metrics)`` runs after each epoch's validation on the main process (the
    search uses it to report and prune; an exception it raises ends the run). ``stop``, once set,
    ends the run at the next step as Ctrl-C would (KeyboardInterrupt): how a worker stops the
    trials it trains in other threads. ``make_step`` replaces the training step (see
    :data:`StepFactory`); ``run_id`` logs into that existing MLflow run. With ``resume``, a
    run continues from the last epoch checkpoint in ``checkpoint_dir`` and the same MLflow run.
    A run of its own (no ``parent_run_id`` or ``run_id``) loads its data before its MLflow run starts,
    so unreadable data is no FAILED run; whatever fails after the start ends the MLflow run FAILED.
    ``seconds``, given, is filled with where the run's time goes as it goes (a run that raises
    included); the result carries it too, and the run logs its set-up, capture and evaluation seconds.
    ``on_run_start(run_id)`` runs once the MLflow run has started (a study links its trial to the run there,
    so that a trial that fails or is pruned is linked too).
    """
    clock = seconds if seconds is not None else RunSeconds()
    with clock.timing("total"):
        result = _train(spec, clock, on_epoch=on_epoch, resume=resume, checkpoint_dir=checkpoint_dir,
                        parent_run_id=parent_run_id, run_name=run_name, tags=tags, progress=progress, stop=stop,
                        make_step=make_step, run_id=run_id, on_run_start=on_run_start)
    result.seconds = clock
    return result


def _train(spec: Spec, clock: RunSeconds, *, on_epoch: EpochCallback | None, resume: bool,
           checkpoint_dir: str | Path | None, parent_run_id: str | None, run_name: str | None,
           tags: dict[str, str] | None, progress: bool, stop: threading.Event | None,
           make_step: StepFactory | None, run_id: str | None,
           on_run_start: Callable[[str], None] | None) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.utils import AutocastKwargs, DataLoaderConfiguration, set_seed

    began = time.perf_counter()
    cfg = spec.train
    precision = resolve_mixed_precision(cfg.mixed_precision)
    enable_tf32(cfg.tf32)
    with _ACCELERATE_STATE:
        _allow_precision(precision)
        accelerator = Accelerator(
            mixed_precision=precision,
            gradient_accumulation_steps=cfg.grad_accum_steps,
            cpu=cfg.cpu or cpu_only(),
            # Shuffles from (seed, epoch): a resumed run sees the batches an unbroken one would.
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, non_blocking=True),
            # A captured step cannot use autocast's cache of casted weights.
            kwargs_handlers=[AutocastKwargs(cache_enabled=False)],
        )
    with CAPTURE_GATE.shared():  # reseeds the process's CUDA generator: not while a packed neighbour captures
        set_seed(spec.seed)
    ckpt_path = Path(checkpoint_dir or checkpoint_dir_of(spec)) / CHECKPOINT_FILE
    checkpoint = load_checkpoint(ckpt_path) if resume and ckpt_path.exists() else None
    if checkpoint is not None:  # a bad input: said before a file is written or the MLflow run is touched
        check_resume_settings(checkpoint, spec, ckpt_path, accelerator.num_processes)
        _check_checkpoint_fits(checkpoint, spec, ckpt_path)  # before the spec's record: it names the weight
        check_resume_spec(checkpoint, spec, ckpt_path)
        if spec.tracking.enabled and checkpoint["run_id"]:  # missing or deleted there: said, nothing made in the store
            check_resumable(spec, checkpoint["run_id"], checkpoint.get("tracking_store"))
        finished = _finished_run(checkpoint, spec)
        if finished is not None:  # trained and tested already: doing it again would log the test and model twice
            return finished
    if accelerator.is_main_process:
        check_writable(ckpt_path.parent)  # before any work: an epoch's checkpoint must have somewhere to go
    own_run = parent_run_id is None and run_id is None
    data = None
    if own_run:
        # A run of its own checks its model's size and reads its data before MLflow hears of it: a model past
        # the device, unreadable data or a batch larger than the training set is one line and no FAILED run. A
        # trial's run is the study's record, so there they are the run's.
        _check_model_fits(spec, accelerator.device)
        with _out_of_memory_in_one_line(accelerator.device):
            data = load_data(spec.data, spec.seed, device=accelerator.device)
        if len(data.train) < cfg.batch_size * accelerator.num_processes:
            raise _no_full_batch(cfg.batch_size, accelerator.num_processes, len(data.train))
    tracker = Tracker(spec, enabled=accelerator.is_main_process)
    # The checkpoint's MLflow run goes on; one trained with tracking off names none, and its training goes on in a
    # new run (or the caller's), which is logged as any new run is.
    continued = checkpoint is not None and checkpoint["run_id"] is not None
    run_id = checkpoint["run_id"] if continued else run_id
    with contextlib.ExitStack() as tracked:
        _on_main_then_together(accelerator, lambda: tracked.enter_context(tracker.run(
            run_id=run_id, parent_run_id=parent_run_id, run_name=run_name, tags=tags)), "as it started the run")
        tracked.enter_context(_peer_loss_in_one_line(accelerator.num_processes))  # said so before the run ends on it
        if on_run_start is not None and tracker.run_id is not None:
            on_run_start(tracker.run_id)
        if own_run and tracker.run_id is not None:  # a trial's runs are reconciled by its study
            mark_run(ckpt_path.parent, tracker.run_id)
        if own_run and resume and accelerator.is_main_process:
            # Said once nothing can refuse the run any more (a checkpoint folder that is a file, unreadable data,
            # another store): a note promising training just before an error refused it was wrong.
            _say_how_it_resumes(ckpt_path, checkpoint, continued, tracker)
        if not own_run:  # a trial's refusal is its run's record, as its data's are: Optuna and MLflow agree
            _check_model_fits(spec, accelerator.device)
        tracked.enter_context(_out_of_memory_in_one_line(accelerator.device))
        run = _setup(spec, accelerator, precision, init_weights=checkpoint is None, data=data)
        start_epoch, history = 0, []
        if checkpoint is not None:
            try:
                _plain(run.model, accelerator).load_state_dict(checkpoint["model"])
            except (RuntimeError, ValueError, KeyError) as err:  # another model's checkpoint
                raise CheckpointMismatch(f"{ckpt_path}: its weights do not fit this spec's model ({_first_line(err)})",
                                         "run without --resume to start afresh, or point --checkpoint-dir "
                                         "elsewhere") from None
            try:
                run.optimizer.load_state_dict(checkpoint["optimizer"])
            except (RuntimeError, ValueError, KeyError) as err:
                # The weights fit, the optimizer's groups do not: a checkpoint from before it recorded its train
                # values (check_resume_settings), written under another train.freeze or train.layer_decay.
                raise CheckpointMismatch(f"{ckpt_path}: its optimizer state does not fit this spec's training "
                                         f"({_first_line(err)})", "resume with the train.freeze and train.layer_decay "
                                         "it was trained with, or run without --resume to start afresh") from None
            if run.graph_blocker is None:
                device_learning_rates(run.optimizer)  # the loaded groups carry their rates as saved
            run.scheduler.load_state_dict(checkpoint["scheduler"])
            with CAPTURE_GATE.shared():
                set_rng_state(checkpoint["rng"])
            start_epoch, history = checkpoint["epoch"] + 1, checkpoint["history"]
        clock.setup += time.perf_counter() - began
        with clock.timing("capture"):
            graph = _make_step(spec, run, accelerator, make_step)
        if not continued:  # a new run (a checkpoint that named none included): its params, tags and spec
            how = {"num_processes": str(accelerator.num_processes), "mixed_precision": precision,
                   "attention_kernel": _attention_kernel(run.model, accelerator, precision), "cuda_graph": graph,
                   **run.data_tags}

            def log_start() -> None:
                tracker.log_start(run.parameters, run.flops, str(accelerator.device), how, trainable=run.trainable)
                if history:  # the epochs the checkpoint trained before this run: its curves start at epoch 0
                    at = int(time.time() * 1000)
                    tracker.log_epochs([(metrics, epoch, at) for epoch, metrics in enumerate(history)])

            _on_main_then_together(accelerator, log_start, "as it logged the run")
        else:  # values --resume may change (train.epochs ...): the run's params keep their first ones, so say them
            _on_main_then_together(accelerator, lambda: _log_resumed(tracker, own_run), "as it logged the resume")
        peak = peak_tflops(accelerator.device, precision, cfg.peak_tflops)
        show_bar = progress and accelerator.is_main_process and sys.stderr.isatty()
        checkpoints = CheckpointWriter(ckpt_path, log=tracker.log_epochs)
        records = _spec_records(spec, accelerator.num_processes)  # the same in every checkpoint: made once
        try:
            for epoch in range(start_epoch, cfg.epochs):
                metrics = _train_epoch(spec, run, accelerator, epoch, show_bar, stop)
                clock.epochs += metrics["epoch_seconds"]
                with clock.timing("evaluation"):
                    metrics.update(evaluate(run.model, run.loaders["val"], accelerator, "val"))
                metrics["peak_memory_mb"] = peak_memory_mb(accelerator.device)
                utilisation = mfu(run.flops, metrics["images_per_second"] / accelerator.num_processes, peak)
                if utilisation is not None:
                    metrics["mfu"] = utilisation
                history.append(metrics)

                def store_and_report(epoch: int = epoch, metrics: dict[str, float] = metrics) -> None:
                    state = functools.partial(_checkpoint, records, run, accelerator, epoch, history, tracker.run_id,
                                              tracker.store)
                    checkpoints.save(state if checkpoints.due(last=epoch == cfg.epochs - 1) else None, metrics,
                                     step=epoch)
                    if on_epoch is not None:
                        on_epoch(epoch, metrics)  # a pruned trial stops here, on every process

                _on_main_then_together(accelerator, store_and_report, f"after epoch {epoch + 1}")
            # The last checkpoint is on disk before the run counts as done.
            _on_main_then_together(accelerator, checkpoints.wait, "as it stored the last epoch")
        finally:
            checkpoints.close()  # no write left running behind an error
        # Validation after the last epoch is that epoch's: only the test split is new here.
        with clock.timing("evaluation"):
            test = evaluate(run.model, run.loaders["test"], accelerator, "test")
            last = history[-1] if history else evaluate(run.model, run.loaders["val"], accelerator, "val")
        tracker.log_metrics(test | {"setup_seconds": clock.setup, "capture_seconds": clock.capture,
                                    "eval_seconds": clock.evaluation}, step=cfg.epochs - 1)
        final = {key: last[key] for key in ("train_loss", "val_loss", "val_accuracy") if key in last} | test
        if accelerator.is_main_process:
            tracker.log_model(_plain(run.model, accelerator).state_dict())
    train_seconds = sum(m["epoch_seconds"] for m in history)
    return TrainResult(final, history, run.parameters, run.flops, tracker.run_id, train_seconds, run.trainable)


def _spec_records(spec: Spec, num_processes: int) -> dict[str, Any]:
    """What every checkpoint of a run records of its spec and processes."""
    return {
        # What builds these weights: `model.init: {from: file}` reads it back.
        "model_spec": model_record(spec.model),
        # What the optimizer state was made under: --resume refuses other values (check_resume_settings).
        "train_settings": resume_settings(spec),
        # What it was trained under: --resume refuses other values but those that may change (check_resume_spec).
        "spec": spec_record(spec),
        "num_processes": num_processes,  # --resume refuses another count (check_resume_settings)
    }


def _checkpoint(records: dict[str, Any], run: _Setup, accelerator: Any, epoch: int, history: list[dict[str, float]],
                run_id: str | None, store: str | None = None) -> dict[str, Any]:
    """What a checkpoint of ``epoch`` holds (on the device still: the writer copies it off); ``records``: what
    :func:`_spec_records` made."""
    return {
        "model": _plain(run.model, accelerator).state_dict(),
        "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
        "rng": rng_state(), "epoch": epoch, "history": history, "run_id": run_id,
        # The store run_id is in: a resume that misses the run there can tell it was removed, not logged elsewhere.
        "tracking_store": store,
        **records,
    }


def _say_how_it_resumes(path: Path, checkpoint: dict[str, Any] | None, continued: bool, tracker: Tracker) -> None:
    """The note of a ``--resume`` that does not continue an MLflow run: no checkpoint to continue, or one that names
    no run (trained with tracking off), whose training goes on in a new run."""
    new_run = ", as a new MLflow run" if tracker.run_id is not None else ""
    if checkpoint is None:
        print(f"vit-search: --resume: no checkpoint at {path}; training from the first epoch{new_run}", file=sys.stderr)
    elif not continued and new_run:
        print(f"vit-search: --resume: the checkpoint {path} names no MLflow run (trained with tracking off); training "
              f"from epoch {checkpoint['epoch'] + 2}{new_run}, its first epochs logged from the checkpoint",
              file=sys.stderr)


def _log_resumed(tracker: Tracker, own_run: bool) -> None:
    """Tag the continued run with the values that differ from its params, and say so for a run of its own."""
    changed = tracker.log_resumed()
    if changed and own_run:
        print(f"vit-search: --resume: MLflow run {tracker.run_id} goes on with {changed}; its params keep the values it "
              f"started with (its tag resumed_with and spec.yaml have these)", file=sys.stderr)


def _finished_run(checkpoint: dict[str, Any], spec: Spec) -> TrainResult | None:
    """The result of the run ``checkpoint`` continues, read back from MLflow, where that run trained every
    epoch of ``spec`` and ended after its test evaluation; None where something is left to do."""
    if checkpoint["epoch"] + 1 < spec.train.epochs or not (spec.tracking.enabled and checkpoint.get("run_id")):
        return None
    logged = finished_metrics(spec, checkpoint["run_id"])
    if logged is None:
        return None
    history = checkpoint["history"]
    final = {key: logged[key] for key in ("train_loss", "val_loss", "val_accuracy", "test_loss", "test_accuracy")
             if key in logged}
    return TrainResult(final, history, int(logged.get("parameters", 0)), int(logged.get("flops", 0)),
                       checkpoint["run_id"], sum(m.get("epoch_seconds", 0.0) for m in history),
                       int(logged.get("trainable_parameters", logged.get("parameters", 0))), already_finished=True)


def _check_checkpoint_fits(checkpoint: dict[str, Any], spec: Spec, path: Path) -> None:
    """Refuse a checkpoint whose weights the spec's model cannot take, before the MLflow run it continues is
    reopened (refused there, the finished run was ended FAILED by a command that changed nothing)."""
    saved = checkpoint.get("model")
    if not isinstance(saved, dict):
        return  # load_checkpoint's own checks; the load says the rest
    ours = {name: tuple(t.shape) for name, t in build_on_meta(spec.model).state_dict().items()}
    theirs = {name: tuple(t.shape) for name, t in saved.items() if isinstance(t, torch.Tensor)}
    differ = sorted(name for name in ours.keys() & theirs.keys() if ours[name] != theirs[name])
    missing, unexpected = sorted(ours.keys() - theirs.keys()), sorted(theirs.keys() - ours.keys())
    if differ or missing or unexpected:
        detail = (f"{differ[0]} is {'x'.join(map(str, theirs[differ[0]]))} in it and "
                  f"{'x'.join(map(str, ours[differ[0]]))} here" if differ
                  else f"it lacks {missing[0]}" if missing else f"it has {unexpected[0]}, this model does not")
        raise CheckpointMismatch(f"{path}: its weights do not fit this spec's model ({detail})",
                                 "resume with the spec it was trained with, run without --resume to start afresh, or "
                                 "point --checkpoint-dir elsewhere")


def _first_line(err: BaseException) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0][:160]


class TrainingStopped(Exception):
    """Raised on the other processes of a run whose main process stopped it (a pruned trial)."""


def _on_main_then_together(accelerator: Any, work: Callable[[], Any], where: str) -> None:
    """Run ``work`` on the main process alone (MLflow, checkpoints, the study's verdict), then let every
    process know whether it failed: if it did, all stop here, the others with :class:`TrainingStopped`
    and the main process with its error. A failure the main process kept to itself would leave the
    others waiting in the next collective for ever, while it went on to its next trial."""
    stop: Exception | None = None
    if accelerator.is_main_process:
        try:
            work()
        except Exception as err:  # re-raised below, once the other processes know
            stop = err
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        (stopped,) = broadcast_object_list([stop is not None])
        if stopped and stop is None:
            raise TrainingStopped(f"stopped by the main process {where}")
    if stop is not None:
        raise stop


def _allow_precision(precision: str) -> None:
    """Let this process's next Accelerator take ``precision`` (search trials may differ in it).

    Accelerate keeps one state per process and refuses a second mixed-precision setting. A
    single-process run resets it; under ``accelerate launch`` the launcher's setting stands.
    """
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") not in (None, precision) and state.get("num_processes", 1) == 1:
        AcceleratorState._reset_state(reset_partial_state=False)


def _plain(model: nn.Module, accelerator: Any) -> nn.Module:
    """The model without Accelerate's or torch.compile's wrappers: its state dict has our names."""
    return accelerator.unwrap_model(model, keep_torch_compile=False)


def _attention_kernel(model: nn.Module, accelerator: Any, precision: str) -> str:
    """The fused SDPA kernel the model's attention can use here (a tag: check it is not "math").

    Attention blocks declare whether they call ``F.scaled_dot_product_attention`` (``fused_attn``,
    as in timm) and their ``head_dim``; those that do not (einsum, many plugins) pick no kernel.
    """
    attn = getattr(_plain(model, accelerator).blocks[0], "attn", None)
    if not getattr(attn, "fused_attn", False) or not isinstance(getattr(attn, "head_dim", None), int):
        return "none"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    return fused_attention_kernel(accelerator.device, dtype, attn.head_dim)


def _train_epoch(spec: Spec, run: _Setup, accelerator: Any, epoch: int, show_bar: bool,
                 stop: threading.Event | None) -> dict[str, float]:
    """One pass over the training split; returns train loss, learning rate, throughput."""
    from tqdm.auto import tqdm

    cfg = spec.train
    loader = run.loaders["train"]
    loader.set_epoch(epoch)  # reshuffle per epoch, same order on resume
    run.model.train()
    loss_sum = torch.zeros((), device=accelerator.device)
    seen = steps = 0
    started = time.perf_counter()
    for step, (images, labels) in enumerate(
        tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=not show_bar)
    ):
        if stop is not None and stop.is_set():
            raise interruption("stopped by the worker")
        # The optimizer steps every grad_accum_steps batches and at the end of the epoch.
        sync = (step + 1) % cfg.grad_accum_steps == 0 or step + 1 == len(loader)
        with CAPTURE_GATE.shared():  # a packed neighbour's capture waits for this step, and it for one
            if run.augment.enabled:
                images, labels = run.augment(images, labels)
            loss_sum += run.step(images, labels, sync)
        seen += images.shape[0]
        steps += 1
        # Checked after every 25th step, not every step: on a GPU each check waits for the device (an
        # epoch shorter than that waits once, at its end). Decided by all processes together, or one
        # would stop while the others wait for its gradients.
        if step % 25 == 24 and accelerator.reduce((~torch.isfinite(loss_sum)).float(), reduction="sum").item():
            break
    train_loss = accelerator.reduce(loss_sum / max(steps, 1), reduction="mean").item()
    seconds = time.perf_counter() - started  # after .item(): the device has finished the epoch
    if not math.isfinite(train_loss):
        raise TrainingDiverged(
            f"loss became {train_loss} in epoch {epoch + 1}; lower train.lr, set train.grad_clip, "
            f"or use mixed_precision: bf16 instead of fp16"
        )
    return {"train_loss": train_loss, "lr": float(max(run.scheduler.get_last_lr())),  # the head's, with layer decay
            "images_per_second": seen * accelerator.num_processes / max(seconds, 1e-9), "epoch_seconds": seconds}


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, accelerator: Any, prefix: str) -> dict[str, float]:
    """Loss and accuracy over a whole split, from every process, no sample counted twice; the sums
    stay on the device until the end (one wait for it per split, not one per batch)."""
    model.eval()
    sums = torch.zeros(3, device=accelerator.device)  # loss, hits, samples
    sharded = isinstance(loader, DeviceBatches)  # else a prepared DataLoader, whose last batches Accelerate pads
    for images, labels in loader:
        logits = model(images)
        per_sample = nn.functional.cross_entropy(logits.float(), labels, reduction="none")
        hits = logits.argmax(-1) == labels
        if not sharded and accelerator.num_processes > 1:
            per_sample, hits = accelerator.gather_for_metrics((per_sample, hits))
        sums[0] += per_sample.sum()
        sums[1] += hits.sum()
        sums[2] += hits.numel()  # a number into a device tensor: no copy from the host to wait for
    if sharded and accelerator.num_processes > 1:
        sums = accelerator.reduce(sums, reduction="sum")
    loss, hits, count = sums.tolist()
    return {f"{prefix}_loss": loss / max(count, 1), f"{prefix}_accuracy": hits / max(count, 1)}

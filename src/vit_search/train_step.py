"""One optimizer step (forward, backward, clipping, AdamW), eager or captured once as a CUDA graph.

A small model's step is hundreds of kernel launches of a few microseconds each: on a GPU the
host's Python, not the device, sets the pace. Captured as a CUDA graph, the whole step is one
launch (PyTorch's "whole-network capture"): the batch is copied into fixed input tensors and the
graph replayed. That needs fixed shapes (device-held data, full batches), no host synchronisation
inside the step (no gradient scaler, so fp32 or bf16; no accumulation) and an optimizer that keeps
its state and learning rate on the device (``capturable``). Where any of that does not hold, or
capture fails, the step runs eagerly through Accelerate, and the run's ``cuda_graph`` tag says why.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable

import torch
from torch import Tensor, nn

Criterion = Callable[[Tensor, Tensor], Tensor]
WARMUP_STEPS = 3  # eager steps on a side stream before capture (cuBLAS and autograd set up), then undone


class CaptureGate:
    """Lets trials packed into threads of one process capture their steps while the others train.

    While any thread captures, the process's default CUDA generator is in capture mode, and a random
    draw from it by another thread fails ("Offset increment outside graph capture encountered
    unexpectedly"): a packed neighbour's random crop, dropout or graph replay. So each training step
    (augmentation included) holds the gate's ``shared`` side, and a capture (with the warm-up that
    swaps the random state) holds ``exclusive``: it waits for the steps in flight, and new steps wait
    behind it. A thread inside its own ``exclusive`` passes through both sides again.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._stepping = 0  # threads inside shared()
        self._waiting = 0  # captures waiting for the steps in flight
        self._owner: int | None = None  # the capturing thread
        self._depth = 0

    @property
    def stepping(self) -> int:
        """How many threads are inside :meth:`shared` now."""
        return self._stepping

    @property
    def waiting(self) -> int:
        """How many captures wait for the steps in flight now."""
        return self._waiting

    @contextlib.contextmanager
    def shared(self) -> Any:
        """Hold while drawing random numbers on the device or stepping: no capture runs meanwhile."""
        if self._owner == threading.get_ident():  # inside this thread's own capture
            yield
            return
        with self._changed:
            self._changed.wait_for(lambda: self._owner is None and not self._waiting)
            self._stepping += 1
        try:
            yield
        finally:
            with self._changed:
                self._stepping -= 1
                self._changed.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Any:
        """Hold while capturing (and while swapping the process's random state for it), or while
        changing another process-wide setting that a step would read (the SDPA kernels allowed)."""
        me = threading.get_ident()
        with self._changed:
            if self._owner != me:
                self._waiting += 1
                self._changed.wait_for(lambda: self._owner is None and not self._stepping)
                self._waiting -= 1
                self._owner = me
            self._depth += 1
        try:
            yield
        finally:
            with self._changed:
                self._depth -= 1
                if not self._depth:
                    self._owner = None
                    self._changed.notify_all()


CAPTURE_GATE = CaptureGate()  # one per process: the default CUDA generator it guards is one per process


class EagerStep:
    """A step through Accelerate: backward (loss scaling, accumulation's division), clipping, AdamW.

    With gradient accumulation, ``sync=False`` adds this batch's gradients without stepping (and,
    across processes, without their all-reduce: Accelerate's ``no_sync``); the caller syncs every
    ``grad_accum_steps`` batches and at the end of the epoch, as Accelerate's ``accumulate`` does.
    """

    def __init__(self, model: nn.Module, optimizer: Any, scheduler: Any, criterion: Criterion, grad_clip: float | None,
                 accelerator: Any):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.criterion, self.grad_clip, self.accelerator = criterion, grad_clip, accelerator

    def __call__(self, images: Tensor, labels: Tensor, sync: bool = True) -> Tensor:
        """Train on one batch; returns its loss (detached, on the device)."""
        accelerator = self.accelerator
        with contextlib.nullcontext() if sync else accelerator.no_sync(self.model):
            loss = self.criterion(self.model(images), labels)
            accelerator.backward(loss)
        if sync:
            if self.grad_clip:
                accelerator.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


class GraphedStep:
    """The same step captured as one CUDA graph; each call copies the batch in and replays it.

    The warm-up steps that capture needs are undone (weights, optimizer state and the CUDA random
    state restored), so the run trains on the same batches for the same steps as an eager one.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, criterion: Criterion,
                 grad_clip: float | None, images: Tensor, labels: Tensor):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.criterion, self.grad_clip = criterion, grad_clip
        self.images, self.labels = images.clone(), labels.clone()
        with CAPTURE_GATE.exclusive():
            self.graph = self._capture(model, optimizer)

    def _capture(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> torch.cuda.CUDAGraph:
        params = [p for p in model.parameters() if p.requires_grad]
        saved = [p.detach().clone() for p in params]
        saved_state = {id(p): {k: v.clone() for k, v in optimizer.state[p].items() if isinstance(v, Tensor)}
                       for p in params if p in optimizer.state}  # a resumed run's moments
        rng = torch.cuda.get_rng_state()
        side = torch.cuda.Stream()  # this step's own: packed trials each capture and warm up on theirs
        side.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(side):
                for _ in range(WARMUP_STEPS):
                    optimizer.zero_grad(set_to_none=True)
                    self._step()
        finally:  # undo the warm-up, also when it failed: the first replay is the run's first step
            torch.cuda.current_stream().wait_stream(side)
            with torch.no_grad():
                for param, value in zip(params, saved):
                    param.copy_(value)
                    before = saved_state.get(id(param), {})
                    for key, state in optimizer.state.get(param, {}).items():
                        if isinstance(state, Tensor) and key in before:
                            state.copy_(before[key])
                        elif isinstance(state, Tensor):  # made by the warm-up: a fresh state is zeros
                            state.zero_()
            torch.cuda.set_rng_state(rng)
            optimizer.zero_grad(set_to_none=True)  # gradients are allocated in the graph's own pool
        graph = torch.cuda.CUDAGraph()
        # thread_local: packed trials in other threads may evaluate (and allocate) during the capture
        with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
            self.loss = self._step()
        return graph

    def _step(self) -> Tensor:
        loss = self.criterion(self.model(self.images), self.labels)
        loss.backward()
        if self.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip, foreach=True)
        self.optimizer.step()
        return loss.detach()

    def __call__(self, images: Tensor, labels: Tensor, sync: bool = True) -> Tensor:
        """Train on one batch; returns its loss (a fresh tensor: the graph's is overwritten next step).
        (Every step syncs: a graph is captured only without gradient accumulation.)"""
        self.images.copy_(images)
        self.labels.copy_(labels)
        self.graph.replay()
        self.scheduler.step()  # fills the learning-rate tensors the graph reads
        return self.loss.clone()


def graph_blocker(device: torch.device, on_device_data: bool, precision: str, cfg: Any, num_processes: int) -> str | None:
    """Why this run's step cannot be a CUDA graph (None: it can)."""
    reasons = [
        (device.type != "cuda", "no CUDA device"),
        (not on_device_data, "data not held on the device"),
        (precision == "fp16", "fp16 needs a loss scaler"),
        (cfg.grad_accum_steps > 1, "gradient accumulation"),
        (cfg.compile, "torch.compile"),
        (cfg.activation_checkpointing, "activation checkpointing"),
        (num_processes > 1, "several processes"),
    ]
    return next((reason for blocked, reason in reasons if blocked), None)


def device_learning_rates(optimizer: torch.optim.Optimizer) -> None:
    """Give each param group its learning rate as a device tensor (a captured step reads it there;
    the scheduler fills it in place) and its initial rate as a number (so that stepping the
    scheduler never waits for the device)."""
    for group in optimizer.param_groups:
        lr = float(group["lr"])
        group["initial_lr"] = lr
        group["lr"] = torch.tensor(lr, device=group["params"][0].device)

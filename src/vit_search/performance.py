"""Device efficiency: precision choice, attention kernel check, model FLOP utilisation, peak memory,
and where a run's seconds go.

Each switch is in the spec (``train``); ``auto`` turns on what helps on the device at hand and
falls back cleanly elsewhere (on a CPU: fp32, no fused optimizer, no TF32).
"""

from __future__ import annotations

import contextlib
import functools
import os
import resource
import sys
import time
from dataclasses import dataclass, fields
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .train_step import CAPTURE_GATE

# Dense bf16/fp16 tensor-core peaks (TFLOP/s, without sparsity) by device name; fp32 runs use the
# TF32 peak, half of these. A spec's train.peak_tflops overrides the table.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0,
               "RTX 4090": 165.0, "V100": 125.0, "T4": 65.0}


def usable_cores() -> int:
    """The cores this process may run on (its affinity: taskset, a container's cpuset), at least 1."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_only() -> bool:
    """True on a machine without accelerators: Accelerate must then be told ``cpu=True`` to join
    launched processes into one gloo group (MULTI_CPU) instead of leaving each alone."""
    from accelerate.utils import is_mps_available, is_xpu_available

    return not (torch.cuda.is_available() or is_mps_available() or is_xpu_available())


def resolve_mixed_precision(setting: str) -> str:
    """``auto``: bf16 on a CUDA GPU that supports it, else fp32 ("no"); other settings unchanged."""
    if setting != "auto":
        return setting
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def enable_tf32(enabled: bool) -> None:
    """Let fp32 matmuls and convolutions use TF32 tensor cores (CUDA only; a no-op elsewhere)."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


@functools.lru_cache(maxsize=64)
def fused_attention_kernel(device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """Which fused attention kernel SDPA can use here ("flash", "efficient", "cudnn"), or "math".

    Runs a tiny attention restricted to each fused backend in turn: a backend that cannot serve
    these shapes, dtype and device raises, so the answer is what torch would pick, not a guess.
    Once per process for each answer's arguments. The restriction is torch's process-wide setting:
    the probe holds the capture gate alone, so that no packed trial steps or captures under it,
    and no other probe saves it as the setting to restore.
    """
    candidates = [("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION)]
    if device.type == "cuda":
        candidates.insert(0, ("cudnn", SDPBackend.CUDNN_ATTENTION))
    q = torch.zeros(1, 1, 8, head_dim, device=device, dtype=dtype)
    with CAPTURE_GATE.exclusive():
        for name, backend in candidates:
            try:
                with sdpa_kernel([backend]), torch.no_grad():
                    F.scaled_dot_product_attention(q, q, q)
                return name
            except RuntimeError:
                continue
    return "math"


def peak_tflops(device: torch.device, mixed_precision: str, override: float | None) -> float | None:
    """The device's peak for this precision, or None when unknown (CPUs, unlisted GPUs)."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = next((value for key, value in PEAK_TFLOPS.items() if key in name), None)
    if peak is None:
        return None
    return peak if mixed_precision in ("bf16", "fp16") else peak / 2


def mfu(forward_flops_per_image: int, images_per_second: float, peak: float | None) -> float | None:
    """Model FLOP utilisation: training FLOPs (3x forward) achieved over the device's peak."""
    if not peak:
        return None
    return 3 * forward_flops_per_image * images_per_second / (peak * 1e12)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: allocated GPU memory on CUDA, else the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


@dataclass
class RunSeconds:
    """Where a training run's wall time went, phase by phase. Filled as the run goes, so a run that
    ends early (pruned, stopped, failed) still says where its time went; a search adds up its trials'.

    On a GPU a small trial's steps are the least of it: what a trial costs around them (its set-up,
    its graph capture, evaluating every epoch, storing what it logs) is what decides how many trials
    an hour a GPU runs.
    """

    setup: float = 0.0  # Accelerate, the data, the model and optimizer, a resumed run's checkpoint, MLflow's run start
    capture: float = 0.0  # the step's warm-up and CUDA-graph capture (about 0 where the step runs eagerly)
    epochs: float = 0.0  # the training steps (the sum of the epochs' ``epoch_seconds``)
    evaluation: float = 0.0  # the validation split after each epoch, the test split at the end
    total: float = 0.0  # the whole run, its MLflow end included

    @property
    def bookkeeping(self) -> float:
        """The rest: checkpoints, stored metrics, the epoch callback (a study's reports and pruning), the
        weights' artifact, the run's end."""
        return max(self.total - self.setup - self.capture - self.epochs - self.evaluation, 0.0)

    @contextlib.contextmanager
    def timing(self, phase: str) -> Iterator[None]:
        """Add the seconds spent inside the block to ``phase`` (also when the block raises)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            setattr(self, phase, getattr(self, phase) + time.perf_counter() - started)

    def add(self, other: "RunSeconds") -> None:
        """Add another run's seconds, phase by phase."""
        for item in fields(self):
            setattr(self, item.name, getattr(self, item.name) + getattr(other, item.name))

    def summary(self) -> str:
        """The phases in one line, e.g. ``1.2 s set-up, 0.3 s capture, 2.9 s epochs, 0.6 s evaluation, 0.3 s
        bookkeeping``."""
        phases = {"set-up": self.setup, "capture": self.capture, "epochs": self.epochs, "evaluation": self.evaluation,
                  "bookkeeping": self.bookkeeping}
        return ", ".join(f"{seconds:.1f} s {name}" for name, seconds in phases.items())

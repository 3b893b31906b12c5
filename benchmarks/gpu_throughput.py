"""ViT-B/16 training throughput and MFU on one GPU (target: >= 45% MFU on an H100, bf16, batch 256).

Two measurements of the same model:

* bare steps: forward, backward and fused AdamW under bf16 autocast, TF32 on, optionally
  ``torch.compile``: what the model itself reaches;
* ``train()``: the product's own loop (Accelerate, data held on the GPU, augmentation, the spec's
  defaults: ``mixed_precision: auto``, fused AdamW, TF32) on synthetic 224x224 images; its last
  epoch's ``images_per_second`` and ``mfu`` are the figures MLflow shows for a trial.

MFU is 3 x forward FLOPs (torch's FLOP counter) x images/s over the device's peak
(``vit_search.performance``).

    python benchmarks/gpu_throughput.py [--batch 256] [--compile] [--steps 30] [--checkpointing]
    python benchmarks/gpu_throughput.py --cpu-smoke     # a tiny run on the CPU: checks the script
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from vit_search.model import build_model
from vit_search.performance import enable_tf32, fused_attention_kernel, peak_tflops
from vit_search.spec import load_spec
from vit_search.model.cost import flop_count
from vit_search.train import train


def bare_steps(args: argparse.Namespace, device: torch.device) -> None:
    """Images/second and MFU of plain training steps of the model."""
    enable_tf32(True)
    size = args.image_size
    model = build_model({"preset": args.preset, "image_size": size, "in_channels": 3, "num_classes": 1000})
    flops = flop_count(model.eval(), torch.zeros(1, 3, size, size))
    model = model.to(device).train()
    model.set_grad_checkpointing(args.checkpointing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    step_model = torch.compile(model) if args.compile else model
    images = torch.randn(args.batch, 3, size, size, device=device)
    labels = torch.randint(0, 1000, (args.batch,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(step_model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(min(5, args.steps)):  # warm-up (and compilation)
        step()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize(device)
    rate = args.batch * args.steps / (time.perf_counter() - started)
    kernel = fused_attention_kernel(device, torch.bfloat16, model.blocks[0].attn.head_dim)
    memory = f", peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else ""
    print(f"{device_name(device)}: {args.preset} bf16 batch {args.batch}{' compiled' if args.compile else ''}, "
          f"bare steps: {rate:,.0f} img/s, attention kernel {kernel}{memory}")
    peak = peak_tflops(device, "bf16", args.peak_tflops)
    print(f"  MFU {3 * flops * rate / (peak * 1e12):.1%} of {peak:.0f} TFLOP/s ({flops / 1e9:.2f} GFLOPs forward "
          f"per image)" if peak else "  MFU: peak unknown for this device; pass --peak-tflops")


def through_train(args: argparse.Namespace, device: torch.device, checkpoint_dir: str) -> None:
    """Images/second and MFU as train() measures and logs them (last of two epochs); the checkpoint goes to
    ``checkpoint_dir``."""
    steps_per_epoch = max(args.steps // 2, 2)
    train_images = args.batch * steps_per_epoch
    samples = int(train_images / 0.72) + 2 * args.classes  # val 10%, test 20% held out
    spec = load_spec({
        "name": "gpu-throughput", "seed": 0,
        "data": {"dataset": "synthetic", "image_size": args.image_size, "channels": 3,
                 "num_classes": args.classes, "num_samples": samples},
        "model": {"preset": args.preset},
        "train": {"epochs": 2, "batch_size": args.batch, "lr": 1e-4, "warmup_epochs": 0, "compile": args.compile,
                  "activation_checkpointing": args.checkpointing, "peak_tflops": args.peak_tflops,
                  "cpu": device.type == "cpu"},
        "tracking": {"enabled": False},
    })
    result = train(spec, checkpoint_dir=checkpoint_dir, progress=False)
    last = result.history[-1]
    mfu = f", MFU {last['mfu']:.1%}" if "mfu" in last else ", MFU: peak unknown (pass --peak-tflops)"
    print(f"  train(): {last['images_per_second']:,.0f} img/s{mfu}, peak memory {last['peak_memory_mb']:,.0f} MB "
          f"(mixed_precision auto, {steps_per_epoch} steps an epoch)")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the device's bf16 peak")
    parser.add_argument("--skip-train", action="store_true", help="bare steps only")
    parser.add_argument("--checkpoint-dir", help="keep train()'s checkpoint in this folder (default: a temporary "
                                                 "folder, removed at the end)")
    parser.add_argument("--cpu-smoke", action="store_true", help="ViT-Ti/16 at 32 px, batch 4, 2 steps, on the CPU")
    args = parser.parse_args()
    if args.batch < 1 or args.steps < 1:
        parser.error(f"--batch {args.batch} --steps {args.steps}: both must be at least 1")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        parser.error(f"--peak-tflops {args.peak_tflops:g}: must be above 0")
    args.preset, args.image_size, args.classes = "vit_b_16", 224, 100
    if args.cpu_smoke:
        args.preset, args.image_size, args.classes, args.batch, args.steps = "vit_ti_16", 32, 4, 4, 2
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        raise SystemExit("no CUDA device: this benchmark measures a GPU (--cpu-smoke checks the script)")
    bare_steps(args, device)
    if args.skip_train:
        return
    if args.checkpoint_dir:
        through_train(args, device, args.checkpoint_dir)
        return
    with tempfile.TemporaryDirectory(prefix="vit-search-gpu-throughput-") as checkpoint_dir:
        through_train(args, device, checkpoint_dir)


if __name__ == "__main__":
    main()

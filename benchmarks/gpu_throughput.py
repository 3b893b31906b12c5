"""ViT-B/16 training throughput and MFU on one GPU (target: >= 45% MFU on an H100, bf16, batch 256).

Times full training steps (forward, backward, fused AdamW) of our ViT-B/16 under bf16 autocast,
with TF32 on and optionally ``torch.compile``, and prints images/second and MFU: 3 x forward
FLOPs (torch's FLOP counter) x images/s over the device's peak (``vit_search.performance``).

    python benchmarks/gpu_throughput.py [--batch 256] [--compile] [--steps 30] [--checkpointing]
"""

from __future__ import annotations

import argparse
import time

import torch

from vit_search.model import build_model
from vit_search.performance import enable_tf32, fused_attention_kernel, peak_tflops
from vit_search.summary import flop_count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the device's bf16 peak")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark measures a GPU")
    device = torch.device("cuda")
    enable_tf32(True)
    model = build_model({"preset": "vit_b_16", "image_size": 224, "in_channels": 3, "num_classes": 1000})
    flops = flop_count(model.eval(), torch.zeros(1, 3, 224, 224))
    model = model.to(device).train()
    model.set_grad_checkpointing(args.checkpointing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    step_model = torch.compile(model) if args.compile else model
    images = torch.randn(args.batch, 3, 224, 224, device=device)
    labels = torch.randint(0, 1000, (args.batch,), device=device)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(step_model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(5):  # warm-up (and compilation)
        step()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    rate = args.batch * args.steps / (time.perf_counter() - started)
    peak = peak_tflops(device, "bf16", args.peak_tflops)
    kernel = fused_attention_kernel(device, torch.bfloat16, 64)
    print(f"{torch.cuda.get_device_name(device)}: ViT-B/16 bf16 batch {args.batch}"
          f"{' compiled' if args.compile else ''}: {rate:,.0f} img/s, attention kernel {kernel}, "
          f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    if peak:
        print(f"MFU {3 * flops * rate / (peak * 1e12):.1%} of {peak:.0f} TFLOP/s "
              f"({flops / 1e9:.2f} GFLOPs forward per image)")
    else:
        print("MFU: peak unknown for this device; pass --peak-tflops")


if __name__ == "__main__":
    main()

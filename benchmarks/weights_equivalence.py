"""Imported weights compute what their source computes: the max abs logit difference between each timm
and torchvision ViT (every weight re-drawn at random, fp32, eval) and our model built by ``from_timm`` /
``from_torchvision``; and resampled position embeddings against timm's ``resample_abs_pos_embed``.

    python benchmarks/weights_equivalence.py      # timm rows print a skip line where timm is not installed
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

TOLERANCE, RESAMPLE_TOLERANCE = 1e-5, 1e-6
TIMM_MODELS = {
    "vit_tiny_patch16_224": {},
    "vit_small_patch16_224": {},
    "vit_base_patch16_224": {},
    "deit_tiny_patch16_224": {},
    "vit_tiny_patch16_224 (global_pool=avg, class_token=False, fc_norm=False)":
        {"global_pool": "avg", "class_token": False, "fc_norm": False},
    "vit_medium_patch16_gap_256": {},
}
TORCHVISION_MODELS = ("vit_b_16", "vit_b_32")


def redrawn(model: nn.Module) -> nn.Module:
    """Every parameter re-drawn (seeded): LayerNorm scales ~N(1, 0.2), vectors ~N(0, 0.1), tokens and
    position embeddings ~N(0, 0.5), matrices ~N(0, 1/fan_in), so no weight stays at a trivial init
    that would hide a wrong mapping and the logits are of order one."""
    generator = torch.Generator().manual_seed(0)
    norms = {id(m.weight) for m in model.modules() if isinstance(m, nn.LayerNorm) and m.weight is not None}
    with torch.no_grad():
        for param in model.parameters():
            if id(param) in norms:
                param.normal_(1.0, 0.2, generator=generator)
            elif param.dim() == 1:
                param.normal_(0.0, 0.1, generator=generator)
            elif param.dim() == 3:
                param.normal_(0.0, 0.5, generator=generator)
            else:
                param.normal_(0.0, param[0].numel() ** -0.5, generator=generator)
    return model.eval()


def difference(reference: nn.Module, ours: nn.Module, size: tuple[int, int]) -> tuple[float, float]:
    """(max abs logit difference, max abs logit) on two random images."""
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, actual = reference(images), ours.eval()(images)
    return (actual - expected).abs().max().item(), expected.abs().max().item()


def main() -> None:
    description = " ".join(__doc__.split("\n\n")[0].split())  # the first paragraph, on one line
    argparse.ArgumentParser(description=description, epilog="It takes no options.").parse_args()
    from vit_search.model import from_timm, from_torchvision, resample_position_embedding

    print(f"max abs logit difference, fp32, eval (tolerance {TOLERANCE:g})")
    try:
        import timm
    except ImportError:
        timm = None
        print("  timm: skipped, timm is not installed (pip install 'vit-search[timm]')")
    failed = False
    if timm is not None:
        for label, kwargs in TIMM_MODELS.items():
            reference = redrawn(timm.create_model(label.split(" ")[0], pretrained=False, **kwargs))
            diff, scale = difference(reference, from_timm(reference), tuple(reference.patch_embed.img_size))
            state_diff, _ = difference(reference, from_timm(reference.state_dict(), heads=reference.blocks[0].attn.num_heads),
                                       tuple(reference.patch_embed.img_size))
            failed |= max(diff, state_diff) > TOLERANCE
            print(f"  timm {label:<72} module {diff:.2e}  state dict {state_diff:.2e}  (logits up to {scale:.1f})")
    import torchvision

    for name in TORCHVISION_MODELS:
        reference = redrawn(torchvision.models.get_model(name, weights=None))
        diff, scale = difference(reference, from_torchvision(reference), (reference.image_size,) * 2)
        state_diff, _ = difference(reference, from_torchvision(reference.state_dict()), (reference.image_size,) * 2)
        failed |= max(diff, state_diff) > TOLERANCE
        print(f"  torchvision {name:<65} module {diff:.2e}  state dict {state_diff:.2e}  (logits up to {scale:.1f})")

    print(f"resampled position embeddings (1 + 14x14 positions, width 768) against timm's resample_abs_pos_embed "
          f"(tolerance {RESAMPLE_TOLERANCE:g})")
    weight = torch.randn(1, 1 + 14 * 14, 768, generator=torch.Generator().manual_seed(2))
    for size in (384, 160):
        grid = size // 16
        ours = resample_position_embedding(weight, grid)
        if timm is None:
            print(f"  224 -> {size}: skipped, timm is not installed")
            continue
        expected = timm.layers.resample_abs_pos_embed(weight, new_size=[grid, grid], num_prefix_tokens=1)
        diff = (ours - expected).abs().max().item()
        failed |= diff > RESAMPLE_TOLERANCE
        print(f"  224 -> {size} (grid 14x14 -> {grid}x{grid}): max abs difference {diff:.2e}")
    if failed:
        raise SystemExit("some difference is above its tolerance")


if __name__ == "__main__":
    main()

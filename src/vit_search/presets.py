"""Named model sections a spec can start from: ``model: {preset: vit_b_16, depth: 6}``.

The paper's Table 1 (and DeiT's Ti and S): width, depth, heads; MLP ratio 4 throughout.
"""

from __future__ import annotations

from typing import Any

# size -> (width D, depth, heads)
SIZES = {"ti": (192, 12, 3), "s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16), "h": (1280, 32, 16)}

PRESETS: dict[str, dict[str, Any]] = {
    f"vit_{size}_{patch}": {
        "dim": dim,
        "depth": depth,
        "patch_embed": {"type": "conv", "patch_size": patch},
        "position": {"type": "learned"},
        "attention": {"type": "sdpa", "heads": heads},
        "ffn": {"type": "mlp", "ratio": 4.0, "activation": "gelu"},
        "pooling": {"type": "cls"},
        "head": {"type": "linear"},
    }
    for size, (dim, depth, heads) in SIZES.items()
    for patch in (16, 32)
}

HEADS_BY_DIM = {dim: heads for dim, _, heads in SIZES.values()}
"""Heads of the paper's sizes by width: a state dict records widths, not heads."""

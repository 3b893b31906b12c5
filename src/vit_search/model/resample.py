"""Weights fitted to another input: a learned position embedding resampled to another patch grid (another
image size), a patch embedding's kernels adapted to another number of image channels."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import WeightsError
from ..sizes import pair


def square_grid(positions: int) -> tuple[int, int]:
    """The square patch grid that holds ``positions`` grid positions; raises WeightsError when none does."""
    side = math.isqrt(positions)
    if side * side != positions:
        raise WeightsError(f"{positions} grid positions are not a square grid; pass old_grid")
    return side, side


def resample_position_embedding(
    weight: Tensor,
    new_grid: int | tuple[int, int],
    old_grid: int | tuple[int, int] | None = None,
    num_prefix_tokens: int = 1,
) -> Tensor:
    """A learned position embedding (1, prefix + rows*cols, D) bicubically resampled to ``new_grid``,
    prefix (class) tokens kept as they are: timm's ``resample_abs_pos_embed``, e.g. to fine-tune at
    384 (grid 24) weights trained at 224 (grid 14). ``old_grid`` defaults to a square grid."""
    new = pair(new_grid)
    if weight.dim() != 3 or weight.shape[0] != 1:
        raise WeightsError(f"expected a position embedding of shape (1, N, D), got {tuple(weight.shape)}")
    prefix, patches = weight[:, :num_prefix_tokens], weight[:, num_prefix_tokens:]
    old = pair(old_grid) if old_grid is not None else square_grid(patches.shape[1])
    if old[0] * old[1] != patches.shape[1]:
        raise WeightsError(f"old grid {old} does not hold the {patches.shape[1]} grid positions")
    if old == new:
        return weight.clone()
    dim = weight.shape[-1]
    # As timm: interpolate in float32, with antialiasing (it smooths only when shrinking the grid).
    grid = patches.float().reshape(1, old[0], old[1], dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new, mode="bicubic", antialias=True, align_corners=False)
    patches = grid.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], dim).to(weight.dtype)
    return torch.cat([prefix, patches], dim=1)


def adapt_input_channels(weight: Tensor, channels: int) -> Tensor:
    """A conv patch embedding's kernels (D, C, kh, kw) for ``channels`` input channels, as timm's
    ``adapt_input_conv``: to one channel, the sum over the C kernels (a grey image seen as C equal
    channels gives the same response); to more, the kernels repeated in turn and scaled by C/channels
    (a constant image gives the same response)."""
    if weight.dim() != 4:
        raise WeightsError(f"expected conv kernels of shape (D, C, kh, kw), got {tuple(weight.shape)}")
    if channels < 1:
        raise WeightsError(f"cannot adapt the patch embedding to {channels} channels")
    old = weight.shape[1]
    if channels == old:
        return weight.clone()
    if channels == 1:
        return weight.float().sum(dim=1, keepdim=True).to(weight.dtype)
    repeats = math.ceil(channels / old)
    return (weight.float().repeat(1, repeats, 1, 1)[:, :channels] * (old / channels)).to(weight.dtype)

"""Patch embeddings: images (B, C, H, W) to a sequence of patch tokens (B, N, D)."""

from __future__ import annotations

from einops import rearrange
from einops.layers.torch import Rearrange
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import register
from .elastic import Elastic, leading_slice, sliced_linear
from ..sizes import pair


def patch_grid(image_size: int | tuple[int, int], patch_size: int | tuple[int, int]) -> tuple[int, int]:
    """Rows and columns of patches; raises ValueError when the image does not divide into patches."""
    (h, w), (ph, pw) = pair(image_size), pair(patch_size)
    if min(h, w, ph, pw) <= 0:
        raise ValueError(f"image size {h}x{w} and patch size {ph}x{pw} must be positive")
    if h % ph or w % pw:
        raise ValueError(
            f"image size {h}x{w} is not divisible by patch size {ph}x{pw}; "
            f"change data.image_size or patch_size so that each side divides evenly"
        )
    return h // ph, w // pw


@register("patch_embed", "conv")
class ConvPatchEmbed(Elastic, nn.Module):
    """Conv2d with kernel = stride = patch size, as in the paper and torchvision."""

    elastic_args = ()  # elastic in dim: a subnet keeps the leading output channels

    def __init__(
        self, in_channels: int, dim: int, image_size: int | tuple[int, int], patch_size: int | tuple[int, int] = 16
    ):
        super().__init__()
        self.grid = patch_grid(image_size, patch_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=pair(patch_size), stride=pair(patch_size))

    def forward(self, images: Tensor) -> Tensor:
        if self.sample is None:
            return rearrange(self.proj(images), "b d h w -> b (h w) d")
        dim, proj = self.sample["dim"], self.proj
        weight = leading_slice(proj.weight, (dim, *proj.weight.shape[1:]))
        bias = None if proj.bias is None else proj.bias[:dim]
        return rearrange(F.conv2d(images, weight, bias, stride=proj.stride), "b d h w -> b (h w) d")


@register("patch_embed", "linear")
class LinearPatchEmbed(Elastic, nn.Module):
    """Flatten each patch (einops) and project it with one Linear: the conv's equivalent, unfolded."""

    elastic_args = ()  # elastic in dim: a subnet keeps the leading output rows

    def __init__(
        self, in_channels: int, dim: int, image_size: int | tuple[int, int], patch_size: int | tuple[int, int] = 16
    ):
        super().__init__()
        self.grid = patch_grid(image_size, patch_size)
        self.num_patches = self.grid[0] * self.grid[1]
        ph, pw = pair(patch_size)
        self.to_patches = Rearrange("b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=ph, p2=pw)
        self.proj = nn.Linear(ph * pw * in_channels, dim)

    def forward(self, images: Tensor) -> Tensor:
        patches = self.to_patches(images)
        return self.proj(patches) if self.sample is None else sliced_linear(self.proj, patches, self.sample["dim"])

"""Resizing image tensors: bilinear, antialiased when shrinking, as torchvision's ``v2.Resize(antialias=True)``.

A float tensor is resized by torch alone, as torchvision itself does it (``interpolate`` with
``align_corners=False``): digits and synthetic data, held as float tensors, then never import
torchvision. Its import takes about 1.5 s, most of it ``torch._dynamo``, which a training step imports
anyway: a worker saves about 0.2 s, a command that trains nothing the whole. uint8 goes through
torchvision, whose uint8 path is its own (a native kernel on the CPU, a float round trip elsewhere).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def resize_float(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """float (N, C, h, w) -> float (N, C, H, W); the same values as torchvision's v2 resize of it."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images, size=list(size), mode="bilinear", align_corners=False, antialias=True)


def resize_uint8(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (N, C, h, w) -> uint8 (N, C, H, W), through torchvision's v2 resize (as the worker path)."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    from torchvision.transforms.v2 import functional as TF

    return TF.resize(images, list(size), antialias=True)

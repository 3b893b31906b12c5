"""Training-time augmentation applied to whole batches on the training device.

Random crop and horizontal flip are written as batched tensor ops (one random draw per image, no
Python loop over images). MixUp and CutMix are torchvision.transforms.v2's, which are batch
transforms by nature: one mixing weight per batch, labels become soft (B, num_classes) float.

RandAugment is per image in the paper, but v2.RandAugment draws one op for everything it is given.
For tensor-held sets it is therefore applied per chunk of ``randaugment_chunk`` images: images in a
chunk share an op and magnitude, chunks differ. Chunk 1 is per image (faithful, ~B/16 times more
kernel launches and Python calls); larger chunks are faster but less diverse within a batch. Sets
decoded by DataLoader workers run RandAugment per image in the workers instead (see loading.py), and
their BatchAugment is built with ``randaugment=False``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..schema import AugmentSpec
from ..sizes import pair


def random_crop(images: Tensor, padding: int) -> Tensor:
    """Zero-pad by ``padding`` then crop back to the input size at a random offset per image.

    Zero is the data set mean once images are normalised, so the border is mean-coloured.
    """
    b, _, h, w = images.shape
    device = images.device
    padded = F.pad(images, (padding, padding, padding, padding))
    top = torch.randint(0, 2 * padding + 1, (b, 1, 1), device=device)
    left = torch.randint(0, 2 * padding + 1, (b, 1, 1), device=device)
    rows = top + torch.arange(h, device=device).view(1, h, 1)
    cols = left + torch.arange(w, device=device).view(1, 1, w)
    batch = torch.arange(b, device=device).view(b, 1, 1)
    # One gather for the whole batch: (B, H, W) pixel coordinates index the channels-last view.
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


def random_hflip(images: Tensor) -> Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = torch.rand(images.shape[0], 1, 1, 1, device=images.device) < 0.5
    return torch.where(flip, images.flip(-1), images)


def _crop_flip_windows(images: Tensor, padding: int, hflip: bool, generator: torch.Generator | None):
    """Per image, where a random crop of the padded image and a random mirror put its pixels:
    (source rows, source cols, target rows, target cols, flipped). Drawn on the CPU, from ``generator``."""
    b, _, h, w = images.shape
    shifts = torch.randint(-padding, padding + 1, (2, b), generator=generator).tolist() if padding else [[0] * b] * 2
    flips = (torch.rand(b, generator=generator) < 0.5).tolist() if hflip else [False] * b
    for dy, dx, flip in zip(*shifts, flips):
        # The window of the source that lands in the output when the padded image is cut at (dy, dx);
        # mirrored, the output's columns are mirrored too (the border is one colour: it needs no flip).
        first, last = max(-dx, 0), w - max(dx, 0)
        yield (slice(max(dy, 0), h + min(dy, 0)), slice(max(dx, 0), w + min(dx, 0)),
               slice(max(-dy, 0), h - max(dy, 0)), slice(w - last, w - first) if flip else slice(first, last), flip)


def random_crop_flip_uint8(images: Tensor, padding: int, hflip: bool, fill: Sequence[int],
                           generator: torch.Generator | None = None) -> Tensor:
    """:func:`random_crop` then :func:`random_hflip` on uint8 images, the border ``fill`` (per channel).

    The decoded cache's batches take this before they become float: a quarter of the bytes, and a
    copy of each image's window (one slice per image; on the CPU faster than the batched gather).
    ``fill`` is the training mean in uint8, so after normalisation the border is about zero, as
    :func:`random_crop`'s is. The draws are made on the CPU, from ``generator`` when given.
    """
    b, c, h, w = images.shape
    out = torch.tensor(list(fill), dtype=torch.uint8, device=images.device).view(1, c, 1, 1).expand(b, c, h, w).clone()
    for i, (rows, cols, to_rows, to_cols, flip) in enumerate(_crop_flip_windows(images, padding, hflip, generator)):
        window = images[i, :, rows, cols]
        out[i, :, to_rows, to_cols].copy_(window.flip(-1) if flip else window)
    return out


def random_crop_flip_normalize(images: Tensor, padding: int, hflip: bool, fill: Sequence[int], scale: Tensor,
                               shift: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """:func:`random_crop_flip_uint8` made float32 ``x * scale - shift`` (``scale``, ``shift``: per
    channel) in the same pass: each output pixel is written once, the border's only where it shows.

    On the CPU this is the decoded cache's training batch (the same draws, so the same images as the
    uint8 crop then a float conversion); it saves the uint8 copy and two passes over the float batch.
    """
    b, c, h, w = images.shape
    scale, shift = scale.reshape(c, 1, 1), shift.reshape(c, 1, 1)
    border = torch.tensor(list(fill), dtype=torch.float32).view(c, 1, 1).to(scale) * scale - shift
    out = torch.empty((b, c, h, w), dtype=torch.float32, device=images.device)
    for i, (rows, cols, to_rows, to_cols, flip) in enumerate(_crop_flip_windows(images, padding, hflip, generator)):
        window, target = images[i, :, rows, cols], out[i, :, to_rows, to_cols]
        torch.mul(window.flip(-1) if flip else window, scale, out=target)
        target.sub_(shift)
        image = out[i]
        for strip in (image[:, : to_rows.start], image[:, to_rows.stop :], image[:, to_rows, : to_cols.start],
                      image[:, to_rows, to_cols.stop :]):
            if strip.numel():
                strip.copy_(border.expand_as(strip))
    return out


# torchvision is imported only where its transforms are used (why: data/resize.py).
def rand_augment() -> Callable[[Tensor], Tensor]:
    """torchvision's v2.RandAugment, its module imported on first use."""
    from torchvision.transforms import v2

    return v2.RandAugment()


def _mixer(spec: AugmentSpec, num_classes: int) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None:
    """MixUp, CutMix, or (both on) one of the two per batch, as in timm and torchvision's references; None if off."""
    if spec.mixup_alpha <= 0 and spec.cutmix_alpha <= 0:
        return None
    from torchvision.transforms import v2

    mixers = [v2.MixUp(alpha=spec.mixup_alpha, num_classes=num_classes)] if spec.mixup_alpha > 0 else []
    mixers += [v2.CutMix(alpha=spec.cutmix_alpha, num_classes=num_classes)] if spec.cutmix_alpha > 0 else []
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)


class BatchAugment:
    """Augments a training batch on its device: crop, flip, RandAugment, then MixUp/CutMix.

    ``mean``/``std`` are the normalisation the images carry (None: images are in [0, 1]);
    RandAugment undoes it, because its colour ops (solarize, posterize, ...) assume [0, 1].
    ``randaugment`` overrides the spec (loading.py passes False where workers already ran it);
    ``geometric=False`` leaves crop and flip out (the decoded cache's batches had them in uint8).
    Random draws use torch's global generators, which Accelerate's ``set_seed`` seeds.
    """

    def __init__(
        self,
        spec: AugmentSpec,
        num_classes: int,
        image_size: int | tuple[int, int],
        *,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        randaugment: bool | None = None,
        geometric: bool = True,
    ) -> None:
        self.spec = spec
        self.num_classes = num_classes
        self.image_size = pair(image_size)
        self.randaugment = spec.randaugment if randaugment is None else randaugment
        self.crop_padding = spec.random_crop_padding if geometric else 0
        self.hflip = spec.hflip and geometric
        self._randaugment = rand_augment() if self.randaugment else None
        self._mean = None if mean is None else torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self._std = None if std is None else torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self._mix = _mixer(spec, num_classes)
        self.soft_labels = self._mix is not None
        self.enabled = bool(self.crop_padding or self.hflip or self.randaugment or self._mix)

    def __call__(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """(images, int64 labels) -> augmented images and labels (soft float with MixUp/CutMix)."""
        if self.crop_padding:
            images = random_crop(images, self.crop_padding)
        if self.hflip:
            images = random_hflip(images)
        if self._randaugment is not None:
            images = self._apply_randaugment(images)
        if self._mix is not None:
            images, labels = self._mix(images, labels)
        return images, labels

    def _apply_randaugment(self, images: Tensor) -> Tensor:
        if images.shape[1] not in (1, 3):
            channels = images.shape[1]
            raise ValueError(f"randaugment needs 1 or 3 image channels, got {channels}; set data.augment.randaugment: false")
        normalised = self._mean is not None and self._std is not None
        if normalised:
            self._mean, self._std = self._mean.to(images.device), self._std.to(images.device)  # once per device
            images = (images * self._std + self._mean).clamp_(0, 1)
        chunks = images.split(self.spec.randaugment_chunk)
        images = torch.cat([self._randaugment(chunk) for chunk in chunks])
        if normalised:
            images = (images - self._mean) / self._std
        return images

    def __repr__(self) -> str:
        return f"BatchAugment({self.spec!r}, randaugment={self.randaugment}, enabled={self.enabled})"

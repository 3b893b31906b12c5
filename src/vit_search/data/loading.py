"""A data set made ready to train on: its splits held as tensors or decoded by workers, normalised, batched.

The images come from a :mod:`.sources` entry (``data.dataset``). torchvision's files live in
``data.root``, else ``$VIT_SEARCH_DATA``, else ``~/.cache/vit-search/data`` (one place for every
working directory, so a search never downloads twice).

A split is held one of two ways:

* :class:`TensorSplit`: every image resized and normalised once, stored as one float32 tensor on
  the training device; batches are drawn on the device (:mod:`.batches`: no per-image Python, no
  workers, no host work per step). digits and synthetic always; the others when ``on_device`` says so (auto: when
  the float32 images fit in ``max_on_device_mb``).
* :class:`.cache_batches.CachedSplit`: the images decoded and resized once per data set and size
  into the decoded cache (:mod:`.cache`, ``data.cache``), read as uint8 batches and made float,
  normalised and augmented on the training device. Image folders and torchvision sets too large
  for the tensors, unless ``data.cache: off``. Image folders held as tensors are filled from the
  cache as well, so a search decodes them once, not once per trial.
* Otherwise (``data.cache: off``) a Dataset that DataLoader workers decode, resize, (RandAugment)
  and normalise per image.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..errors import DataError
from ..schema import DataSpec
from ..sizes import pair
from .augment import BatchAugment
from .batches import DeviceBatches
from .cache import DecodedCache, cache_root, open_cache
from .cache_batches import CacheBatches, CachedSplit
from .resize import resize_float
from .sources import DATASETS, Arrays, Items, Parts, PartSplits, default_root, read_image

_CHUNK = 4096  # images resized at a time when building tensors: bounds the temporary memory
_STATS_SAMPLE = 1024  # worker-path sets: training images decoded to estimate mean and std
Stats = tuple[float, ...] | None  # per-channel normalisation (None: not normalised)


class TensorSplit(Dataset):
    """A split held as tensors: images (N, C, H, W) float32 and labels (N,) int64 on one device.

    Training batches it through :class:`.batches.DeviceBatches` (drawn on the device), not a DataLoader.
    """

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.labels[index]


@dataclass
class DataSplits:
    """The three splits and what a model needs to know about them."""

    train: Dataset
    val: Dataset
    test: Dataset
    in_channels: int
    num_classes: int
    on_device: bool  # True: the splits are TensorSplits already on the training device
    image_size: tuple[int, int] = (0, 0)
    mean: tuple[float, ...] | None = None  # per-channel normalisation applied (None: images in [0, 1])
    std: tuple[float, ...] | None = None
    classes: list[str] = field(default_factory=list)
    augment: BatchAugment | None = None  # data.augment, built to match how the splits are held
    cache: DecodedCache | None = None  # the decoded cache the splits were read from


class _ArrayImages(Dataset):
    """(uint8 (C, H, W) tensor, label) items of an in-memory array, for the worker path."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], int(self.labels[index])


class _Transformed(Dataset):
    """Items ``indices`` of ``base`` with ``transform`` applied to the image (runs in workers)."""

    def __init__(self, base: Dataset, indices: np.ndarray, transform: Callable[[Any], Tensor]) -> None:
        self.base, self.indices, self.transform = base, indices, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image, label = read_image(self.base, int(self.indices[index]))
        return self.transform(image), int(label)


def _transform(
    size: tuple[int, int], *, scale: bool, randaugment: bool = False, mean: Stats = None, std: Stats = None
) -> Callable[[Any], Tensor]:
    """PIL image or uint8 tensor -> resized uint8 (scale=False) or float, optionally normalised."""
    from torchvision.transforms import v2

    steps: list[Any] = [v2.ToImage(), v2.Resize(size, antialias=True)]
    steps += [v2.RandAugment()] if randaugment else []  # per image, on uint8 as the paper's PIL did
    steps += [v2.ToDtype(torch.float32, scale=True)] if scale else []
    steps += [v2.Normalize(list(mean), list(std))] if mean is not None else []
    return v2.Compose(steps + [v2.ToPureTensor()])


# -- assembling ---------------------------------------------------------------------------------------
def load_data(spec: DataSpec, seed: int, device: torch.device | str = "cpu") -> DataSplits:
    """Load ``spec``'s data set, split it with ``seed``, normalise it, and hold it as ``spec.on_device`` and
    ``spec.cache`` say.

    A set made in memory (digits, synthetic: nothing on disk can change it) is made once per process
    and handed to every run that asks for the same one: the trials of a search, packed or one after
    another, share it (they only read it). Raises :class:`DataError` when files are missing or unreadable.
    """
    device = torch.device(device)
    if DATASETS[spec.dataset].parts is not None:
        return _load(spec, seed, device)
    key = (spec.model_dump_json(), seed, str(device))
    with _MADE_LOCK:  # packed trials starting together: one makes it, the others wait for it
        if key not in _MADE:
            _MADE.clear()  # the newest only: a search's trials ask for one set
            _MADE[key] = _load(spec, seed, device)
            if device.type == "cuda":  # made on this thread's stream; packed trials read it on theirs
                torch.cuda.current_stream(device).synchronize()
        return _MADE[key]


_MADE: dict[tuple[str, int, str], DataSplits] = {}
_MADE_LOCK = threading.Lock()


def _load(spec: DataSpec, seed: int, device: torch.device) -> DataSplits:
    size = pair(spec.image_size)
    source = DATASETS[spec.dataset]
    parts: Parts | None = None
    if source.parts is None:  # in memory already
        arrays, classes = source.read(spec, seed)
        count, channels = sum(len(y) for _, y in arrays.values()), arrays["train"][0].shape[1]
    else:
        parts, where, classes = source.parts(spec, seed)
        count, channels = sum(len(i) for _, i in where.values()), source.shape(spec)[0]
    # The spec refuses this at `data` (schema.DataSpec); a section changed in place after validation
    # (a nested assignment does not check the section again) still stops here, not in torchvision.
    if spec.augment.randaugment and channels not in (1, 3):
        raise DataError(f"data.augment.randaugment needs 1 or 3 channels, the data has {channels}")
    megabytes = count * channels * size[0] * size[1] * 4 / 2**20
    small = spec.on_device == "auto" and megabytes <= spec.max_on_device_mb
    tensors = parts is None or spec.on_device == "yes" or small
    on_device = tensors and spec.on_device != "no"
    folder = parts is not None and not isinstance(parts["train"], tuple)
    # The cache where the set would otherwise be decoded per epoch, or (image folders) per trial.
    cache = _cache(spec, parts, classes, size) if parts is not None and (folder or not tensors) else None

    if cache is not None and not tensors:
        splits, mean, std = _from_cache(cache, where, size, spec, seed, device)
    elif tensors:
        if cache is not None:
            arrays = {name: (cache.parts[p].read(i), torch.as_tensor(cache.parts[p].labels[i])) for name, (p, i) in
                      where.items()}
        elif folder:
            arrays = {name: _decode(parts[p], i, size, spec.num_workers) for name, (p, i) in where.items()}
        elif parts is not None:
            arrays = {name: (parts[p][0][i], parts[p][1][i]) for name, (p, i) in where.items()}
        splits, mean, std = _as_tensors(arrays, size, spec.normalize, device if on_device else torch.device("cpu"))
    else:
        items: Items = {name: (parts[p], i) if folder else (_ArrayImages(parts[p][0][i], parts[p][1][i]),
                                                            np.arange(len(i))) for name, (p, i) in where.items()}
        splits, mean, std = _for_workers(items, size, spec, seed)
    # Worker-path sets had RandAugment per image already; the batch augment does the rest on the device.
    # Cached batches were cropped, flipped and RandAugment-ed as uint8 by their loader.
    from_cache = cache is not None and not tensors
    augment = BatchAugment(spec.augment, len(classes), size, mean=mean, std=std,
                           randaugment=spec.augment.randaugment and tensors, geometric=not from_cache)
    return DataSplits(
        splits["train"], splits["val"], splits["test"], in_channels=int(channels), num_classes=len(classes),
        on_device=on_device, image_size=size, mean=mean, std=std, classes=list(classes), augment=augment,
        cache=cache,
    )


def prepare_cache(spec: DataSpec, seed: int) -> DecodedCache | None:
    """Build (or find) the decoded cache ``spec`` trains from; None where it trains without one."""
    return load_data(spec, seed).cache


def _cache(spec: DataSpec, parts: Parts, classes: list[str], size: tuple[int, int]) -> DecodedCache | None:
    if spec.cache == "off":
        return None
    root = Path(spec.root).expanduser() if spec.root else (Path(".") if spec.dataset == "imagefolder" else default_root())
    identity = str(root.resolve())
    return open_cache(spec.dataset, identity, parts, list(classes), size, cache_root(spec.cache))


def _from_cache(
    cache: DecodedCache, where: PartSplits, size: tuple[int, int], spec: DataSpec, seed: int, device: torch.device
) -> tuple[dict[str, Dataset], Stats, Stats]:
    """CachedSplits, normalised with the stats of the training images the worker path would sample."""
    mean = std = None
    if spec.normalize:
        part, index = where["train"]
        sample = np.random.default_rng(seed).choice(index, min(len(index), _STATS_SAMPLE), replace=False)
        mean, std = _uint8_stats(cache.parts[part], np.sort(sample))
    augment = spec.augment
    geometric = {"crop_padding": augment.random_crop_padding, "hflip": augment.hflip,
                 "randaugment_chunk": augment.randaugment_chunk if augment.randaugment else 0}
    return {name: CachedSplit(cache.parts[p], i, device, mean, std, **(geometric if name == "train" else {}))
            for name, (p, i) in where.items()}, mean, std


def _uint8_stats(part: Any, index: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of cached images ``index`` in [0, 1] (as :func:`_channel_stats`)."""
    total = squares = count = 0
    for start in range(0, len(index), 128):
        images = part.read(index[start : start + 128]).double().div_(255)
        total = total + images.sum(dim=(0, 2, 3))
        squares = squares + images.square().sum(dim=(0, 2, 3))
        count += images.numel() // images.shape[1]
    mean = total / max(count, 1)
    std = (squares / max(count, 1) - mean.square()).clamp_min(0).sqrt()
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    return tuple(mean.tolist()), tuple(std.tolist())


def _as_tensors(
    arrays: Arrays, size: tuple[int, int], normalize: bool, device: torch.device
) -> tuple[dict[str, Dataset], Stats, Stats]:
    """TensorSplits on ``device``: resized once, normalised once with the training split's stats."""
    held = {name: (_to_float(x, size, device), y.to(device)) for name, (x, y) in arrays.items()}
    mean = std = None
    if normalize:
        var, m = torch.var_mean(held["train"][0], dim=(0, 2, 3), correction=0)
        s = torch.where(var > 1e-12, var.sqrt(), torch.ones_like(var))  # a constant channel is left as is
        for x, _ in held.values():
            x.sub_(m.view(1, -1, 1, 1)).div_(s.view(1, -1, 1, 1))
        mean, std = tuple(m.tolist()), tuple(s.tolist())
    return {name: TensorSplit(x, y) for name, (x, y) in held.items()}, mean, std


def _for_workers(
    items: Items, size: tuple[int, int], spec: DataSpec, seed: int
) -> tuple[dict[str, Dataset], Stats, Stats]:
    """Datasets decoded, resized, RandAugment-ed (train) and normalised per image in DataLoader workers."""
    mean, std = _channel_stats(*items["train"], size, spec.num_workers, seed) if spec.normalize else (None, None)
    splits = {}
    for name, (base, idx) in items.items():
        randaugment = name == "train" and spec.augment.randaugment
        transform = _transform(size, scale=True, randaugment=randaugment, mean=mean, std=std)
        splits[name] = _Transformed(base, idx, transform)
    return splits, mean, std


def _to_float(images: Tensor, size: tuple[int, int], device: torch.device) -> Tensor:
    """uint8 or [0, 1] float (N, C, h, w) -> float32 (N, C, H, W) in [0, 1] on ``device``, resized in chunks."""
    out = torch.empty((len(images), images.shape[1], *size), dtype=torch.float32, device=device)
    for start in range(0, len(images), _CHUNK):
        chunk = images[start : start + _CHUNK].to(device)
        chunk = chunk.float().div_(255) if chunk.dtype == torch.uint8 else chunk.float()
        chunk = resize_float(chunk, size)
        out[start : start + _CHUNK] = chunk
    return out


def _decode(base: Dataset, indices: np.ndarray, size: tuple[int, int], num_workers: int) -> tuple[Tensor, Tensor]:
    """Decode and resize a folder split once, in workers: uint8 (N, 3, H, W) and labels."""
    dataset = _Transformed(base, indices, _transform(size, scale=False))
    loader = DataLoader(dataset, batch_size=256, num_workers=num_workers)
    images, labels = zip(*loader)
    return torch.cat(images), torch.cat(labels)


def _channel_stats(
    base: Dataset, indices: np.ndarray, size: tuple[int, int], num_workers: int, seed: int
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of up to _STATS_SAMPLE training images (decoding all would cost an epoch)."""
    sample = np.random.default_rng(seed).choice(indices, min(len(indices), _STATS_SAMPLE), replace=False)
    dataset = _Transformed(base, np.sort(sample), _transform(size, scale=True))
    loader = DataLoader(dataset, batch_size=128, num_workers=num_workers)
    total = squares = count = 0
    for images, _ in loader:
        total = total + images.double().sum(dim=(0, 2, 3))
        squares = squares + images.double().square().sum(dim=(0, 2, 3))
        count += images.numel() // images.shape[1]
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(0).sqrt()
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    return tuple(mean.tolist()), tuple(std.tolist())


def make_loader(
    dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int, num_workers: int = 0, drop_last: bool = False,
    rank: int = 0, num_processes: int = 1,
) -> DataLoader | DeviceBatches:
    """Batches of a split: drawn on the device for a TensorSplit (this process's shard); else a plain
    DataLoader, which Accelerate shards when it prepares it.

    The shuffle order is a seeded generator's: the same seed gives the same batches every run.
    """
    if isinstance(dataset, CachedSplit):
        return CacheBatches(dataset, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last, rank=rank,
                            num_processes=num_processes)
    if isinstance(dataset, TensorSplit):
        return DeviceBatches(dataset.images, dataset.labels, batch_size, shuffle=shuffle, seed=seed,
                             drop_last=drop_last, rank=rank, num_processes=num_processes)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed), pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,  # no re-fork of workers each epoch
    )

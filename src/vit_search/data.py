"""Data sets: loading, a seeded stratified train/val/test split, normalisation, and batching.

Sources (``data.dataset``): ``digits`` (scikit-learn's 8x8 digits, offline), ``mnist``,
``fashion_mnist``, ``cifar10``, ``cifar100`` (torchvision), ``imagefolder`` (``root/<class>/<image>``,
or ``root/train``, ``root/val``, ``root/test``) and ``synthetic`` (class patterns plus noise).
torchvision's files live in ``data.root``, else ``$VIT_SEARCH_DATA``, else ``~/.cache/vit-search/data``
(one place for every working directory, so a search never downloads twice).

A split is held one of two ways:

* :class:`TensorSplit`: every image resized and normalised once, stored as one float32 tensor on
  the training device; a batch is one tensor index through ``__getitems__`` (no per-image Python,
  no workers). digits and synthetic always; the others when ``on_device`` says so (auto: when
  the float32 images fit in ``max_on_device_mb``).
* Otherwise a Dataset that DataLoader workers decode, resize, (RandAugment) and normalise per image.
"""

from __future__ import annotations

import os
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torchvision
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from .augment import BatchAugment, pair
from .spec import DataSpec

__all__ = [
    "BatchAugment", "DataError", "DataSplits", "TensorSplit", "default_root", "load_data", "make_loader", "stratified_split",
]

_TORCHVISION = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "cifar10": "CIFAR10", "cifar100": "CIFAR100"}
_CHUNK = 4096  # images resized at a time when building tensors: bounds the temporary memory
_STATS_SAMPLE = 1024  # worker-path sets: training images decoded to estimate mean and std
Stats = tuple[float, ...] | None  # per-channel normalisation (None: not normalised)


class DataError(ValueError):
    """Data that cannot be found or read; the message says where it was expected and what to do."""


class TensorSplit(Dataset):
    """A split held as tensors: images (N, C, H, W) float32 and labels (N,) int64 on one device."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.labels[index]

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        # DataLoader's fetcher calls this with a whole batch of indices: one gather, not B items.
        index = torch.as_tensor(indices, device=self.labels.device)
        return self.images[index], self.labels[index]


def _passthrough(batch: Any) -> Any:
    """collate_fn for TensorSplit: ``__getitems__`` already returns the stacked batch."""
    return batch


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


def default_root() -> Path:
    """Where torchvision data sets live when ``data.root`` is unset."""
    return Path(os.environ.get("VIT_SEARCH_DATA") or Path.home() / ".cache" / "vit-search" / "data").expanduser()


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted indices (kept, held out) with ``fraction`` held out, class shares kept; same seed, same split."""
    from sklearn.model_selection import train_test_split

    index = np.arange(len(labels))
    state = seed % 2**32
    try:
        kept, held = train_test_split(index, test_size=fraction, stratify=labels, random_state=state)
    except ValueError:
        # A class with a single image, or fewer held-out slots than classes: shuffle unstratified.
        try:
            kept, held = train_test_split(index, test_size=fraction, random_state=state)
        except ValueError as err:
            raise DataError(f"cannot split {len(labels)} images with fraction {fraction}: {err}") from None
    return np.sort(kept), np.sort(held)


def _three_way(labels: np.ndarray, spec: DataSpec, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """train/val/test indices: test_fraction of all, then val_fraction of the rest."""
    rest, test = stratified_split(labels, spec.test_fraction, seed)
    train, val = stratified_split(labels[rest], spec.val_fraction, seed)
    return rest[train], rest[val], test


# -- sources held in memory: (images uint8 or float in [0, 1], (N, C, h, w); labels) per split ------
Arrays = dict[str, tuple[Tensor, Tensor]]


def _digits(spec: DataSpec, seed: int) -> tuple[Arrays, list[str]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16  # 17 grey levels, 0..16
    labels = torch.as_tensor(digits.target, dtype=torch.int64)
    parts = _three_way(digits.target, spec, seed)
    arrays = {name: (images[i], labels[i]) for name, i in zip(("train", "val", "test"), parts)}
    return arrays, [str(d) for d in range(10)]


def _synthetic(spec: DataSpec, seed: int) -> tuple[Arrays, list[str]]:
    """Each class a smooth random pattern (4x4 upsampled, so any patch size sees it) plus uniform noise."""
    g = torch.Generator().manual_seed(seed)
    h, w = pair(spec.image_size)
    coarse = torch.rand(spec.num_classes, spec.channels, 4, 4, generator=g)
    patterns = TF.resize(coarse, [h, w], antialias=True)
    labels = torch.randperm(spec.num_samples, generator=g) % spec.num_classes  # balanced classes
    noise = torch.rand(spec.num_samples, spec.channels, h, w, generator=g)
    images = 0.5 * patterns[labels] + 0.5 * noise
    parts = _three_way(labels.numpy(), spec, seed)
    names = [f"class_{i}" for i in range(spec.num_classes)]
    return {name: (images[i], labels[i]) for name, i in zip(("train", "val", "test"), parts)}, names


def _torchvision(spec: DataSpec, seed: int) -> tuple[Arrays, list[str]]:
    """The official train split divided into train/val (seeded, stratified); the official test split."""
    cls = getattr(torchvision.datasets, _TORCHVISION[spec.dataset])
    root = Path(spec.root).expanduser() if spec.root else default_root()
    if issubclass(cls, torchvision.datasets.MNIST):
        folder = root / cls.__name__ / "raw"
        names = [os.path.splitext(name)[0] for name, _ in cls.resources]
    else:
        folder = root / cls.base_folder
        names = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing and spec.download:
        try:
            cls(str(root), train=True, download=True)
        except (RuntimeError, OSError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise DataError(
                f"{spec.dataset}: could not download into {folder} ({first}); "
                f"check the network, or place {', '.join(names)} there"
            ) from None
        missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise DataError(
            f"{spec.dataset}: data files not found in {folder} (missing {', '.join(missing)}); "
            f"set data.download: true to fetch them, or place the files there (data.root sets the folder above it)"
        )
    try:
        splits, classes = _read_official(cls, root, folder)
    except (AssertionError, TypeError, ValueError, KeyError, pickle.UnpicklingError, EOFError) as err:
        raise DataError(f"{spec.dataset}: cannot read the files in {folder} ({err}); delete them and download again") \
            from None
    # (N, H, W) grey or (N, H, W, 3) colour -> (N, C, H, W)
    (train_x, train_y), (test_x, test_y) = [
        (torch.as_tensor(x).unsqueeze(1) if x.ndim == 3 else torch.as_tensor(x).permute(0, 3, 1, 2),
         torch.as_tensor(y, dtype=torch.int64))
        for x, y in splits
    ]
    keep, val = stratified_split(train_y.numpy(), spec.val_fraction, seed)
    arrays = {"train": (train_x[keep], train_y[keep]), "val": (train_x[val], train_y[val]), "test": (test_x, test_y)}
    return arrays, classes


Pairs = list[tuple[np.ndarray, np.ndarray]]  # (images, labels) of the train and test splits


def _read_official(cls: type, root: Path, folder: Path) -> tuple[Pairs, list[str]]:
    """(images, labels) of the train and test splits through torchvision's own class."""
    try:
        sets = [cls(str(root), train=train) for train in (True, False)]
    except RuntimeError:
        if issubclass(cls, torchvision.datasets.MNIST):
            raise ValueError("torchvision did not accept them") from None
        # torchvision refuses CIFAR files whose md5 is not the official release's (a subset, a
        # re-pickled copy); the format is documented, so read them ourselves and say so.
        warnings.warn(f"{folder}: not the official release's files (md5 differs); reading them as CIFAR pickles",
                      stacklevel=2)
        return _read_cifar(cls, folder)
    return [(np.asarray(s.data), np.asarray(s.targets)) for s in sets], list(sets[0].classes)


def _read_cifar(cls: type, folder: Path) -> tuple[Pairs, list[str]]:
    """CIFAR's python pickles: 'data' (N, 3072) uint8, 'labels' or 'fine_labels'; HWC like torchvision."""
    splits = []
    for files in (cls.train_list, cls.test_list):
        xs, ys = [], []
        for name, _ in files:
            with open(folder / name, "rb") as f:
                entry = pickle.load(f, encoding="latin1")  # the format is pickle; torchvision loads it too
            xs.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            ys.extend(entry["labels"] if "labels" in entry else entry["fine_labels"])
        splits.append((np.concatenate(xs), np.asarray(ys)))
    with open(folder / cls.meta["filename"], "rb") as f:
        classes = list(pickle.load(f, encoding="latin1")[cls.meta["key"]])
    return splits, classes


# -- image folders: (dataset of (PIL image, label), indices) per split ------------------------------
Items = dict[str, tuple[Dataset, np.ndarray]]


class _ClassesOf(torchvision.datasets.ImageFolder):
    """An ImageFolder that uses the training folder's class indices (val may lack some classes)."""

    def __init__(self, root: Path, class_to_idx: dict[str, int]) -> None:
        self._fixed = class_to_idx
        super().__init__(str(root), allow_empty=True)

    def find_classes(self, directory: str | os.PathLike[str]) -> tuple[list[str], dict[str, int]]:
        unknown = sorted({e.name for e in os.scandir(directory) if e.is_dir()} - set(self._fixed))
        if unknown:
            raise DataError(f"{directory}: class folders {', '.join(unknown)} are not in the training folder")
        return list(self._fixed), dict(self._fixed)


def _imagefolder(spec: DataSpec, seed: int) -> tuple[Items, list[str]]:
    root = Path(spec.root or ".").expanduser()
    has_train = (root / "train").is_dir()
    try:
        base = torchvision.datasets.ImageFolder(str(root / "train" if has_train else root))
    except (FileNotFoundError, OSError) as err:
        raise DataError(f"imagefolder: cannot read {root}: {err}") from None
    labels = np.asarray(base.targets)
    if not has_train:
        train, val, test = _three_way(labels, spec, seed)
        return {"train": (base, train), "val": (base, val), "test": (base, test)}, base.classes
    # root/train exists: root/val and root/test are used where present, else carved from train.
    items: Items = {}
    kept = np.arange(len(labels))
    for name, fraction in (("test", spec.test_fraction), ("val", spec.val_fraction)):
        if (root / name).is_dir():
            folder = _ClassesOf(root / name, base.class_to_idx)
            items[name] = (folder, np.arange(len(folder)))
        else:
            keep, held = stratified_split(labels[kept], fraction, seed)
            items[name] = (base, kept[held])
            kept = kept[keep]
    items["train"] = (base, kept)
    return items, base.classes


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
        image, label = self.base[int(self.indices[index])]
        return self.transform(image), int(label)


def _transform(
    size: tuple[int, int], *, scale: bool, randaugment: bool = False, mean: Stats = None, std: Stats = None
) -> v2.Compose:
    """PIL image or uint8 tensor -> resized uint8 (scale=False) or float, optionally normalised."""
    steps: list[Any] = [v2.ToImage(), v2.Resize(size, antialias=True)]
    steps += [v2.RandAugment()] if randaugment else []  # per image, on uint8 as the paper's PIL did
    steps += [v2.ToDtype(torch.float32, scale=True)] if scale else []
    steps += [v2.Normalize(list(mean), list(std))] if mean is not None else []
    return v2.Compose(steps + [v2.ToPureTensor()])


# -- assembling ---------------------------------------------------------------------------------------
def load_data(spec: DataSpec, seed: int, device: torch.device | str = "cpu") -> DataSplits:
    """Load ``spec``'s data set, split it with ``seed``, normalise it, and hold it as ``spec.on_device`` says.

    Raises :class:`DataError` when files are missing or unreadable.
    """
    device = torch.device(device)
    size = pair(spec.image_size)
    if spec.dataset == "imagefolder":
        items, classes = _imagefolder(spec, seed)
        count, channels = sum(len(i) for _, i in items.values()), 3  # ImageFolder decodes to RGB
    else:
        loader = {"digits": _digits, "synthetic": _synthetic}.get(spec.dataset, _torchvision)
        arrays, classes = loader(spec, seed)
        count, channels = sum(len(y) for _, y in arrays.values()), arrays["train"][0].shape[1]
    if spec.augment.randaugment and channels not in (1, 3):
        raise DataError(f"data.augment.randaugment needs 1 or 3 channels, the data has {channels}")
    megabytes = count * channels * size[0] * size[1] * 4 / 2**20
    in_memory = spec.dataset in ("digits", "synthetic")  # nothing to decode: always tensors
    small = spec.on_device == "auto" and megabytes <= spec.max_on_device_mb
    tensors = in_memory or spec.on_device == "yes" or small
    on_device = tensors and spec.on_device != "no"

    if tensors:
        if spec.dataset == "imagefolder":
            arrays = {name: _decode(base, idx, size, spec.num_workers) for name, (base, idx) in items.items()}
        splits, mean, std = _as_tensors(arrays, size, spec.normalize, device if on_device else torch.device("cpu"))
    else:
        if spec.dataset != "imagefolder":
            items = {name: (_ArrayImages(x, y), np.arange(len(y))) for name, (x, y) in arrays.items()}
        splits, mean, std = _for_workers(items, size, spec, seed)
    # Worker-path sets had RandAugment per image already; the batch augment does the rest on the device.
    augment = BatchAugment(
        spec.augment, len(classes), size, mean=mean, std=std, randaugment=spec.augment.randaugment and tensors
    )
    return DataSplits(
        splits["train"], splits["val"], splits["test"], in_channels=int(channels), num_classes=len(classes),
        on_device=on_device, image_size=size, mean=mean, std=std, classes=list(classes), augment=augment,
    )


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
        if tuple(chunk.shape[-2:]) != size:
            chunk = TF.resize(chunk, list(size), antialias=True)  # bilinear, antialiased when shrinking
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
    dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int, num_workers: int = 0, drop_last: bool = False
) -> DataLoader:
    """A plain DataLoader (Accelerate shards its batch_sampler); TensorSplits get whole-batch fetches, no workers.

    The shuffle order is a seeded generator's: the same seed gives the same batches every run.
    """
    if isinstance(dataset, TensorSplit):
        return DataLoader(
            dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, collate_fn=_passthrough,
            generator=torch.Generator().manual_seed(seed), num_workers=0,
        )
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed), pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,  # no re-fork of workers each epoch
    )

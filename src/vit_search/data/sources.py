"""Where images come from: one table of data sets, which the spec schema takes its names from.

Each source reads its images and splits them train/val/test (seeded, stratified). In-memory
sources return ``(images, labels)`` tensors per split; ``imagefolder`` returns a dataset of files
and the indices of each split, decoded later (see :mod:`.loading`). torch and torchvision are
imported when a source is read, not when the table is: a spec validates without them. scikit-learn
is never imported: its digits file is read as it reads it, and its splits drawn as it draws them
(:mod:`.splits`). Adding a data set is an entry in ``DATASETS`` and its reader.
"""

from __future__ import annotations

import math
import os
import pickle
import re
import shutil
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ..errors import DataError
from .splits import train_test_split

if TYPE_CHECKING:
    from torch import Tensor
    from torch.utils.data import Dataset

    from ..schema import DataSpec

Arrays = dict[str, tuple["Tensor", "Tensor"]]  # split -> (images (N, C, h, w) uint8 or [0, 1] float, labels)
Items = dict[str, tuple["Dataset", np.ndarray]]  # split -> (dataset of (PIL image, label), indices)
# What a decoded cache stores: a source's images whole, independent of the seed's split.
Parts = dict[str, Any]  # part -> a dataset of (PIL image, label), or (images (N, C, h, w) uint8, labels)
PartSplits = dict[str, tuple[str, np.ndarray]]  # split -> (part, sorted indices into it)


@dataclass(frozen=True)
class Source:
    """A data set: its (channels, classes) without reading the images, and how to read it (one of two)."""

    shape: Callable[["DataSpec"], tuple[int, int]]
    # Small and decoded already: the splits as arrays, always held as tensors.
    read: Callable[["DataSpec", int], tuple[Arrays, list[str]]] | None = None
    # To decode: the images whole and each split's share of them (what the decoded cache stores).
    parts: Callable[["DataSpec", int], tuple[Parts, PartSplits, list[str]]] | None = None


def default_root() -> Path:
    """Where torchvision data sets live when ``data.root`` is unset."""
    return Path(os.environ.get("VIT_SEARCH_DATA") or Path.home() / ".cache" / "vit-search" / "data").expanduser()


def stratified_split(labels: np.ndarray, fraction: float, seed: int,
                     key: str = "data.val_fraction") -> tuple[np.ndarray, np.ndarray]:
    """Sorted indices (kept, held out) with ``fraction`` (the spec's ``key``) held out, class shares kept;
    same seed, same split. The images of a class that has only one stay on the kept side."""
    index = np.arange(len(labels))
    state = seed % 2**32
    inverse = np.unique(labels, return_inverse=True)[1].reshape(-1)
    single = np.bincount(inverse)[inverse] == 1 if len(labels) else np.zeros(0, dtype=bool)
    try:
        if not single.any():
            kept, held = train_test_split(index, fraction, state, stratify=labels)
        else:
            # A class of one image cannot be on both sides, and would turn stratification off for every class:
            # it is kept, and the others are stratified, as many held out as the share of all of them says.
            held_count = math.ceil(fraction * len(labels))  # scikit-learn's count for a share
            kept, held = train_test_split(index[~single], held_count, state, stratify=labels[~single])
            kept = np.concatenate([kept, index[single]])
    except ValueError:
        # Fewer held-out (or kept) slots than classes, or no class of two images: shuffle unstratified.
        try:
            kept, held = train_test_split(index, fraction, state)
        except ValueError:  # scikit-learn's words are its own (test_size, train_size): said in the spec's
            raise DataError(f"{key} {fraction}: holding out that share of {_images(len(labels))} leaves one side "
                            f"with none; set {key} so that both keep at least one image, or add images") from None
    return np.sort(kept), np.sort(held)


def _images(count: int) -> str:
    return f"{count:,} image" + ("" if count == 1 else "s")


def _room_for_val(left: int, total: int, test_fraction: float) -> None:
    """Refuse a test share that leaves fewer than the two images that train and val need, one each: no
    ``val_fraction`` could fix that, so the error names ``test_fraction``."""
    if left < 2:
        raise DataError(f"data.test_fraction {test_fraction}: holding out that share of {_images(total)} for test "
                        f"leaves {_images(left)} for training and validation, which need one each; lower "
                        f"data.test_fraction, or add images")


def _three_way(labels: np.ndarray, spec: "DataSpec", seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """train/val/test indices: test_fraction of all, then val_fraction of the rest."""
    rest, test = stratified_split(labels, spec.test_fraction, seed, "data.test_fraction")
    _room_for_val(len(rest), len(labels), spec.test_fraction)
    train, val = stratified_split(labels[rest], spec.val_fraction, seed)
    return rest[train], rest[val], test


# -- in memory ------------------------------------------------------------------------------------
def read_digits(spec: "DataSpec", seed: int) -> tuple[Arrays, list[str]]:
    """scikit-learn's 8x8 digits (1,797 images, 17 grey levels), shipped with it: works offline."""
    import torch

    pixels, target = _digits()
    images = torch.as_tensor(pixels, dtype=torch.float32).unsqueeze(1) / 16  # 17 grey levels, 0..16
    labels = torch.as_tensor(target, dtype=torch.int64)
    parts = _three_way(target, spec, seed)
    arrays = {name: (images[i], labels[i]) for name, i in zip(("train", "val", "test"), parts)}
    return arrays, [str(d) for d in range(10)]


def _digits() -> tuple[np.ndarray, np.ndarray]:
    """(images (1797, 8, 8), labels) as ``sklearn.datasets.load_digits`` reads them, from the file scikit-learn
    ships, without importing it (about 1.5 s: most of scikit-learn comes with ``sklearn.datasets``)."""
    import gzip
    from importlib.util import find_spec

    found = find_spec("sklearn")  # where the package is, its code not run
    if found is None or not found.submodule_search_locations:
        raise DataError("data.dataset digits: scikit-learn, which ships it, is not installed; pip install scikit-learn")
    with gzip.open(Path(found.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz", "rt") as rows:
        table = np.loadtxt(rows, delimiter=",")
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(int)


def read_synthetic(spec: "DataSpec", seed: int) -> tuple[Arrays, list[str]]:
    """Each class a smooth random pattern (4x4 upsampled, so any patch size sees it) plus uniform noise."""
    import torch

    from ..sizes import pair
    from .resize import resize_float

    g = torch.Generator().manual_seed(seed)
    h, w = pair(spec.image_size)
    coarse = torch.rand(spec.num_classes, spec.channels, 4, 4, generator=g)
    patterns = resize_float(coarse, (h, w))
    labels = torch.randperm(spec.num_samples, generator=g) % spec.num_classes  # balanced classes
    noise = torch.rand(spec.num_samples, spec.channels, h, w, generator=g)
    images = 0.5 * patterns[labels] + 0.5 * noise
    parts = _three_way(labels.numpy(), spec, seed)
    names = [f"class_{i}" for i in range(spec.num_classes)]
    return {name: (images[i], labels[i]) for name, i in zip(("train", "val", "test"), parts)}, names


def torchvision_parts(class_name: str,
                      num_classes: int) -> Callable[["DataSpec", int], tuple[Parts, PartSplits, list[str]]]:
    """The official train and test splits of one of torchvision's data sets (labels checked against
    ``num_classes``), and the seeded split of the official train split into train/val (stratified)."""

    def parts(spec: "DataSpec", seed: int) -> tuple[Parts, PartSplits, list[str]]:
        import torch
        import torchvision

        cls = getattr(torchvision.datasets, class_name)
        root = Path(spec.root).expanduser() if spec.root else default_root()
        mnist = issubclass(cls, torchvision.datasets.MNIST)
        if mnist:
            folder = root / cls.__name__ / "raw"
            names = [os.path.splitext(name)[0] for name, _ in cls.resources]
        else:
            folder = root / cls.base_folder
            names = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        missing = [n for n in names if not (folder / n).is_file()]
        if missing and spec.download:
            # The highest folder the download is about to make: a failed one removes it, and all it made.
            new = next((d for d in reversed([folder, *folder.parents]) if not d.exists()), None)
            try:
                cls(str(root), train=True, download=True)
            except (RuntimeError, OSError) as err:
                if new is not None:
                    shutil.rmtree(new, ignore_errors=True)
                # torchvision's reason is on the lines after "Error downloading NAME:": all of it, on one line.
                first = " ".join(str(err).split())[:300] or type(err).__name__
                raise DataError(
                    f"{spec.dataset}: could not download into {folder} ({first}); "
                    f"check the network, or place {', '.join(names)} there"
                ) from None
            missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise DataError(
                f"{spec.dataset}: data files not found in {folder} (missing {', '.join(missing)}); set "
                f"data.download: true to fetch them, or place the files there (data.root sets the folder above it)"
            )
        if mnist:
            splits, classes = _read_mnist(cls, folder, spec.dataset, num_classes)
        else:
            splits, classes = _read_official(cls, root, folder, spec.dataset, num_classes)
        # (N, H, W) grey or (N, H, W, 3) colour -> (N, C, H, W)
        (train_x, train_y), (test_x, test_y) = [
            (torch.as_tensor(x).unsqueeze(1) if x.ndim == 3 else torch.as_tensor(x).permute(0, 3, 1, 2),
             torch.as_tensor(y, dtype=torch.int64))
            for x, y in splits
        ]
        keep, val = stratified_split(train_y.numpy(), spec.val_fraction, seed)
        where = {"train": ("train", keep), "val": ("train", val), "test": ("test", np.arange(len(test_y)))}
        return {"train": (train_x, train_y), "test": (test_x, test_y)}, where, classes

    parts.__doc__ = f"torchvision's {class_name}, read from data.root (or downloaded with data.download)."
    return parts


Pairs = list[tuple[np.ndarray, np.ndarray]]  # (images, labels) of the train and test splits
_REPLACE = "delete it and download the set again (data.download: true), or put the release's file there"


def _read_official(cls: type, root: Path, folder: Path, dataset: str, num_classes: int) -> tuple[Pairs, list[str]]:
    """(images, labels) of CIFAR's train and test splits: through torchvision's own class where the files are
    the release's (their md5 says so), else read as CIFAR pickles, file by file."""
    try:
        sets = [cls(str(root), train=train) for train in (True, False)]
    except RuntimeError:
        # torchvision refuses CIFAR files whose md5 is not the official release's (a subset, a
        # re-pickled copy); the format is documented, so read them ourselves and say so.
        warn_once(f"{folder}: not the official release's files (md5 differs); reading them as CIFAR pickles")
        return _read_cifar(cls, folder, dataset, num_classes)
    except Exception as err:  # the release's files, checked by their md5: what is left is the reader's
        raise DataError(f"{dataset}: cannot read the files in {folder} ({_why(err)}); delete them and download the "
                        f"set again (data.download: true)") from None
    return [(np.asarray(s.data), np.asarray(s.targets)) for s in sets], list(sets[0].classes)


_WARNED: set[str] = set()


def warn_once(text: str) -> None:
    """``text`` as one line on stderr, ``vit-search: warning: ...``, once per process (every trial reads the set)."""
    if text not in _WARNED:
        _WARNED.add(text)
        print(f"vit-search: warning: {text}", file=sys.stderr, flush=True)


def _why(err: BaseException) -> str:
    """An exception as a short line: its type, and its message where it has one."""
    said = " ".join(str(err).split())[:200]
    return f"{type(err).__name__}: {said}" if said else type(err).__name__


def _reading(path: Path, dataset: str, read: Callable[[Path], Any]) -> Any:
    """``read(path)``, whatever it raises (the file is what the user must fix) made one DataError naming ``path``."""
    try:
        return read(path)
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"{dataset}: cannot read {path} ({_why(err)}); {_REPLACE}") from None


def _unpickle(path: Path) -> Any:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")  # the format is pickle; torchvision loads it too


def _read_cifar(cls: type, folder: Path, dataset: str, num_classes: int) -> tuple[Pairs, list[str]]:
    """CIFAR's python pickles: 'data' (N, 3072) uint8, 'labels' or 'fine_labels'; HWC like torchvision."""
    splits = []
    for files in (cls.train_list, cls.test_list):
        batches = [_cifar_batch(folder / name, dataset, num_classes) for name, _ in files]
        splits.append((np.concatenate([x for x, _ in batches]), np.concatenate([y for _, y in batches])))
    meta = folder / cls.meta["filename"]
    classes = _reading(meta, dataset, lambda path: list(_unpickle(path)[cls.meta["key"]]))
    if len(classes) != num_classes:  # the model's head has num_classes outputs, the labels index these names
        raise DataError(f"{dataset}: {meta} names {len(classes):,} classes, {dataset} has {num_classes}; {_REPLACE}")
    return splits, classes


def _cifar_batch(path: Path, dataset: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR batch file: images (N, 32, 32, 3) uint8 and their labels, one per image, each a class."""

    def read(path: Path) -> tuple[np.ndarray, np.ndarray]:
        entry = _unpickle(path)
        images = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return images, np.asarray(entry["labels"] if "labels" in entry else entry["fine_labels"])

    images, labels = _reading(path, dataset, read)
    if len(labels) != len(images):  # misaligned from the first missing label on, every later one wrong
        raise DataError(f"{dataset}: {path} holds {_images(len(images))} but {len(labels):,} labels; {_REPLACE}")
    return images, _classes_of(labels, path, dataset, num_classes)


def _classes_of(labels: np.ndarray, path: Path, dataset: str, num_classes: int) -> np.ndarray:
    """``labels`` as int64, refused unless each is a class of the data set (0 to num_classes - 1)."""
    if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise DataError(f"{dataset}: {path}: its labels are not class numbers (a list of {labels.dtype} of shape "
                        f"{labels.shape}); {_REPLACE}")
    outside = (labels < 0) | (labels >= num_classes)
    if outside.any():
        count = int(outside.sum())
        raise DataError(f"{dataset}: {path} holds {count:,} label{'' if count == 1 else 's'} outside 0 to "
                        f"{num_classes - 1}, the classes of {dataset} (the first: {labels[outside][0]}); {_REPLACE}")
    return labels.astype(np.int64)


def _read_mnist(cls: type, folder: Path, dataset: str, num_classes: int) -> tuple[Pairs, list[str]]:
    """MNIST's (and FashionMNIST's) raw idx files, read file by file as torchvision reads them, so that a
    damaged one is named."""
    splits = []
    for prefix in ("train", "t10k"):  # torchvision's names for the two splits' files
        images_path, labels_path = folder / f"{prefix}-images-idx3-ubyte", folder / f"{prefix}-labels-idx1-ubyte"
        images = _reading(images_path, dataset, lambda path: _idx(path, 3))
        labels = _reading(labels_path, dataset, lambda path: _idx(path, 1))
        if len(labels) != len(images):
            raise DataError(f"{dataset}: {labels_path} holds {len(labels):,} labels but {images_path} holds "
                            f"{_images(len(images))}; delete them and download the set again (data.download: true), "
                            f"or put the release's files there")
        splits.append((images, _classes_of(labels, labels_path, dataset, num_classes)))
    return splits, list(cls.classes)


def _idx(path: Path, ndim: int) -> np.ndarray:
    """An idx file (MNIST's format) of bytes in ``ndim`` dimensions; a ValueError says what is wrong."""
    raw = np.fromfile(path, dtype=np.uint8)  # writable, unlike a buffer of bytes: torch takes it without a copy
    head = 4 + 4 * ndim
    magic = bytes(raw[:4])
    if len(raw) < head or magic != bytes([0, 0, 0x08, ndim]):  # 0x08: unsigned bytes, as MNIST's files hold
        raise ValueError(f"not an idx file of {ndim}-dimensional bytes (it starts {magic.hex() or 'empty'}, "
                         f"not 000008{ndim:02x})")
    sizes = struct.unpack(f">{ndim}I", bytes(raw[4:head]))
    if len(raw) - head != math.prod(sizes):
        raise ValueError(f"its header says {' x '.join(map(str, sizes))} = {math.prod(sizes):,} bytes follow, "
                         f"{len(raw) - head:,} do: cut short or padded")
    return raw[head:].reshape(sizes)


# -- image folders --------------------------------------------------------------------------------
def class_folders(spec: "DataSpec") -> list[Path]:
    """The class folders of an image folder: ``root/train/<class>``, else ``root/<class>``."""
    root = Path(spec.root or ".").expanduser()
    if not root.is_dir():
        raise ValueError(f"data.root '{root}' {'is not a folder' if root.exists() else 'does not exist'}; "
                         f"imagefolder expects root/<class>/<image>")
    train = root / "train" if (root / "train").is_dir() else root
    classes = sorted(p for p in train.iterdir() if p.is_dir()) if train.is_dir() else []
    if not classes:
        raise ValueError(f"data.root '{root}' has no class folders; imagefolder expects root/<class>/<image>")
    empty = [folder.name for folder in classes if not _holds_an_image(folder)]
    if empty:
        raise ValueError(_no_images(", ".join(empty[:3]) + (f" and {len(empty) - 3} more" if len(empty) > 3 else ""),
                                    root))
    if len(classes) == 1:  # one class scores a perfect, meaningless 1.0000
        raise ValueError(_one_class(root, classes[0], train != root))
    for name in ("val", "test") if train != root else ():
        # ImageFolder reads a split's images in its class folders only: loose ones would make a split of none,
        # which scores 0.0000, silently.
        split = root / name
        if split.is_dir() and not any(_holds_an_image(p) for p in split.iterdir() if p.is_dir()):
            raise ValueError(_empty_split(root, name))
    return classes


def _one_class(root: Path, only: Path, has_train: bool) -> str:
    if has_train:
        return (f"data.root '{root}': train/ holds one class folder only, '{only.name}/'; a classifier needs at least "
                f"2: put each class's images in a folder of its own under train/")
    try:  # root/images/<class>/...: data.root one folder too high
        deeper = any(entry.is_dir() for entry in os.scandir(only))
    except OSError:
        deeper = False
    return (f"data.root '{root}' holds one class folder only, '{only.name}/', and a classifier needs at least 2: "
            f"data.root should be the folder that holds the class folders"
            + (f" (is it '{only}'?)" if deeper else ""))


def _empty_split(root: Path, name: str) -> str:
    return (f"data.root '{root}': {name}/ holds no images in class folders ({name}/<class>/<image>), so its split "
            f"would be empty; put the {name} images in its class folders, or remove {name}/ to hold out "
            f"data.{name}_fraction of train instead")


# torchvision.datasets.folder.IMG_EXTENSIONS, which ImageFolder reads (written out: validate imports no torchvision).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _holds_an_image(folder: Path) -> bool:
    # Stops at the first image: a class folder of a million images costs one listing, not a million.
    for _, _, files in os.walk(folder, followlinks=True):  # as ImageFolder walks it
        if any(name.lower().endswith(IMAGE_SUFFIXES) for name in files):
            return True
    return False


def _no_images(names: str, root: Path) -> str:
    return (f"class folder(s) {names} under data.root '{root}' hold no images ({', '.join(IMAGE_SUFFIXES)}); "
            "add images or remove the folder(s)")


def imagefolder_parts(spec: "DataSpec", seed: int) -> tuple[Parts, PartSplits, list[str]]:
    """The folders of an image folder (``train``, and ``val``/``test`` where present) and the splits."""
    import torchvision

    root = Path(spec.root or ".").expanduser()
    has_train = (root / "train").is_dir()
    try:
        base = torchvision.datasets.ImageFolder(str(root / "train" if has_train else root), loader=read_rgb)
    except (FileNotFoundError, OSError) as err:
        empty = re.match(r"Found no valid file for the classes (.*?)\. ", str(err))
        if empty:  # torchvision's words for a class folder emptied since the spec was validated
            raise DataError(f"imagefolder: {_no_images(empty[1], root)}") from None
        raise DataError(f"imagefolder: cannot read {root}: {err}") from None
    labels = np.asarray(base.targets)
    parts: Parts = {"train": base}
    if not has_train:
        _no_folder_twice(parts, root)
        train, val, test = _three_way(labels, spec, seed)
        return parts, {"train": ("train", train), "val": ("train", val), "test": ("train", test)}, base.classes
    # root/train exists: root/val and root/test are used where present, else carved from train.
    where: PartSplits = {}
    kept = np.arange(len(labels))
    for name, fraction in (("test", spec.test_fraction), ("val", spec.val_fraction)):
        if (root / name).is_dir():
            parts[name] = _folder_with_classes(root / name, base.class_to_idx)
            if len(parts[name]) == 0:  # its images removed since the spec was validated
                raise DataError(f"imagefolder: {_empty_split(root, name)}")
            where[name] = (name, np.arange(len(parts[name])))
        else:
            if name == "val" and len(kept) < len(labels):  # test carved out first: what is left must hold two
                _room_for_val(len(kept), len(labels), spec.test_fraction)
            keep, held = stratified_split(labels[kept], fraction, seed, f"data.{name}_fraction")
            where[name] = ("train", kept[held])
            kept = kept[keep]
    where["train"] = ("train", kept)
    _no_folder_twice(parts, root)
    return parts, where, base.classes


def _no_folder_twice(parts: Parts, root: Path) -> None:
    """Refuse a folder whose images the walk reached twice, through a symbolic link: ImageFolder follows
    links without a loop check, so a link to a folder above it multiplies the set (and a val folder
    linked to a train folder tests on training images). One path resolved per folder, not per image."""
    seen: dict[str, str] = {}
    for part in parts.values():
        for folder in dict.fromkeys(os.path.dirname(path) for path, _ in part.samples):
            first = seen.setdefault(os.path.realpath(folder), folder)
            if first != folder:
                raise DataError(f"imagefolder: {folder} is {first} again, through a symbolic link under data.root "
                                f"'{root}', so its images would be read twice; remove the link, or make it point "
                                f"outside data.root")


# Pillow's one-channel modes wider than 8 bits, with the value that is white in each. torchvision's own loader
# converts them to RGB by clipping at 255: a 16-bit image came out nearly all white, a float one black.
# Mode I (32-bit integers) is mostly 16-bit data (TIFF, older Pillow's PNG): read as such, above 65535 clipped.
_WIDE_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}


def read_rgb(path: str) -> Any:
    """An image file as an 8-bit RGB PIL image, as ImageFolder reads it, except that 16-bit, 32-bit and
    float (0 to 1) images are scaled to 8 bits rather than clipped at 255."""
    from PIL import Image

    with open(path, "rb") as file:
        image = Image.open(file)
        if image.mode not in _WIDE_MODES:
            return image.convert("RGB")
        pixels = np.asarray(image, dtype=np.float64)
    white = _WIDE_MODES[image.mode]
    if image.mode == "F" and not (pixels.min() >= 0 and pixels.max() <= 1):  # NaN fails both
        raise ValueError(f"float pixels from {pixels.min():g} to {pixels.max():g}, not within 0 to 1; save it as an "
                         f"8- or 16-bit image, or scale it to 0 to 1")
    eight = np.clip(np.rint(pixels * (255 / white)), 0, 255).astype(np.uint8)
    return Image.fromarray(eight).convert("RGB")


def read_image(dataset: "Dataset", index: int) -> tuple[Any, int]:
    """Item ``index`` (PIL image, label) of an image data set; a file that cannot be decoded (not an
    image, truncated, a decompression bomb) is a DataError that names it."""
    try:
        return dataset[index]
    except Exception as err:  # whatever the decoder raises: the file is what the user must fix
        raise undecodable(dataset, [(index, err)]) from None


def undecodable(dataset: "Dataset", failures: list[tuple[int, BaseException]]) -> DataError:
    """One line for the images of ``dataset`` that could not be decoded: the first few files and why."""
    failures = sorted(failures, key=lambda failure: failure[0])
    shown = []
    for index, err in failures[:3]:
        samples = getattr(dataset, "samples", None)  # an ImageFolder's (path, label) pairs
        name = str(samples[index][0]) if samples is not None else f"image {index}"
        reason = " ".join((str(err) or type(err).__name__).split())
        for said in (f"<_io.BufferedReader name={name!r}>", repr(name)):  # PIL repeats the file in its message
            reason = reason.replace(f" {said}", "")
        reason = reason.removesuffix(":")  # "[Errno 2] No such file or directory: 'path'" without its path
        shown.append(f"{name} ({reason[:200]})")
    more = f" and {len(failures) - 3} more" if len(failures) > 3 else ""
    what = "an image" if len(failures) == 1 else f"{len(failures)} images"
    return DataError(f"cannot decode {what}: {'; '.join(shown)}{more}; remove or replace the files, then run again")


def _folder_with_classes(root: Path, class_to_idx: dict[str, int]) -> "Dataset":
    """An ImageFolder that uses the training folder's class indices (val may lack some classes)."""
    import torchvision

    class ClassesOf(torchvision.datasets.ImageFolder):
        def find_classes(self, directory: str | os.PathLike[str]) -> tuple[list[str], dict[str, int]]:
            unknown = sorted({e.name for e in os.scandir(directory) if e.is_dir()} - set(class_to_idx))
            if unknown:
                raise DataError(f"{directory}: class folders {', '.join(unknown)} are not in the training folder")
            return list(class_to_idx), dict(class_to_idx)

    return ClassesOf(str(root), loader=read_rgb, allow_empty=True)


def _fixed(channels: int, classes: int) -> Callable[["DataSpec"], tuple[int, int]]:
    return lambda spec: (channels, classes)


def _torchvision(class_name: str, channels: int, classes: int) -> Source:
    return Source(_fixed(channels, classes), parts=torchvision_parts(class_name, classes))


DATASETS: dict[str, Source] = {
    "digits": Source(_fixed(1, 10), read=read_digits),
    "mnist": _torchvision("MNIST", 1, 10),
    "fashion_mnist": _torchvision("FashionMNIST", 1, 10),
    "cifar10": _torchvision("CIFAR10", 3, 10),
    "cifar100": _torchvision("CIFAR100", 3, 100),
    # ImageFolder decodes every image to RGB.
    "imagefolder": Source(lambda spec: (3, len(class_folders(spec))), parts=imagefolder_parts),
    "synthetic": Source(lambda spec: (spec.channels, spec.num_classes), read=read_synthetic),
}
"""``data.dataset`` name -> :class:`Source`."""

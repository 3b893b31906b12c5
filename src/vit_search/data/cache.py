"""The decoded cache: a source's images decoded and resized once, stored as uint8 arrays that every
trial, worker process and ``--jobs`` worker reads.

A cache folder holds, per part of the source (an image folder's ``train``/``val``/``test`` folders,
a torchvision set's official train and test splits), ``<part>.npy`` (N, C, H, W) uint8 and
``<part>.labels.npy``, and ``manifest.json`` (the source's fingerprint, the class names, the shapes).
The folder's name says the data set, the size and a hash of where the source is and how it was
resized; the manifest's fingerprint (every file's size and modification time, or the hash of an
in-memory array) says whether the source changed since.

Building is atomic and happens once however many processes ask at the same time: the first takes a
file lock and writes into a hidden ``.<name>.building-<pid>`` folder that is renamed into place only
when complete; the others wait on the lock, then find the cache built. A builder that was killed
leaves its hidden folder behind (never a complete-looking cache), which the next builder removes.

Reading is ``preadv`` into a caller's buffer, consecutive images in one call: the page cache is
shared by every process and the only copy is into the batch, so a process's memory does not grow
with the cache (a memory map would count every page it touched as the process's).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataError
from .decode import decode_dataset, resize_array
from .sources import read_image, undecodable

VERSION = 2  # 2: 16-bit and float images scaled to 8 bits (sources.read_rgb), no longer clipped
RESIZE = "torchvision v2.Resize bilinear antialias on uint8"  # part of the key: another resize, another cache
_REPORT_SECONDS = 5.0  # a progress line this often when stderr is not a terminal


def cache_root(setting: str = "auto") -> Path:
    """The folder caches live in: ``data.cache`` when it is a path, else ``$VIT_SEARCH_CACHE``, else
    ``~/.cache/vit-search/decoded``."""
    if setting not in ("auto", "off"):
        return Path(setting).expanduser()
    return Path(os.environ.get("VIT_SEARCH_CACHE") or Path.home() / ".cache" / "vit-search" / "decoded").expanduser()


# (path, inode, pid) -> descriptor: a forked process opens its own, a rebuilt cache is a new file.
_FDS: dict[tuple[str, int, int], int] = {}


@dataclass(frozen=True)
class CachedPart:
    """One part's images in a cache file: read any of them into a uint8 buffer."""

    path: Path
    offset: int  # where the .npy file's data begins
    shape: tuple[int, int, int, int]  # (N, C, H, W)
    labels: np.ndarray
    inode: int = 0  # the file this part was opened as (a rebuild replaces it)

    @property
    def image_bytes(self) -> int:
        """Bytes of one image."""
        return int(np.prod(self.shape[1:]))

    def _fd(self) -> int:
        key = (str(self.path), self.inode, os.getpid())
        if key not in _FDS:
            fd = os.open(self.path, os.O_RDONLY)
            if os.fstat(fd).st_ino != self.inode:
                os.close(fd)
                raise DataError(f"the decoded cache {self.path.parent} was rebuilt while this process read it; run again")
            _FDS[key] = fd
        return _FDS[key]

    def read_into(self, indices: np.ndarray, out: np.ndarray) -> None:
        """Images ``indices`` into ``out`` (len(indices), C, H, W) uint8; consecutive indices are one read."""
        index = np.asarray(indices, dtype=np.int64)
        if len(index) == 0:
            return
        flat = out.reshape(len(index), -1)
        breaks = np.flatnonzero(np.diff(index) != 1) + 1
        fd, size = self._fd(), self.image_bytes
        for start, stop in zip([0, *breaks.tolist()], [*breaks.tolist(), len(index)]):
            view = memoryview(flat[start:stop]).cast("B")
            position, done = self.offset + int(index[start]) * size, 0
            while done < len(view):
                got = os.preadv(fd, [view[done:]], position + done)
                if got == 0:
                    raise DataError(f"{self.path}: the cache file is shorter than its manifest says; delete "
                                    f"{self.path.parent} to rebuild it")
                done += got

    def read(self, indices: np.ndarray) -> torch.Tensor:
        """Images ``indices`` as a new uint8 (n, C, H, W) tensor."""
        out = torch.empty((len(indices), *self.shape[1:]), dtype=torch.uint8)
        self.read_into(indices, out.numpy())
        return out


@dataclass(frozen=True)
class DecodedCache:
    """An opened cache: its folder, class names, parts and size on disk."""

    folder: Path
    classes: list[str]
    parts: dict[str, CachedPart]
    nbytes: int


def fingerprint(parts: dict[str, Any]) -> str:
    """What the source is now: each file's path, size and modification time, or an array's content."""
    digest = hashlib.blake2b(digest_size=16)
    for name, part in sorted(parts.items()):
        digest.update(f"part {name}\n".encode())
        if isinstance(part, tuple):  # (images, labels) in memory: hash them (a few hundred MB at most)
            for array in part:
                digest.update(np.ascontiguousarray(np.asarray(array)).tobytes())
        elif hasattr(part, "samples"):  # an ImageFolder
            failures = []  # a symbolic link to nothing, a file removed since it was listed: the data's fault
            for index, (path, label) in enumerate(part.samples):
                try:
                    stat = os.stat(path)
                except OSError as err:
                    failures.append((index, err))
                    continue
                digest.update(f"{path}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
            if failures:
                raise undecodable(part, failures)
        else:
            raise DataError(f"cannot cache part '{name}' ({type(part).__name__}): set data.cache: off")
    return digest.hexdigest()


def open_cache(dataset: str, identity: str, parts: dict[str, Any], classes: list[str], size: tuple[int, int],
               root: Path) -> DecodedCache:
    """The cache of ``parts`` at ``size`` under ``root``, built first if it is missing or stale.

    ``identity`` says where the source is (its folder): with the size and resize it names the cache.
    """
    key = json.dumps({"dataset": dataset, "source": identity, "size": list(size), "resize": RESIZE,
                      "version": VERSION}, sort_keys=True)
    name = f"{dataset}-{size[0]}x{size[1]}-{hashlib.blake2b(key.encode(), digest_size=6).hexdigest()}"
    folder, source = root / name, fingerprint(parts)
    opened = _open(folder, key, source)
    if opened is not None:
        return opened
    try:
        root.mkdir(parents=True, exist_ok=True)
        with _locked(root / f".{name}.lock", folder):
            opened = _open(folder, key, source)  # built by another process while this one waited
            if opened is not None:
                return opened
            _build(folder, key, source, parts, classes, size)
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise DataError(f"no space left for the decoded cache in {root}; free space, set data.cache to "
                            f"another folder, or data.cache: off") from None
        raise DataError(f"cannot write the decoded cache in {root}: {err.strerror or err}; set data.cache to "
                        f"another folder, or data.cache: off") from None
    opened = _open(folder, key, source)
    if opened is None:
        raise DataError(f"the decoded cache {folder} changed while it was built; run again")
    return opened


def _open(folder: Path, key: str, source: str) -> DecodedCache | None:
    """The cache in ``folder`` if it is complete and of this source as it is now; else None."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("key") != key or manifest.get("source") != source:
        return None
    parts = {}
    try:
        for name in manifest["parts"]:
            labels = np.load(folder / f"{name}.labels.npy")
            array = np.load(folder / f"{name}.npy", mmap_mode="r")  # to read the header's length only
            path = folder / f"{name}.npy"
            parts[name] = CachedPart(path, int(array.offset), tuple(array.shape), labels, os.stat(path).st_ino)
            del array
    except (OSError, ValueError):  # files removed by hand: build again
        return None
    return DecodedCache(folder, list(manifest["classes"]), parts, int(manifest["bytes"]))


class _locked:
    """An exclusive lock on ``path`` (released by the kernel if this process dies); says so when it waits."""

    def __init__(self, path: Path, folder: Path) -> None:
        self.path, self.folder = path, folder

    def __enter__(self) -> None:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"vit-search: waiting for another process to build the decoded cache {self.folder}",
                  file=sys.stderr, flush=True)
            fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _build(folder: Path, key: str, source: str, parts: dict[str, Any], classes: list[str],
           size: tuple[int, int]) -> None:
    """Decode every part into a hidden folder, then rename it into place (under the lock)."""
    root = folder.parent
    for stale in root.glob(f".{folder.name}.building-*"):  # left by a builder that died: we hold the lock
        shutil.rmtree(stale, ignore_errors=True)
    building = root / f".{folder.name}.building-{os.getpid()}"
    counts = {name: len(part[1]) if isinstance(part, tuple) else len(part) for name, part in parts.items()}
    progress = Progress(f"decoding {sum(counts.values()):,} images into {folder}", sum(counts.values()))
    try:
        building.mkdir()
        total = 0
        for name, part in parts.items():
            channels = _channels(part)
            images = np.lib.format.open_memmap(building / f"{name}.npy", mode="w+", dtype=np.uint8,
                                               shape=(counts[name], channels, *size))
            _reserve(building / f"{name}.npy")
            if isinstance(part, tuple):
                resize_array(torch.as_tensor(part[0]), images, size, progress.advance)
                labels = np.asarray(part[1], dtype=np.int64)
            else:
                decode_dataset(part, images, size, progress.advance)
                labels = np.asarray(part.targets, dtype=np.int64)
            images.flush()
            total += images.nbytes
            del images
            np.save(building / f"{name}.labels.npy", labels)
        manifest = {"key": key, "source": source, "classes": list(classes), "bytes": total,
                    "parts": {name: {"count": count} for name, count in counts.items()}}
        (building / "manifest.json").write_text(json.dumps(manifest))  # written last: its presence means complete
        for path in building.iterdir():
            with open(path, "rb") as f:
                os.fsync(f.fileno())  # on disk before the rename makes it visible
        old = root / f".{folder.name}.old-{os.getpid()}"
        if folder.exists():  # a stale cache of a changed source: readers that have it open keep reading it
            folder.rename(old)
        building.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        progress.close(built=False)
        raise
    progress.close()


def _reserve(path: Path) -> None:
    """Give the (sparse) file its disk blocks now. Written through a memory map, a page the disk has no
    room for is SIGBUS, which kills the process without a word; reserved, a full disk is ENOSPC here."""
    if not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as err:
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):  # a file system that cannot: as before
            raise
    finally:
        os.close(fd)


def _channels(part: Any) -> int:
    if isinstance(part, tuple):
        return int(part[0].shape[1])
    if len(part) == 0:
        return 3  # an empty folder: ImageFolder decodes to RGB
    try:
        image, _ = read_image(part, 0)
    except DataError:
        if hasattr(part, "samples"):  # an ImageFolder (RGB): the decode names every bad file, this first one too
            return 3
        raise
    return len(image.getbands())


class Progress:
    """Images done so far: a tqdm bar on a terminal, else a line every few seconds on stderr."""

    def __init__(self, what: str, total: int) -> None:
        self.what, self.total, self.done = what, total, 0
        self.start = self.last = time.monotonic()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="decoded cache", unit="img", leave=False)
        else:
            print(f"vit-search: {what}", file=sys.stderr, flush=True)

    def advance(self, count: int) -> None:
        """``count`` more images done."""
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
            return
        now = time.monotonic()
        if now - self.last >= _REPORT_SECONDS:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            print(f"vit-search: decoded {self.done:,}/{self.total:,} images ({rate:,.0f} img/s)",
                  file=sys.stderr, flush=True)

    def close(self, built: bool = True) -> None:
        """Close the bar; say how long it took (where it was built: else the error says why not)."""
        if self.bar is not None:
            self.bar.close()
        if not built:
            return
        seconds = time.monotonic() - self.start
        print(f"vit-search: decoded cache: {self.done:,} images in {seconds:.1f} s "
              f"({self.done / max(seconds, 1e-9):,.0f} img/s)", file=sys.stderr, flush=True)

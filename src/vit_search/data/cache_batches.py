"""Batches read from the decoded cache: the only host work per step is reading uint8 images.

Reader threads (one per core, at most four) read the next batches (``preadv``, which releases the
GIL) into a few reused buffers, pinned when training on a GPU, while the step before runs. The
uint8 batch goes to the training device; training batches are cropped, flipped and RandAugment-ed
there while still uint8 (a quarter of the bytes of float), then every batch becomes float,
normalised in one pass; MixUp/CutMix follow on the device in :class:`.augment.BatchAugment`.
Training on the CPU, the readers do the crop, flip and float conversion themselves, in one pass over
each image, beside the step.

The order and sharding are :class:`.batches.DeviceBatches`' (one seeded permutation per epoch, every
``num_processes``-th index for this process); within a batch, images are read in file order, so
neighbours are one read.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .augment import rand_augment, random_crop_flip_normalize, random_crop_flip_uint8
from .batches import DeviceBatches
from .cache import CachedPart
from .decode import decode_threads

_AHEAD = 2  # batches each reader thread reads ahead of the step
_MAX_READERS = 4  # reader threads per loader
_POLL = 0.1  # seconds between checks that the consumer still wants batches


class CachedSplit(Dataset):
    """A split of the decoded cache: indices into one cached part, labels, and the normalisation."""

    def __init__(self, part: CachedPart, indices: np.ndarray, device: torch.device,
                 mean: Sequence[float] | None, std: Sequence[float] | None, *, crop_padding: int = 0,
                 hflip: bool = False, randaugment_chunk: int = 0) -> None:
        self.part, self.indices, self.device = part, np.asarray(indices, dtype=np.int64), torch.device(device)
        self.labels = torch.as_tensor(part.labels[self.indices], dtype=torch.int64)
        # The training split's crop and flip, done on its uint8 batches (BatchAugment leaves them out).
        self.crop_padding, self.hflip = crop_padding, hflip
        # RandAugment on uint8 too (its ops are defined there, and are cheaper), per chunk of images (0: off).
        self.randaugment_chunk = randaugment_chunk
        self._randaugment = rand_augment() if randaugment_chunk else None
        channels = part.shape[1]
        self.fill = [round(255 * m) for m in mean] if mean is not None else [0] * channels
        mean = [0.0] * channels if mean is None else list(mean)
        std = [1.0] * channels if std is None else list(std)
        # x / 255 normalised is x * scale - shift: one pass over the batch on the device.
        self.scale = (1 / (255 * torch.tensor(std))).view(1, -1, 1, 1).to(self.device)
        self.shift = (torch.tensor(mean) / torch.tensor(std)).view(1, -1, 1, 1).to(self.device)

    def __len__(self) -> int:
        return len(self.indices)

    def crop_flip(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """The training split's crop and flip on a uint8 batch (a new tensor), or the batch as is."""
        if self.crop_padding or self.hflip:
            return random_crop_flip_uint8(images, self.crop_padding, self.hflip, self.fill, generator)
        return images

    def crop_flip_float(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """:meth:`crop_flip` then :meth:`to_float` in one pass over the batch (the same draws, the same images)."""
        return random_crop_flip_normalize(images, self.crop_padding, self.hflip, self.fill, self.scale, self.shift,
                                          generator)

    def randaugment(self, images: Tensor) -> Tensor:
        """The training split's RandAugment on a uint8 batch, per chunk of images (others: as is)."""
        if self._randaugment is None:
            return images
        return torch.cat([self._randaugment(chunk) for chunk in images.split(self.randaugment_chunk)])

    def to_float(self, images: Tensor) -> Tensor:
        """uint8 (B, C, H, W) on the device -> normalised float32."""
        return images.float().mul_(self.scale).sub_(self.shift)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = self.part.read(self.indices[index : index + 1]).to(self.device)
        return self.to_float(image)[0], self.labels[index]


class CacheBatches(DeviceBatches):
    """An iterable of (normalised float images, labels) batches of a cached split, on its device."""

    def __init__(self, split: CachedSplit, batch_size: int, *, shuffle: bool, seed: int, drop_last: bool = False,
                 rank: int = 0, num_processes: int = 1) -> None:
        super().__init__(None, split.labels, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last,
                         rank=rank, num_processes=num_processes)
        self.split = split

    def positions(self) -> np.ndarray:
        """This process's positions in the split, in this epoch's order (what it reads)."""
        return self._order().numpy()[: len(self) * self.batch_size]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        split, device = self.split, self.split.device
        order = self.positions()
        batches = [order[start : start + self.batch_size] for start in range(0, len(order), self.batch_size)]
        readers = min(_readers(), max(len(batches), 1))
        # Crop and flip draw from a generator per batch (seed, epoch, process, batch): the same batches
        # every run, whichever thread draws them.
        seed = ((self.seed * 100_003 + self.epoch) * 1_009 + self.rank) * 1_000_003
        pin = device.type == "cuda"
        free: queue.Queue = queue.Queue()
        for _ in range(readers * (_AHEAD + 1)):
            free.put((torch.empty((self.batch_size, *split.part.shape[1:]), dtype=torch.uint8, pin_memory=pin), None))
        # Reader j takes batches j, j + readers, ...; each has its own queue, taken from in turn: in order.
        ready = [queue.Queue(maxsize=_AHEAD) for _ in range(readers)]
        stop = threading.Event()
        threads = [threading.Thread(target=_read_batches, daemon=True,
                                    args=(split, list(enumerate(batches))[j::readers], free, ready[j], stop, seed))
                   for j in range(readers)]
        for thread in threads:
            thread.start()
        try:
            for number in range(len(batches)):
                item = ready[number % readers].get()
                if isinstance(item, BaseException):
                    raise item
                images, labels, buffer, done = item
                if not done:
                    images = images.to(device, non_blocking=True)
                    event = None
                    if buffer is not None and device.type == "cuda":  # the buffer is refilled once its copy ran
                        event = torch.cuda.Event()
                        event.record()
                    if device.type != "cpu":  # on the CPU the reader thread cropped and flipped
                        images = split.crop_flip(images, torch.Generator().manual_seed(seed + number))
                    images = split.to_float(split.randaugment(images))
                    if buffer is not None:
                        free.put((buffer, event))
                yield images, labels.to(device, non_blocking=True)
        finally:
            stop.set()
            for thread in threads:
                thread.join()


def _readers() -> int:
    """Reader threads per loader: one per core, at most _MAX_READERS."""
    return min(decode_threads(), _MAX_READERS)


def _read_batches(split: CachedSplit, batches: list[tuple[int, np.ndarray]], free: queue.Queue, ready: queue.Queue,
                  stop: threading.Event, seed: int) -> None:
    """A reader thread: each of its batches' images into a free buffer, then onto ``ready``.

    Training on the CPU, the thread also crops, flips and (without RandAugment, which draws from
    torch's global generator and so stays on the training thread) makes the batch float: torch
    releases the GIL, so this runs beside the training step and the other readers.
    """

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=_POLL)
                return True
            except queue.Full:
                continue
        return False

    try:
        for number, positions in batches:
            index = split.indices[positions]
            by_file = np.argsort(index, kind="stable")  # file order: neighbours become one read
            positions, index = positions[by_file], index[by_file]
            while True:
                try:
                    buffer, event = free.get(timeout=_POLL)
                    break
                except queue.Empty:
                    if stop.is_set():
                        return
            if event is not None:
                event.synchronize()
            split.part.read_into(index, buffer[: len(index)].numpy())
            images, labels = buffer[: len(index)], split.labels[positions]
            if split.device.type != "cpu":
                item = (images, labels, buffer, False)
            else:
                generator = torch.Generator().manual_seed(seed + number)
                done = split._randaugment is None
                if done:
                    images = split.crop_flip_float(images, generator)
                else:
                    images = split.crop_flip(images, generator)
                    if images.data_ptr() == buffer.data_ptr():
                        images = images.clone()
                free.put((buffer, None))  # copied out of it already
                item = (images, labels, None, done)
            if not put(item):
                return
    except BaseException as err:  # raised again in the consumer, where the training loop sees it
        put(err)

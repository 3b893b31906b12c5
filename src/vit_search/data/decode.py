"""Decoding a source's images once, resized, into a uint8 array (the decoded cache's build step).

The resize is the one the worker path applies (``v2.ToImage`` then ``v2.Resize(size, antialias=True)``
on the uint8 tensor): a cached image equals the image a DataLoader worker would have decoded.
Image files are decoded by a pool of threads: PIL's decoder and torch's resize release the GIL,
so threads use every core without the start-up and pickling cost of worker processes.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np
import torch

from ..performance import usable_cores
from .resize import resize_uint8
from .sources import undecodable

_CHUNK = 32  # images a thread decodes per task: few enough to keep the progress line moving
_ARRAY_CHUNK = 512  # in-memory images resized at a time


def decode_threads() -> int:
    """Threads that decode: one per core this process may use."""
    return usable_cores()


def decode_dataset(dataset: Any, out: np.ndarray, size: tuple[int, int], advance: Callable[[int], None],
                   threads: int | None = None) -> None:
    """Decode every (PIL image, label) item of ``dataset`` into ``out`` (N, C, H, W) uint8, resized.

    Files that cannot be decoded are all found before one DataError names the first few: a large
    set is not decoded again for each bad file."""
    from torchvision.transforms.v2.functional import pil_to_tensor

    count = len(out)
    failures: list[tuple[int, BaseException]] = []

    def work(start: int) -> int:
        stop = min(start + _CHUNK, count)
        for i in range(start, stop):
            try:
                image, _ = dataset[i]
            except Exception as err:  # the file, not the code: reported below with its name
                failures.append((i, err))
                continue
            out[i] = resize_uint8(pil_to_tensor(image).unsqueeze(0), size)[0].numpy()
        return stop - start

    intra_op = torch.get_num_threads()
    torch.set_num_threads(1)  # the pool is the parallelism: a resize must not start threads of its own
    try:
        with ThreadPoolExecutor(threads or decode_threads()) as pool:
            for done in pool.map(work, range(0, count, _CHUNK)):
                advance(done)
    finally:
        torch.set_num_threads(intra_op)
    if failures:
        raise undecodable(dataset, failures)


def resize_array(images: torch.Tensor, out: np.ndarray, size: tuple[int, int], advance: Callable[[int], None]) -> None:
    """Resize in-memory uint8 (N, C, h, w) images into ``out`` in chunks (bounded temporary memory)."""
    for start in range(0, len(images), _ARRAY_CHUNK):
        chunk = images[start : start + _ARRAY_CHUNK]
        out[start : start + len(chunk)] = resize_uint8(chunk, size).numpy()
        advance(len(chunk))

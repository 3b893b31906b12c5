"""Batches of a split held on the training device, drawn on the device: no host work per batch.

A DataLoader over a device-held split hands each batch's indices over from a Python list: one small
host-to-device copy per step, which makes the host wait for the device to finish the step before.
Here an epoch's order is one ``randperm`` on the device (seeded from the run's seed and the epoch,
so a resumed run sees the batches an unbroken one would), and a batch is a slice of it: every
step has the same shapes and needs nothing from the host, which is what a CUDA graph replays.

Under ``accelerate launch`` each process takes every ``num_processes``-th index of the order,
as Accelerate's sharding does; evaluation splits are sharded without padding and their sums
reduced, so no sample counts twice.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor


class DeviceBatches:
    """An iterable of (images, labels) batches of a device-held split, sharded by process."""

    def __init__(self, images: Tensor, labels: Tensor, batch_size: int, *, shuffle: bool, seed: int,
                 drop_last: bool = False, rank: int = 0, num_processes: int = 1):
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.rank, self.num_processes = rank, num_processes
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the next iteration's order for ``epoch`` (same epoch, same order)."""
        self.epoch = epoch

    def _order(self) -> Tensor:
        device = self.labels.device
        count = len(self.labels)
        if not self.shuffle:
            order = torch.arange(count, device=device)
        else:
            generator = torch.Generator(device=device).manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(count, device=device, generator=generator)
        if self.drop_last:  # training: every process gets the same number of samples
            order = order[: count - count % self.num_processes]
        return order[self.rank :: self.num_processes]

    def __len__(self) -> int:
        count = len(self.labels)
        if self.drop_last:
            return (count // self.num_processes) // self.batch_size
        mine = len(range(self.rank, count, self.num_processes))
        return -(-mine // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        order = self._order()
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = order[start : start + self.batch_size]
            yield self.images[index], self.labels[index]

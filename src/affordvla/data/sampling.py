"""A training sampler whose position is a function of the optimiser step, so a resumed run sees exactly the
samples an uninterrupted run would have seen, whatever the dataloader prefetched before the checkpoint."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import Sampler


class StepResumableSampler(Sampler):
    """Yields one seeded permutation per data epoch, starting at the batch the run has reached.

    With `with_epoch=True` it yields `(index, epoch)` pairs, so a dataset can seed per-draw randomness
    (augmentation) from them and a resumed run draws the same augmentations too.

    `batches_done()` returns how many batches the run has consumed (optimiser steps x gradient accumulation);
    it is read at every `__iter__`, so each new loader epoch continues exactly where training stands. Only full
    batches are used (drop_last), which keeps the mapping step -> samples independent of the epoch length.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, batches_done: Callable[[], int] = lambda: 0,
                 with_epoch: bool = False):
        if num_samples < batch_size:
            raise ValueError(f"the training set has {num_samples} samples, fewer than one batch of {batch_size}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.batches_done = batches_done
        self.batches_per_epoch = num_samples // batch_size
        self.with_epoch = with_epoch

    def _start(self) -> tuple[int, int]:
        done = int(self.batches_done())
        return divmod(done, self.batches_per_epoch)

    def permutation(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_samples, generator=generator).tolist()

    def __iter__(self) -> Iterator[int] | Iterator[tuple[int, int]]:
        epoch, batch = self._start()
        order = self.permutation(epoch)[: self.batches_per_epoch * self.batch_size][batch * self.batch_size :]
        yield from ((index, epoch) for index in order) if self.with_epoch else order

    def __len__(self) -> int:
        _, batch = self._start()
        return (self.batches_per_epoch - batch) * self.batch_size

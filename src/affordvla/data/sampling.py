"""A training sampler whose position is a function of the optimiser step, so a resumed run sees exactly the
samples an uninterrupted run would have seen, whatever the dataloader prefetched before the checkpoint; and
which shards every epoch across distributed ranks itself, so N ranks x batch B see exactly what one process
with batch N x B sees, in the same order."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DistributedSampler


def distributed_rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the initialised default process group, (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class StepResumableSampler(DistributedSampler):
    """Yields one seeded permutation per data epoch, starting at the batch the run has reached.

    With `with_epoch=True` it yields `(index, epoch)` pairs, so a dataset can seed per-draw randomness
    (augmentation) from them and a resumed run draws the same augmentations too.

    `batches_done()` returns how many batches the run has consumed (optimiser steps x gradient accumulation);
    it is read at every `__iter__`, so each new loader epoch continues exactly where training stands. Only full
    batches are used (drop_last), which keeps the mapping step -> samples independent of the epoch length.

    Distributed: the permutation is cut into global batches of `batch_size x world_size`; rank r takes the r-th
    slice of `batch_size` of each, so the ranks' shards are disjoint, cover every used index once per epoch, and
    together form the batch a single process with the global batch size would draw. `rank` / `world_size` default
    to torch.distributed's at iteration time (the loader is built after the process group exists).

    It subclasses DistributedSampler only because that is what Lightning checks (`use_distributed_sampler`) to
    leave a sampler in place: otherwise Lightning wraps it in a DistributedSamplerWrapper that reshuffles the
    indices per rank, losing the step-determined order and the exact resume. It calls none of its methods.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, batches_done: Callable[[], int] = lambda: 0,
                 with_epoch: bool = False, rank: int | None = None, world_size: int | None = None):
        if rank is not None and world_size is not None and not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of {world_size}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.batches_done = batches_done
        self.with_epoch = with_epoch
        self._rank, self._world_size = rank, world_size
        self.epoch = 0  # set_epoch (Lightning calls it) is recorded but unused: the epoch follows from the step
        self._check(self.world_size)

    # DistributedSampler's attribute names, as properties: the process group may come up after construction
    @property
    def rank(self) -> int:
        return self._rank if self._rank is not None else distributed_rank_and_world()[0]

    @property
    def world_size(self) -> int:
        return self._world_size if self._world_size is not None else distributed_rank_and_world()[1]

    num_replicas = world_size

    def _check(self, world_size: int) -> None:
        if self.num_samples < self.batch_size * world_size:
            raise ValueError(f"the training set has {self.num_samples} samples, fewer than one batch of "
                             f"{self.batch_size} x {world_size} ranks")

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    @property
    def batches_per_epoch(self) -> int:
        return self.num_samples // self.global_batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _start(self) -> tuple[int, int]:
        done = int(self.batches_done())
        return divmod(done, self.batches_per_epoch)

    def permutation(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_samples, generator=generator).tolist()

    def __iter__(self) -> Iterator[int] | Iterator[tuple[int, int]]:
        world, rank = self.world_size, self.rank
        self._check(world)
        epoch, batch = self._start()
        order = self.permutation(epoch)
        size, global_size = self.batch_size, self.batch_size * world
        mine = [index for start in range(batch * global_size, self.batches_per_epoch * global_size, global_size)
                for index in order[start + rank * size : start + (rank + 1) * size]]
        yield from ((index, epoch) for index in mine) if self.with_epoch else mine

    def __len__(self) -> int:
        _, batch = self._start()
        return (self.batches_per_epoch - batch) * self.batch_size

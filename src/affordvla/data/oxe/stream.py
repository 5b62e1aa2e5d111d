"""Windows of standardised episodes, and the streamed, weighted interleaving of a mixture's datasets."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from torch.utils.data import IterableDataset

from affordvla.data.oxe.rlds import RLDSDataset
from affordvla.data.oxe.specs import resolve_mixture
from affordvla.data.oxe.transforms import Episode, OXEFormatError
from affordvla.formats.sample import ActionWindowSample

log = logging.getLogger(__name__)


def episode_windows(episode: Episode, window_size: int, chunk_size: int) -> Iterator[ActionWindowSample]:
    """One sample per step t: frames t-ws+1..t (clamped at 0, masked) and for each the next `chunk_size`
    actions (clamped at the last step, masked)."""
    length = len(episode.actions)
    cameras = {"primary": episode.images, **episode.extra_images}
    for t in range(length):
        frame_ids = np.arange(t - window_size + 1, t + 1)
        frame_mask = frame_ids >= 0
        frame_ids = frame_ids.clip(0, length - 1)
        action_ids = frame_ids[:, None] + np.arange(chunk_size)[None, :]
        action_mask = frame_mask[:, None] & (action_ids < length)
        yield ActionWindowSample(
            images={role: frames[frame_ids] for role, frames in cameras.items()}, instruction=episode.instruction,
            actions=episode.actions[action_ids.clip(0, length - 1)], action_mask=action_mask,
            frame_mask=frame_mask, meta={"source": episode.source, "step": t},
        )


def mixture_weights(mixture: str | list, available: set[str], *, allow_missing: bool = False,
                    where: str = "") -> dict[str, float]:
    """Normalised sampling weights of the mixture's datasets. A dataset absent from `available` is an error
    naming it, unless `allow_missing` (then it is left out with a warning)."""
    entries = resolve_mixture(mixture, where=where)
    missing = [name for name, _ in entries if name not in available]
    if missing and not allow_missing:
        raise OXEFormatError(f"mixture datasets {missing} are not under the data root {where or ''} (found "
                             f"{sorted(available)[:10]})")
    if missing:
        log.warning("mixture datasets not found under the data root and left out: %s", missing)
    present = [(name, w) for name, w in entries if name in available]
    if not present:
        raise OXEFormatError(f"none of the mixture's datasets are available: {[n for n, _ in entries]}")
    total = sum(w for _, w in present)
    return {name: w / total for name, w in present}


def stream_mixture(root: str | Path, mixture: str | list, split: str, *, window_size: int, chunk_size: int,
                   seed: int = 0, shuffle_buffer: int = 256, rank: int = 0, world_size: int = 1,
                   image_size: int | None = None, cameras: tuple[str, ...] = ("primary",),
                   skip_unlabeled: bool = True, allow_missing: bool = False,
                   unlabeled: dict[str, int] | None = None,
                   counted: set[str] | None = None) -> Iterator[ActionWindowSample]:
    """Interleave the mixture's datasets by weight, windows shuffled through a bounded buffer. Each dataset is
    read shard by shard (this consumer's shards only) and restarts when exhausted, so the stream is endless for
    training; memory holds at most `shuffle_buffer` windows plus one episode per dataset. The weights are taken
    as given: sizes are unknown before a full pass, so OpenVLA's size balancing is the datamodule's (cached).
    Episodes left out for having no instruction are counted per dataset into `unlabeled` as the first pass over
    it reads them; `counted` receives the datasets whose first pass is complete (their count final)."""
    root = Path(root)
    available = {p.name for p in root.iterdir() if p.is_dir()} if root.is_dir() else set()
    weights = mixture_weights(mixture, available, allow_missing=allow_missing, where=str(root))
    datasets = {name: RLDSDataset.open(root, name) for name in weights}
    rng = np.random.default_rng([seed, rank])

    def windows(name: str) -> Iterator[ActionWindowSample]:
        first_pass = True
        while True:
            produced, left_out = False, []
            for episode in datasets[name].episodes(split, rank=rank, world_size=world_size, image_size=image_size,
                                                   cameras=cameras, skip_unlabeled=skip_unlabeled,
                                                   unlabeled=left_out if first_pass else None):
                if first_pass and unlabeled is not None:
                    unlabeled[name] = len(left_out)
                for window in episode_windows(episode, window_size, chunk_size):
                    produced = True
                    yield window
            if first_pass:
                if unlabeled is not None:
                    unlabeled[name] = len(left_out)
                if counted is not None:
                    counted.add(name)
                first_pass = False
            if not produced:
                raise OXEFormatError(f"dataset {name}: {datasets[name].path}: split {split!r} gives consumer {rank} "
                                     f"of {world_size} no episodes (fewer episodes than ranks x loader workers?)")

    sources = {name: windows(name) for name in weights}
    names, probabilities = list(weights), np.array(list(weights.values()))
    buffer: list[ActionWindowSample] = []
    while True:
        name = names[rng.choice(len(names), p=probabilities)]
        buffer.append(next(sources[name]))
        if len(buffer) >= shuffle_buffer:
            yield buffer.pop(int(rng.integers(len(buffer))))


class OXEMixtureStream(IterableDataset):
    """`stream_mixture` as a torch IterableDataset: shards are divided among every (distributed rank, loader
    worker) pair, so no two consumers read the same episode. The rank and world size come from
    torch.distributed when it is initialised, and from the arguments otherwise. `metadata()` gives the episodes
    left out for having no instruction, per dataset, as far as this process has read (each loader worker
    counts its own share). Its actions are in each dataset's standardised units: the per-dataset normalisation
    needs the statistics of a full pass, which the cached OXEMixtureDataModule computes."""

    def __init__(self, root: str | Path, mixture: str | list[tuple[str, float]], split: str = "train", *,
                 window_size: int = 1, chunk_size: int = 1, seed: int = 0, shuffle_buffer: int = 256,
                 rank: int | None = None, world_size: int | None = None, image_size: int | None = None,
                 cameras: tuple[str, ...] = ("primary",), skip_unlabeled: bool = True):
        # an unknown dataset fails here, before any data is read
        resolve_mixture(mixture, where=f"mixture, data root {root}")
        self.root, self.mixture, self.split = root, mixture, split
        self.image_size, self.cameras, self.skip_unlabeled = image_size, tuple(cameras), skip_unlabeled
        self.window_size, self.chunk_size = window_size, chunk_size
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.rank, self.world_size = rank, world_size
        self.unlabeled: dict[str, int] = {}
        self.counted: set[str] = set()

    def consumer(self) -> tuple[int, int]:
        import torch.distributed as dist
        from torch.utils.data import get_worker_info

        rank, world = self.rank, self.world_size
        if rank is None or world is None:
            initialised = dist.is_available() and dist.is_initialized()
            rank, world = (dist.get_rank(), dist.get_world_size()) if initialised else (0, 1)
        worker = get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker is not None else (1, 0)
        return rank * workers + worker_id, world * workers

    def __iter__(self) -> Iterator[ActionWindowSample]:
        consumer, consumers = self.consumer()
        return stream_mixture(self.root, self.mixture, self.split, window_size=self.window_size,
                              chunk_size=self.chunk_size, seed=self.seed, shuffle_buffer=self.shuffle_buffer,
                              rank=consumer, world_size=consumers, image_size=self.image_size,
                              cameras=self.cameras, skip_unlabeled=self.skip_unlabeled, unlabeled=self.unlabeled,
                              counted=self.counted)

    def metadata(self) -> dict:
        """`unlabeled_episodes`: {dataset: {split: episodes left out}} read so far; `unlabeled_complete`: {dataset:
        whether a whole pass over its share was read, so the count is final}."""
        names = [name for name, _ in resolve_mixture(self.mixture)]
        return {"source": "oxe_mixture", "mixture": self.mixture, "split": self.split,
                "unlabeled_episodes": {n: {self.split: self.unlabeled[n]} for n in names if n in self.unlabeled},
                "unlabeled_complete": {n: n in self.counted for n in names}}

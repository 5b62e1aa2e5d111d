"""LightningDataModule for episode datasets (CALVIN, Open X-Embodiment) that yield ActionWindowSamples.

It reads the source format directly or, with `cache_dir` set, through the HDF5 episode cache, which it builds on
first use (`affordvla-data convert` builds the same file ahead of time). The window semantics stay those of the
source: CALVIN windows start at a frame (RoboVLMs), OXE windows end at one (OpenVLA). `metadata()` gives what a
head needs to size itself: action dimension, window and chunk sizes, cameras and action statistics.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from affordvla.data.sample import ActionWindowSample

log = logging.getLogger(__name__)
SOURCES = ("calvin", "oxe")


def collate_action_windows(samples: list[ActionWindowSample]) -> dict[str, Any]:
    """Stack a batch: images per camera (B, T, H, W, 3) uint8, actions (B, T, n, D), masks, instructions."""
    batch = {
        "images": {cam: torch.from_numpy(np.stack([s.images[cam] for s in samples])) for cam in samples[0].images},
        "actions": torch.from_numpy(np.stack([s.actions for s in samples]).astype(np.float32)),
        "action_mask": torch.from_numpy(np.stack([s.action_mask for s in samples])),
        "frame_mask": torch.from_numpy(np.stack([s.frame_mask for s in samples])),
        "instructions": [s.instruction for s in samples],
        "samples": samples,
    }
    if all(s.state is not None for s in samples):
        batch["state"] = torch.from_numpy(np.stack([s.state for s in samples]).astype(np.float32))
    return batch


class ActionWindowDataModule(L.LightningDataModule):
    sample_kind = "action_window"

    def __init__(self, source: str, root: str, name: str | None = None, train_split: str = "training",
                 val_split: str = "validation", window_size: int = 8, chunk_size: int = 10,
                 cache_dir: str | None = None, batch_size: int = 8, num_workers: int = 0, seed: int = 0,
                 cameras: tuple[str, ...] = ("rgb_static", "rgb_gripper"), generate: dict | None = None):
        super().__init__()
        if source not in SOURCES:
            raise ValueError(f"unknown episode source {source!r}; valid: {list(SOURCES)}")
        if source == "oxe" and not name:
            raise ValueError("an oxe dataset needs `name` (the RLDS folder, e.g. bridge_orig)")
        self.source, self.root, self.name = source, Path(root), name
        self.split_names = {"train": train_split, "val": val_split}
        self.window_size, self.chunk_size = window_size, chunk_size
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.cameras = tuple(cameras)
        # settings of the project's toy action dataset (data/toy_actions.py), written to `root` on first use
        self.generate = dict(generate) if generate else None
        self.splits: dict[str, Dataset] = {}
        self.statistics: dict[str, Any] | None = None

    # --- building the datasets ----------------------------------------------------------------------------
    def _cache_path(self, split: str) -> Path:
        label = self.name or self.root.name
        return self.cache_dir / f"{self.source}_{label}_{self.split_names[split]}.h5"

    def _episodes(self, split: str):
        from affordvla.data.h5cache import calvin_episodes, oxe_episodes

        if self.source == "calvin":
            return calvin_episodes(self.root / self.split_names[split], cameras=self.cameras)
        return oxe_episodes(self.root, self.name, self.split_names[split])

    def _native(self, split: str) -> Dataset:
        if self.source == "calvin":
            from affordvla.data.calvin import CalvinWindowDataset

            return CalvinWindowDataset(self.root / self.split_names[split], self.window_size, self.chunk_size,
                                       cameras=self.cameras)
        raise ValueError("Open X-Embodiment is streamed; give `cache_dir` for a map-style dataset, or use "
                         "affordvla.data.oxe.OXEMixtureStream")

    def _dataset(self, split: str) -> Dataset:
        if self.cache_dir is None:
            return self._native(split)
        from affordvla.data.h5cache import CachedWindowDataset, convert, is_complete

        path = self._cache_path(split)
        if not is_complete(path):
            log.info("building the HDF5 cache %s", path)
            convert(self._episodes(split), path, source=f"{self.root}:{self.name}:{self.split_names[split]}",
                    source_format=self.source)
        anchor = "forward" if self.source == "calvin" else "history"
        return CachedWindowDataset(path, self.window_size, self.chunk_size, anchor=anchor)

    def prepare_data(self) -> None:
        if self.generate is not None:
            from affordvla.data.toy_actions import ToyActionSettings, write_toy_actions

            write_toy_actions(self.root, ToyActionSettings(**self.generate))

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        self.splits = {split: self._dataset(split) for split in ("train", "val")}
        self.statistics = self._action_statistics()

    def _action_statistics(self) -> dict[str, Any]:
        if self.source == "calvin":
            from affordvla.data.calvin import CalvinWindowDataset

            return CalvinWindowDataset(self.root / self.split_names["train"], 1, 1, cameras=()).action_statistics()
        from affordvla.data.oxe import RLDSDataset

        return RLDSDataset.open(self.root, self.name).action_statistics()

    def metadata(self) -> dict[str, Any]:
        first = self.splits["train"][0]
        return {
            "source": self.source, "root": str(self.root), "name": self.name,
            "sizes": {split: len(data) for split, data in self.splits.items()},
            "action_dim": int(first.actions.shape[-1]), "window_size": self.window_size,
            "chunk_size": self.chunk_size, "cameras": {cam: list(v.shape[1:]) for cam, v in first.images.items()},
            "state_dim": None if first.state is None else int(first.state.shape[-1]),
            "action_statistics": self.statistics,
        }

    # --- loaders ------------------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.splits["train"], batch_size=self.batch_size, shuffle=True, drop_last=True,
                          generator=generator, collate_fn=collate_action_windows, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["val"], batch_size=self.batch_size, shuffle=False,
                          collate_fn=collate_action_windows, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        # CALVIN and the OXE datasets have no separate test split: offline figures are on the validation split
        return self.val_dataloader()

"""LightningDataModule for episode datasets (CALVIN, Open X-Embodiment, RLBench) that yield ActionWindowSamples.

It reads the source format directly or, with `cache_dir` set, through the HDF5 episode cache, which it builds on
first use (`affordvla-data convert` builds the same file ahead of time); OXE and RLBench are read through the cache
only. The window semantics stay those of the source: CALVIN windows start at a frame (RoboVLMs), OXE and RLBench
windows end at one (OpenVLA; LLARVA's "previous five (including current) steps"). `metadata()` gives what a head
needs to size itself: action dimension, window and chunk sizes, cameras and action statistics.

RLBench splits are folders of task folders, `{root}/{split}/{task}/` (PerAct's layout), in either episode layout
(data/rlbench.py). Its actions are LLARVA's: the next step's 7 joint velocities and gripper_open (1 open, 0 closed).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from affordvla.data.calvin import LANG_FILE
from affordvla.data.checks import require_dir, require_file
from affordvla.data.generated import check_generator
from affordvla.data.sampling import StepResumableSampler
from affordvla.formats.sample import ActionWindowSample

log = logging.getLogger(__name__)
SOURCES = ("calvin", "oxe", "rlbench")


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
    """Windows of episodes (CALVIN, OXE, RLBench) on disk, checked when built, or generated on first use into a
    folder named by the settings of `generate`, the generator the config names, called with what this module
    knows of the layout: CALVIN `generate(root)`, RLBench `generate(root, tasks, split_names)` ({"train": folder,
    "val": folder}), OXE `generate(root, name)` (e.g. the writers in `affordvla.offline.toy_actions`,
    `affordvla.offline.toy_rlbench`, `affordvla.offline.toy_oxe`)."""

    sample_kind = "action_window"

    def __init__(self, source: str, root: str, name: str | None = None, train_split: str = "training",
                 val_split: str = "validation", window_size: int = 8, chunk_size: int = 10,
                 cache_dir: str | None = None, batch_size: int = 8, num_workers: int = 0, seed: int = 0,
                 cameras: tuple[str, ...] = ("rgb_static", "rgb_gripper"),
                 generate: Callable[..., Any] | None = None,
                 tasks: list[str] | None = None):
        super().__init__()
        if source not in SOURCES:
            raise ValueError(f"unknown episode source {source!r}; valid: {list(SOURCES)}")
        if source == "oxe" and not name:
            raise ValueError("an oxe dataset needs `name` (the RLDS folder, e.g. bridge_orig)")
        if source == "oxe":
            self._check_oxe_name(name, root)  # here, before the backbone is built
        self.source, self.root, self.name = source, Path(root), name
        # the policy module may hand its own batch layout; windows are collated as they are otherwise
        self.collate: Callable[[list[ActionWindowSample]], Any] | None = None
        self.split_names = {"train": train_split, "val": val_split}
        self.window_size, self.chunk_size = window_size, chunk_size
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.cameras = tuple(cameras)
        if source == "rlbench":
            from affordvla.data.rlbench import CAMERAS

            unknown = [cam for cam in self.cameras if cam not in CAMERAS]
            if unknown or not self.cameras:
                raise ValueError(f"RLBench cameras {unknown or '[]'} are not among {list(CAMERAS)}")
        # RLBench: the task folders of each split to read; None = all of them
        self.tasks = None if tasks is None else [str(t) for t in tasks]
        # the generator of a dataset written to `root` on first use; None: data on disk
        self.generate = generate
        self.splits: dict[str, Dataset] = {}
        self.statistics: dict[str, Any] | None = None
        # before any work: generated data only into its own folder, a user's folders only read and of the layout
        if self.generate is not None:
            check_generator(self.root, source, generate)
        else:
            self._check_layout()

    def _check_layout(self) -> None:
        layouts = {"calvin": "a CALVIN dataset: one folder per split (training/, validation/)",
                   "rlbench": "RLBench demonstrations as {root}/{split}/{task}/",
                   "oxe": f"an Open X-Embodiment RLDS folder holding {self.name}/<version>/"}
        require_dir(self.root, "dataset.root", layouts[self.source])
        if self.source == "oxe":
            require_dir(self.root / self.name, "dataset.name", f"the RLDS dataset {self.name} in {self.root}")
            return
        for key, split in self.split_names.items():
            if self.source == "rlbench":
                self._rlbench_tasks(key)
                continue
            folder = require_dir(self.root / split, f"dataset.{key}_split={split}",
                                 f"a CALVIN split folder: episode_*.npz and {LANG_FILE}")
            require_file(folder / LANG_FILE, f"dataset.{key}_split={split}", "CALVIN's language annotations")

    @staticmethod
    def _check_oxe_name(name: str, root: str) -> None:
        from affordvla.data.oxe.specs import SPECS

        if name not in SPECS:
            raise ValueError(f"dataset.name {name!r} (root {root}) is not an Open X-Embodiment dataset with a "
                             f"standardisation; known: {sorted(SPECS)}")

    # --- building the datasets ----------------------------------------------------------------------------
    def _cache_path(self, split: str) -> Path:
        label = self.name or self.root.name
        if self.source == "rlbench":  # another task list or camera set is another cache, not a clash
            label += "_" + hashlib.sha1(self._rlbench_source(split).encode()).hexdigest()[:10]
        return self.cache_dir / f"{self.source}_{label}_{self.split_names[split]}.h5"

    def _rlbench_tasks(self, split: str) -> list[Path]:
        split_dir = self.root / self.split_names[split]
        if not split_dir.is_dir():
            raise ValueError(f"RLBench split folder {split_dir} does not exist (expected {{root}}/{{split}}/{{task}}/)")
        if self.tasks is None:
            folders = sorted(p for p in split_dir.iterdir() if p.is_dir())
            if not folders:
                raise ValueError(f"RLBench split folder {split_dir} holds no task folders")
            return folders
        missing = [t for t in self.tasks if not (split_dir / t).is_dir()]
        if missing:
            raise ValueError(f"RLBench tasks {missing} have no folder in {split_dir}")
        return [split_dir / t for t in self.tasks]

    def _rlbench_source(self, split: str) -> str:
        return json.dumps({"root": str(self.root), "split": self.split_names[split], "cameras": list(self.cameras),
                           "tasks": [p.name for p in self._rlbench_tasks(split)]})

    def _episodes(self, split: str):
        from affordvla.data.h5cache import (
            calvin_episodes,
            oxe_episodes,
            rlbench_episodes,
        )

        if self.source == "calvin":
            return calvin_episodes(self.root / self.split_names[split], cameras=self.cameras)
        if self.source == "rlbench":
            return (record for task in self._rlbench_tasks(split) for record in rlbench_episodes(task, self.cameras))
        return oxe_episodes(self.root, self.name, self.split_names[split])

    def _native(self, split: str) -> Dataset:
        if self.source == "calvin":
            from affordvla.data.calvin import CalvinWindowDataset

            return CalvinWindowDataset(self.root / self.split_names[split], self.window_size, self.chunk_size,
                                       cameras=self.cameras)
        if self.source == "rlbench":
            raise ValueError("RLBench is read through the HDF5 episode cache (its pickles and PNGs are slow to "
                             "reread every epoch): give `cache_dir`")
        raise ValueError("Open X-Embodiment is streamed; give `cache_dir` for a map-style dataset, or use "
                         "affordvla.data.oxe.OXEMixtureStream")

    def _dataset(self, split: str) -> Dataset:
        if self.cache_dir is None:
            return self._native(split)
        from affordvla.data.h5cache import CachedWindowDataset, convert, is_complete

        path = self._cache_path(split)
        if not is_complete(path):
            log.info("building the HDF5 cache %s", path)
            source = (self._rlbench_source(split) if self.source == "rlbench"
                      else f"{self.root}:{self.name}:{self.split_names[split]}")
            convert(self._episodes(split), path, source=source, source_format=self.source)
        anchor = "forward" if self.source == "calvin" else "history"  # RLBench: LLARVA's history ends at t
        return CachedWindowDataset(path, self.window_size, self.chunk_size, anchor=anchor)

    def prepare_data(self) -> None:
        if self.generate is None:
            return
        if self.source == "calvin":
            self.generate(self.root)
        elif self.source == "rlbench":  # one folder per task of `tasks`, in the splits this datamodule reads
            self.generate(self.root, self.tasks or [], dict(self.split_names))
        else:  # oxe: the standardisation that dataset.name selects
            self.generate(self.root, self.name)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        self.prepare_data()  # idempotent; also covers callers that skip the Trainer
        self.splits = {split: self._dataset(split) for split in ("train", "val")}
        self.statistics = self._action_statistics()

    def _action_statistics(self) -> dict[str, Any]:
        if self.source == "calvin":
            from affordvla.data.calvin import CalvinWindowDataset

            train = CalvinWindowDataset(self.root / self.split_names["train"], 1, 1, cameras=())
            return train.action_statistics(cache_dir=self.cache_dir)
        if self.source == "rlbench":
            return self._cached_action_statistics(self._cache_path("train"))
        from affordvla.data.oxe import RLDSDataset

        return RLDSDataset.open(self.root, self.name).action_statistics(cache_dir=self.cache_dir)

    @staticmethod
    def _cached_action_statistics(path: Path) -> dict[str, Any]:
        """q01 / q99 / mean / std / min / max over every step of every cached training episode (each step once)."""
        import h5py

        with h5py.File(path, "r") as f:
            values = np.concatenate([f["episodes"][e]["actions"][()] for e in sorted(f["episodes"])]).astype(np.float64)
        return {"count": len(values), "mean": values.mean(0).tolist(), "std": values.std(0).tolist(),
                "q01": np.quantile(values, 0.01, axis=0).tolist(), "q99": np.quantile(values, 0.99, axis=0).tolist(),
                "min": values.min(0).tolist(), "max": values.max(0).tolist()}

    def metadata(self) -> dict[str, Any]:
        first = self.splits["train"][0]
        meta = {
            "source": self.source, "root": str(self.root), "name": self.name,
            "sizes": {split: len(data) for split, data in self.splits.items()},
            "action_dim": int(first.actions.shape[-1]), "window_size": self.window_size,
            "chunk_size": self.chunk_size, "cameras": {cam: list(v.shape[1:]) for cam, v in first.images.items()},
            "state_dim": None if first.state is None else int(first.state.shape[-1]),
            "action_statistics": self.statistics,
        }
        if self.source == "rlbench":
            meta["tasks"] = [p.name for p in self._rlbench_tasks("train")]
        return meta

    # --- loaders ------------------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        # the step-resumable sampler: an exact resume, and under DDP the ranks' batches together are the
        # single-process batch (Lightning would otherwise reshuffle with its own DistributedSampler)
        trainer = self.trainer
        done = (lambda: trainer.global_step * trainer.accumulate_grad_batches) if trainer is not None else (lambda: 0)
        sampler = StepResumableSampler(len(self.splits["train"]), self.batch_size, self.seed, done)
        return DataLoader(self.splits["train"], batch_size=self.batch_size, sampler=sampler, drop_last=True,
                          collate_fn=self.collate or collate_action_windows, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["val"], batch_size=self.batch_size, shuffle=False,
                          collate_fn=self.collate or collate_action_windows, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        # CALVIN and the OXE datasets have no separate test split: offline figures are on the validation split
        return self.val_dataloader()

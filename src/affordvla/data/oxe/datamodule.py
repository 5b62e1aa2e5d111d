"""A mixture of Open X-Embodiment datasets for training, read through one HDF5 episode cache per dataset and
split, sampled by the mixture's weights (OpenVLA's: weight x dataset size when `balance_weights`)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import ConcatDataset, Dataset

from affordvla.data.action_datamodule import ActionWindowDataModule
from affordvla.data.h5cache import CachedWindowDataset, EpisodeRecord, convert, is_complete
from affordvla.data.oxe.rlds import RLDSDataset
from affordvla.data.oxe.specs import resolve_mixture
from affordvla.data.sample import ActionWindowSample

log = logging.getLogger(__name__)


def oxe_records(root: str | Path, name: str, split: str, *, image_size: int | None, cameras: tuple[str, ...],
                skip_unlabeled: bool = True) -> Iterator[EpisodeRecord]:
    """Standardised episodes of one dataset as cache records, every requested camera role at `image_size`."""
    unlabeled: list[str] = []
    for episode in RLDSDataset.open(root, name).episodes(split, image_size=image_size, cameras=cameras,
                                                         skip_unlabeled=skip_unlabeled, unlabeled=unlabeled):
        yield EpisodeRecord(key=episode.source, images={"primary": episode.images, **episode.extra_images},
                            actions=episode.actions, instruction=episode.instruction)


class MixtureWindowDataset(Dataset):
    """The windows of several datasets as one map-style dataset in which dataset k fills a share p_k of the
    indices (its windows repeated or cut to fit), so a uniform sampler draws dataset k with probability p_k."""

    def __init__(self, parts: dict[str, Dataset], probabilities: dict[str, float]):
        self.names = list(parts)
        self.parts = [parts[n] for n in self.names]
        total = sum(len(p) for p in self.parts)
        counts = [max(1, round(probabilities[n] * total)) for n in self.names]
        self.part_index = np.repeat(np.arange(len(self.parts)), counts)
        self.item_index = np.concatenate([np.arange(c) % len(p) for c, p in zip(counts, self.parts)])

    def __len__(self) -> int:
        return len(self.part_index)

    def __getitem__(self, i: int) -> ActionWindowSample:
        sample = self.parts[self.part_index[i]][int(self.item_index[i])]
        sample.meta["dataset"] = self.names[self.part_index[i]]
        return sample


class OXEMixtureDataModule(ActionWindowDataModule):
    """Open X-Embodiment mixture (a named one, or [[dataset, weight], ...]) through per-dataset HDF5 caches.

    The mixture is checked when the module is built: a dataset without a standardisation is an error naming it,
    before any data is read. Every camera role of `cameras` is resized to `image_size` (OpenVLA's 224) so the
    datasets batch together; roles a dataset lacks are black frames. `skip_unlabeled` leaves out episodes
    without an instruction, as OpenVLA does. Validation reads every dataset's val windows once, unweighted.
    Statistics: `action_statistics` pools the training actions of the whole mixture (what one action head is
    normalised with); `dataset_statistics` has each dataset's own."""

    def __init__(self, root: str, mixture: str | list, train_split: str = "train", val_split: str = "val",
                 window_size: int = 1, chunk_size: int = 1, cache_dir: str | None = None, batch_size: int = 8,
                 num_workers: int = 0, seed: int = 0, cameras: tuple[str, ...] = ("primary",), image_size: int = 224,
                 skip_unlabeled: bool = True, balance_weights: bool = True, generate: dict | None = None,
                 source: str = "oxe_mixture"):
        self.entries = resolve_mixture(list(mixture) if not isinstance(mixture, str) else mixture,
                                       where=f"data root {root}")
        if source != "oxe_mixture":
            raise ValueError(f"OXEMixtureDataModule reads source 'oxe_mixture', got {source!r}")
        if not cache_dir:
            raise ValueError("an OXE mixture is read through the HDF5 episode cache: give `cache_dir`")
        if "primary" not in cameras:
            raise ValueError(f"cameras {list(cameras)} must include 'primary'")
        label = mixture if isinstance(mixture, str) else "custom"
        super().__init__("oxe", root, name=label, train_split=train_split, val_split=val_split,
                         window_size=window_size, chunk_size=chunk_size, cache_dir=cache_dir, batch_size=batch_size,
                         num_workers=num_workers, seed=seed, cameras=tuple(cameras), generate=generate)
        self.mixture_label, self.image_size = label, image_size
        self.skip_unlabeled, self.balance_weights = skip_unlabeled, balance_weights
        self.probabilities: dict[str, float] = {}
        self.dataset_statistics: dict[str, Any] = {}

    def _dataset_cache(self, name: str, split: str) -> Path:
        tag = f"{self.image_size}px_{'-'.join(self.cameras)}" + ("" if self.skip_unlabeled else "_all")
        return self.cache_dir / f"oxe_{name}_{self.split_names[split]}_{tag}.h5"

    def _part(self, name: str, split: str) -> CachedWindowDataset:
        path = self._dataset_cache(name, split)
        if not is_complete(path):
            log.info("building the HDF5 cache %s", path)
            source = json.dumps({"root": str(self.root), "dataset": name, "split": self.split_names[split],
                                 "image_size": self.image_size, "cameras": list(self.cameras),
                                 "skip_unlabeled": self.skip_unlabeled})
            convert(oxe_records(self.root, name, self.split_names[split], image_size=self.image_size,
                                cameras=self.cameras, skip_unlabeled=self.skip_unlabeled),
                    path, source=source, source_format="oxe")
        return CachedWindowDataset(path, self.window_size, self.chunk_size, anchor="history")

    def _dataset(self, split: str) -> Dataset:
        parts = {name: self._part(name, split) for name, _ in self.entries}
        empty = [name for name, part in parts.items() if len(part) == 0]
        if empty:
            raise ValueError(f"mixture datasets {empty} have no {self.split_names[split]!r} windows under {self.root}")
        if split != "train":
            return ConcatDataset(list(parts.values()))
        weights = {name: w * (len(parts[name]) if self.balance_weights else 1) for name, w in self.entries}
        total = sum(weights.values())
        self.probabilities = {name: w / total for name, w in weights.items()}
        return MixtureWindowDataset(parts, self.probabilities)

    def prepare_data(self) -> None:
        if self.generate is None:
            return
        from affordvla.data.toy_oxe import write_toy_mixture

        write_toy_mixture(self.root, [name for name, _ in self.entries], **self.generate)

    def _action_statistics(self) -> dict[str, Any]:
        self.dataset_statistics = {
            name: RLDSDataset.open(self.root, name).action_statistics(self.cache_dir,
                                                                      skip_unlabeled=self.skip_unlabeled)
            for name, _ in self.entries}
        import h5py

        values = []
        for name, _ in self.entries:
            with h5py.File(self._dataset_cache(name, "train"), "r") as f:
                values += [f["episodes"][e]["actions"][()] for e in sorted(f["episodes"])]
        actions = np.concatenate(values).astype(np.float64)
        return {"count": len(actions), "mean": actions.mean(0).tolist(), "std": actions.std(0).tolist(),
                "q01": np.quantile(actions, 0.01, axis=0).tolist(), "q99": np.quantile(actions, 0.99, axis=0).tolist(),
                "min": actions.min(0).tolist(), "max": actions.max(0).tolist()}

    def metadata(self) -> dict[str, Any]:
        meta = super().metadata()
        meta.update({"source": "oxe_mixture", "name": self.mixture_label,
                     "mixture": [[name, weight] for name, weight in self.entries],
                     "sampling_probabilities": self.probabilities, "image_size": self.image_size,
                     "dataset_statistics": self.dataset_statistics})
        return meta

"""A mixture of Open X-Embodiment datasets for training, read through one HDF5 episode cache per dataset and
split, sampled by the mixture's weights (OpenVLA's: weight x dataset size when `balance_weights`), each dataset's
actions normalised with its own statistics (OpenVLA's q01 / q99 bounds)."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import ConcatDataset, Dataset

from affordvla.data.action_datamodule import ActionWindowDataModule
from affordvla.data.checks import require_dir
from affordvla.data.h5cache import CachedWindowDataset, CacheError, EpisodeRecord, convert, is_complete
from affordvla.data.oxe.rlds import RLDSDataset
from affordvla.data.oxe.specs import resolve_mixture
from affordvla.formats.sample import ActionWindowSample

log = logging.getLogger(__name__)
BOUNDS_EPS = 1e-8  # OpenVLA's BOUNDS_Q99 denominator guard


def oxe_records(root: str | Path, name: str, split: str, *, image_size: int | None, cameras: tuple[str, ...],
                skip_unlabeled: bool = True, unlabeled: list[str] | None = None) -> Iterator[EpisodeRecord]:
    """Standardised episodes of one dataset as cache records, every requested camera role at `image_size`; the
    locations of episodes left out for having no instruction are appended to `unlabeled`."""
    for episode in RLDSDataset.open(root, name).episodes(split, image_size=image_size, cameras=cameras,
                                                         skip_unlabeled=skip_unlabeled, unlabeled=unlabeled):
        yield EpisodeRecord(key=episode.source, images={"primary": episode.images, **episode.extra_images},
                            actions=episode.actions, instruction=episode.instruction)


def normalize_bounds(actions: np.ndarray, q01: np.ndarray, q99: np.ndarray) -> np.ndarray:
    """OpenVLA's BOUNDS_Q99 on the arm dimensions: clip(2 (x - q01) / (q99 - q01 + eps) - 1, -1, 1); dimensions
    whose q01 == q99 never vary and map to 0. The gripper (last dimension) is a binary target, left as it is."""
    arm = actions[..., :-1].astype(np.float64)
    scaled = np.clip(2 * (arm - q01) / (q99 - q01 + BOUNDS_EPS) - 1, -1, 1)
    scaled = np.where(q99 == q01, 0.0, scaled)
    return np.concatenate([scaled, actions[..., -1:]], axis=-1).astype(np.float32)


def statistics(values: np.ndarray) -> dict[str, Any]:
    """count / mean / std / q01 / q99 / min / max per dimension of (N, D) actions."""
    values = np.asarray(values, np.float64)
    return {"count": len(values), "mean": values.mean(0).tolist(), "std": values.std(0).tolist(),
            "q01": np.quantile(values, 0.01, axis=0).tolist(), "q99": np.quantile(values, 0.99, axis=0).tolist(),
            "min": values.min(0).tolist(), "max": values.max(0).tolist()}


class NormalizedPart(Dataset):
    """One dataset's windows, its actions normalised with its own q01 / q99 and tagged with its name."""

    def __init__(self, part: Dataset, name: str, stats: dict[str, Any]):
        self.part, self.name = part, name
        self.q01, self.q99 = (np.asarray(stats[k], np.float64)[:-1] for k in ("q01", "q99"))

    def __len__(self) -> int:
        return len(self.part)

    def __getitem__(self, i: int) -> ActionWindowSample:
        sample = self.part[i]
        sample.actions = normalize_bounds(sample.actions, self.q01, self.q99)
        sample.meta["dataset"] = self.name
        return sample


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
    without an instruction, as OpenVLA does, and counts them per dataset and split (`unlabeled_episodes`).
    Validation reads every dataset's val windows once, unweighted.

    Normalisation, as OpenVLA's: each dataset's arm actions are mapped to [-1, 1] with that dataset's own
    training q01 / q99 (`dataset_statistics`, keyed by dataset name like OpenVLA's `unnorm_key`), so the samples
    hold normalised actions and the head takes them as they are (`action_normalization` tells it so);
    `action_statistics` describes the normalised training actions of the whole mixture.

    Each cache's name carries a hash of its settings (data root included) and its stored `source` is compared
    on reuse, so another copy of the data is another cache.

    A generated mixture is written on first use by `generate(root, names)` (the mixture's dataset names)."""

    def __init__(self, root: str, mixture: str | list, train_split: str = "train", val_split: str = "val",
                 window_size: int = 1, chunk_size: int = 1, cache_dir: str | None = None, batch_size: int = 8,
                 num_workers: int = 0, seed: int = 0, cameras: tuple[str, ...] = ("primary",), image_size: int = 224,
                 skip_unlabeled: bool = True, balance_weights: bool = True,
                 generate: Callable[..., Any] | None = None, source: str = "oxe_mixture"):
        self.entries = resolve_mixture(list(mixture) if not isinstance(mixture, str) else mixture,
                                       where=f"dataset.mixture, data root {root}")
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
        self.unlabeled_episodes: dict[str, dict[str, int]] = {}

    @staticmethod
    def _check_oxe_name(name: str, root: str) -> None:
        """The mixture's datasets were checked by resolve_mixture; `name` is the mixture's label."""

    def _check_layout(self) -> None:
        """The data root must be there; each dataset of the mixture is named when it is opened (setup)."""
        require_dir(self.root, "dataset.root", "an Open X-Embodiment data root holding the mixture's RLDS datasets")

    def _source(self, name: str, split: str) -> str:
        return json.dumps({"root": str(self.root.resolve()), "dataset": name, "split": self.split_names[split],
                           "image_size": self.image_size, "cameras": list(self.cameras),
                           "skip_unlabeled": self.skip_unlabeled})

    def _dataset_cache(self, name: str, split: str) -> Path:
        tag = f"{self.image_size}px_{'-'.join(self.cameras)}" + ("" if self.skip_unlabeled else "_all")
        digest = hashlib.sha1(self._source(name, split).encode()).hexdigest()[:10]
        return self.cache_dir / f"oxe_{name}_{self.split_names[split]}_{tag}_{digest}.h5"

    def _part(self, name: str, split: str) -> CachedWindowDataset:
        import h5py

        path, source = self._dataset_cache(name, split), self._source(name, split)
        if not is_complete(path):
            log.info("building the HDF5 cache %s", path)
            unlabeled: list[str] = []
            convert(oxe_records(self.root, name, self.split_names[split], image_size=self.image_size,
                                cameras=self.cameras, skip_unlabeled=self.skip_unlabeled, unlabeled=unlabeled),
                    path, source=source, source_format="oxe",
                    attrs=lambda: {"unlabeled_episodes": len(unlabeled)})
        with h5py.File(path, "r") as f:
            stored, count = f.attrs.get("source"), f.attrs.get("unlabeled_episodes")
        if stored != source or count is None:
            raise CacheError(f"{path} caches {stored!r} (unlabeled count {count!r}), not {source}: delete it")
        self.unlabeled_episodes.setdefault(name, {})[split] = int(count)
        return CachedWindowDataset(path, self.window_size, self.chunk_size, anchor="history")

    def _statistics(self, name: str) -> dict[str, Any]:
        """One dataset's training-action statistics, read from its train cache (built if needed)."""
        if name not in self.dataset_statistics:
            part = self._part(name, "train")
            stats = self._cached_action_statistics(part.path)
            if stats["count"] == 0:
                raise ValueError(f"mixture dataset {name} has no training steps under {self.root}")
            self.dataset_statistics[name] = {"dataset": name, "episodes": len(part.episodes), **stats}
        return self.dataset_statistics[name]

    def _dataset(self, split: str) -> Dataset:
        raw = {name: self._part(name, split) for name, _ in self.entries}
        empty = [name for name, part in raw.items() if len(part) == 0]
        if empty:
            raise ValueError(f"mixture datasets {empty} have no {self.split_names[split]!r} windows under {self.root}")
        parts = {name: NormalizedPart(part, name, self._statistics(name)) for name, part in raw.items()}
        if split != "train":
            return ConcatDataset(list(parts.values()))
        weights = {name: w * (len(parts[name]) if self.balance_weights else 1) for name, w in self.entries}
        total = sum(weights.values())
        self.probabilities = {name: w / total for name, w in weights.items()}
        return MixtureWindowDataset(parts, self.probabilities)

    def prepare_data(self) -> None:
        if self.generate is None:
            return
        # e.g. affordvla.offline.toy_oxe.write_toy_mixture
        self.generate(self.root, [name for name, _ in self.entries])

    def _action_statistics(self) -> dict[str, Any]:
        """The normalised training actions of the whole mixture, every step once (not weighted)."""
        import h5py

        values = []
        for name, _ in self.entries:
            stats = self._statistics(name)
            q01, q99 = (np.asarray(stats[k], np.float64)[:-1] for k in ("q01", "q99"))
            with h5py.File(self._dataset_cache(name, "train"), "r") as f:
                values += [normalize_bounds(f["episodes"][e]["actions"][()], q01, q99) for e in sorted(f["episodes"])]
        return statistics(np.concatenate(values))

    def metadata(self) -> dict[str, Any]:
        meta = super().metadata()
        meta.update({"source": "oxe_mixture", "name": self.mixture_label,
                     "mixture": [[name, weight] for name, weight in self.entries],
                     "sampling_probabilities": self.probabilities, "image_size": self.image_size,
                     "action_normalization": {"mode": "bounds_q99", "per_dataset": True},
                     "dataset_statistics": self.dataset_statistics,
                     "unlabeled_episodes": {name: dict(self.unlabeled_episodes.get(name, {}))
                                            for name, _ in self.entries}})
        return meta

"""LightningDataModules for keypoint datasets: KALIE's format (generated or on disk) here, RoboPoint's in
robopoint_datamodule.py, both on the shared `KeypointDataModule` base (loaders, resumable sampler, HDF5 cache).

They know nothing of models: the LightningModule hands them a `collate` function (backbone processor + head codec)
before the loaders are built.
"""

from __future__ import annotations

import abc
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from torch.utils.data import DataLoader, Dataset

from affordvla.data.checks import require_dir, require_file, unreadable_images
from affordvla.data.generated import check_generator
from affordvla.data.kalie import (
    JSON_NAME,
    MANIFEST,
    ON_ERROR_CHOICES,
    SPLITS_FILE,
    KalieFormatError,
    kalie_split,
    load_kalie_sample,
    read_kalie_index,
)
from affordvla.data.kalie import SCALE as KALIE_SCALE
from affordvla.data.kalie_augment import KalieAugmentation, centre_crop
from affordvla.data.sampling import StepResumableSampler
from affordvla.formats.sample import KALIE_POINT_NAMES, KeypointSample

log = logging.getLogger(__name__)


class KeypointDataset(Dataset):
    """Index entries of one split (KALIE's, or any the `loader` reads); samples are loaded on first access and kept
    (datasets here are small images).

    Evaluation splits may take a fixed `centre_crop_fraction` (KALIE's 450/700 view). The training split may
    take an `augmentation`; it is then indexed by `(index, epoch)` pairs and seeds each draw from
    (seed, epoch, index), so augmentations are reproducible and a resumed run sees the same ones.
    """

    def __init__(self, entries: list[Any], cache: bool = True, *,
                 augmentation: KalieAugmentation | None = None, augmentation_seed: int = 0,
                 centre_crop_fraction: float | None = None,
                 loader: Callable[[Any], KeypointSample] = load_kalie_sample):
        self.entries = entries
        self.loader = loader
        self.cache = cache
        self.augmentation = augmentation
        self.augmentation_seed = augmentation_seed
        self.centre_crop_fraction = centre_crop_fraction
        self._samples: dict[int, KeypointSample] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def _raw(self, index: int) -> KeypointSample:
        if index in self._samples:
            return self._samples[index]
        sample = self.loader(self.entries[index])
        if self.cache:
            self._samples[index] = sample
        return sample

    def __getitem__(self, key: int | tuple[int, int]) -> KeypointSample:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        sample = self._raw(index)
        if self.augmentation is not None:
            rng = np.random.default_rng([self.augmentation_seed, epoch, index])
            return self.augmentation(sample, rng)
        if self.centre_crop_fraction is not None:
            return centre_crop(sample, self.centre_crop_fraction)
        return sample


class KeypointDataModule(L.LightningDataModule, abc.ABC):
    """What every keypoint datamodule shares: `splits` of KeypointDatasets, the collate the module provides, the
    step-resumable training sampler, evaluation loaders and the optional HDF5 sample cache. Subclasses build
    `splits` in `setup` and define `train_keypoint_mean` (the mean baseline the evaluator scores)."""

    # How many points every answer has (None: it varies per sample, as in RoboPoint's VQA)
    points_per_sample: int | None = None

    sample_kind = "keypoints"
    format_error: type[ValueError] = ValueError  # raised for a file that breaks the dataset's format

    def __init__(self, batch_size: int, eval_batch_size: int, num_workers: int, sampler_seed: int,
                 max_val_samples: int | None, cache_dir: str | None, validate_images: bool = True,
                 validate_sample: int | None = None, on_error: str = "raise"):
        super().__init__()
        if on_error not in ON_ERROR_CHOICES:
            raise ValueError(f"dataset.on_error must be one of {list(ON_ERROR_CHOICES)}, got {on_error!r}")
        if validate_sample is not None and validate_sample < 1:
            raise ValueError(f"dataset.validate_sample must be a positive number of images or null (all), got "
                             f"{validate_sample}")
        # pre-flight: decode every image (or a seeded sample of them) before training, not at step N
        self.validate_images = validate_images
        self.validate_sample = validate_sample
        self.preflight: dict[str, Any] = {}
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.sampler_seed = sampler_seed
        self.max_val_samples = max_val_samples
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.collate: Callable[[list[KeypointSample]], Any] | None = None
        self.splits: dict[str, KeypointDataset] = {}
        self.num_skipped = 0

    @abc.abstractmethod
    def train_keypoint_mean(self) -> np.ndarray:
        """The 'predict the training mean' baseline, in the evaluation view; each dataset defines its own."""

    def _cached_loader(self, entries: list, path: Path, load: Callable[[Any], KeypointSample], *, source: str,
                       source_format: str) -> Callable[[Any], KeypointSample]:
        """Read every sample through the HDF5 cache at `path` (keyed by `entry.key`), built on first use (or by
        `affordvla-data convert`); entries missing from an older cache are added."""
        from affordvla.data.h5cache import KeypointCache, convert_keypoints, is_complete

        cache = KeypointCache(path) if is_complete(path) else None
        missing = [e for e in entries if cache is None or e.key not in cache]
        if missing:
            convert_keypoints((load(e) for e in missing), path, source=source, source_format=source_format,
                              total=len(missing))
            cache = KeypointCache(path)
        return lambda entry: cache.get(entry.key)

    def _preflight(self, entries: list, where: Path, on_error: str) -> list:
        """`entries` (each with `image_path` and `key`) less those whose image does not decode fully: raised as
        the format's error naming the file and entry, or with on_error="skip" left out and counted."""
        if not self.validate_images:
            self.preflight = {"checked": 0, "unreadable": 0}
            return entries
        failed, checked = unreadable_images((e.image_path for e in entries), self.validate_sample, self.sampler_seed)
        self.preflight = {"checked": checked, "unreadable": len(failed), "sampled": self.validate_sample is not None}
        if not failed:
            return entries
        bad = [e for e in entries if str(e.image_path) in failed]
        if on_error == "raise":
            first = bad[0]
            why = failed[str(first.image_path)]
            raise self.format_error(
                f"{where}, entry {first.key!r}: image {first.image_path} does not decode ({why})"
                f"; {len(failed)} unreadable image(s) in all. Replace them, or set dataset.on_error=skip to leave "
                "their entries out (counted in the run's dataset metadata)")
        for entry in bad:
            log.warning("skipped entry %r: image %s does not decode (%s)", entry.key, entry.image_path,
                        failed[str(entry.image_path)])
        self.num_skipped += len(bad)
        self.preflight["skipped_entries"] = len(bad)
        return [e for e in entries if str(e.image_path) not in failed]

    def metadata(self) -> dict[str, Any]:
        return {"sizes": {s: len(d) for s, d in self.splits.items()}, "skipped": self.num_skipped,
                "preflight": self.preflight}

    # --- loaders ------------------------------------------------------------------------------------------
    def _require_collate(self) -> Callable:
        if self.collate is None:
            raise RuntimeError(f"{type(self).__name__}.collate is unset: the LightningModule provides it in setup()")
        return self.collate

    def _batches_done(self) -> int:
        trainer = self.trainer
        if trainer is None:
            return 0
        return trainer.global_step * trainer.accumulate_grad_batches

    def train_dataloader(self) -> DataLoader:
        dataset = self.splits["train"]
        sampler = StepResumableSampler(len(dataset), self.batch_size, self.sampler_seed, self._batches_done,
                                       with_epoch=dataset.augmentation is not None)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, drop_last=True,
                          collate_fn=self._require_collate(), num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def _eval_loader(self, split: str, limit: int | None = None) -> DataLoader:
        dataset = self.splits[split]
        if limit is not None and limit < len(dataset):
            dataset = KeypointDataset(dataset.entries[:limit], centre_crop_fraction=dataset.centre_crop_fraction,
                                      loader=dataset.loader)
        return DataLoader(dataset, batch_size=self.eval_batch_size, shuffle=False,
                          collate_fn=self._require_collate(), num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val", self.max_val_samples)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")


class KalieDataModule(KeypointDataModule):
    """KALIE's JSON datasets: on disk (checked when built), or generated on first use into a folder named by
    the settings of `generate`, the generator (e.g. `affordvla.offline.toy_kalie.ensure_toy_kalie`) called as
    `generate(root)`."""

    points_per_sample = len(KALIE_POINT_NAMES)
    format_error = KalieFormatError

    def __init__(
        self,
        root: str,
        name: str = "kalie",
        generate: Callable[..., Any] | None = None,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        num_workers: int = 0,
        on_error: str = "raise",
        split_seed: int = 2023,
        train_fraction: float = 0.8,
        sampler_seed: int = 0,
        max_val_samples: int | None = None,
        augmentation: KalieAugmentation | None = None,
        eval_centre_crop: float | None = None,
        cache_dir: str | None = None,
        max_train_samples: int | None = None,
        train_subset_seed: int = 0,
        validate_images: bool = True,
        validate_sample: int | None = None,
    ):
        super().__init__(batch_size, eval_batch_size, num_workers, sampler_seed, max_val_samples, cache_dir,
                         validate_images, validate_sample, on_error)
        if max_train_samples is not None and max_train_samples < 1:
            raise ValueError(f"max_train_samples must be a positive number of originals, got {max_train_samples}")
        # KALIE's "10 vs 50 originals" ablation: a seeded subset of the original training entries; synthetic
        # variants of a synthesised dataset follow their original (see `original_subset`)
        self.max_train_samples = max_train_samples
        self.train_subset_seed = train_subset_seed
        self.root = Path(root)
        self.name = name
        self.generate = generate
        # before any work: generated data only into its own folder, a user's folder only read and of KALIE's layout
        if generate is not None:
            check_generator(self.root, "kalie", generate)
        else:
            require_dir(self.root, "dataset.root", f"a KALIE dataset folder: imgs/ and {JSON_NAME}")
            require_file(self.root / JSON_NAME, "dataset.root", f"KALIE's index {JSON_NAME} (KALIE's layout: "
                         f"imgs/ and {JSON_NAME})")
        self.on_error = on_error
        self.split_seed = split_seed
        self.train_fraction = train_fraction
        self.augmentation = augmentation
        # KALIE trains on augmented crops and evaluates on the centre crop; the augmentation's crop is the default
        if eval_centre_crop is None and augmentation is not None:
            eval_centre_crop = augmentation.crop_fraction
        self.eval_centre_crop = eval_centre_crop

    def prepare_data(self) -> None:
        if self.generate is not None:
            self.generate(self.root)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        self.prepare_data()  # idempotent; also covers callers that skip the Trainer
        entries, self.num_skipped = read_kalie_index(self.root, on_error=self.on_error)
        entries = self._preflight(entries, self.root / JSON_NAME, self.on_error)
        by_key = {e.key: e for e in entries}
        split_file = self.root / SPLITS_FILE
        if split_file.exists():
            keys = json.loads(split_file.read_text())
            missing = [k for ks in keys.values() for k in ks if k not in by_key]
            if missing and self.on_error == "raise":
                raise KalieFormatError(f"{split_file} names entries missing from the index: {missing[:5]}")
            keys = {split: [k for k in ks if k in by_key] for split, ks in keys.items()}
        else:
            # KALIE's own split: seeded 80/20, and its validation set is its test set.
            train, test = kalie_split(list(by_key), seed=self.split_seed, train_fraction=self.train_fraction)
            keys = {"train": train, "val": test, "test": test}
        if self.max_train_samples is not None:
            keys["train"] = original_subset(self.root, keys["train"], self.max_train_samples, self.train_subset_seed)
        loader = (self._cached_loader(entries, self.cache_dir / f"kalie_{self.root.name}.h5", load_kalie_sample,
                                     source=str(self.root), source_format="kalie")
                  if self.cache_dir is not None else load_kalie_sample)
        self.splits = {
            split: KeypointDataset(
                [by_key[k] for k in ks],
                augmentation=self.augmentation if split == "train" else None,
                augmentation_seed=self.sampler_seed,
                centre_crop_fraction=None if split == "train" else self.eval_centre_crop,
                loader=loader,
            )
            for split, ks in keys.items()
        }
        log.info("dataset %s: %s", self.root, {s: len(d) for s, d in self.splits.items()})

    # --- statistics the rest of the framework derives from the data -----------------------------------------
    def train_keypoint_mean(self) -> np.ndarray:
        """Mean keypoints of the training split, in the evaluation view: the 'predict the mean' baseline."""
        # From the index entries: no image needs to be opened for this.
        points = [list(entry.points.values()) for entry in self.splits["train"].entries]
        mean = np.mean(np.asarray(points, dtype=np.float64) / KALIE_SCALE, axis=0)
        if self.eval_centre_crop is not None:  # a centred crop of fraction f maps p to (p - (1 - f) / 2) / f
            mean = (mean - (1 - self.eval_centre_crop) / 2) / self.eval_centre_crop
        return mean.astype(np.float32)

    def metadata(self) -> dict[str, Any]:
        # the evaluation view travels with the policy: inference shows the model what evaluation showed it
        return {"root": str(self.root), **super().metadata(), "max_train_samples": self.max_train_samples,
                "eval_centre_crop": self.eval_centre_crop}


def original_subset(root: Path, train_keys: list[str], count: int, seed: int) -> list[str]:
    """The training keys of `count` originals drawn with `seed`, each with its synthetic variants.

    In a synthesised dataset (one with the synthesis stage's manifest.json) every entry records the source entry
    it came from, so an original and its variants form one group and a subset never keeps a variant without its
    original; in any other dataset every entry is its own original. The draw is over the sorted group names, so
    it depends only on which originals exist and the seed, not on file order or on how many variants each has."""
    manifest = root / MANIFEST
    origin = {key: key for key in train_keys}
    if manifest.is_file():
        records = json.loads(manifest.read_text()).get("entries", {})
        missing = [k for k in train_keys if k not in records or "source" not in records[k]]
        if missing:
            raise KalieFormatError(f"{manifest}: no source recorded for training entries {missing[:5]}")
        origin = {key: str(records[key]["source"]) for key in train_keys}
    groups = sorted(set(origin.values()))
    if count > len(groups):
        raise KalieFormatError(f"{root}: max_train_samples={count} originals asked, but the training split has "
                               f"only {len(groups)}")
    chosen = {groups[i] for i in np.random.default_rng(seed).permutation(len(groups))[:count]}
    return [key for key in train_keys if origin[key] in chosen]

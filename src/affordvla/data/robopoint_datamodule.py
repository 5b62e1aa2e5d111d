"""LightningDataModule for RoboPoint's pointing data (LLaVA conversation JSON), served like KALIE's.

Every human -> gpt turn whose answer is a list of normalised (x, y) tuples is one sample; text and box answers are
counted (`metadata()["left_out"]`) and left out, as `robopoint.pointing_samples` does. Unlike `pointing_samples`,
the index keeps only the parsed answers and opens an image when its sample is first read, so a file of a million
turns needs no image in memory at setup.

Answers hold any number of unordered points in a target region, so samples carry `meta["point_set"] = True` and
the evaluator scores them as point sets (metrics/keypoints.py). Pair with `head.codec=robopoint`, the codec
that writes and reads any number of points.

RoboPoint ships one training file: KALIE's seeded 80/20 rule is drawn over *images*, so the questions about one
image never land on both sides; validation = test, as for KALIE.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from affordvla.data.checks import require_dir, require_file
from affordvla.data.datamodule import KeypointDataModule, KeypointDataset
from affordvla.data.generated import check_generator, check_inside
from affordvla.data.kalie import ON_ERROR_CHOICES, kalie_split
from affordvla.data.robopoint import (
    RoboPointFormatError,
    load_image,
    parse_point_answer,
    read_conversations,
)
from affordvla.formats.sample import POINT_SET, KeypointSample, numbered_point_names

log = logging.getLogger(__name__)
_BOX = re.compile(r"\(\s*[\d.]+(\s*,\s*[\d.]+){3}\s*\)")  # the rule pointing_samples counts boxes by


@dataclass
class RoboPointEntry:
    """One pointing turn of a RoboPoint conversation file, read without its image."""

    key: str  # "{id}#{turn}", the entry name pointing_samples and the HDF5 cache use
    source: str  # the conversation file
    image_path: Path
    instruction: str
    points: np.ndarray  # (N, 2) normalised (x, y)


def read_pointing_index(json_path: str | Path, image_dir: str | Path,
                        on_error: str = "raise") -> tuple[list[RoboPointEntry], Counter, int]:
    """The pointing turns of a conversation file without their images: (entries, left-out answers by kind,
    entries skipped for a missing image). A missing image raises unless `on_error="skip"`."""
    if on_error not in ON_ERROR_CHOICES:
        raise ValueError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")
    entries, left_out, seen, skipped = [], Counter(), Counter(), 0
    for turn in read_conversations(json_path, image_dir):
        points = parse_point_answer(turn.answer)
        if points is None:
            left_out["box" if _BOX.search(turn.answer) else "text"] += 1
            continue
        key = f"{turn.entry_id}#{turn.turn}"
        seen[key] += 1
        if seen[key] > 1:  # a repeated id: keys name samples in the caches, so they must stay unique
            key = f"{key}~{seen[key] - 1}"
        if not turn.image_path.is_file():  # found here rather than hours into training
            message = f"{json_path}, entry {turn.entry_id!r}: image {turn.image_path} does not exist"
            if on_error == "raise":
                raise RoboPointFormatError(message)
            log.warning("skipped: %s", message)
            skipped += 1
            continue
        entries.append(RoboPointEntry(key, str(json_path), turn.image_path, turn.question, points))
    return entries, left_out, skipped


def load_robopoint_sample(entry: RoboPointEntry) -> KeypointSample:
    return KeypointSample(
        image=load_image(entry.image_path, f"{entry.source}, entry {entry.key!r}"), instruction=entry.instruction,
        keypoints=entry.points, point_names=numbered_point_names(len(entry.points)), task="robopoint",
        meta={"source": entry.source, "entry": entry.key, "image_path": str(entry.image_path), POINT_SET: True},
    )


class RoboPointDataModule(KeypointDataModule):
    """RoboPoint's pointing turns as KeypointSamples (variable point counts), split 80/20 by image."""

    format_error = RoboPointFormatError

    def __init__(
        self,
        json_path: str,
        image_dir: str,
        root: str | None = None,
        name: str = "robopoint",
        batch_size: int = 16,
        eval_batch_size: int = 32,
        num_workers: int = 0,
        on_error: str = "raise",
        split_seed: int = 2023,
        train_fraction: float = 0.8,
        sampler_seed: int = 0,
        max_val_samples: int | None = None,
        cache_dir: str | None = None,
        keep_in_memory: bool = False,
        generate: Callable[..., Any] | None = None,
        validate_images: bool = True,
        validate_sample: int | None = None,
    ):
        super().__init__(batch_size, eval_batch_size, num_workers, sampler_seed, max_val_samples, cache_dir,
                         validate_images, validate_sample, on_error)
        # before any work: generated data only into its own folder, a user's files only read and of the layout
        if generate is not None:
            if root is None:
                raise ValueError("generated RoboPoint data needs `root` (its Where2Place folder is written to "
                                 "<root>/where2place)")
            check_generator(root, "robopoint", generate)
            check_inside(root, json_path, image_dir)
        else:
            require_file(json_path, "dataset.json_path", "RoboPoint's LLaVA conversation JSON, e.g. "
                         "robopoint_1432k.json")
            require_dir(image_dir, "dataset.image_dir", "the folder the entries' \"image\" paths are relative to")
        # the generator of a fixture written on first use, called as generate(json_path, image_dir, where2place_dir)
        # (e.g. affordvla.offline.toy_robopoint.ensure_toy_robopoint); null: data on disk
        self.generate = generate
        # No `root` attribute on purpose: synthesis recipes read KALIE folders from `datamodule.root`.
        self.data_root = root
        self.json_path = Path(json_path)
        self.image_dir = Path(image_dir)
        self.name = name
        self.on_error = on_error
        self.split_seed = split_seed
        self.train_fraction = train_fraction
        # decoded samples kept after the first read: right for small sets, not for RoboPoint's million turns
        self.keep_in_memory = keep_in_memory
        self.left_out: Counter = Counter()

    def prepare_data(self) -> None:
        if self.generate is not None:
            self.generate(self.json_path, self.image_dir, Path(self.data_root) / "where2place")

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        self.prepare_data()  # idempotent; also covers callers that skip the Trainer
        entries, self.left_out, self.num_skipped = read_pointing_index(self.json_path, self.image_dir, self.on_error)
        entries = self._preflight(entries, self.json_path, self.on_error)
        if not entries:
            raise RoboPointFormatError(f"{self.json_path}: no pointing answers ([(x, y), ...]) among its turns "
                                       f"(left out: {dict(self.left_out)})")
        images = list(dict.fromkeys(str(e.image_path) for e in entries))  # first-seen order, then the seeded shuffle
        train_images, _ = kalie_split(images, seed=self.split_seed, train_fraction=self.train_fraction)
        train_images = set(train_images)
        train = [e for e in entries if str(e.image_path) in train_images]
        held_out = [e for e in entries if str(e.image_path) not in train_images]
        loader = load_robopoint_sample
        if self.cache_dir is not None:
            cached = self._cached_loader(entries, self.cache_dir / f"robopoint_{self.json_path.stem}.h5",
                                         load_robopoint_sample, source=str(self.json_path),
                                         source_format="robopoint")

            def loader(entry: RoboPointEntry) -> KeypointSample:
                sample = cached(entry)
                sample.meta[POINT_SET] = True  # caches written by `affordvla-data convert robopoint` lack the flag
                return sample

        held_out = KeypointDataset(held_out, cache=self.keep_in_memory, loader=loader)
        self.splits = {"train": KeypointDataset(train, cache=self.keep_in_memory, loader=loader),
                       "val": held_out, "test": held_out}
        log.info("dataset %s: %s, left out %s", self.json_path, {s: len(d) for s, d in self.splits.items()},
                 dict(self.left_out))

    def train_keypoint_mean(self) -> np.ndarray:
        """The mean baseline as a one-point answer: the mean over training answers of each answer's centroid
        (every answer weighs the same, however many points it has). (1, 2), from the index alone."""
        if not self.splits["train"].entries:
            raise RoboPointFormatError(f"{self.json_path}: the training split is empty "
                                       f"(train_fraction={self.train_fraction})")
        centroids = np.stack([e.points.mean(axis=0) for e in self.splits["train"].entries])
        return centroids.mean(axis=0, keepdims=True).astype(np.float32)

    def metadata(self) -> dict[str, Any]:
        counts = [len(e.points) for e in self.splits["train"].entries]
        return {"root": self.data_root, "json_path": str(self.json_path), "image_dir": str(self.image_dir),
                **super().metadata(),
                "left_out": dict(self.left_out),
                "points_per_answer": {"min": min(counts, default=0), "max": max(counts, default=0),
                                      "mean": float(np.mean(counts)) if counts else 0.0}}


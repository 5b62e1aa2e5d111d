"""A `MaskProvider` that reads the object masks shipped with a dataset instead of running GroundingDINO + SAM.

The toy generator (offline/toy_kalie.py) and this stage's own output record each object's mask as a PNG beside the
image, listed in the entry's `other.masks` = {object name: path relative to the dataset root}.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

from affordvla.data.kalie import (
    KalieEntry,
    KalieFormatError,
    load_kalie_sample,
    read_kalie_index,
)


def _where(entry: KalieEntry) -> str:
    return f"{entry.source or entry.image_path}, entry {entry.key!r}"


def _digest(image: np.ndarray) -> str:
    image = np.ascontiguousarray(image)
    return hashlib.sha256(repr(image.shape).encode() + image.tobytes()).hexdigest()


class DatasetMasks:
    """Masks from `other.masks`. The recipe asks `masks_for_entry`; the protocol's `masks(image, names)` finds
    the entry by the image's content in the dataset at `root`, for callers that only hold the image."""

    name = "dataset"

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else None
        self._by_digest: dict[str, KalieEntry] | None = None

    def describe(self) -> dict:
        return {"masks": "dataset", "class": f"{type(self).__module__}.{type(self).__qualname__}",
                "source": "other.masks files shipped with the dataset", "models": []}

    def masks_for_entry(self, entry: KalieEntry, image: np.ndarray, object_names: list[str]) -> dict[str, np.ndarray]:
        where = _where(entry)
        listed = entry.other.get("masks")
        if not isinstance(listed, dict):
            raise KalieFormatError(f"{where}: no other.masks in the entry; this dataset ships no masks, so use a "
                                   "segmenting mask provider (GroundingDINO + SAM) instead of DatasetMasks")
        root = entry.source.parent if entry.source is not None else entry.image_path.parent.parent
        out: dict[str, np.ndarray] = {}
        for name in object_names:
            rel = listed.get(name)
            if rel is None:
                continue  # like a detector that finds nothing: the object is left where it is
            if not isinstance(rel, str):
                raise KalieFormatError(f"{where}: other.masks[{name!r}] must be a path string, got {rel!r}")
            path = root / rel
            try:
                with Image.open(path) as im:
                    mask = np.asarray(im.convert("L")) >= 128
            except FileNotFoundError:
                raise KalieFormatError(f"{where}: mask file of {name!r} not found: {path}") from None
            except (OSError, ValueError) as exc:
                raise KalieFormatError(f"{where}: cannot read mask of {name!r} at {path}: {exc}") from None
            if mask.shape != image.shape[:2]:
                raise KalieFormatError(f"{where}: mask {path} is {mask.shape[1]}x{mask.shape[0]} but the image is "
                                       f"{image.shape[1]}x{image.shape[0]}")
            out[name] = mask
        return out

    def masks(self, image: np.ndarray, object_names: list[str]) -> dict[str, np.ndarray]:
        if self.root is None:
            raise ValueError("DatasetMasks.masks(image, names) needs the dataset root to find the image's entry")
        if self._by_digest is None:
            entries, _ = read_kalie_index(self.root)
            self._by_digest = {}
            for entry in entries:
                self._by_digest.setdefault(_digest(load_kalie_sample(entry).image), entry)
        entry = self._by_digest.get(_digest(image))
        if entry is None:
            raise KeyError(f"the image is not one of the dataset's images in {self.root}")
        return self.masks_for_entry(entry, image, object_names)

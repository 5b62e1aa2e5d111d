"""The common sample every reader yields and every processor consumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

# KALIE's five keypoints, in the order its loaders read them (kalie.md 1.2).
KALIE_POINT_NAMES: tuple[str, ...] = (
    "Grasp Point",
    "Function Point",
    "Target Point",
    "Pre-contact Point",
    "Post-contact Point",
)


@dataclass
class KeypointSample:
    """One image with named keypoints.

    `keypoints` holds (x, y) in normalised image coordinates ([0, 1] inside the image; values outside are
    allowed because KALIE's synthesis does not clip). `meta` records where the sample came from
    (source file, entry key) so errors and overlays can point back to it.
    """

    image: np.ndarray  # HxWx3 uint8 RGB
    instruction: str
    keypoints: np.ndarray  # (K, 2) float32, (x, y) normalised
    point_names: tuple[str, ...] = KALIE_POINT_NAMES
    task: str = ""
    objects: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.keypoints = np.asarray(self.keypoints, dtype=np.float32).reshape(-1, 2)
        if len(self.point_names) != len(self.keypoints):
            raise ValueError(
                f"{len(self.keypoints)} keypoints but {len(self.point_names)} names in sample {self.meta}"
            )

"""The common sample every reader yields and every processor consumes, and the point names it carries."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

# KALIE's five keypoints, in the order its loaders read them.
KALIE_POINT_NAMES: tuple[str, ...] = (
    "Grasp Point",
    "Function Point",
    "Target Point",
    "Pre-contact Point",
    "Post-contact Point",
)
POINT_SET = "point_set"  # the sample meta flag for unordered, variable-count targets (RoboPoint's regions)


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


@dataclass
class ActionWindowSample:
    """A history window of T observations with, for each of them, the next n actions (RoboVLMs' formulation).

    `images` maps a camera name to (T, H, W, 3) uint8 frames. `actions` is (T, n, D) in the dataset's own units
    (normalisation belongs to the head); `action_mask[t, j]` is False where step t + j lies past the end of the
    annotated segment or episode (the action there repeats the last valid one and must not be trained on).
    `frame_mask[t]` is False for padded history frames.
    """

    images: dict[str, np.ndarray]
    instruction: str
    actions: np.ndarray  # (T, n, D) float32
    action_mask: np.ndarray  # (T, n) bool
    frame_mask: np.ndarray  # (T,) bool
    state: np.ndarray | None = None  # (T, S) proprioception, when the dataset has it
    meta: dict[str, Any] = field(default_factory=dict)


def numbered_point_names(count: int) -> tuple[str, ...]:
    """Names of the points of a set that does not name them (RoboPoint's answers): "Point 1", "Point 2", ..."""
    return tuple(f"Point {i + 1}" for i in range(count))

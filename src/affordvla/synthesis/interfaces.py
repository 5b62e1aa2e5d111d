"""The contracts between the parts of KALIE's synthesis stage.

A mask provider finds each named object's silhouette; a context annotator turns an image into the structure map
ControlNet is conditioned on; an inpainting backend renders the object at its new pose. The recipe (geometry,
chaining objects, writing samples) only talks to these protocols, so the diffusion backend and the offline
compositing backend are interchangeable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


class MaskProvider(Protocol):
    """What synthesis reads object masks from (GroundingDINO + SAM, or a stand-in)."""

    def masks(self, image: np.ndarray, object_names: list[str]) -> dict[str, np.ndarray]:
        """HxWx3 uint8 image -> {object name: HxW bool mask}; a name that is not found is left out."""


class ContextAnnotator(Protocol):
    """What turns an image into the ControlNet's context map."""

    name: str

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """HxWx3 uint8 image -> HxWx3 uint8 context map (edges, depth, ...) of the same size."""


@dataclass
class InpaintRequest:
    """Everything one object's re-rendering may need; each backend reads the fields it uses."""

    image: np.ndarray  # HxWx3 uint8, the current image (earlier objects of the chain already re-rendered)
    object_mask: np.ndarray  # HxW bool, the object's silhouette before the move
    affine: np.ndarray  # 2x3 float, the map applied to the object (pixel coordinates, x = column)
    moved_mask: np.ndarray  # HxW bool, the silhouette after the move
    inpaint_mask: np.ndarray  # HxW bool, union of old and new silhouettes, dilated: the pixels that may change
    context: np.ndarray  # HxWx3 uint8, the composed context map
    prompt: str
    seed: int
    extras: dict = field(default_factory=dict)  # backend-specific settings recorded in the manifest


class InpaintBackend(Protocol):
    """What re-renders an object inside a mask (Stable Diffusion with ControlNet, or a stand-in)."""

    name: str

    def inpaint(self, request: InpaintRequest) -> np.ndarray:
        """Return the HxWx3 uint8 image with the object re-rendered inside `request.inpaint_mask`."""

    def describe(self) -> dict:
        """Models and parameters, for the manifest."""

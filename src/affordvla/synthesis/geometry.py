"""The geometry of KALIE's synthesis: one affine per object, applied in one frame to the context
map, the mask and the keypoints.

Coordinates are continuous pixel units, x = column, with pixel (row r, column c) covering [c, c + 1) x [r, r + 1)
(the convention of data/kalie_augment.py), so a KALIE point v on the 0-1000 scale sits at v / 1000 * width.
OpenCV puts pixel centres on integers; `to_opencv` converts a map once so that images, masks and points move
together. The reference implementation moved the image about one centre and the keypoints about another; here
everything goes through the same 2x3 matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

REFERENCE_SIZE = 700  # KALIE's images are 700x700; its pixel constants are scaled from this size


def scaled_px(px_at_reference: float, size: int, reference: int = REFERENCE_SIZE) -> float:
    """A length given in KALIE's 700-px units, at an image of `size` px."""
    return px_at_reference * size / reference


def disk(radius: int) -> np.ndarray:
    """Elliptical structuring element of the given radius (radius 0: the 1x1 identity)."""
    radius = max(0, int(radius))
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def erode(mask: np.ndarray, kernel: int) -> np.ndarray:
    """Binary erosion by a kernel x kernel square (KALIE's 5x5); kernel <= 1 leaves the mask as it is."""
    mask = np.asarray(mask, dtype=bool)
    if kernel <= 1:
        return mask
    return cv2.erode(mask.astype(np.uint8), np.ones((kernel, kernel), np.uint8),
                     borderType=cv2.BORDER_CONSTANT, borderValue=0).astype(bool)


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    mask = np.asarray(mask, dtype=bool)
    if radius <= 0:
        return mask
    return cv2.dilate(mask.astype(np.uint8), disk(radius)).astype(bool)


# ------------------------------------------------------------------------------------------------ the affine


@dataclass(frozen=True)
class AffineRanges:
    """KALIE's random transform: independent x/y scales, a rotation, a translation in 700-px
    units scaled to the image."""

    scale: tuple[float, float] = (0.8, 1.2)
    rotation_degrees: float = 20.0
    translation_px: float = 20.0
    reference_size: int = REFERENCE_SIZE


def mask_centre(mask: np.ndarray) -> tuple[float, float]:
    """Centre (x, y) of the mask's bounding box, in continuous pixel units."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        raise ValueError("empty mask has no centre")
    return (cols.min() + cols.max() + 1) / 2.0, (rows.min() + rows.max() + 1) / 2.0


def object_affine(centre: tuple[float, float], scale: tuple[float, float], angle_degrees: float,
                  translation: tuple[float, float]) -> np.ndarray:
    """2x3 map: scale, then rotate (positive = counter-clockwise on screen, OpenCV's sense), then translate,
    all about `centre`."""
    cx, cy = centre
    a = math.radians(angle_degrees)
    c, s = math.cos(a), math.sin(a)
    # y points down, so [[c, s], [-s, c]] turns counter-clockwise as seen on the screen
    linear = np.array([[c, s], [-s, c]]) @ np.diag(scale)
    offset = np.array([cx, cy]) + np.asarray(translation, dtype=np.float64) - linear @ np.array([cx, cy])
    return np.concatenate([linear, offset[:, None]], axis=1)


def sample_affine(rng: np.random.Generator, mask: np.ndarray, ranges: AffineRanges = AffineRanges()
                  ) -> tuple[np.ndarray, dict[str, float]]:
    """Draw one object's transform about its mask's centre; returns the 2x3 map and the drawn parameters."""
    height, width = mask.shape
    sx, sy = rng.uniform(*ranges.scale, size=2)
    angle = rng.uniform(-ranges.rotation_degrees, ranges.rotation_degrees)
    tx = rng.uniform(-1.0, 1.0) * scaled_px(ranges.translation_px, width, ranges.reference_size)
    ty = rng.uniform(-1.0, 1.0) * scaled_px(ranges.translation_px, height, ranges.reference_size)
    centre = mask_centre(mask)
    params = {"sx": float(sx), "sy": float(sy), "angle": float(angle), "tx": float(tx), "ty": float(ty),
              "cx": float(centre[0]), "cy": float(centre[1])}
    return object_affine(centre, (sx, sy), angle, (tx, ty)), params


def to_opencv(affine: np.ndarray) -> np.ndarray:
    """The same map for OpenCV's frame, whose pixel centres are integers: T(-0.5) A T(+0.5)."""
    affine = np.asarray(affine, dtype=np.float64)
    out = affine.copy()
    out[:, 2] = affine[:, 2] + affine[:, :2] @ np.array([0.5, 0.5]) - 0.5
    return out


def transform_points(points: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """(n, 2) points in continuous pixel units through the 2x3 map."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return points @ np.asarray(affine)[:, :2].T + np.asarray(affine)[:, 2]


def warp_image(image: np.ndarray, affine: np.ndarray, *, interpolation: int = cv2.INTER_LINEAR,
               border: int = cv2.BORDER_CONSTANT) -> np.ndarray:
    """Resample an HxW(xC) array through the map into the same size (pixels from outside read as 0)."""
    height, width = image.shape[:2]
    return cv2.warpAffine(image, to_opencv(affine), (width, height), flags=interpolation, borderMode=border,
                          borderValue=0)


def warp_mask(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Move a bool mask: bilinear coverage thresholded at one half, so the silhouette neither grows nor shrinks."""
    coverage = warp_image(np.asarray(mask, dtype=np.float32), affine)
    return coverage >= 0.5


def warp_alpha(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Soft (anti-aliased) coverage of the moved mask in [0, 1], for pasting."""
    return np.clip(warp_image(np.asarray(mask, dtype=np.float32), affine), 0.0, 1.0)


# ------------------------------------------------------------------------------------------ context and masks


def compose_context(context: np.ndarray, moved_context: np.ndarray, mask: np.ndarray, moved_mask: np.ndarray,
                    erode_kernel: int = 5) -> np.ndarray:
    """KALIE's hint: c' = (1 - erode(m)) * c + erode(h(m)) * h(c), clipped to uint8.

    The object's own structure is erased from the map and its moved copy pasted in; where the moved copy lands
    on other structure the two add, as in the reference.
    """
    keep = 1.0 - erode(mask, erode_kernel).astype(np.float32)
    paste = erode(moved_mask, erode_kernel).astype(np.float32)
    if context.ndim == 3:
        keep, paste = keep[..., None], paste[..., None]
    out = keep * context.astype(np.float32) + paste * moved_context.astype(np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def inpaint_mask(mask: np.ndarray, moved_mask: np.ndarray, dilate_radius: int) -> np.ndarray:
    """The pixels that may change: union of the old and new silhouettes, dilated."""
    return dilate(np.asarray(mask, bool) | np.asarray(moved_mask, bool), dilate_radius)


def object_region(mask: np.ndarray, kind: str = "hull", margin: int = 0) -> np.ndarray:
    """The region whose keypoints belong to the object: the mask itself or its convex hull, dilated by `margin`.

    The hull matters for objects that are not one blob: a pile of trash scraps, whose Target Point (the pile's
    centre) often falls between the scraps, and a brush whose Function Point sits on the head's edge.
    """
    mask = np.asarray(mask, dtype=bool)
    if kind == "hull":
        rows, cols = np.nonzero(mask)
        if rows.size:
            hull = cv2.convexHull(np.stack([cols, rows], axis=1).astype(np.int32))
            filled = np.zeros(mask.shape, np.uint8)
            cv2.fillConvexPoly(filled, hull, 1)
            mask = mask | filled.astype(bool)
    elif kind != "mask":
        raise ValueError(f"keypoint region must be 'mask' or 'hull', got {kind!r}")
    return dilate(mask, margin)


def inside(region: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Which (n, 2) continuous-pixel points fall on a True pixel of `region` (outside the image: False)."""
    height, width = region.shape
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    cols, rows = np.floor(points[:, 0]).astype(int), np.floor(points[:, 1]).astype(int)
    valid = (cols >= 0) & (cols < width) & (rows >= 0) & (rows < height)
    out = np.zeros(len(points), dtype=bool)
    out[valid] = region[rows[valid], cols[valid]]
    return out

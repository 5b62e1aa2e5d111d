"""KALIE's fine-tuning image pipeline with the keypoints carried through every transform.

Training: random rotation (15 deg), random resized crop (area 0.9-1, aspect 0.95-1), horizontal and vertical
flips (p = 0.5 each), colour jitter (brightness .1, contrast .1, saturation .2, hue .2), then a centre crop of
450/700 of the side. Evaluation: the same centre crop only (box [125, 125, 575, 575] of a 700x700 image).

All geometric steps are composed into one affine map and the image is resampled once, so the keypoints move
with exactly the map that moves the pixels. Coordinates are continuous pixel units with pixel i covering
[i, i + 1), the convention of PIL's affine transform; keypoints are normalised to the output image and may fall
outside [0, 1] (KALIE clamps only when it writes the answer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageEnhance

from affordvla.formats.sample import KeypointSample

KALIE_CROP_FRACTION = 450 / 700


def _translate(tx: float, ty: float) -> np.ndarray:
    return np.array([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]])


def _scale(sx: float, sy: float) -> np.ndarray:
    return np.diag([sx, sy, 1.0])


def _rotate_about(angle_degrees: float, cx: float, cy: float) -> np.ndarray:
    """Counter-clockwise on screen for a positive angle (y points down), as torchvision and OpenCV."""
    a = math.radians(angle_degrees)
    c, s = math.cos(a), math.sin(a)
    rotation = np.array([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]])
    return _translate(cx, cy) @ rotation @ _translate(-cx, -cy)


def centre_crop_box(width: int, height: int, fraction: float) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the centred crop; 700x700 at 450/700 gives (125, 125, 575, 575)."""
    crop_w, crop_h = round(width * fraction), round(height * fraction)
    left, top = (width - crop_w) // 2, (height - crop_h) // 2
    return left, top, left + crop_w, top + crop_h


def warp_sample(sample: KeypointSample, matrix: np.ndarray, size: tuple[int, int]) -> KeypointSample:
    """Resample the image through `matrix` (source pixels -> output pixels) into `size` = (w, h), and move the
    keypoints with the same matrix."""
    height, width = sample.image.shape[:2]
    inverse = np.linalg.inv(matrix)
    image = Image.fromarray(sample.image).transform(
        size, Image.Transform.AFFINE, data=tuple(inverse[:2].reshape(-1)), resample=Image.Resampling.BICUBIC)
    points = np.concatenate([sample.keypoints * [width, height], np.ones((len(sample.keypoints), 1))], axis=1)
    moved = (points @ matrix.T)[:, :2] / np.asarray(size, dtype=np.float64)
    return replace(sample, image=np.asarray(image), keypoints=moved.astype(np.float32))


def centre_crop(sample: KeypointSample, fraction: float = KALIE_CROP_FRACTION) -> KeypointSample:
    """KALIE's evaluation view: the centred crop of `fraction` of each side, keypoints re-normalised to it."""
    height, width = sample.image.shape[:2]
    left, top, right, bottom = centre_crop_box(width, height, fraction)
    image = np.ascontiguousarray(sample.image[top:bottom, left:right])
    points = (sample.keypoints * [width, height] - [left, top]) / [right - left, bottom - top]
    return replace(sample, image=image, keypoints=points.astype(np.float32),
                   meta={**sample.meta, "view": f"centre_crop_{fraction:.6f}"})


def _jitter_colour(image: np.ndarray, rng: np.random.Generator, brightness: float, contrast: float,
                   saturation: float, hue: float) -> np.ndarray:
    pil = Image.fromarray(image)
    for enhancer, amount in ((ImageEnhance.Brightness, brightness), (ImageEnhance.Contrast, contrast),
                             (ImageEnhance.Color, saturation)):
        if amount > 0:
            pil = enhancer(pil).enhance(rng.uniform(1 - amount, 1 + amount))
    if hue > 0:
        hsv = np.asarray(pil.convert("HSV")).copy()
        shift = round(rng.uniform(-hue, hue) * 256)
        hsv[..., 0] = (hsv[..., 0].astype(np.int16) + shift) % 256
        pil = Image.fromarray(hsv, mode="HSV").convert("RGB")
    return np.asarray(pil)


@dataclass
class KalieAugmentation:
    """KALIE's training transforms; `__call__(sample, rng)` returns the augmented, centre-cropped sample."""

    rotation_degrees: float = 15.0
    crop_area: tuple[float, float] = (0.9, 1.0)
    crop_aspect: tuple[float, float] = (0.95, 1.0)
    horizontal_flip: float = 0.5
    vertical_flip: float = 0.5
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.2
    hue: float = 0.2
    crop_fraction: float = KALIE_CROP_FRACTION

    def geometry(self, width: int, height: int, rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, int]]:
        """The composed affine (source pixels -> output pixels) and the output size."""
        matrix = _rotate_about(rng.uniform(-self.rotation_degrees, self.rotation_degrees), width / 2, height / 2)
        area = rng.uniform(*self.crop_area) * width * height
        aspect = rng.uniform(*self.crop_aspect)
        if rng.random() < 0.5:  # the aspect range is one-sided; either side may be the longer one
            aspect = 1 / aspect
        crop_w = min(width, math.sqrt(area * aspect))
        crop_h = min(height, math.sqrt(area / aspect))
        left, top = rng.uniform(0, width - crop_w), rng.uniform(0, height - crop_h)
        matrix = _scale(width / crop_w, height / crop_h) @ _translate(-left, -top) @ matrix
        if rng.random() < self.horizontal_flip:
            matrix = np.array([[-1.0, 0, width], [0, 1, 0], [0, 0, 1]]) @ matrix
        if rng.random() < self.vertical_flip:
            matrix = np.array([[1.0, 0, 0], [0, -1, height], [0, 0, 1]]) @ matrix
        box_left, box_top, box_right, box_bottom = centre_crop_box(width, height, self.crop_fraction)
        matrix = _translate(-box_left, -box_top) @ matrix
        return matrix, (box_right - box_left, box_bottom - box_top)

    def __call__(self, sample: KeypointSample, rng: np.random.Generator) -> KeypointSample:
        height, width = sample.image.shape[:2]
        matrix, size = self.geometry(width, height, rng)
        out = warp_sample(sample, matrix, size)
        image = _jitter_colour(out.image, rng, self.brightness, self.contrast, self.saturation, self.hue)
        return replace(out, image=image, meta={**sample.meta, "view": "augmented"})

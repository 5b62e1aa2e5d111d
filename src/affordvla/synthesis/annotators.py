"""Context-map annotators: the structure maps ControlNet is conditioned on.

KALIE's configs use sd-webui-controlnet preprocessors: softedge_pidinet (default), canny 165/215, depth (MiDaS),
mlsd, scribble_pidinet, segmentation (UniFormer on ADE20K). Here:

| name | what it computes | stands in for |
|---|---|---|
| `canny` | OpenCV Canny, thresholds 165/215 (exact) | canny |
| `softedge` | scale-normalised gradient magnitude averaged over three scales (classical) | softedge_pidinet (a learned edge net) |
| `scribble` | the soft edges thinned to ridges, thresholded and thickened like the webui's scribble post-processing | scribble_pidinet |
| `mlsd` | OpenCV's LSD line segments drawn 1 px wide | mlsd (a learned line-segment net) |
| `seg` | unsupervised colour regions (k-means in Lab) painted in a fixed palette; regions, not semantic classes | segmentation (UniFormer, ADE20K classes) |
| `depth` | a depth model from a local checkpoint (`AutoModelForDepthEstimation`, e.g. DPT/MiDaS), min-max to 0-255 | depth (MiDaS) |
| `depth_foreground` | a top-down heuristic: what differs from the table is nearer; not a depth estimate | depth, only if chosen by name |

Every annotator maps an HxWx3 uint8 RGB image to an HxWx3 uint8 map of the same size (white structure on black
for the edge-like maps) and runs at the image's own resolution.
"""

from __future__ import annotations

import abc
from pathlib import Path

import cv2
import numpy as np
import torch

from affordvla.synthesis.checkpoints import (
    checkpoint_dir,
    load_or_explain,
    resolve_device,
    resolve_dtype,
)


def _check_image(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        shape = getattr(image, "shape", None)
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got shape {shape} dtype {getattr(image, 'dtype', None)}")
    return np.ascontiguousarray(image)


def _gray(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)


def _rgb(single: np.ndarray) -> np.ndarray:
    """HxW float in [0, 1] or uint8 -> HxWx3 uint8."""
    if single.dtype != np.uint8:
        single = np.clip(np.rint(single * 255.0), 0, 255).astype(np.uint8)
    return np.repeat(single[:, :, None], 3, axis=2)


class Annotator(abc.ABC):
    """A ControlNet context annotator: maps an image to a context map, and describes itself for the manifest."""

    name = "annotator"
    approximates = ""

    @abc.abstractmethod
    def __call__(self, image: np.ndarray) -> np.ndarray:
        """HxWx3 uint8 image -> HxWx3 uint8 context map of the same size."""

    def describe(self) -> dict:
        params = {k: (str(v) if isinstance(v, (Path, torch.device, torch.dtype)) else v) for k, v in vars(self).items()
                  if not k.startswith("_") and isinstance(v, (int, float, str, bool, tuple, Path, torch.device,
                                                               torch.dtype))}
        return {"annotator": self.name, "approximates": self.approximates, **params}


class CannyAnnotator(Annotator):
    """OpenCV Canny. On the grey image by default; `on_color=True` runs it on the RGB image as the webui does
    (OpenCV then takes the strongest channel's gradient)."""

    name = "canny"
    approximates = "canny (exact)"

    def __init__(self, low: int = 165, high: int = 215, on_color: bool = False):
        self.low, self.high, self.on_color = int(low), int(high), bool(on_color)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        image = _check_image(image)
        source = image if self.on_color else _gray(image)
        return _rgb(cv2.Canny(source, self.low, self.high))


def soft_edges(image: np.ndarray, sigmas: tuple[float, ...] = (1.0, 2.0, 4.0), gain: float = 2.0,
               reference_size: int = 512) -> np.ndarray:
    """HxW float in [0, 1]: per scale, the largest channel gradient of the blurred image times sqrt(2 pi) sigma
    (so a step edge reads as its contrast at any scale), the maximum over scales, times `gain`. `sigmas` are
    pixels at the webui's 512-px processing resolution and scale with the image's longer side."""
    rgb = image.astype(np.float32) / 255.0
    total = np.zeros(image.shape[:2], np.float32)
    for sigma in sigmas:
        sigma = max(0.5, sigma * max(image.shape[:2]) / reference_size)
        blurred = cv2.GaussianBlur(rgb, (0, 0), sigma)
        gx = cv2.Sobel(blurred, cv2.CV_32F, 1, 0, ksize=3) / 8.0  # Sobel's weights sum to 8 x the derivative
        gy = cv2.Sobel(blurred, cv2.CV_32F, 0, 1, ksize=3) / 8.0
        magnitude = np.sqrt(gx * gx + gy * gy).max(axis=2)
        total = np.maximum(total, magnitude * np.sqrt(2.0 * np.pi) * sigma)
    return np.clip(total * gain, 0.0, 1.0)


class SoftEdgeAnnotator(Annotator):
    """Soft edges: gradient magnitude averaged over several scales, standing in for the PiDiNet network."""

    name = "softedge"
    approximates = "softedge_pidinet: classical multi-scale gradient magnitude instead of the PiDiNet network"

    def __init__(self, sigmas: tuple[float, ...] = (1.0, 2.0, 4.0), gain: float = 2.0, reference_size: int = 512):
        self.sigmas, self.gain = tuple(float(s) for s in sigmas), float(gain)
        self.reference_size = int(reference_size)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return _rgb(soft_edges(_check_image(image), self.sigmas, self.gain, self.reference_size))


def ridges(edges: np.ndarray, threshold: float, sigma: float) -> np.ndarray:
    """Bool map of the pixels of the blurred `edges` that are local maxima along at least one of the four
    directions (horizontal, vertical, both diagonals) and above `threshold`: thin centre lines of the edges."""
    smooth = cv2.GaussianBlur(edges.astype(np.float32), (0, 0), sigma)
    lines = [np.array(k, np.uint8) for k in (
        [[0, 0, 0], [1, 1, 1], [0, 0, 0]], [[0, 1, 0], [0, 1, 0], [0, 1, 0]],
        [[1, 0, 0], [0, 1, 0], [0, 0, 1]], [[0, 0, 1], [0, 1, 0], [1, 0, 0]])]
    peak = np.zeros(smooth.shape, bool)
    for kernel in lines:
        peak |= cv2.dilate(smooth, kernel) == smooth
    return peak & (smooth > threshold)


class ScribbleAnnotator(Annotator):
    """Soft edges -> ridge lines above 127 -> blurred and every pixel above 4 set white: thick hand-drawn-looking
    strokes, the webui's scribble post-processing applied to the classical soft edges. The webui's blur (sigma 3)
    acts at its 512-px processing resolution; here it scales with the image (`sigma` x longer side / 512)."""

    name = "scribble"
    approximates = "scribble_pidinet: the webui's thinning/thickening applied to classical soft edges, not PiDiNet"

    def __init__(self, threshold: float = 127.0, sigma: float = 3.0, reference_size: int = 512):
        self.threshold, self.sigma, self.reference_size = float(threshold), float(sigma), int(reference_size)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        image = _check_image(image)
        sigma = max(0.5, self.sigma * max(image.shape[:2]) / self.reference_size)
        edges = soft_edges(image, reference_size=self.reference_size) * 255.0
        strokes = ridges(edges, self.threshold, sigma).astype(np.float32) * 255.0
        strokes = cv2.GaussianBlur(strokes, (0, 0), sigma)
        return _rgb(np.where(strokes > 4.0, 255, 0).astype(np.uint8))


class MlsdAnnotator(Annotator):
    """Straight line segments from OpenCV's LSD detector (von Gioi et al.), drawn white and 1 px wide on black like
    the webui's MLSD output; segments shorter than `min_length` x the longer image side are dropped, since LSD
    also reports the short segments of textures that the learned MLSD ignores."""

    name = "mlsd"
    approximates = "mlsd: OpenCV LineSegmentDetector segments instead of the M-LSD network"

    def __init__(self, min_length: float = 0.04):
        self.min_length = float(min_length)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        image = _check_image(image)
        height, width = image.shape[:2]
        out = np.zeros((height, width), np.uint8)
        segments = cv2.createLineSegmentDetector().detect(_gray(image))[0]
        if segments is not None:
            shortest = self.min_length * max(height, width)
            for x0, y0, x1, y1 in segments.reshape(-1, 4):
                if np.hypot(x1 - x0, y1 - y0) >= shortest:
                    cv2.line(out, (round(float(x0)), round(float(y0))), (round(float(x1)), round(float(y1))), 255, 1)
        return _rgb(out)


# Distinct colours for regions, largest region first (ADE20K-like saturated tones; not ADE20K's class colours).
SEG_PALETTE = np.array([
    [120, 120, 120], [180, 120, 120], [6, 230, 230], [80, 50, 50], [4, 200, 3], [120, 120, 80], [140, 140, 140],
    [204, 5, 255], [230, 230, 230], [4, 250, 7], [224, 5, 255], [235, 255, 7], [150, 5, 61], [120, 120, 70],
    [8, 255, 51], [255, 6, 82]], np.uint8)


class SegmentationAnnotator(Annotator):
    """k-means on Lab colour (deterministic farthest-point start, fixed iterations) over a smoothed image; each
    region is painted with a palette colour, largest region first, then a median filter removes specks."""

    name = "seg"
    approximates = "segmentation (UniFormer/ADE20K): unsupervised colour regions, not semantic classes"

    def __init__(self, regions: int = 8, iterations: int = 10, sample: int = 4096):
        if not 1 <= regions <= len(SEG_PALETTE):
            raise ValueError(f"regions must be in 1..{len(SEG_PALETTE)}, got {regions}")
        self.regions, self.iterations, self.sample = int(regions), int(iterations), int(sample)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        image = _check_image(image)
        lab = cv2.cvtColor(cv2.GaussianBlur(image, (0, 0), 1.5), cv2.COLOR_RGB2LAB).reshape(-1, 3).astype(np.float32)
        step = max(1, len(lab) // self.sample)
        centres = _kmeans(lab[::step], self.regions, self.iterations)
        labels = ((lab[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)
        order = np.argsort(-np.bincount(labels, minlength=len(centres)), kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        painted = SEG_PALETTE[rank[labels]].reshape(image.shape)
        return cv2.medianBlur(painted, 5)


def _kmeans(points: np.ndarray, k: int, iterations: int) -> np.ndarray:
    """Lloyd's k-means from a farthest-point start (first centre: the mean), deterministic for given points."""
    centres = [points.mean(axis=0)]
    distance = ((points - centres[0]) ** 2).sum(1)
    for _ in range(1, min(k, len(points))):
        centres.append(points[int(distance.argmax())])
        distance = np.minimum(distance, ((points - centres[-1]) ** 2).sum(1))
    centres = np.stack(centres)
    for _ in range(iterations):
        labels = ((points[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)
        for j in range(len(centres)):
            members = points[labels == j]
            if len(members):
                centres[j] = members.mean(axis=0)
    return centres


class DepthAnnotator(Annotator):
    """A depth model from a local checkpoint (`AutoModelForDepthEstimation` + `AutoImageProcessor`: DPT, MiDaS
    DPT-hybrid, Depth Anything), resized to the image and min-max normalised to 0-255 like the webui's MiDaS
    output. MiDaS-style models predict inverse depth (near is bright); set `invert=True` for a model that
    predicts depth."""

    name = "depth"
    approximates = "depth (MiDaS): the checkpoint given"

    def __init__(self, checkpoint: str | Path | None = None, device: str | None = "cpu", dtype: str = "float32",
                 invert: bool = False):
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation

        if checkpoint is None:
            raise ValueError("the depth annotator needs checkpoint=<local depth model directory> (e.g. a DPT "
                             "checkpoint; affordvla.offline.tiny_synthesis.write_tiny_dpt writes a tiny one); for "
                             "the classical heuristic choose the annotator 'depth_foreground' by name")
        self.checkpoint = checkpoint_dir(checkpoint, "depth model")
        self.device, self.dtype, self.invert = resolve_device(device), resolve_dtype(dtype), bool(invert)
        self._processor = load_or_explain("depth image processor", self.checkpoint, AutoImageProcessor.from_pretrained)
        self._model = load_or_explain("depth model", self.checkpoint, AutoModelForDepthEstimation.from_pretrained,
                                      dtype=self.dtype).to(self.device).eval()

    @torch.no_grad()
    def __call__(self, image: np.ndarray) -> np.ndarray:
        image = _check_image(image)
        inputs = self._processor(images=image, return_tensors="pt")
        pixels = inputs["pixel_values"].to(self.device, self.dtype)
        depth = self._model(pixel_values=pixels).predicted_depth.float()  # (1, h, w)
        depth = torch.nn.functional.interpolate(depth[:, None], size=image.shape[:2], mode="bicubic",
                                                align_corners=False)[0, 0].cpu().numpy()
        depth = depth - depth.min()
        depth = depth / depth.max() if depth.max() > 0 else depth
        return _rgb(1.0 - depth if self.invert else depth)


class ForegroundDepthAnnotator(Annotator):
    """For a top-down camera over a table: pixels whose Lab colour differs from the table's (the median of the
    image border) by more than Otsu's threshold are objects, nearer than the table; their height grows with the
    distance from the object outline (objects read as rounded). Table = 64, object tops up to 255. A heuristic,
    chosen only by name, for running the depth configuration without a depth model."""

    name = "depth_foreground"
    approximates = "depth (MiDaS): a foreground-height heuristic, not a depth estimate"

    def __init__(self, table_level: int = 64, rounding: float = 0.1):
        self.table_level, self.rounding = int(table_level), float(rounding)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        image = _check_image(image)
        lab = cv2.cvtColor(cv2.GaussianBlur(image, (0, 0), 1.0), cv2.COLOR_RGB2LAB).astype(np.float32)
        border = np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]])
        difference = np.sqrt(((lab - np.median(border, axis=0)) ** 2).sum(-1))
        difference = np.clip(difference, 0, 255).astype(np.uint8)
        _, foreground = cv2.threshold(difference, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        inside = cv2.distanceTransform(foreground, cv2.DIST_L2, 3)
        reach = max(1.0, self.rounding * max(image.shape[:2]))
        height = np.sqrt(np.clip(inside / reach, 0.0, 1.0))  # a rounded profile from the outline inwards
        level = self.table_level / 255.0
        depth = level + (1.0 - level) * height * (foreground > 0)
        return _rgb(cv2.GaussianBlur(depth.astype(np.float32), (0, 0), 1.0))


ANNOTATORS = {
    "canny": CannyAnnotator,
    "softedge": SoftEdgeAnnotator,
    "scribble": ScribbleAnnotator,
    "mlsd": MlsdAnnotator,
    "seg": SegmentationAnnotator,
    "depth": DepthAnnotator,
    "depth_foreground": ForegroundDepthAnnotator,
}
ALIASES = {"segmentation": "seg", "soft_edge": "softedge", "softedge_pidinet": "softedge",
           "scribble_pidinet": "scribble"}

# KALIE's ControlNet units: annotator -> (SD1.5 v1.1 ControlNet model, control mode).
KALIE_CONTROLNETS = {
    "softedge": ("control_v11p_sd15_softedge", "balanced"),
    "canny": ("control_v11p_sd15_canny", "balanced"),
    "depth": ("control_v11f1p_sd15_depth", "prompt_more_important"),
    "mlsd": ("control_v11p_sd15_mlsd", "balanced"),
    "scribble": ("control_v11p_sd15_scribble", "balanced"),
    "seg": ("control_v11p_sd15_seg", "balanced"),
}


def make_annotator(name: str, **kwargs) -> Annotator:
    """The annotator registered as `name` (or an alias such as 'segmentation'), built with `kwargs`."""
    key = ALIASES.get(name, name)
    if key not in ANNOTATORS:
        raise ValueError(f"unknown context annotator {name!r}; choose from {sorted(ANNOTATORS) + sorted(ALIASES)}")
    return ANNOTATORS[key](**kwargs)

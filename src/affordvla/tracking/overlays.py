"""Keypoint overlays: each image with its true keypoints (rings) and predicted keypoints (crosses)."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

POINT_COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (240, 50, 230), (70, 240, 240)]


def draw_keypoints(image: np.ndarray, truth: np.ndarray | None, prediction: np.ndarray | None,
                   size: int = 256, caption: str = "") -> Image.Image:
    canvas = Image.fromarray(np.asarray(image)).convert("RGB").resize((size, size), Image.BICUBIC)
    draw = ImageDraw.Draw(canvas)
    r = max(3, size // 64)
    for k, (x, y) in enumerate(truth if truth is not None else []):
        colour = POINT_COLOURS[k % len(POINT_COLOURS)]
        draw.ellipse([x * size - r, y * size - r, x * size + r, y * size + r], outline=colour, width=2)
    for k, (x, y) in enumerate(prediction if prediction is not None else []):
        colour = POINT_COLOURS[k % len(POINT_COLOURS)]
        px, py = x * size, y * size
        draw.line([px - r, py - r, px + r, py + r], fill=colour, width=2)
        draw.line([px - r, py + r, px + r, py - r], fill=colour, width=2)
    if prediction is None:
        draw.text((4, 4), "unparseable answer", fill=(255, 0, 0))
    if caption:
        draw.rectangle([0, size - 14, size, size], fill=(0, 0, 0))
        draw.text((3, size - 13), caption[:48], fill=(255, 255, 255))
    return canvas


def overlay_grid(items: list[tuple[np.ndarray, np.ndarray, np.ndarray | None, str]], point_names: tuple[str, ...],
                 tile: int = 256, columns: int = 4) -> Image.Image:
    """A grid of overlays plus a legend row naming each point's colour (ring = truth, cross = prediction)."""
    rows = max(1, math.ceil(len(items) / columns))
    legend_h = 18
    grid = Image.new("RGB", (tile * columns, tile * rows + legend_h), (255, 255, 255))
    for i, (image, truth, prediction, caption) in enumerate(items):
        grid.paste(draw_keypoints(image, truth, prediction, tile, caption),
                   ((i % columns) * tile, (i // columns) * tile))
    draw = ImageDraw.Draw(grid)
    x = 4
    for k, name in enumerate(point_names):
        draw.rectangle([x, tile * rows + 4, x + 10, tile * rows + 14], fill=POINT_COLOURS[k % len(POINT_COLOURS)])
        draw.text((x + 14, tile * rows + 3), name, fill=(0, 0, 0))
        x += 14 + 7 * len(name) + 10
    draw.text((x, tile * rows + 3), "o truth   x prediction", fill=(0, 0, 0))
    return grid

"""Generated fixtures in RoboPoint's on-disk formats, from the project's
procedural tabletop scenes (offline/tabletop.py): a LLaVA conversation file of pointing questions and a Where2Place
benchmark folder, so the RoboPoint table runs end to end without the real downloads.

Every question names objects of the scene and asks for points in a region of it:
- free space on one side of an object ("... to the left of the brush"): table pixels not covered by any named
  object, on that side of the object's centre and within reach of it;
- the object itself ("Point to the brush."), RoboPoint's object-reference data;
- free space between two objects: held out of the training file and asked only as Where2Place's "unseen"
  category, the way Where2Place (h) holds out relations the model did not train on.
Answers are 1-5 points drawn uniformly from the region, written as RoboPoint writes them (3 decimals, x right,
y down); Where2Place masks are the regions themselves.

Layout, all in the conversation file's folder (written once per parameter set and reused afterwards, never into a
folder holding anything else: `affordvla.locking.write_once` records what it wrote):
    <json_path>                 the conversation file (the config's dataset.json_path)
    <image_dir>/scene_NNNNN.png the training images (dataset.image_dir)
    <where2place_dir>/          images/NN.jpg, masks/NN.jpg, point_questions.jsonl
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from affordvla.data.generated import check_inside
from affordvla.data.robopoint import (
    ROBOPOINT_ANSWER_SUFFIX,
    point_entry,
    write_conversations,
    write_where2place,
)
from affordvla.formats.kalie_tasks import TASKS
from affordvla.locking import write_once
from affordvla.offline.tabletop import make_scene

log = logging.getLogger(__name__)
GENERATOR = "affordvla.toy_robopoint/1"
SIDES = {"left": (-1, 0), "right": (1, 0), "above": (0, -1), "below": (0, 1)}
REACH = 0.35  # free space "next to" an object: within this normalised distance of its centre
MIN_REGION_PIXELS = 12  # smaller regions make no question (too few pixels for a fair answer)


def _free_space(masks: dict[str, np.ndarray]) -> np.ndarray:
    """Table pixels at least two pixels away from every named object."""
    occupied = np.zeros(next(iter(masks.values())).shape, bool)
    for mask in masks.values():
        occupied |= mask
    return ~ndimage.binary_dilation(occupied, iterations=2)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:size, 0:size]
    return (xs + 0.5) / size, (ys + 0.5) / size


def side_region(masks: dict[str, np.ndarray], name: str, side: str) -> np.ndarray:
    """Free pixels on `side` of object `name` (beyond its centre by its half extent) and within REACH of it."""
    mask = masks[name]
    size = mask.shape[0]
    xs, ys = _grid(size)
    cx, cy = xs[mask].mean(), ys[mask].mean()
    dx, dy = SIDES[side]
    half = (xs[mask].max() - xs[mask].min()) / 2 if dx else (ys[mask].max() - ys[mask].min()) / 2
    along = (xs - cx) * dx + (ys - cy) * dy
    near = np.hypot(xs - cx, ys - cy) <= REACH + half
    return _free_space(masks) & (along > half) & near


def between_region(masks: dict[str, np.ndarray], first: str, second: str) -> np.ndarray:
    """Free pixels within a band around the middle of the segment joining the two objects' centres."""
    size = masks[first].shape[0]
    xs, ys = _grid(size)
    a = np.array([xs[masks[first]].mean(), ys[masks[first]].mean()])
    b = np.array([xs[masks[second]].mean(), ys[masks[second]].mean()])
    d = b - a
    length2 = float(d @ d) or 1e-9
    t = ((xs - a[0]) * d[0] + (ys - a[1]) * d[1]) / length2
    distance = np.abs((xs - a[0]) * d[1] - (ys - a[1]) * d[0]) / np.sqrt(length2)
    return _free_space(masks) & (t > 0.25) & (t < 0.75) & (distance < 0.08)


def sample_points(region: np.ndarray, rng: np.random.Generator, max_points: int = 5) -> np.ndarray:
    """1..max_points distinct pixels of `region`, as normalised (x, y) pixel centres."""
    rows, cols = np.nonzero(region)
    count = int(rng.integers(1, min(max_points, len(rows)) + 1))
    chosen = rng.choice(len(rows), size=count, replace=False)
    height, width = region.shape
    return np.stack([(cols[chosen] + 0.5) / width, (rows[chosen] + 0.5) / height], axis=1)


def scene_questions(masks: dict[str, np.ndarray], rng: np.random.Generator, *, unseen: bool
                    ) -> list[tuple[str, np.ndarray]]:
    """(question, region) pairs of a scene with a region large enough: side and object questions (seen), or
    between questions (unseen, where the scene has two objects)."""
    names = list(masks)
    if unseen:
        if len(names) < 2:
            return []
        region = between_region(masks, names[0], names[1])
        return [(f"Point to free space between the {names[0]} and the {names[1]}.", region)]
    found = []
    for name in names:
        side = str(rng.choice(list(SIDES)))
        found.append((f"Point to free space on the table {side} the {name}." if side in ("above", "below")
                      else f"Point to free space to the {side} of the {name}.", side_region(masks, name, side)))
        found.append((f"Point to the {name}.", masks[name]))
    return found


def ensure_toy_robopoint(json_path: str | Path, image_dir: str | Path, where2place_dir: str | Path, *,
                         seed: int = 0, image_size: int = 64, images: int = 20, where2place: int = 10,
                         unseen_fraction: float = 0.3) -> Path:
    """Write the conversation file, its images and a Where2Place folder unless identical ones exist."""
    json_path, image_dir, where2place_dir = Path(json_path), Path(image_dir), Path(where2place_dir)
    if where2place > 100:
        raise ValueError(f"Where2Place names its images with two digits: at most 100 questions, got {where2place}")
    # folders relative to the dataset root, so the same data reached through another path is still recognised
    params = {"generator": GENERATOR, "seed": seed, "image_size": image_size, "images": images,
              "where2place": where2place, "unseen_fraction": unseen_fraction, "json_name": json_path.name,
              "image_dir": os.path.relpath(image_dir.resolve(), json_path.parent.resolve()),
              "where2place_dir": os.path.relpath(where2place_dir.resolve(), json_path.parent.resolve())}
    # one folder holds it all: the generator writes nowhere it cannot record
    check_inside(json_path.parent, image_dir, where2place_dir)
    write_once(json_path.parent, "toy_robopoint", params,
               lambda: _write(json_path, image_dir, where2place_dir, seed, image_size, images, where2place,
                              unseen_fraction))
    return json_path


def _write(json_path: Path, image_dir: Path, where2place_dir: Path, seed: int, image_size: int, images: int,
           where2place: int, unseen_fraction: float) -> None:
    tasks = list(TASKS)
    rng = np.random.default_rng([seed, 0])
    image_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for index in range(images):
        scene = make_scene(rng, tasks[index % len(tasks)], image_size)
        name = f"scene_{index:05d}.png"
        Image.fromarray(scene.image).save(image_dir / name)
        for turn, (question, region) in enumerate(scene_questions(scene.masks, rng, unseen=False)):
            if region.sum() >= MIN_REGION_PIXELS:
                entries.append(point_entry(f"{index}_{turn}", name, question, sample_points(region, rng)))
    write_conversations(json_path, entries)

    # Where2Place: fresh scenes (its own stream), one question each; the last `unseen_fraction` are unseen
    rng = np.random.default_rng([seed, 1])
    items = []
    unseen_count = round(where2place * unseen_fraction)
    attempts = 0
    while len(items) < where2place:
        unseen = len(items) >= where2place - unseen_count
        # cycling over tasks by attempt, not by question: one-object tasks cannot ask an unseen question
        scene = make_scene(rng, tasks[attempts % len(tasks)], image_size)
        attempts += 1
        if attempts > 100 * where2place:
            raise RuntimeError(f"could not draw {where2place} Where2Place questions in {attempts} scenes")
        usable = [(q, r) for q, r in scene_questions(scene.masks, rng, unseen=unseen)
                  if r.sum() >= MIN_REGION_PIXELS and not q.startswith("Point to the ")]
        if usable:  # Where2Place asks about free space only
            question, region = usable[int(rng.integers(len(usable)))]
            items.append((scene.image, region.astype(np.uint8) * 255, f"{question} {ROBOPOINT_ANSWER_SUFFIX}",
                          "unseen" if unseen else "seen"))
    write_where2place(where2place_dir, items)
    log.info("wrote toy RoboPoint data (%d pointing turns) to %s and Where2Place to %s", len(entries), json_path,
             where2place_dir)

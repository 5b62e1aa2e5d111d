"""Generate the embedded default dataset: procedural tabletop scenes written in KALIE's JSON format.

The dataset is written once per parameter set (seeded, so identical on every machine) and reused afterwards, never
into a folder holding anything else (`affordvla.locking.write_once` records what it wrote):
`imgs/entry_i.png` + `data_jsonformat.json` + `data_strformat.json` exactly as KALIE writes them, each object's
mask in `masks/entry_i_<k>.png` (recorded in `other.masks`), and `splits.json` naming the train/val/test keys.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from affordvla.data.kalie import (
    SPLITS_FILE,
    points_to_json_string,
    points_to_str_format,
    to_kalie_int,
)
from affordvla.formats.kalie_tasks import TASKS
from affordvla.formats.sample import KALIE_POINT_NAMES
from affordvla.locking import write_once
from affordvla.offline.tabletop import make_scene

log = logging.getLogger(__name__)


def _params(seed: int, splits: dict[str, int], image_size: int, tasks: list[str]) -> dict:
    return {"generator": "affordvla.toy_kalie/1", "seed": seed, "splits": splits, "image_size": image_size,
            "tasks": tasks}


def _atomic_write_json(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=4))
    os.replace(tmp, path)


def ensure_toy_kalie(
    root: str | Path,
    *,
    seed: int = 0,
    splits: dict[str, int] | None = None,
    image_size: int = 128,
    tasks: list[str] | None = None,
) -> Path:
    """Write the dataset under `root` unless an identical one (same parameters) is already complete there."""
    root = Path(root)
    splits = dict(splits or {"train": 2000, "val": 100, "test": 250})
    tasks = list(tasks or TASKS)
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown KALIE tasks {unknown}; valid: {sorted(TASKS)}")
    params = _params(seed, splits, image_size, tasks)
    write_once(root, "toy_kalie", params, lambda: _write(root, seed, splits, image_size, tasks))
    return root


def _write(root: Path, seed: int, splits: dict[str, int], image_size: int, tasks: list[str]) -> None:
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    # Each split draws from its own seeded stream, so changing the size of one split leaves the others unchanged.
    json_entries, str_entries, split_keys = {}, {}, {}
    index = 0
    total = sum(splits.values())
    with tqdm(total=total, desc=f"generating toy KALIE data in {root}", unit="scene") as bar:
        for split, count in splits.items():
            stream = int.from_bytes(hashlib.sha256(f"{seed}/{split}".encode()).digest()[:8], "little")
            rng = np.random.default_rng(stream)
            split_keys[split] = []
            for i in range(count):
                scene = make_scene(rng, tasks[i % len(tasks)], image_size)
                key = f"entry_{index}"
                Image.fromarray(scene.image).save(root / "imgs" / f"{key}.png")
                mask_paths = {}
                for k, (name, mask) in enumerate(scene.masks.items()):
                    rel = f"masks/{key}_{k}.png"
                    Image.fromarray(mask.astype(np.uint8) * 255).save(root / rel)
                    mask_paths[name] = rel
                points = {name: [to_kalie_int(x), to_kalie_int(y)]
                          for name, (x, y) in zip(KALIE_POINT_NAMES, scene.keypoints)}
                other = {"task": scene.task, "objects": list(TASKS[scene.task].objects), "masks": mask_paths}
                json_entries[key] = {"img": f"imgs/{key}.png", "points": points_to_json_string(points), "other": other}
                str_entries[key] = {"img": f"imgs/{key}.png", "points": points_to_str_format(points), "other": other}
                split_keys[split].append(key)
                index += 1
                bar.update()
    _atomic_write_json(root / "data_jsonformat.json", json_entries)
    _atomic_write_json(root / "data_strformat.json", str_entries)
    _atomic_write_json(root / SPLITS_FILE, split_keys)
    log.info("wrote %d generated KALIE entries to %s", total, root)

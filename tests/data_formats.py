"""Datasets laid out by hand as the original tools write them (KALIE's hdf5_to_json, RoboPoint's release, CALVIN's
splits), for tests that break them the way real folders break."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

KALIE_POINTS = ("Grasp Point", "Function Point", "Target Point", "Pre-contact Point", "Post-contact Point")
# One answer as KALIE's fine-tuning data writes it: json.dumps({name: [sx, sy]}, indent=4) of zero-padded strings
KALIE_ANSWER_TEXT = """{
    "Grasp Point": [
        "397",
        "093"
    ],
    "Function Point": [
        "500",
        "250"
    ],
    "Target Point": [
        "640",
        "410"
    ],
    "Pre-contact Point": [
        "600",
        "400"
    ],
    "Post-contact Point": [
        "700",
        "420"
    ]
}"""


def write_kalie_folder(root: Path, entries: int = 6) -> Path:
    """A KALIE dataset as hdf5_to_json leaves it: imgs/entry_i.png and data_jsonformat.json whose "points" is a
    JSON string (indent 4) of the five named points on KALIE's 0-1000 scale."""
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    index = {}
    for i in range(entries):
        Image.fromarray(np.full((24, 24, 3), 40 * i % 255, np.uint8)).save(root / "imgs" / f"entry_{i}.png")
        points = {name: [100 + 50 * k, 200 + 10 * i] for k, name in enumerate(KALIE_POINTS)}
        index[f"entry_{i}"] = {"img": f"imgs/entry_{i}.png", "points": json.dumps(points, indent=4),
                               "other": {"task": "Sweep the trash off the table with the brush.",
                                         "objects": ["brush", "trash"]}}
    (root / "data_jsonformat.json").write_text(json.dumps(index, indent=4))
    return root


def write_robopoint_folder(root: Path) -> Path:
    """RoboPoint's release: robopoint_1432k.json (LLaVA conversations) with image paths relative to images/."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "images" / "scene.png")
    turn = [{"from": "human", "value": "<image>\nPoint to free space left of the mug."},
            {"from": "gpt", "value": "[(0.250, 0.500), (0.300, 0.520)]"}]
    (root / "robopoint_1432k.json").write_text(json.dumps([{"id": "a1", "image": "scene.png",
                                                            "conversations": turn}]))
    return root


def truncate(path: Path) -> None:
    """Keep the header and half the pixel data: the file still opens, and fails when its pixels are decoded."""
    data = path.read_bytes()
    path.write_bytes(data[: max(len(data) // 2, 60)])


def write_calvin_split(split: Path, annotations: bool = True) -> None:
    """One CALVIN split folder as the release lays it out: episode_XXXXXXX.npz frames and the language annotations
    (a pickled dict saved with np.save)."""
    split.mkdir(parents=True)
    for i in range(3):
        np.savez(split / f"episode_{i:07d}.npz", rgb_static=np.zeros((8, 8, 3), np.uint8),
                 rel_actions=np.zeros(7), actions=np.zeros(7), robot_obs=np.zeros(15), scene_obs=np.zeros(24))
    np.save(split / "ep_start_end_ids.npy", np.array([[0, 2]]))
    if annotations:
        (split / "lang_annotations").mkdir()
        np.save(split / "lang_annotations" / "auto_lang_ann.npy",
                np.array({"info": {"indx": [(0, 2)]}, "language": {"ann": ["open the drawer"],
                                                                   "task": ["open_drawer"]}}, dtype=object))

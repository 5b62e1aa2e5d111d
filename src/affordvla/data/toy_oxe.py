"""The toy manipulation episodes (data/toy_actions.py) written as Open X-Embodiment's bridge_orig: an RLDS folder of
TFRecord shards with JPEG frames, the end effector's state, commanded actions and the instruction, laid out as
bridge_orig stores them. `dataset=oxe_bridge` then runs offline through the same reader, standardisation and HDF5
cache as the real release (smoke scale, tests).

bridge_orig's standardisation relabels the arm action from the state (state[t+1] - state[t]) and binarises the
gripper action, so the state carries the toy gripper's (x, y, height) and the action its open (1) / closed (0)
command; the rotation entries are zero, as the toy's are."""

from __future__ import annotations

import io
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image

from affordvla.data.oxe import write_rlds_dataset
from affordvla.data.toy_actions import GENERATOR_VERSION, GRIPPER_OPEN_WIDTH, ToyActionSettings, generate_episode
from affordvla.locking import write_once

log = logging.getLogger(__name__)
DONE_MARKER = "toy_oxe.json"
BRIDGE_NAMES = ("bridge_orig", "bridge_dataset")


def _jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def bridge_episode(frames: list[dict], instruction: str, index: int) -> dict:
    """One toy episode as bridge_orig's flattened episode features."""
    count = len(frames)
    state = np.zeros((count, 7), np.float32)
    state[:, :3] = [frame["robot_obs"][:3] for frame in frames]
    state[:, 6] = [frame["robot_obs"][6] / GRIPPER_OPEN_WIDTH for frame in frames]  # gripper opening, 1 = open
    action = np.zeros((count, 7), np.float32)
    action[:-1, :3] = state[1:, :3] - state[:-1, :3]  # what was commanded, as the robot then moved
    action[:, 6] = [1.0 if frame["rel_actions"][6] > 0 else 0.0 for frame in frames]
    return {
        "steps/observation/image_0": [_jpeg(frame["rgb_static"]) for frame in frames],
        "steps/observation/state": state.reshape(-1),
        "steps/action": action.reshape(-1),
        "steps/language_instruction": [instruction.encode()] * count,
        "steps/is_first": np.array([1] + [0] * (count - 1)),
        "steps/is_last": np.array([0] * (count - 1) + [1]),
        "steps/reward": np.array([0.0] * (count - 1) + [1.0], np.float32),
        "episode_metadata/file_path": [f"toy/episode_{index:05d}.npy".encode()],
    }


def write_toy_bridge(root: str | Path, settings: ToyActionSettings | None = None, name: str = "bridge_orig",
                     shards: int = 2) -> Path:
    """Write `train` and `val` splits of toy episodes as the RLDS dataset `root/name/1.0.0` (seeded; reused once
    complete). Returns that folder."""
    if name not in BRIDGE_NAMES:
        raise ValueError(f"the toy episodes are written in bridge's layout only; got dataset name {name!r}, "
                         f"valid: {list(BRIDGE_NAMES)}")
    root, settings = Path(root), settings or ToyActionSettings()

    def write() -> None:
        episodes = {}
        for split, count, offset in (("train", settings.train_episodes, 0), ("val", settings.val_episodes, 1)):
            rng = np.random.default_rng([settings.seed, offset])
            episodes[split] = [bridge_episode(*generate_episode(rng, settings.episode_length, settings.distractors)[:2],
                                              index) for index in range(count)]
        write_rlds_dataset(root, name, episodes, shards=shards)

    recorded = {**asdict(settings), "name": name, "shards": shards, "version": GENERATOR_VERSION}
    if write_once(root, DONE_MARKER, recorded, write):
        log.info("wrote the toy %s dataset to %s", name, root)
    return root / name / "1.0.0"

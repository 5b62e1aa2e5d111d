"""Generated fixture episodes in RLBench's on-disk format, so LLARVA's
pipeline (reader, HDF5 episode cache, text-action head) runs end to end without CoppeliaSim or a download.

Per task, a 7-joint arm moves from a random start configuration towards the task's goal configuration under a
proportional joint-velocity controller, closes the gripper halfway and keeps moving; the front camera shows the
task's coloured goal marker and a marker whose position and size follow the first three joints (filled when the
gripper is closed). Episodes are written as PerAct's fork writes them:
    {root}/{split}/{task}/all_variations/episodes/episode{M}/front_rgb/{i}.png + low_dim_obs.pkl
                                                           + variation_descriptions.pkl + variation_number.pkl
Each task is written on its own, a part of the generator's record (`affordvla.locking.write_once`), so configs
naming other task lists share one root and add only the tasks it lacks; a root holding anything the generator did
not write is never written to.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from affordvla.data.rlbench import write_episode
from affordvla.locking import write_once

log = logging.getLogger(__name__)
GENERATOR = "affordvla.toy_rlbench/1"
JOINTS = 7
GAIN = 0.25  # joint velocity = GAIN x (goal - position), per step


def _task_rng(seed: int, *parts: object) -> np.random.Generator:
    """A stream per (seed, task, ...): adding a task or a split leaves the others' episodes unchanged."""
    digest = hashlib.sha256("/".join(str(p) for p in (seed, *parts)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _render(size: int, goal_colour: np.ndarray, goal_xy: np.ndarray, joints: np.ndarray, closed: bool) -> np.ndarray:
    """Front view: table, the goal marker, and the arm marker (xy from joints 0-1, size from joint 2)."""
    image = np.full((size, size, 3), 200, np.uint8)
    ys, xs = np.mgrid[0:size, 0:size] / size
    image[(np.abs(xs - goal_xy[0]) < 0.06) & (np.abs(ys - goal_xy[1]) < 0.06)] = goal_colour
    centre = (np.tanh(joints[:2]) + 1) / 2
    radius = 0.04 + 0.03 * (np.tanh(joints[2]) + 1) / 2
    ring = np.hypot(xs - centre[0], ys - centre[1])
    image[ring < radius if closed else (ring < radius) & (ring > radius * 0.6)] = (20, 20, 20)
    return image


def toy_episode(rng: np.random.Generator, goal: np.ndarray, goal_colour: np.ndarray, length: int, image_size: int
                ) -> tuple[list[dict], list[np.ndarray]]:
    """Observations (Observation attributes) and front RGB frames of one scripted demonstration."""
    positions = rng.uniform(-1.5, 1.5, JOINTS)
    goal_xy = (np.tanh(goal[:2]) + 1) / 2
    observations, frames = [], []
    for t in range(length):
        closed = t >= length // 2
        velocities = GAIN * (goal - positions)
        gripper_pose = np.r_[np.tanh(positions[:3]), 0.0, 0.0, 0.0, 1.0]
        observations.append({"joint_positions": positions.copy(), "joint_velocities": velocities,
                             "gripper_open": 0.0 if closed else 1.0, "gripper_pose": gripper_pose,
                             "front_rgb": None, "misc": {}})
        frames.append(_render(image_size, goal_colour, goal_xy, positions, closed))
        positions = positions + velocities
    return observations, frames


def write_toy_rlbench(root: str | Path, tasks: list[str], *, splits: dict[str, int] | None = None, seed: int = 0,
                      episode_length: int = 12, image_size: int = 64) -> Path:
    """Write `splits` ({split folder: episodes per task}) for each task under `root` that is not already complete
    there with the same settings."""
    root = Path(root)
    if not tasks:
        raise ValueError("toy RLBench data needs the task names to write (dataset.tasks)")
    splits = dict(splits or {"train": 4, "val": 2})
    for task in tasks:
        params = {"generator": GENERATOR, "task": task, "splits": splits, "seed": seed,
                  "episode_length": episode_length, "image_size": image_size}
        write_once(root, f"rlbench task {task}", params,
                   lambda task=task: _write_task(root, task, splits, seed, episode_length, image_size))
    log.info("toy RLBench episodes for %s are in %s", tasks, root)
    return root


def generate_toy_rlbench(root: str | Path, tasks: list[str], split_names: dict[str, str], *, train_episodes: int = 4,
                         val_episodes: int = 2, episode_length: int = 12, image_size: int = 64, seed: int = 0
                         ) -> Path:
    """`dataset.generate` for RLBench's layout: `train_episodes` / `val_episodes` per task into the split folders
    `split_names` gives for "train" and "val"."""
    splits = {split_names["train"]: train_episodes, split_names["val"]: val_episodes}
    return write_toy_rlbench(root, tasks, splits=splits, seed=seed, episode_length=episode_length,
                             image_size=image_size)


def _write_task(root: Path, task: str, splits: dict[str, int], seed: int, episode_length: int,
                image_size: int) -> None:
    task_rng = _task_rng(seed, task)
    goal = task_rng.uniform(-1.0, 1.0, JOINTS)  # one goal configuration per task: its "skill"
    colour = task_rng.integers(30, 230, 3).astype(np.uint8)
    description = task.replace("_", " ")
    for split, count in splits.items():
        rng = _task_rng(seed, task, split)
        for m in range(count):
            observations, frames = toy_episode(rng, goal, colour, episode_length, image_size)
            folder = root / split / task / "all_variations" / "episodes" / f"episode{m}"
            write_episode(folder, observations, images={"front_rgb": frames}, descriptions=[description],
                          variation_number=0)

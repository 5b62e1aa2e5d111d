"""A toy manipulation dataset the project generates, written in CALVIN's on-disk format.

Each episode is a top-down tabletop with coloured blocks and a gripper marker. The instruction names one block
("pick up the red block"); the scripted policy moves the gripper towards it, closes on arrival and lifts. The
actions follow CALVIN's `rel_actions` convention: 7 numbers, a position delta scaled into [-1, 1] (x, y, z),
three rotation deltas (always 0 here) and the gripper (+1 open, -1 close). Everything an action depends on is
visible in the current frame (the block, the marker, whether it is filled = closed, its size = height), so a
policy that reads the image can learn it; which block to reach is only said by the instruction.

Written as a real CALVIN split (`episode_XXXXXXX.npz` per frame, `ep_start_end_ids.npy`,
`lang_annotations/auto_lang_ann.npy`), so the same reader, HDF5 cache and datamodule serve it and real CALVIN.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from affordvla.data.calvin import save_frame, write_split_index
from affordvla.locking import write_once

log = logging.getLogger(__name__)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 210), "yellow": (225, 200, 40),
    "purple": (140, 60, 180), "orange": (235, 130, 30),
}
MAX_STEP = 0.1  # table units moved per step at full action
FULL_SPEED_DISTANCE = 0.5  # a proportional controller: the xy action is offset / 0.5, saturating at +-1
GRASP_DISTANCE = 0.025
GRIPPER_OPEN_WIDTH = 0.08  # robot_obs[6] of an open gripper (metres, as CALVIN's Franka)
START_HEIGHT = 0.3  # the gripper's height at the start of an episode (also the height it grasps from)
STATIC_SIZE, GRIPPER_SIZE = 200, 84
DONE_MARKER = "toy_actions.json"
GENERATOR_VERSION = 2  # bumped whenever the scenes or the expert change, so an older dataset is rewritten


@dataclass(frozen=True)
class ToyActionSettings:
    """The settings of the toy action dataset; they also name its generated folder."""

    train_episodes: int = 256
    val_episodes: int = 16
    episode_length: int = 24
    distractors: int = 1
    seed: int = 0


def scripted_action(ee: np.ndarray, z: float, closed: bool, target: np.ndarray) -> np.ndarray:
    """The expert: reach in xy, close within GRASP_DISTANCE, then lift (rel_actions layout, 7 numbers)."""
    action = np.zeros(7)
    offset = target - ee
    if not closed and np.linalg.norm(offset) > GRASP_DISTANCE:
        action[:2] = np.clip(offset / FULL_SPEED_DISTANCE, -1, 1)
        action[6] = 1.0
    else:  # at the block: close (the first step) and lift while closed
        action[2] = 1.0 if closed else 0.0
        action[6] = -1.0
    return action


def _draw_square(image: np.ndarray, centre: np.ndarray, half: int, colour) -> None:
    size = image.shape[0]
    cx, cy = (centre * size).astype(int)
    image[max(cy - half, 0) : cy + half, max(cx - half, 0) : cx + half] = colour


def _draw_marker(image: np.ndarray, centre: np.ndarray, z: float, closed: bool) -> None:
    size = image.shape[0]
    yy, xx = np.mgrid[0:size, 0:size]
    cx, cy = centre * size
    radius = size * (0.045 + 0.05 * z)  # higher = larger, as seen from the static camera above
    distance = np.hypot(xx - cx, yy - cy)
    ring = distance <= radius if closed else (distance <= radius) & (distance >= radius - 3)
    image[ring] = (20, 20, 20)


def render(table_colour, blocks: list[tuple[np.ndarray, tuple]], ee: np.ndarray, z: float, closed: bool
           ) -> dict[str, np.ndarray]:
    static = np.empty((STATIC_SIZE, STATIC_SIZE, 3), np.uint8)
    static[:] = table_colour
    for centre, colour in blocks:
        _draw_square(static, centre, STATIC_SIZE // 16, colour)
    _draw_marker(static, ee, z, closed)
    # the gripper camera looks down from the gripper: a crop of the table around it
    half = STATIC_SIZE // 5
    cx, cy = np.clip((ee * STATIC_SIZE).astype(int), half, STATIC_SIZE - half)
    crop = static[cy - half : cy + half, cx - half : cx + half]
    index = (np.arange(GRIPPER_SIZE) * crop.shape[0] / GRIPPER_SIZE).astype(int)
    return {"rgb_static": static, "rgb_gripper": np.ascontiguousarray(crop[index][:, index])}


@dataclass
class ToyScene:
    """One table: block colour names (the first is the episode's target), their centres, the table colour and
    where the gripper starts. Mutable so that a simulator can carry a grasped block or clear a delivered one."""

    names: list[str]
    centres: list[np.ndarray]
    table: tuple[int, int, int]
    start: np.ndarray

    def blocks(self) -> list[tuple[np.ndarray, tuple]]:
        return [(c, COLOURS[n]) for c, n in zip(self.centres, self.names)]


def sample_scene(rng: np.random.Generator, count: int) -> ToyScene:
    """`count` distinct blocks, a table colour and a gripper start, drawn in the order the dataset always drew
    them (the generated data depends on it)."""
    if not 1 <= count <= len(COLOURS):
        raise ValueError(f"a toy scene holds 1..{len(COLOURS)} blocks, not {count}")
    names = [str(n) for n in rng.choice(list(COLOURS), size=count, replace=False)]
    # blocks far enough apart that the marker can only be at one of them
    centres: list[np.ndarray] = []
    while len(centres) < len(names):
        c = rng.uniform(0.15, 0.85, 2)
        if all(np.linalg.norm(c - o) > 0.2 for o in centres):
            centres.append(c)
    table = tuple(int(v) for v in rng.integers(150, 230, 3))
    return ToyScene(names, centres, table, rng.uniform(0.1, 0.9, 2))


def apply_action(ee: np.ndarray, z: float, action: np.ndarray) -> tuple[np.ndarray, float, bool]:
    """The gripper's next (xy, height, closed) under a rel_actions action. Height stays in [0, 1] (the expert
    only lifts, so the lower bound never touches the generated data)."""
    ee = np.clip(ee + action[:2] * MAX_STEP, 0.0, 1.0)
    z = max(min(z + action[2] * MAX_STEP / 2, 1.0), 0.0)
    return ee, z, bool(action[6] < 0)


def robot_state(ee: np.ndarray, z: float, closed: bool) -> np.ndarray:
    """CALVIN's robot_obs layout (15): tcp xyz, euler (0), gripper width, 7 joints (0), gripper action."""
    robot_obs = np.zeros(15)
    robot_obs[:3] = (ee[0], ee[1], z)
    robot_obs[6] = 0.0 if closed else GRIPPER_OPEN_WIDTH
    robot_obs[14] = -1.0 if closed else 1.0
    return robot_obs


def instruction_for(name: str) -> tuple[str, str]:
    """The instruction and task id of picking the `name` block."""
    return f"pick up the {name} block", f"pick_{name}"


def generate_episode(rng: np.random.Generator, length: int, distractors: int) -> tuple[list[dict], str, str]:
    """Frames (CALVIN keys) of one scripted episode, its instruction and task id."""
    scene = sample_scene(rng, 1 + distractors)
    target, blocks = scene.centres[0], scene.blocks()
    ee, z, closed = scene.start, START_HEIGHT, False
    frames = []
    for _ in range(length):
        action = scripted_action(ee, z, closed, target)
        images = render(scene.table, blocks, ee, z, closed)
        frames.append({**images, "rel_actions": action, "actions": np.r_[ee, z, 0, 0, 0, action[6]],
                       "robot_obs": robot_state(ee, z, closed)})
        ee, z, closed = apply_action(ee, z, action)
    return (frames, *instruction_for(scene.names[0]))


def write_toy_actions(root: str | Path, settings: ToyActionSettings = ToyActionSettings()) -> Path:
    """Write `training/` and `validation/` CALVIN splits under `root` (seeded; reused once complete)."""
    root = Path(root)
    recorded = {**asdict(settings), "version": GENERATOR_VERSION}
    if write_once(root, DONE_MARKER, recorded, lambda: _write_splits(root, settings)):
        log.info("wrote the toy action dataset to %s", root)
    return root


def generate_toy_calvin(root: str | Path, *, train_episodes: int = 256, val_episodes: int = 16,
                        episode_length: int = 24, distractors: int = 1, seed: int = 0) -> Path:
    """`dataset.generate` for CALVIN's format: `write_toy_actions` with these settings."""
    return write_toy_actions(root, ToyActionSettings(train_episodes=train_episodes, val_episodes=val_episodes,
                                                     episode_length=episode_length, distractors=distractors,
                                                     seed=seed))


def _write_splits(root: Path, settings: ToyActionSettings) -> None:
    for split, count, offset in (("training", settings.train_episodes, 0), ("validation", settings.val_episodes, 1)):
        rng = np.random.default_rng([settings.seed, offset])
        split_root = root / split
        split_root.mkdir(parents=True, exist_ok=True)
        ranges, segments, frame_id = [], [], 0
        for _ in range(count):
            frames, instruction, task = generate_episode(rng, settings.episode_length, settings.distractors)
            for frame in frames:
                save_frame(split_root, frame_id, frame)
                frame_id += 1
            ranges.append((frame_id - len(frames), frame_id - 1))
            segments.append((frame_id - len(frames), frame_id - 1, instruction, task))
        write_split_index(split_root, ranges, segments)

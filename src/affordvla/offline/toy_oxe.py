"""The toy manipulation episodes (offline/toy_actions.py) written as Open X-Embodiment's bridge_orig: an RLDS folder of
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

from affordvla.data.oxe import SPECS, DatasetSpec, write_rlds_dataset
from affordvla.locking import write_once
from affordvla.offline.toy_actions import (
    GENERATOR_VERSION,
    GRIPPER_OPEN_WIDTH,
    ToyActionSettings,
    generate_episode,
)

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


def generate_toy_bridge(root: str | Path, name: str = "bridge_orig", *, train_episodes: int = 256,
                        val_episodes: int = 16, episode_length: int = 24, distractors: int = 1, seed: int = 0) -> Path:
    """`dataset.generate` for an OXE dataset in bridge's layout: `write_toy_bridge` with these settings."""
    return write_toy_bridge(root, ToyActionSettings(train_episodes=train_episodes, val_episodes=val_episodes,
                                                    episode_length=episode_length, distractors=distractors,
                                                    seed=seed), name=name)


def _gripper_values(rule: str, rng: np.random.Generator, count: int) -> np.ndarray:
    """Gripper values as a dataset of this convention stores them."""
    if rule == "rel2abs":  # mostly "keep", a few close (+1) / open (-1) commands
        return rng.choice([-1.0, 0.0, 0.0, 0.0, 1.0], count)
    if rule == "binarize":  # continuous openness with some in-between values, ending decided
        return np.append(rng.choice([0.0, 0.02, 0.5, 0.97, 1.0], count - 1), rng.choice([0.0, 1.0]))
    if rule in ("clip", "invert_clip"):
        return rng.choice([-1.0, 1.0], count)
    return rng.choice([0.0, 1.0], count)


def synthetic_episode(spec: DatasetSpec, steps: int, rng: np.random.Generator, instruction: str,
                      image_shape: tuple[int, int] | None = None) -> dict:
    """One episode of `spec`'s dataset as flattened Example features, every feature of its layout filled.
    `image_shape` overrides the frames' (height, width) (smaller files for benchmarks)."""
    features: dict = {}
    for feature in spec.features:
        name = f"steps/{feature.key}"
        if feature.kind == "image":
            h, w = image_shape or feature.shape[:2]
            base = rng.integers(0, 256, 3)
            features[name] = [_jpeg(np.clip(base + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8))
                              for _ in range(steps)]
        elif feature.kind == "text":
            features[name] = [instruction.encode()] * steps
        elif feature.kind == "bool":
            features[name] = rng.integers(0, 2, (steps, max(1, int(np.prod(feature.shape)))))
        elif spec.language_codepoints and feature.key == spec.language:  # unicode code points padded with 0
            row = np.zeros(feature.shape[0], np.int64)
            row[: len(instruction)] = [ord(c) for c in instruction]
            features[name] = np.tile(row, steps)
        elif feature.kind in ("int", "int64"):
            features[name] = np.zeros((steps, max(1, int(np.prod(feature.shape)))), np.int64)
        else:
            size = int(np.prod(feature.shape)) if feature.shape else 1
            values = rng.uniform(-0.05, 0.05, (steps, size)).astype(np.float32)
            if spec.state == feature.key and spec.relabel_from_state:
                values = np.cumsum(values, axis=0).astype(np.float32)
            features[name] = values
    for piece in (spec.gripper,):
        if piece is not None:
            features[f"steps/{piece.key}"][:, piece.start] = _gripper_values(spec.gripper_rule, rng, steps)
    if spec.rot is not None and spec.rot_quaternion:
        quaternion = rng.normal(size=(steps, 4))
        features[f"steps/{spec.rot.key}"][:, spec.rot.start:spec.rot.start + 4] = (
            quaternion / np.linalg.norm(quaternion, axis=1, keepdims=True))
    for name, value in features.items():
        if isinstance(value, np.ndarray):
            features[name] = value.reshape(-1)
    features.update({
        "steps/is_first": np.array([1] + [0] * (steps - 1)), "steps/is_last": np.array([0] * (steps - 1) + [1]),
        "steps/is_terminal": np.array([0] * (steps - 1) + [1]),
        "steps/reward": np.array([0.0] * (steps - 1) + [1.0], np.float32),
        "steps/discount": np.ones(steps, np.float32),
        "episode_metadata/file_path": [f"toy/{spec.name}/{int(rng.integers(1 << 30))}.npy".encode()],
    })
    return features


def write_toy_mixture(root: str | Path, names: list[str], *, train_episodes: int = 2, val_episodes: int = 1,
                      episode_length: int = 6, seed: int = 0, shards: int = 2,
                      image_shape: tuple[int, int] | None = None) -> list[Path]:
    """Write `train` and `val` splits of synthetic episodes for each named dataset, in its published layout, as
    `root/<name>/1.0.0` (seeded; a dataset already written with these settings is reused)."""
    root = Path(root)
    written = []
    for index, name in enumerate(names):
        if name not in SPECS:
            raise ValueError(f"dataset {name!r} has no spec to write a toy version from; known: {sorted(SPECS)}")
        spec = SPECS[name]

        def write(spec=spec, index=index, name=name) -> None:
            episodes = {}
            for split, count, offset in (("train", train_episodes, 0), ("val", val_episodes, 1)):
                rng = np.random.default_rng([seed, index, offset])
                episodes[split] = [synthetic_episode(spec, episode_length, rng, f"{name} task {e % 3}", image_shape)
                                   for e in range(count)]
            write_rlds_dataset(root, name, episodes, shards=shards)

        recorded = {"name": name, "train": train_episodes, "val": val_episodes, "length": episode_length,
                    "seed": seed, "shards": shards, "image_shape": list(image_shape or []),
                    "version": GENERATOR_VERSION}
        write_once(root / name, DONE_MARKER, recorded, write)
        written.append(root / name / "1.0.0")
    return written

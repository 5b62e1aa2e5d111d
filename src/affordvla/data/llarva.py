"""LLARVA's vision-action instruction data from RLBench episodes.

Every frame t but the last becomes one LLaVA conversation record: the front camera image, the task description,
the five most recent joint positions (with N(0, 0.01) noise, rounded to 4 decimals) and, as the answer, the
next step's 7 joint velocities plus gripper_open. The visual-trace variant also asks for, and answers with, the
end effector's future pixel track in the front camera. The prompt and answer text come from formats/llarva.py,
shared with the text action head that trains on and generates them.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np

from affordvla.data.rlbench import RLBenchEpisode, list_episodes
from affordvla.formats.llarva import HISTORY, JOINTS, llarva_answer, llarva_prompt

NOISE_STD = 0.01
TRACE_POINTS = 30


def project_points(points: np.ndarray, extrinsics: np.ndarray, intrinsics: np.ndarray) -> np.ndarray:
    """World points (N, 3) -> integer pixels (N, 2) through a camera pose (camera-to-world 4x4) and its 3x3
    intrinsics, as RLBench stores them in `misc`."""
    homogeneous = np.concatenate([points, np.ones((len(points), 1))], axis=1)
    in_camera = (np.linalg.inv(extrinsics) @ homogeneous.T)[:3]
    pixels = intrinsics @ in_camera
    return np.floor(pixels[:2] / pixels[2]).T.astype(np.int64)


def visual_trace(observations: list[Any], t: int, camera: str = "front") -> list[list[int]]:
    """End-effector pixels from frame t to the episode end, strided by floor(len / 30)."""
    misc = observations[t].misc
    positions = np.array([np.asarray(o.gripper_pose)[:3] for o in observations[t:]])
    pixels = project_points(positions, np.asarray(misc[f"{camera}_camera_extrinsics"]),
                            np.asarray(misc[f"{camera}_camera_intrinsics"]))
    stride = max(1, len(pixels) // TRACE_POINTS)
    return pixels[::stride].tolist()


def episode_records(episode: RLBenchEpisode, *, image_root: Path | None = None, visual_trace_answers: bool = False,
                    rng: np.random.Generator) -> list[dict[str, Any]]:
    """The LLaVA conversation records of one episode (every frame but the last)."""
    observations = episode.demo().observations
    description = episode.descriptions()[0]
    history = [[0.0] * JOINTS for _ in range(HISTORY)]
    records = []
    relative = episode.path if image_root is None else episode.path.relative_to(image_root)
    for t in range(len(observations) - 1):
        joints = np.asarray(observations[t].joint_positions, dtype=np.float64)[:JOINTS]
        noisy = joints + rng.normal(0, NOISE_STD, JOINTS)
        history = history[1:] + [[round(float(v), 4) for v in noisy]]
        following = observations[t + 1]
        action = np.append(np.asarray(following.joint_velocities, dtype=np.float64)[:JOINTS], following.gripper_open)
        action = [round(float(v), 4) for v in action]
        trace = visual_trace(observations, t) if visual_trace_answers else None
        records.append({
            "id": f"{episode.task}_{episode.variation}_{episode.path.name}_{t}",
            "image": f"{relative}/front_rgb/{t}.png",
            "conversations": [
                {"from": "human", "value": llarva_prompt(description, history, visual_trace=visual_trace_answers)},
                {"from": "gpt", "value": llarva_answer(action, trace)},
            ],
        })
    return records


def write_llarva_annotations(data_root: str | Path, tasks: list[str], out_json: str | Path, *, seed: int = 0,
                             visual_trace_answers: bool = False) -> int:
    """Annotate every episode of the tasks under `data_root`; write the shuffled records; return their count."""
    data_root = Path(data_root)
    rng = np.random.default_rng(seed)
    records = []
    for task in tasks:
        for episode in list_episodes(data_root / task):
            records += episode_records(episode, image_root=data_root, visual_trace_answers=visual_trace_answers,
                                       rng=rng)
    random.Random(seed).shuffle(records)
    out_json = Path(out_json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(records, indent=2), encoding="utf-8")
    return len(records)

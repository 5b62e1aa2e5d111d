"""Closed-loop evaluation: an agent (`reset()`, `act(observation) -> action`; affordvla-eval wraps an action
policy's session, whose step's `executed` is the action) acting in an environment adapter until success or a step
limit.

An environment adapter has `reset(seed) -> observation` and `step(action) -> (observation, done, info)` with
`info["success"]`; one that `supports_chains` also has `reset_chain(seed, subtasks)` and `advance()` (the next
subtask's observation after a success, None after the last). Observations are
`{"images": {camera: HxWx3 uint8}, "instruction": str, "state": optional}`, what a session's `act` takes. The
toy simulator (toy_env.py) and the simulator adapters (simulators.py) follow it.

Episodes give a success rate; chains follow CALVIN's protocol: the scene is
reset once per chain, the agent before every subtask, each subtask has `max_steps`, and the chain stops at the
first failure, so its result is the number of subtasks completed in a row (`long_horizon_metrics`).
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from affordvla.evaluation.calvin import (
    SUBTASKS,
    long_horizon_metrics,
    results_from_sequences,
)

log = logging.getLogger(__name__)
STRIP_COLUMNS = 8  # frames per saved strip, evenly spaced over the rollout


class Agent(Protocol):
    """What a rollout drives: reset at an episode's start, then an action per observation."""

    def reset(self) -> None: ...

    def act(self, observation: dict[str, Any]) -> np.ndarray: ...


@dataclass
class RolloutReport:
    """Per-episode successes and step counts, per-chain subtask outcomes, and the metrics derived from them."""

    successes: list[bool] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    sequences: list[list[bool]] = field(default_factory=list)
    seeds: dict[str, list[int]] = field(default_factory=lambda: {"episodes": [], "chains": []})
    strips: list[Path] = field(default_factory=list)

    @property
    def results(self) -> list[int]:
        """Subtasks completed in a row, per chain."""
        return results_from_sequences(self.sequences)

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.successes:
            out.update({"rollout/success_rate": float(np.mean(self.successes)),
                        "rollout/episodes": len(self.successes), "rollout/mean_steps": float(np.mean(self.steps))})
        if self.sequences:
            calvin = long_horizon_metrics(self.results)
            out.update({f"rollout/calvin_success_{i}": calvin[f"success_{i}"] for i in range(1, SUBTASKS + 1)})
            out.update({"rollout/calvin_avg_len": calvin["avg_len"], "rollout/chains": len(self.sequences)})
        return out

    def write_results(self, path: str | Path) -> Path:
        """Per-chain outcomes as JSON lines with "result" (what `affordvla-eval calvin --results` reads)."""
        path = Path(path)
        lines = [json.dumps({"seed": s, "result": r, "subtasks": o})
                 for s, r, o in zip(self.seeds["chains"], self.results, self.sequences)]
        path.write_text("".join(line + "\n" for line in lines))
        return path


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr, leave=False)


def _camera_frame(observation: dict[str, Any], camera: str | None) -> np.ndarray:
    images = observation.get("images")
    if images is None:
        return np.asarray(observation["image"])
    return np.asarray(images[camera] if camera is not None else next(iter(images.values())))


def _run_subtask(agent: Agent, env, observation: dict[str, Any], max_steps: int, frames: list | None,
                 camera: str | None) -> tuple[bool, int]:
    agent.reset()
    for step in range(1, max_steps + 1):
        observation, done, info = env.step(agent.act(observation))
        if frames is not None:
            frames.append(_camera_frame(observation, camera))
        if done:
            return bool(info.get("success", False)), step
    return False, max_steps


def run_episodes(agent: Agent, env, episodes: int, max_steps: int, seed: int = 0, *, progress: bool = True,
                 frames_dir: str | Path | None = None, saved: int = 3, camera: str | None = None,
                 report: RolloutReport | None = None) -> RolloutReport:
    """`episodes` single-task rollouts with seeds seed, seed + 1, ...; the first `saved` are written as image
    strips into `frames_dir` when given."""
    report = report or RolloutReport()
    bar = _progress(episodes, f"{getattr(env, 'name', 'env')} episodes", progress)
    for i in range(episodes):
        observation = env.reset(seed + i)
        frames = [_camera_frame(observation, camera)] if frames_dir is not None and i < saved else None
        success, steps = _run_subtask(agent, env, observation, max_steps, frames, camera)
        report.successes.append(success)
        report.steps.append(steps)
        report.seeds["episodes"].append(seed + i)
        if frames is not None:
            name = f"episode_{seed + i:05d}_{'success' if success else 'failure'}.png"
            report.strips.append(save_strip(frames, Path(frames_dir) / name, [success]))
        bar.update()
        bar.set_postfix(success=f"{np.mean(report.successes):.2f}")
    bar.close()
    return report


def run_chains(agent: Agent, env, chains: int, max_steps: int, seed: int = 0, subtasks: int = SUBTASKS, *,
               progress: bool = True, frames_dir: str | Path | None = None, saved: int = 3,
               camera: str | None = None, report: RolloutReport | None = None) -> RolloutReport:
    """`chains` CALVIN-style sequences of `subtasks` (<= 5); each stops at its first failed subtask."""
    if not getattr(env, "supports_chains", False):
        raise ValueError(f"the {getattr(env, 'name', 'given')} environment has no chained tasks: evaluate --episodes")
    if not 1 <= subtasks <= SUBTASKS:
        raise ValueError(f"a chain has 1..{SUBTASKS} subtasks")
    report = report or RolloutReport()
    bar = _progress(chains, f"{getattr(env, 'name', 'env')} chains", progress)
    for i in range(chains):
        observation = env.reset_chain(seed + i, subtasks)
        frames = [_camera_frame(observation, camera)] if frames_dir is not None and i < saved else None
        outcomes: list[bool] = []
        while observation is not None:
            success, _ = _run_subtask(agent, env, observation, max_steps, frames, camera)
            outcomes.append(success)
            if not success:
                break
            observation = env.advance()
        report.sequences.append(outcomes)
        report.seeds["chains"].append(seed + i)
        if frames is not None:
            name = f"chain_{seed + i:05d}_len{sum(outcomes)}.png"
            report.strips.append(save_strip(frames, Path(frames_dir) / name, outcomes))
        bar.update()
        bar.set_postfix(avg_len=f"{np.mean(report.results):.2f}")
    bar.close()
    return report


def save_strip(frames: list[np.ndarray], path: Path, outcomes: list[bool], columns: int = STRIP_COLUMNS) -> Path:
    """A row of `columns` evenly spaced frames (first and last included) over a bar of one segment per subtask:
    green for a success, red for a failure."""
    from PIL import Image

    picks = np.unique(np.linspace(0, len(frames) - 1, min(columns, len(frames))).round().astype(int))
    height = max(frames[i].shape[0] for i in picks)
    tiles = [np.pad(frames[i], ((0, height - frames[i].shape[0]), (0, 2), (0, 0)), constant_values=255)
             for i in picks]
    row = np.concatenate(tiles, axis=1)
    bar = np.zeros((8, row.shape[1], 3), np.uint8)
    for k, edges in enumerate(np.array_split(np.arange(row.shape[1]), max(len(outcomes), 1))):
        ok = outcomes[k] if k < len(outcomes) else False
        bar[:, edges] = (40, 170, 60) if ok else (200, 40, 40)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate([row, bar]).astype(np.uint8)).save(path)
    return path


def check_cameras(policy_cameras: dict[str, list[int]], camera: str, observation: dict[str, Any]) -> None:
    """The simulator must show the policy's camera at the size it was trained on: a silent resize would be a
    different input distribution."""
    images = observation.get("images") or {}
    if camera not in images:
        raise ValueError(f"the policy reads camera {camera!r}; the environment gives {sorted(images)}")
    trained = tuple(policy_cameras.get(camera) or ())
    if trained and tuple(images[camera].shape) != trained:
        raise ValueError(f"camera {camera!r}: the policy was trained on {list(trained)} images, the environment "
                         f"renders {list(images[camera].shape)}")

"""A closed-loop simulator of the toy action world (offline/toy_actions.py): the same scenes, rendering and
gripper dynamics, stepped by a policy instead of the scripted expert.

Observations are what a session's `act` takes and what the policy was trained on: both CALVIN cameras
(`rgb_static` 200x200, `rgb_gripper` 84x84), the instruction ("pick up the red block") and `robot_obs` as the
state. `reset(seed)` draws the scene exactly as `generate_episode(np.random.default_rng(seed), ...)` does, so the
expert's actions replay that episode's frames (tests/test_rollouts.py).

What the data never shows, the simulator has to decide; the rules:
- closing the gripper grasps the block within GRASP_DISTANCE of the marker, if any, and only at the working
  height episodes start at (a gripper lifted first closes on air);
- a grasped block moves with the gripper in xy and is dropped where it is when the gripper opens;
- a subtask succeeds when its named block is grasped and the gripper is at LIFT_HEIGHT or above (4 full lift
  steps: the expert gets there within ~24 steps from anywhere on the table).

Chains (CALVIN-style long-horizon evaluation): `reset_chain(seed, n)` lays out n target blocks plus the
distractors; after a success `advance()` puts the lifted block away (it leaves the table), reopens the gripper
at the working height where it is, and names the next block. The scene is reset once per chain, as in CALVIN.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from affordvla.offline.toy_actions import (
    COLOURS,
    GRASP_DISTANCE,
    GRIPPER_SIZE,
    START_HEIGHT,
    STATIC_SIZE,
    ToyScene,
    apply_action,
    instruction_for,
    render,
    robot_state,
    sample_scene,
    scripted_action,
)

LIFT_HEIGHT = START_HEIGHT + 0.2
_EPS = 1e-9  # heights accumulate 0.05 steps in floating point


class ToyActionEnv:
    """`reset(seed)`/`reset_chain(seed, subtasks)` -> observation, `step(action)` -> (observation, done, info),
    `advance()` -> the next subtask's observation (or None after the last)."""

    name = "toy"
    cameras = {"rgb_static": (STATIC_SIZE, STATIC_SIZE, 3), "rgb_gripper": (GRIPPER_SIZE, GRIPPER_SIZE, 3)}
    supports_chains = True

    def __init__(self, distractors: int = 1):
        if distractors < 0 or distractors >= len(COLOURS):
            raise ValueError(f"distractors must be in 0..{len(COLOURS) - 1}")
        self.distractors = distractors
        self.scene: ToyScene | None = None

    # --- episodes ---------------------------------------------------------------------------------------------
    def reset(self, seed: int) -> dict[str, Any]:
        """One pick task on a fresh table, drawn as the dataset draws an episode from `default_rng(seed)`."""
        return self._start(np.random.default_rng(seed), 1)

    def reset_chain(self, seed: int, subtasks: int) -> dict[str, Any]:
        """`subtasks` picks in a row on one table (targets first in the scene's block list, then distractors)."""
        if not 1 <= subtasks <= len(COLOURS) - self.distractors:
            raise ValueError(f"with {self.distractors} distractors a toy chain has 1..{len(COLOURS) - self.distractors}"
                             f" subtasks (one colour per block), not {subtasks}")
        # a stream of its own, so that chain seed s is not episode seed s with more blocks
        return self._start(np.random.default_rng([seed, 1]), subtasks)

    def _start(self, rng: np.random.Generator, subtasks: int) -> dict[str, Any]:
        self.scene = sample_scene(rng, subtasks + self.distractors)
        self.targets = list(self.scene.names[:subtasks])
        self.subtask = 0
        self.ee, self.z, self.closed = self.scene.start.copy(), START_HEIGHT, False
        self.grasped: int | None = None  # index into scene.names
        return self.observation()

    def advance(self) -> dict[str, Any] | None:
        """After a success: the lifted block leaves the table, the gripper reopens at the working height, and the
        next block is named; None when the chain is complete."""
        if not self.success():
            raise RuntimeError("advance() is for after a subtask succeeded")
        del self.scene.names[self.grasped], self.scene.centres[self.grasped]
        self.grasped, self.closed, self.z = None, False, START_HEIGHT
        self.subtask += 1
        return self.observation() if self.subtask < len(self.targets) else None

    # --- dynamics ---------------------------------------------------------------------------------------------
    def step(self, action: np.ndarray) -> tuple[dict[str, Any], bool, dict[str, Any]]:
        action = np.clip(np.asarray(action, dtype=float).reshape(-1)[:7], -1.0, 1.0)
        if action.shape != (7,):
            raise ValueError(f"a toy action has 7 numbers (rel_actions layout), got {action.shape[0]}")
        was_closed, before = self.closed, self.ee
        self.ee, z, self.closed = apply_action(self.ee, self.z, action)
        if self.closed and not was_closed:
            self.grasped = self._block_under(self.ee) if self.z <= START_HEIGHT + _EPS else None
        elif not self.closed:
            self.grasped = None
        if self.grasped is not None:
            self.scene.centres[self.grasped] = self.scene.centres[self.grasped] + (self.ee - before)
        self.z = z
        success = self.success()
        info = {"success": success, "subtask": self.subtask, "target": self.targets[self.subtask],
                "grasped": None if self.grasped is None else self.scene.names[self.grasped]}
        return self.observation(), success, info

    def _block_under(self, ee: np.ndarray) -> int | None:
        distances = [np.linalg.norm(c - ee) for c in self.scene.centres]
        nearest = int(np.argmin(distances))
        return nearest if distances[nearest] <= GRASP_DISTANCE else None

    def success(self) -> bool:
        """The current subtask's block is held and lifted."""
        return (self.grasped is not None and self.scene.names[self.grasped] == self.targets[self.subtask]
                and self.z >= LIFT_HEIGHT - _EPS)

    # --- observations -----------------------------------------------------------------------------------------
    @property
    def instruction(self) -> str:
        return instruction_for(self.targets[self.subtask])[0]

    def observation(self) -> dict[str, Any]:
        images = render(self.scene.table, self.scene.blocks(), self.ee, self.z, self.closed)
        # float32 as the datamodule hands robot_obs to the policy
        return {"images": images, "instruction": self.instruction,
                "state": robot_state(self.ee, self.z, self.closed).astype(np.float32)}

    def expert_action(self) -> np.ndarray:
        """The scripted expert's action from the true state (privileged: for checking the simulator)."""
        target = self.scene.centres[self.scene.names.index(self.targets[self.subtask])]
        return scripted_action(self.ee, self.z, self.closed, target)

    def close(self) -> None:
        self.scene = None


class ToyExpertAgent:
    """The scripted expert as an agent: what a perfect policy would do in the toy world. It reads the simulator's
    state, so it bounds what an image-reading policy can reach."""

    def __init__(self, env: ToyActionEnv):
        self.env = env

    def reset(self) -> None:
        pass

    def act(self, observation: dict[str, Any]) -> np.ndarray:
        return self.env.expert_action()


class RandomAgent:
    """Uniform random rel_actions (gripper +-1): the floor a learned policy has to beat."""

    def __init__(self, seed: int = 0, action_dim: int = 7):
        self.rng, self.action_dim = np.random.default_rng(seed), action_dim

    def reset(self) -> None:
        pass

    def act(self, observation: dict[str, Any]) -> np.ndarray:
        action = self.rng.uniform(-1, 1, self.action_dim)
        action[-1] = 1.0 if action[-1] >= 0 else -1.0
        return action

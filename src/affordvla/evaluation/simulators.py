"""Environment adapters for `affordvla-eval rollout`: the toy simulator, and thin adapters over the CALVIN,
RLBench and SimplerEnv simulators, each turning its simulator into the protocol of rollouts.py
(`reset(seed)`, `step(action) -> (observation, done, info)`, for CALVIN also `reset_chain` / `advance`).

The simulator packages are imported inside the constructors, after `require_simulator(name)`, so this module
imports without them and a missing package gives the message that names it. Each adapter is written against the
simulator's public API as its own README and evaluation scripts use it; the assumed calls are listed in its
docstring. Only the toy simulator is exercised by the tests here; the others need their packages and assets.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import numpy as np

from affordvla.evaluation.calvin import require_simulator

log = logging.getLogger(__name__)
ENVIRONMENTS = ("toy", "calvin", "rlbench", "simpler")
# per-subtask / per-episode step limits: CALVIN's 360, LLARVA's RLBench
# evaluation episode_length=120 (its README); the toy expert needs at most ~24 steps
DEFAULT_MAX_STEPS = {"toy": 40, "calvin": 360, "rlbench": 120, "simpler": 120}


class CalvinAdapter:
    """CALVIN's multistep evaluation (calvin_env + calvin_agent from github.com/mees/calvin).

    Assumed API (as CALVIN's `calvin_agent/evaluation/evaluate_policy.py` uses it):
    - `calvin_env.envs.play_table_env.get_env(dataset/validation, show_gui=False)`; `env.reset(robot_obs=,
      scene_obs=)`, `env.get_obs()` -> {"rgb_obs": {"rgb_static", "rgb_gripper"}, "robot_obs", ...},
      `env.step(action)` -> (obs, reward, done, info) with a relative action of 7 numbers (gripper -1 / 1),
      `env.get_info()`;
    - `calvin_agent.evaluation.multistep_sequences.get_sequences(n)` -> [(initial_state, 5 subtask ids)] (fixed
      seed inside), `calvin_agent.evaluation.utils.get_env_state_for_initial_condition(initial_state)`;
    - the task oracle `hydra.utils.instantiate(conf/callbacks/rollout/tasks/new_playtable_tasks.yaml)` with
      `get_task_info_for_set(start_info, current_info, {subtask})` (non-empty = solved), and the instructions
      `conf/annotations/new_playtable_validation.yaml` (first annotation per subtask), `conf` beside the
      `calvin_agent` package.
    Chain `seed + i` is evaluation sequence number `seed + i` of `get_sequences(num_sequences)`.
    """

    name = "calvin"
    supports_chains = True

    def __init__(self, dataset_path: str | Path, cameras: tuple[str, ...] = ("rgb_static", "rgb_gripper"),
                 num_sequences: int = 1000):
        require_simulator("calvin")
        if importlib.util.find_spec("calvin_agent") is None:
            raise RuntimeError("CALVIN rollouts also need the `calvin_agent` package (calvin_models in "
                               "https://github.com/mees/calvin) for the evaluation sequences and the task oracle")
        import calvin_agent
        import hydra
        from calvin_agent.evaluation.multistep_sequences import get_sequences
        from calvin_agent.evaluation.utils import get_env_state_for_initial_condition
        from calvin_env.envs.play_table_env import get_env
        from omegaconf import OmegaConf

        validation = Path(dataset_path) / "validation"
        if not validation.is_dir():
            raise FileNotFoundError(f"{validation} does not exist: --data is a CALVIN dataset root (task_ABC_D, ...)")
        conf = Path(calvin_agent.__file__).resolve().parents[1] / "conf"
        self.env = get_env(validation, show_gui=False)
        self.oracle = hydra.utils.instantiate(OmegaConf.load(conf / "callbacks/rollout/tasks/new_playtable_tasks.yaml"))
        self.annotations = OmegaConf.load(conf / "annotations/new_playtable_validation.yaml")
        self.sequences = get_sequences(num_sequences)
        self._initial_state = get_env_state_for_initial_condition
        self.cameras = tuple(cameras)

    def reset_chain(self, seed: int, subtasks: int) -> dict[str, Any]:
        if not 0 <= seed < len(self.sequences):
            raise ValueError(f"CALVIN has {len(self.sequences)} evaluation sequences; sequence {seed} does not exist")
        initial_state, sequence = self.sequences[seed]
        robot_obs, scene_obs = self._initial_state(initial_state)
        self.env.reset(robot_obs=robot_obs, scene_obs=scene_obs)
        self.sequence, self.subtask = list(sequence)[:subtasks], 0
        self.start_info = self.env.get_info()
        return self._observation(self.env.get_obs())

    def reset(self, seed: int) -> dict[str, Any]:
        """A single episode is the first subtask of evaluation sequence `seed`."""
        return self.reset_chain(seed, 1)

    def step(self, action: np.ndarray) -> tuple[dict[str, Any], bool, dict[str, Any]]:
        action = np.asarray(action, dtype=float).copy()
        action[-1] = 1.0 if action[-1] > 0 else -1.0  # CALVIN takes the gripper as exactly -1 / 1
        obs, _, _, info = self.env.step(action)
        solved = self.oracle.get_task_info_for_set(self.start_info, info, {self.sequence[self.subtask]})
        success = len(solved) > 0
        return self._observation(obs), success, {"success": success, "subtask": self.subtask,
                                                 "target": self.sequence[self.subtask]}

    def advance(self) -> dict[str, Any] | None:
        self.subtask += 1
        if self.subtask >= len(self.sequence):
            return None
        self.start_info = self.env.get_info()  # each subtask is judged against the state it started from
        return self._observation(self.env.get_obs())

    def _observation(self, obs: dict[str, Any]) -> dict[str, Any]:
        subtask = self.sequence[self.subtask]
        return {"images": {c: np.asarray(obs["rgb_obs"][c]) for c in self.cameras},
                "instruction": str(self.annotations[subtask][0]),
                "state": np.asarray(obs["robot_obs"], dtype=np.float32)}

    def close(self) -> None:
        self.env.close()


class RLBenchAdapter:
    """One RLBench task (RLBench on PyRep / CoppeliaSim), with the action space of the RLBench data here: LLARVA's
    7 joint velocities + gripper_open (1 open, 0 closed).

    Assumed API (RLBench's README examples): `ObservationConfig()` with `set_all_high_dim(False)`,
    `set_all_low_dim(True)`, `<camera>_camera.rgb = True` and `.image_size`; `Environment(MoveArmThenGripper(
    JointVelocity(), Discrete()), obs_config=, headless=True)`, `env.launch()`, `env.get_task(task_class)` with
    the class from `rlbench.backend.utils.task_file_to_task_class(task_name)`; `task.reset()` -> (descriptions,
    obs), `task.step(action)` -> (obs, reward, terminate) with reward 1 on success; `obs.<camera>_rgb`,
    `obs.joint_positions`; `env.shutdown()`. RLBench draws its variations from numpy's global generator, which
    `reset(seed)` seeds.
    """

    name = "rlbench"
    supports_chains = False

    def __init__(self, task: str, cameras: tuple[str, ...] = ("front",), image_size: tuple[int, int] = (128, 128),
                 headless: bool = True):
        require_simulator("rlbench")
        from rlbench.action_modes.action_mode import MoveArmThenGripper
        from rlbench.action_modes.arm_action_modes import JointVelocity
        from rlbench.action_modes.gripper_action_modes import Discrete
        from rlbench.backend.utils import task_file_to_task_class
        from rlbench.environment import Environment
        from rlbench.observation_config import ObservationConfig

        config = ObservationConfig()
        config.set_all_high_dim(False)
        config.set_all_low_dim(True)
        for camera in cameras:
            camera_config = getattr(config, f"{camera}_camera")
            camera_config.rgb, camera_config.image_size = True, tuple(image_size)
        self.env = Environment(MoveArmThenGripper(JointVelocity(), Discrete()), obs_config=config,
                               headless=headless)
        self.env.launch()
        self.task = self.env.get_task(task_file_to_task_class(task))
        self.cameras = tuple(cameras)

    def reset(self, seed: int) -> dict[str, Any]:
        np.random.seed(seed)
        descriptions, obs = self.task.reset()
        self.instruction = descriptions[0]
        return self._observation(obs)

    def step(self, action: np.ndarray) -> tuple[dict[str, Any], bool, dict[str, Any]]:
        from rlbench.backend.exceptions import InvalidActionError

        action = np.asarray(action, dtype=float).copy()
        action[-1] = 1.0 if action[-1] > 0.5 else 0.0  # Discrete() takes gripper_open as 1 / 0
        try:
            obs, reward, terminate = self.task.step(action)
        except InvalidActionError as exc:  # e.g. a joint limit: the episode ends as a failure
            log.debug("rlbench: invalid action ends the episode: %s", exc)
            return {"images": {}, "instruction": self.instruction}, True, {"success": False, "error": str(exc)}
        success = reward >= 1.0
        return self._observation(obs), bool(terminate or success), {"success": success}

    def _observation(self, obs) -> dict[str, Any]:
        return {"images": {c: np.asarray(getattr(obs, f"{c}_rgb")) for c in self.cameras},
                "instruction": self.instruction,
                "state": np.asarray(obs.joint_positions, dtype=np.float32)[:7]}

    def close(self) -> None:
        self.env.shutdown()


class SimplerAdapter:
    """One SimplerEnv task (github.com/simpler-env/SimplerEnv, ManiSkill2 real-to-sim).

    Assumed API (SimplerEnv's README): `simpler_env.make(task_name)`, `env.reset(seed=)` -> (obs, info),
    `env.get_language_instruction()`, `simpler_env.utils.env.observation_utils.get_image_from_maniskill2_obs_dict(
    env, obs)` (the overhead / 3rd-view camera), `env.step(action)` -> (obs, reward, done, truncated, info) with
    `info["success"]`; the action is delta xyz, axis-angle rotation delta and the gripper, whose sign convention
    depends on the robot. The policy's actions go through unchanged: train on the matching dataset (units and
    gripper convention) or pass `action_transform`. The image is given under the policy's camera name.
    """

    name = "simpler"
    supports_chains = False

    def __init__(self, task: str, camera: str = "image", action_transform=None):
        require_simulator("simpler")
        import simpler_env
        from simpler_env.utils.env.observation_utils import (
            get_image_from_maniskill2_obs_dict,
        )

        self.env = simpler_env.make(task)
        self._image = get_image_from_maniskill2_obs_dict
        self.camera, self.action_transform = camera, action_transform

    def reset(self, seed: int) -> dict[str, Any]:
        obs, _ = self.env.reset(seed=seed)
        return self._observation(obs)

    def step(self, action: np.ndarray) -> tuple[dict[str, Any], bool, dict[str, Any]]:
        action = np.asarray(action, dtype=float)
        if self.action_transform is not None:
            action = self.action_transform(action)
        obs, _, done, truncated, info = self.env.step(action)
        success = bool(info.get("success", False))
        return self._observation(obs), bool(done or truncated or success), {"success": success}

    def _observation(self, obs) -> dict[str, Any]:
        # long-horizon SimplerEnv tasks change the instruction as they advance, so it is read every step
        return {"images": {self.camera: np.asarray(self._image(self.env, obs))},
                "instruction": self.env.get_language_instruction()}

    def close(self) -> None:
        self.env.close()


def make_env(name: str, *, policy_camera: str | None = None, camera_size: list[int] | None = None,
             data: str | None = None, task: str | None = None, distractors: int = 1):
    """The adapter for `name`; `policy_camera` / `camera_size` are the camera the policy reads and the size it
    was trained on (RLBench renders at that size; SimplerEnv's image is given under that name)."""
    if name not in ENVIRONMENTS:
        raise ValueError(f"unknown environment {name!r}; valid: {list(ENVIRONMENTS)}")
    if name == "toy":
        from affordvla.offline.toy_env import ToyActionEnv

        return ToyActionEnv(distractors=distractors)
    require_simulator(name)  # before asking for simulator-specific options: the missing package comes first
    if name == "calvin":
        if not data:
            raise ValueError("--env calvin needs --data, the CALVIN dataset root (its validation/ split)")
        return CalvinAdapter(data)
    if not task:
        raise ValueError(f"--env {name} needs --task (an RLBench task file name / a SimplerEnv task name)")
    if name == "rlbench":
        size = tuple(camera_size[:2]) if camera_size else (128, 128)
        return RLBenchAdapter(task, cameras=(policy_camera or "front",), image_size=size)
    return SimplerAdapter(task, camera=policy_camera or "image")

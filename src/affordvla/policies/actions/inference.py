"""An action policy in use: batched, stateless `predict` and closed-loop sessions.

A session keeps the history each formulation needs: policy heads keep their own (the LSTM its state, the GPT a
feature memory of `window_size` frames), the interleaved formulation a memory of frames that it re-encodes as one
causal sequence, language heads the recent proprio states their prompt quotes. Over a window its chunks equal
those of the batched training forward on the same frames. Each session holds its own history, so one loaded policy
serves several sessions (a server's clients) in turn.

Chunk execution: `first` executes the first action of every new chunk (RoboVLMs); `ensemble` averages every
still-overlapping chunk's prediction for the current step with weights exp(-decay * i), i = 0 for the oldest
chunk (ACT's temporal ensembling), the gripper by a vote on the averaged value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from affordvla.policies.actions.base import ActionPolicyModuleBase
from affordvla.policies.base import ActionPrediction, Observation, Policy, Session

EXECUTIONS = ("first", "ensemble")


@dataclass
class ActionStep(ActionPrediction):
    """A session's step: `actions` is the chunk (n, D) this step predicted, `executed` the action (D,) to send to
    the robot under the session's execution (the chunk's first action, or the ensemble of overlapping chunks)."""

    executed: np.ndarray | None = None

    def to_dict(self) -> dict[str, Any]:
        return super().to_dict() | {"executed": None if self.executed is None else self.executed.tolist()}


class ActionSession(Session):
    """One episode at a time: `reset()` when it starts, then `act(observation)` per step."""

    def __init__(self, module: ActionPolicyModuleBase, execution: str = "first", ensemble_decay: float = 0.1,
                 unnorm_key: str | None = None):
        if execution not in EXECUTIONS:
            raise ValueError(f"unknown execution {execution!r}; valid: {list(EXECUTIONS)}")
        module.check_ready(unnorm_key)
        self.module, self.execution, self.ensemble_decay = module, execution, ensemble_decay
        # a mixture policy: the dataset whose units the actions come back in
        self.unnorm_key = unnorm_key
        self.reset()

    def reset(self) -> None:
        self.module.eval()
        self._history = self.module.new_history()
        self._chunks: list[np.ndarray] = []  # newest last; chunk i was made len - 1 - i steps ago
        self._gripper = 1.0  # the last executed gripper command; episodes start open

    @torch.no_grad()
    def act(self, observation: Observation | Mapping[str, Any]) -> ActionStep:
        """`observation`: an Observation, or {"images": {camera: HxWx3 uint8} (or "image"), "instruction": str,
        "state": optional}."""
        observation = Observation.coerce(observation)
        predicted = self.module.step(observation, self._history, self._gripper)
        chunk = self.module.unnormalize(predicted.actions, self.unnorm_key)
        executed = chunk[0].copy() if self.execution == "first" else self._ensemble(chunk)
        self._gripper = float(executed[-1])
        return ActionStep(chunk, predicted.text, predicted.parsed, executed=executed)

    def _ensemble(self, chunk: np.ndarray) -> np.ndarray:
        self._chunks = (self._chunks + [chunk])[-len(chunk) :]
        ages = range(len(self._chunks) - 1, -1, -1)
        predictions = np.stack([c[age] for c, age in zip(self._chunks, ages)])
        weights = np.exp(-self.ensemble_decay * np.arange(len(predictions)))
        action = (weights[:, None] * predictions).sum(0) / weights.sum()
        low = self.module.normalizer.gripper_low
        action[-1] = 1.0 if action[-1] > (low + 1) / 2 else low
        return action


class ActionPolicy(Policy):
    """A loaded action policy (`load_policy` on an export of module=action_policy or module=language_actions)."""

    kind = "actions"
    module: ActionPolicyModuleBase

    @property
    def camera(self) -> str | None:
        return self.module.camera

    def predict(self, observations: Sequence[Observation | Mapping[str, Any]], unnorm_key: str | None = None
                ) -> list[ActionPrediction]:
        """Each observation's chunk (n, D) in dataset units (of dataset `unnorm_key` for a mixture policy), from
        its frame alone: a window head sees a window of one frame."""
        return self.module.predict_observations([Observation.coerce(o) for o in observations], unnorm_key)

    def session(self, execution: str = "first", unnorm_key: str | None = None, ensemble_decay: float = 0.1
                ) -> ActionSession:
        return ActionSession(self.module, execution, ensemble_decay, unnorm_key)

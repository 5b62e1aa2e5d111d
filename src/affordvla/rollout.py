"""Step-wise inference for rollouts: `reset()` at the start of an episode, then `act(observation) -> action`.

Each formulation keeps the history it needs: policy heads keep their own (the LSTM its state, the GPT a feature
memory of `window_size` frames), the interleaved formulation a memory of frames that it re-encodes as one causal
sequence, language heads the recent proprio states their prompt quotes. Over a window the chunks equal those of
the batched training forward on the same frames (tests/test_policy.py).

Chunk execution: `first` executes the first action of every new chunk (RoboVLMs); `ensemble` averages every
still-overlapping chunk's prediction for the current step with weights exp(-decay * i), i = 0 for the oldest
chunk (ACT's temporal ensembling), the gripper by a vote on the averaged value.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from affordvla.policy_module import ActionPolicyModule

EXECUTIONS = ("first", "ensemble")


class PolicyRunner:
    def __init__(self, module: ActionPolicyModule, execution: str = "first", ensemble_decay: float = 0.1,
                 unnorm_key: str | None = None):
        if execution not in EXECUTIONS:
            raise ValueError(f"unknown execution {execution!r}; valid: {list(EXECUTIONS)}")
        if module.normalizer is None:
            raise ValueError("the policy has no dataset metadata yet: train it, or load_exported_head() first")
        self.module, self.execution, self.ensemble_decay = module, execution, ensemble_decay
        # a mixture policy: the dataset whose units the actions come back in (checked now, not mid-episode)
        self.unnorm_key = unnorm_key
        if module.normalizer.datasets:
            module.normalizer.unnormalize(torch.zeros(1, module.normalizer.action_dim), unnorm_key)
        self.reset()

    def reset(self) -> None:
        module = self.module
        module.eval()
        if module.policy_head is not None:
            module.policy_head.reset()
        self._frames: list[torch.Tensor] = []
        self._states: list[np.ndarray] = []
        self._chunks: list[np.ndarray] = []  # newest last; chunk i was made len - 1 - i steps ago
        self._gripper = 1.0  # the last executed gripper command; episodes start open

    @property
    def window_size(self) -> int:
        return int(self.module.dataset_metadata["window_size"])

    @torch.no_grad()
    def predict_chunk(self, image: np.ndarray, instruction: str, state: np.ndarray | None = None) -> np.ndarray:
        """This step's chunk (n, D) in dataset units, updating the history."""
        module = self.module
        pixels = module.pixel_values(np.asarray(image)[None])
        if module.is_language_head:
            if state is not None:
                self._states = (self._states + [np.asarray(state)])[-16:]
            history = np.stack(self._states) if self._states else None
            prompt = module.language_head.prompt(instruction, history)
            # an answer that does not parse keeps the gripper as it is
            chunk = module.language_head.predict(module.backbone, pixels, [prompt], self._gripper)[1][0]
            return module.normalizer.unnormalize(torch.as_tensor(chunk), self.unnorm_key).numpy()
        prompt = module._prompt(instruction)
        if module.formulation == "interleaved":
            self._frames = (self._frames + [pixels[0]])[-self.window_size :]
            count = len(self._frames)
            features = module.action_features(torch.stack(self._frames), [prompt] * count, 1, count)
            arm, gripper = module.policy_head(features)
            arm, gripper = arm[:, -1], gripper[:, -1]
        else:
            features = module.action_features(pixels, [prompt], 1, 1)[:, 0]
            arm, gripper = module.policy_head.step(features)
        actions = module.normalizer.denormalize(arm, gripper > 0)
        return module.normalizer.unnormalize(actions, self.unnorm_key)[0].cpu().numpy()

    def act(self, observation: dict[str, Any]) -> np.ndarray:
        """`observation`: {"images": {camera: HxWx3 uint8} (or "image"), "instruction": str, "state": optional}."""
        images = observation.get("images")
        image = images[self.module.camera] if images is not None else observation["image"]
        chunk = self.predict_chunk(image, observation["instruction"], observation.get("state"))
        if self.execution == "first":
            self._gripper = float(chunk[0][-1])
            return chunk[0]
        self._chunks = (self._chunks + [chunk])[-len(chunk) :]
        ages = range(len(self._chunks) - 1, -1, -1)
        predictions = np.stack([c[age] for c, age in zip(self._chunks, ages)])
        weights = np.exp(-self.ensemble_decay * np.arange(len(predictions)))
        action = (weights[:, None] * predictions).sum(0) / weights.sum()
        low = self.module.normalizer.gripper_low
        action[-1] = 1.0 if action[-1] > (low + 1) / 2 else low
        self._gripper = float(action[-1])
        return action

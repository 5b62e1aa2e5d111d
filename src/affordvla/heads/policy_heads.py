"""Policy heads: features of the learnable action token(s) over a history
window -> action chunks.

Input `features` is (B, T, L, H): T frames of the window, L latent action tokens per frame. Output is the arm
(B, T, n, D-1) through tanh, in normalised space, and gripper logits (B, T, n) (open = 1). `step` runs the same
head one frame at a time for rollouts, keeping the history each head needs; over a window it returns exactly
what the batched forward returns at that frame (tests/test_policy.py checks it).
"""

from __future__ import annotations

import abc
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from affordvla.heads.action_normalization import ActionNormalizer


class PolicyHead(nn.Module, abc.ABC):
    """Shared outputs and step-wise bookkeeping; subclasses say how the window is fused."""

    def __init__(self, in_features: int, action_dim: int, chunk_size: int, window_size: int, hidden_size: int):
        super().__init__()
        self.in_features, self.action_dim = in_features, action_dim
        self.chunk_size, self.window_size, self.hidden_size = chunk_size, window_size, hidden_size
        self.arm = nn.Linear(hidden_size, chunk_size * (action_dim - 1))
        self.gripper = nn.Linear(hidden_size, chunk_size)
        self._memory: list[torch.Tensor] = []

    def _outputs(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lead = hidden.shape[:-1]
        arm = torch.tanh(self.arm(hidden)).view(*lead, self.chunk_size, self.action_dim - 1)
        return arm, self.gripper(hidden).view(*lead, self.chunk_size)

    @staticmethod
    def pool(features: torch.Tensor) -> torch.Tensor:
        """(..., L, H) -> (..., H): max over the latent action tokens (one token passes through unchanged)."""
        return features.max(dim=-2).values

    @abc.abstractmethod
    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, L, H) -> arm (B, T, n, D-1), gripper logits (B, T, n)."""

    # --- rollouts -----------------------------------------------------------------------------------------
    def reset(self) -> None:
        self._memory = []

    def rollout_state(self) -> dict:
        """The history `step` keeps, so that several rollouts (a server's sessions) can share one head."""
        return {"memory": list(self._memory)}

    def load_rollout_state(self, state: dict | None) -> None:
        """Continue the rollout `state` (from `rollout_state`); None starts a new one."""
        if state is None:
            self.reset()
            return
        self._memory = list(state["memory"])

    def step(self, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One new frame's features (B, L, H) -> this frame's (arm (B, n, D-1), gripper logits (B, n)).
        Default: keep the last `window_size` frames and re-run the window, reading its last step."""
        self._memory = (self._memory + [feature])[-self.window_size :]
        arm, gripper = self(torch.stack(self._memory, dim=1))
        return arm[:, -1], gripper[:, -1]


class MLPHead(PolicyHead):
    """Each frame on its own (one-step): pooled feature -> MLP. History is for the interleaved formulation."""

    def __init__(self, in_features: int, action_dim: int, chunk_size: int, window_size: int, hidden_size: int = 256,
                 num_layers: int = 2):
        super().__init__(in_features, action_dim, chunk_size, window_size, hidden_size)
        layers, width = [], in_features
        for _ in range(num_layers):
            layers += [nn.Linear(width, hidden_size), nn.ReLU()]
            width = hidden_size
        self.mlp = nn.Sequential(*layers)

    def forward(self, features):
        return self._outputs(self.mlp(self.pool(features)))

    def step(self, feature):  # no history needed
        return self._outputs(self.mlp(self.pool(feature)))


class LSTMHead(PolicyHead):
    """An LSTM over the window. Step-wise it carries its state while the memory fits the window, then trims
    the memory to the last `window_size` frames and re-runs from a zero state (as RoboVLMs does)."""

    def __init__(self, in_features: int, action_dim: int, chunk_size: int, window_size: int, hidden_size: int = 256,
                 num_layers: int = 2):
        super().__init__(in_features, action_dim, chunk_size, window_size, hidden_size)
        self.lstm = nn.LSTM(in_features, hidden_size, num_layers=num_layers, batch_first=True)
        for name, param in self.lstm.named_parameters():  # RoboVLMs' init: xavier weights, zero biases
            nn.init.xavier_uniform_(param) if "weight" in name else nn.init.zeros_(param)
        self._state: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, features):
        hidden, _ = self.lstm(self.pool(features))
        return self._outputs(hidden)

    def reset(self) -> None:
        super().reset()
        self._state = None

    def rollout_state(self) -> dict:
        return super().rollout_state() | {"lstm": self._state}

    def load_rollout_state(self, state: dict | None) -> None:
        super().load_rollout_state(state)
        if state is not None:
            self._state = state["lstm"]

    def step(self, feature):
        self._memory.append(feature)
        if len(self._memory) <= self.window_size:
            hidden, self._state = self.lstm(self.pool(feature)[:, None], self._state)
            arm, gripper = self._outputs(hidden[:, -1])
            return arm, gripper
        self._memory = self._memory[-self.window_size :]
        hidden, self._state = self.lstm(self.pool(torch.stack(self._memory, dim=1)))
        return self._outputs(hidden[:, -1])


class GPTHead(PolicyHead):
    """A small causal GPT-2 (transformers' GPT2Model) over the window with learned positions; step-wise it
    re-runs the causal model over the last `window_size` frames."""

    def __init__(self, in_features: int, action_dim: int, chunk_size: int, window_size: int, hidden_size: int = 256,
                 num_layers: int = 2, num_heads: int = 4):
        super().__init__(in_features, action_dim, chunk_size, window_size, hidden_size)
        from transformers import GPT2Config, GPT2Model

        self.project = nn.Linear(in_features, hidden_size) if in_features != hidden_size else nn.Identity()
        config = GPT2Config(n_embd=hidden_size, n_layer=num_layers, n_head=num_heads, n_positions=window_size,
                            vocab_size=1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        self.gpt = GPT2Model(config)

    def forward(self, features):
        hidden = self.gpt(inputs_embeds=self.project(self.pool(features))).last_hidden_state
        return self._outputs(hidden)


HEADS: dict[str, Callable[..., PolicyHead]] = {"mlp": MLPHead, "lstm": LSTMHead, "gpt": GPTHead}


def policy_loss(arm: torch.Tensor, gripper_logits: torch.Tensor, actions: torch.Tensor, mask: torch.Tensor,
                normalizer: ActionNormalizer, gripper_weight: float = 0.01) -> dict[str, torch.Tensor]:
    """Huber (delta 1) on the normalised arm + `gripper_weight` x BCE on the gripper, both over the chunk steps
    that `mask` keeps (steps past an episode end do not count)."""
    mask = mask.to(arm.dtype)
    count = mask.sum().clamp(min=1)
    arm_target = normalizer.normalize_arm(actions)
    arm_loss = (F.smooth_l1_loss(arm, arm_target, reduction="none", beta=1.0).mean(-1) * mask).sum() / count
    gripper_target = normalizer.gripper_target(actions)
    bce = F.binary_cross_entropy_with_logits(gripper_logits, gripper_target, reduction="none")
    gripper_loss = (bce * mask).sum() / count
    with torch.no_grad():
        accuracy = (((gripper_logits > 0).to(arm.dtype) == gripper_target).to(arm.dtype) * mask).sum() / count
    return {"loss": arm_loss + gripper_weight * gripper_loss, "arm_loss": arm_loss, "gripper_loss": gripper_loss,
            "gripper_accuracy": accuracy}

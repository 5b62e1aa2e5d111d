"""Continuous action heads (MLP / LSTM / GPT, heads/policy_heads.py) reading learnable action token(s) appended
after each frame's prompt, as RoboVLMs' policy-head formulations:

- `policy_head`: every frame of the window is its own sequence `[image][prompt][LRN x latent]` (batch B*T); the
  head fuses the T action-token features over time;
- `interleaved`: the T blocks are concatenated into one causal sequence, the language model itself carries the
  history, and the head reads each block's action token.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import nn

from affordvla.backbones.base import VLMBackbone
from affordvla.heads.language_actions import LanguageActionHead
from affordvla.heads.policy_heads import HEADS, PolicyHead, policy_loss
from affordvla.policies.actions.base import ActionPolicyModuleBase, plain_settings
from affordvla.policies.base import (
    HEAD_WEIGHTS,
    ActionPrediction,
    Observation,
    PolicyFormatError,
)

FORMULATIONS = ("policy_head", "interleaved")
# what the module passes to a head factory: the shapes the backbone and the dataset give
SHAPE_ARGUMENTS = ("in_features", "action_dim", "chunk_size", "window_size")


class ContinuousActionModule(ActionPolicyModuleBase):
    """A backbone with learnable action tokens and a continuous policy head (`head`: a factory of a PolicyHead
    taking the shape arguments, as `head=lstm|gpt|mlp` gives it)."""

    policy_head: PolicyHead
    action_token: nn.Parameter
    head_factory: Callable[..., PolicyHead]

    head_part = "policy_head"

    def __init__(self, backbone: VLMBackbone, head: Callable[..., PolicyHead],
                 optimizer: Callable[..., torch.optim.Optimizer] | None = None,
                 scheduler: Callable[..., Any] | None = None, part_lr: dict[str, float] | None = None,
                 freeze: list[str] | None = None, formulation: str = "policy_head", latent_tokens: int = 1,
                 camera: str | None = None, normalization: dict | None = None, gripper_loss_weight: float = 0.01,
                 head_lr: float | None = None, callbacks: Mapping[str, L.Callback | None] | None = None):
        if isinstance(head, LanguageActionHead) or not callable(head):
            raise ValueError(f"module=action_policy trains continuous heads (lstm, gpt, mlp), not "  # noqa: TRY004
                             f"{type(head).__name__}: use module=language_actions for the discrete and "
                             "text_actions heads")
        if formulation not in FORMULATIONS:
            raise ValueError(f"unknown module.formulation {formulation!r}; valid: {list(FORMULATIONS)}")
        super().__init__(backbone, optimizer, scheduler, part_lr, freeze, camera, normalization, head_lr, callbacks)
        self.head_factory = head
        self.formulation, self.latent_tokens = formulation, latent_tokens
        self.gripper_loss_weight = gripper_loss_weight
        # built by configure_from_metadata, before any step uses them
        self.policy_head = None  # type: ignore[assignment]
        self.action_token = None  # type: ignore[assignment]

    def build_head(self, chunk_size: int, window_size: int) -> None:
        hidden = self.backbone.hidden_size
        self.policy_head = self.head_factory(in_features=hidden, action_dim=self.normalizer.action_dim,
                                             chunk_size=chunk_size, window_size=window_size)
        device = self.backbone.model.device
        self.policy_head.to(device)
        # RoboVLMs starts the learnable action token at zero
        self.action_token = nn.Parameter(torch.zeros(self.latent_tokens, hidden, device=device))

    def prompt(self, instruction: str) -> str:
        return f"What action should the robot take to {instruction.rstrip('. ')}?"

    # --- forward ------------------------------------------------------------------------------------------
    def action_features(self, pixel_values: torch.Tensor, prompts: list[str], batch: int, window: int
                        ) -> torch.Tensor:
        """Hidden states at the action tokens, (batch, window, latent, hidden); frames ordered batch-major."""
        latent = self.latent_tokens
        inputs = self.backbone.append_positions(self.backbone.build_inputs(prompts), latent)
        inputs = {k: v.to(pixel_values.device) for k, v in inputs.items()}
        embeds = self.backbone.embed_inputs(pixel_values, inputs)
        token = self.action_token.to(embeds.dtype).expand(len(prompts), latent, -1)
        embeds = torch.cat([embeds[:, :-latent], token], dim=1)
        length = embeds.shape[1]
        if self.formulation == "interleaved":  # one causal sequence of `window` blocks per sample
            embeds = embeds.reshape(batch, window * length, -1)
            inputs = self._interleave(inputs, batch, window)
        hidden = self.backbone.hidden_states(embeds, inputs)
        hidden = hidden.reshape(batch, window, length, -1)
        return hidden[:, :, -latent:]

    @staticmethod
    def _interleave(inputs: dict[str, torch.Tensor], batch: int, window: int) -> dict[str, torch.Tensor]:
        """Concatenate per-frame rows into per-sample sequences; block k's positions continue after block k-1's
        (identical prompts within a sample make every block equally long)."""
        out = {}
        for key, value in inputs.items():
            blocks = value.reshape(batch, window, -1)
            if key == "position_ids":
                valid = inputs["attention_mask"].reshape(batch, window, -1).bool()
                first = torch.where(valid, blocks, torch.full_like(blocks, 1 << 30)).amin(dim=-1, keepdim=True)
                span = blocks[..., -1:] - first + 1
                blocks = blocks + torch.arange(window, device=value.device)[None, :, None] * span
            out[key] = blocks.reshape(batch, -1)
        return out

    def continuous_outputs(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Arm (B, T, n, D-1) in normalised units and gripper logits (B, T, n) of a batch of windows."""
        images = batch["images"][self.camera]
        b, t = images.shape[:2]
        pixel_values = self.pixel_values(images.reshape(b * t, *images.shape[2:]))
        prompts = [self.prompt(instruction) for instruction in batch["instructions"] for _ in range(t)]
        return self.policy_head(self.action_features(pixel_values, prompts, b, t))

    # --- training and evaluation --------------------------------------------------------------------------
    def compute_loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        arm, gripper = self.continuous_outputs(batch)
        mask = batch["action_mask"] & batch["frame_mask"][..., None]
        return policy_loss(arm, gripper, batch["actions"].to(arm.device), mask.to(arm.device), self.normalizer,
                           self.gripper_loss_weight)

    @torch.no_grad()
    def predict_first_actions(self, batch: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        arm, gripper = self.continuous_outputs(batch)
        actions = self.normalizer.denormalize(arm[:, :, 0], gripper[:, :, 0] > 0)
        mask = batch["action_mask"][:, :, 0] & batch["frame_mask"]
        return (actions.reshape(-1, actions.shape[-1]).cpu().numpy(),
                batch["actions"][:, :, 0].reshape(-1, actions.shape[-1]).numpy(), mask.reshape(-1).numpy())

    def head_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.policy_head.parameters()) + [self.action_token]

    # --- inference ----------------------------------------------------------------------------------------
    def predict_frames(self, observations: Sequence[Observation]) -> list[ActionPrediction]:
        pixels = self.pixel_values([o.image_for(self.camera) for o in observations])
        features = self.action_features(pixels, [self.prompt(o.instruction) for o in observations],
                                        len(observations), 1)
        arm, gripper = self.policy_head(features)
        actions = self.normalizer.denormalize(arm[:, 0], gripper[:, 0] > 0).cpu().numpy()
        return [ActionPrediction(chunk) for chunk in actions]

    def new_history(self) -> dict[str, Any]:
        # the head's own history (the LSTM's state, the GPT's feature memory) lives with the session, not the head
        return super().new_history() | {"head": None}

    def step(self, observation: Observation, history: dict[str, Any], previous_gripper: float
             ) -> ActionPrediction:
        pixels = self.pixel_values([observation.image_for(self.camera)])
        prompt = self.prompt(observation.instruction)
        if self.formulation == "interleaved":  # the language model re-reads the window's frames as one sequence
            history["frames"] = (history["frames"] + [pixels[0]])[-self.window_size :]
            count = len(history["frames"])
            features = self.action_features(torch.stack(history["frames"]), [prompt] * count, 1, count)
            arm, gripper = self.policy_head(features)
            arm, gripper = arm[:, -1], gripper[:, -1]
        else:
            features = self.action_features(pixels, [prompt], 1, 1)[:, 0]
            self.policy_head.load_rollout_state(history["head"])
            arm, gripper = self.policy_head.step(features)
            history["head"] = self.policy_head.rollout_state()
        return ActionPrediction(self.normalizer.denormalize(arm, gripper > 0)[0].cpu().numpy())

    # --- export -------------------------------------------------------------------------------------------
    def head_record(self) -> dict[str, Any]:
        factory = self.head_factory
        function = factory.func if isinstance(factory, functools.partial) else factory
        given = factory.keywords if isinstance(factory, functools.partial) else {}
        names = {cls: name for name, cls in HEADS.items()}
        if function not in names:
            raise ValueError(f"head {getattr(function, '__qualname__', function)!r} is not one of the continuous "
                             f"heads an export can rebuild ({sorted(HEADS)})")
        return {"class": names[function], "settings": plain_settings(function, given, skip=SHAPE_ARGUMENTS),
                "formulation": self.formulation, "latent_tokens": self.latent_tokens,
                "gripper_loss_weight": self.gripper_loss_weight, **super().head_record()}

    def head_state(self) -> dict[str, torch.Tensor]:
        state = {f"head.{k}": v for k, v in self.policy_head.state_dict().items()}
        state["action_token"] = self.action_token.detach()
        return state

    def load_head_state(self, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        if "action_token" not in state:
            raise PolicyFormatError(f"{HEAD_WEIGHTS} has no action_token: not the weights of a continuous head")
        with torch.no_grad():
            self.action_token.copy_(state.pop("action_token"))
        self.policy_head.load_state_dict({k.removeprefix("head."): v for k, v in state.items()}, strict=True)

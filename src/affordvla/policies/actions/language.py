"""Actions the language model writes as its answer (heads/language_actions.py): discrete action tokens (OpenVLA /
RoboVLMs) and LLARVA's text actions. Both are one-step: every valid frame of a window is an (image, prompt,
answer) sample; LLARVA's prompt quotes the frame's recent proprio states.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch

from affordvla.backbones.base import VLMBackbone
from affordvla.heads.language_actions import LANGUAGE_HEADS, LanguageActionHead
from affordvla.policies.actions.base import (
    STATE_HISTORY,
    ActionPolicyModuleBase,
    plain_settings,
)
from affordvla.policies.base import ActionPrediction, Observation, answer_logits


class LanguageActionModule(ActionPolicyModuleBase):
    """A backbone writing each frame's action chunk as text (`head`: a DiscreteActionHead or TextActionHead, as
    `head=discrete|text_actions` gives it)."""

    # a discrete or a text head: each offers its own parts (parse, trace) beside the shared interface
    language_head: Any

    def __init__(self, backbone: VLMBackbone, head: LanguageActionHead,
                 optimizer: Callable[..., torch.optim.Optimizer] | None = None,
                 scheduler: Callable[..., Any] | None = None, part_lr: dict[str, float] | None = None,
                 freeze: list[str] | None = None, camera: str | None = None, normalization: dict | None = None,
                 head_lr: float | None = None, callbacks: Mapping[str, L.Callback | None] | None = None):
        if not isinstance(head, LanguageActionHead):
            raise ValueError(f"module=language_actions trains heads writing actions as text (discrete, "  # noqa: TRY004
                             f"text_actions), not {getattr(head, 'func', type(head)).__name__}: use "
                             "module=action_policy for the lstm, gpt and mlp heads")
        super().__init__(backbone, optimizer, scheduler, part_lr, freeze, camera, normalization, head_lr, callbacks)
        self.language_head = head

    def build_head(self, chunk_size: int, window_size: int) -> None:
        self.language_head.bind(self.backbone, self.normalizer, chunk_size)

    def _samples(self, batch: dict[str, Any], with_answers: bool):
        """Every valid frame of every window as a one-step sample: (frames, prompts, answers, targets, masks)."""
        images = batch["images"][self.camera]
        actions, action_mask, frame_mask = batch["actions"], batch["action_mask"], batch["frame_mask"]
        states = batch.get("state")
        frames, prompts, answers, rows = [], [], [], []
        head = self.language_head
        for i, instruction in enumerate(batch["instructions"]):
            for t in range(images.shape[1]):
                if not (frame_mask[i, t] and action_mask[i, t, 0]):
                    continue
                history = None if states is None else states[i, : t + 1].numpy()
                frames.append(images[i, t].numpy())
                prompts.append(head.prompt(instruction, history))
                rows.append((i, t))
                if with_answers:
                    trace = (head.trace_from_states(states[i, t + 1 :].numpy())
                             if getattr(head, "visual_trace", False) and states is not None else None)
                    chunk = actions[i, t, : head.steps_predicted].numpy()
                    answers.append(head.target_text(chunk, trace=trace))
        index = torch.tensor(rows, dtype=torch.long).reshape(-1, 2)
        targets = actions[index[:, 0], index[:, 1]]
        masks = action_mask[index[:, 0], index[:, 1]]
        return np.stack(frames), prompts, answers, targets, masks

    # --- training and evaluation --------------------------------------------------------------------------
    def compute_loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        frames, prompts, answers, _, _ = self._samples(batch, with_answers=True)
        inputs = {k: v.to(self.device) for k, v in self.backbone.build_inputs(prompts, answers).items()}
        return self.language_head.loss(*answer_logits(self.backbone, self.pixel_values(frames), inputs))

    @torch.no_grad()
    def predict_first_actions(self, batch: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        frames, prompts, _, targets, masks = self._samples(batch, with_answers=False)
        _, predicted = self.language_head.predict(self.backbone, self.pixel_values(frames), prompts)
        return predicted[:, 0], targets[:, 0].numpy(), masks[:, 0].numpy()

    def frames_per_window(self) -> int:
        return 1  # every valid frame is its own sample

    def extra_metrics(self) -> dict[str, float]:
        head = self.language_head
        total = head.n_parsed + head.n_failed
        rate = head.n_failed / total if total else 0.0
        head.reset_counts()
        return {"parse_failure_rate": rate}

    # --- inference ----------------------------------------------------------------------------------------
    def _answer(self, frames: list[np.ndarray], prompts: list[str], previous_gripper: float
                ) -> list[ActionPrediction]:
        head = self.language_head
        texts, actions = head.predict(self.backbone, self.pixel_values(frames), prompts, previous_gripper)
        return [ActionPrediction(np.asarray(chunk, np.float32), text, self._parses(text))
                for text, chunk in zip(texts, actions)]

    def _parses(self, text: str) -> bool:
        """Whether an answer parses, leaving the head's parse counts (the evaluation's figures) as they were."""
        head = self.language_head
        if not hasattr(head, "parse"):  # constrained decoding: every answer is well formed
            return True
        counts = head.n_parsed, head.n_failed
        parsed = head.parse(text, previous_gripper=1.0)[1]
        head.n_parsed, head.n_failed = counts
        return parsed

    def predict_frames(self, observations: Sequence[Observation]) -> list[ActionPrediction]:
        prompts = [self.language_head.prompt(o.instruction, None if o.state is None else o.state[None])
                   for o in observations]
        return self._answer([o.image_for(self.camera) for o in observations], prompts, previous_gripper=1.0)

    def step(self, observation: Observation, history: dict[str, Any], previous_gripper: float
             ) -> ActionPrediction:
        if observation.state is not None:
            history["states"] = (history["states"] + [np.asarray(observation.state)])[-STATE_HISTORY:]
        states = np.stack(history["states"]) if history["states"] else None
        prompt = self.language_head.prompt(observation.instruction, states)
        return self._answer([observation.image_for(self.camera)], [prompt], previous_gripper)[0]

    # --- export -------------------------------------------------------------------------------------------
    def head_record(self) -> dict[str, Any]:
        head = self.language_head
        names = {cls: name for name, cls in LANGUAGE_HEADS.items()}
        if type(head) not in names:
            raise ValueError(f"head {type(head).__qualname__!r} is not one of the language action heads an export "
                             f"can rebuild ({sorted(LANGUAGE_HEADS)})")
        settings = plain_settings(type(head), {}, attributes=head, aliases={"prompt": "prompt_template"})
        return {"class": names[type(head)], "settings": settings, **super().head_record()}

"""Actions the language model writes: discrete action tokens (OpenVLA / RoboVLMs) and LLARVA's text actions.

Both are one-step formulations: each frame is its own sample (image + prompt -> answer), the loss covers the
answer tokens only, and prediction is greedy decoding parsed back into an action chunk (n, D) in dataset units.

- `DiscreteActionHead`: each dimension of each chunk step becomes one of `bins` tokens. The tokens are *added*
  to the tokenizer (`<act_000>` ...) as one explicit contiguous id range after every existing id, so no real or
  special token is ever overwritten (OpenVLA reuses the last 256 ids of Llama's vocabulary, one of which is a
  real character). Decoding can only emit action tokens, exactly n x D of them.
- `TextActionHead`: LLARVA's `The next action step: [...]` answer (optionally followed by the visual trace),
  with LLARVA's prompt built by the same function at training and inference.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList

from affordvla.backbones.base import IGNORE_INDEX, VLMBackbone
from affordvla.formats.llarva import ROBOT, llarva_answer, llarva_prompt, parse_llarva_action
from affordvla.heads.action_normalization import ActionNormalizer
from affordvla.heads.soft_targets import soft_bin_nll


def answer_token_loss(logits: torch.Tensor, labels: torch.Tensor, soft_ids: torch.Tensor | None = None,
                      sigma: float = 0.0) -> dict[str, torch.Tensor]:
    """Next-token cross-entropy on answer positions (labels != IGNORE_INDEX). With `soft_ids` (a contiguous id
    range of ordered bins) and `sigma` > 0, a target inside the range is a Gaussian over neighbouring bins, so an
    answer one bin off costs little."""
    labels = labels[:, -logits.shape[1] :]
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    keep = shift_labels != IGNORE_INDEX
    picked, targets = shift_logits[keep], shift_labels[keep]
    log_probs = picked.log_softmax(-1)
    nll = -log_probs.gather(1, targets[:, None]).squeeze(1)
    if soft_ids is not None and sigma > 0:
        nll = soft_bin_nll(log_probs, targets, nll, int(soft_ids[0]), len(soft_ids), sigma)
    with torch.no_grad():
        accuracy = (picked.argmax(-1) == targets).float().mean()
    return {"loss": nll.mean(), "token_accuracy": accuracy}


class LanguageActionHead(nn.Module):
    """What both heads share: binding to a backbone and the dataset's normaliser, prompts, loss, decoding."""

    def __init__(self, prompt: str = "What action should the robot take to {instruction}?"):
        super().__init__()
        self.prompt_template = prompt
        self.normalizer: ActionNormalizer | None = None
        self.chunk_size = 1
        self.n_parsed = self.n_failed = 0

    def bind(self, backbone: VLMBackbone, normalizer: ActionNormalizer, chunk_size: int) -> None:
        self.normalizer, self.chunk_size = normalizer, chunk_size

    @property
    def action_dim(self) -> int:
        return self.normalizer.action_dim

    def prompt(self, instruction: str, state_history: np.ndarray | None = None) -> str:
        return self.prompt_template.format(instruction=instruction.rstrip(". "), n=self.steps_predicted)

    @property
    def steps_predicted(self) -> int:
        return self.chunk_size

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return answer_token_loss(logits, labels)

    def reset_counts(self) -> None:
        self.n_parsed = self.n_failed = 0


# ------------------------------------------------------------------------------------- discrete tokens


class ActionTokenizer:
    """`bins` equal bins over [-1, 1] <-> the contiguous token-id range [first_id, first_id + bins)."""

    def __init__(self, first_id: int, bins: int = 256):
        self.first_id, self.bins = first_id, bins

    @staticmethod
    def token_strings(bins: int) -> list[str]:
        width = len(str(bins - 1))
        return [f"<act_{i:0{width}d}>" for i in range(bins)]

    @property
    def ids(self) -> torch.Tensor:
        return torch.arange(self.first_id, self.first_id + self.bins)

    def to_bins(self, values: torch.Tensor) -> torch.Tensor:
        scaled = (values.clamp(-1, 1) + 1) / 2 * self.bins
        return scaled.floor().long().clamp(0, self.bins - 1)

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        return self.to_bins(values) + self.first_id

    def decode(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Token ids -> bin centres in [-1, 1]."""
        index = (token_ids - self.first_id).clamp(0, self.bins - 1).float()
        return -1 + (index + 0.5) * 2 / self.bins


class _OnlyTokenRange(LogitsProcessor):
    def __init__(self, first: int, count: int):
        self.first, self.count = first, count

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        masked = torch.full_like(scores, -math.inf)
        masked[:, self.first : self.first + self.count] = scores[:, self.first : self.first + self.count]
        return masked


class DiscreteActionHead(LanguageActionHead):
    """n x D action tokens per answer (arm normalised, gripper -1 closed / +1 open, as OpenVLA).

    `decoding="argmax"` reads each generated token's bin centre (OpenVLA). `"expectation"` reads the mean bin
    centre under the model's distribution over the action tokens at that step (the tokens themselves are still
    generated greedily): an uncertain prediction then lands between the likely bins instead of on one of them.
    """

    DECODINGS = ("argmax", "expectation")

    def __init__(self, bins: int = 256, bin_sigma: float = 0.0, decoding: str = "argmax",
                 prompt: str = "What {n} step actions should the robot take to {instruction}?"):
        super().__init__(prompt)
        if decoding not in self.DECODINGS:
            raise ValueError(f"unknown decoding {decoding!r}; valid: {list(self.DECODINGS)}")
        self.bins, self.bin_sigma, self.decoding = bins, float(bin_sigma), decoding
        self.action_tokens: ActionTokenizer | None = None

    def bind(self, backbone: VLMBackbone, normalizer: ActionNormalizer, chunk_size: int) -> None:
        super().bind(backbone, normalizer, chunk_size)
        self.action_tokens = add_action_tokens(backbone, self.bins)

    def prompt(self, instruction: str, state_history: np.ndarray | None = None) -> str:
        if self.chunk_size == 1:  # RoboVLMs' one-step wording
            return f"What action should the robot take to {instruction.rstrip('. ')}?"
        return super().prompt(instruction, state_history)

    def target_text(self, actions: np.ndarray, **_: Any) -> str:
        """(n, D) actions in dataset units -> the answer as action-token strings."""
        values = self._normalised(torch.as_tensor(actions, dtype=torch.float32))
        strings = ActionTokenizer.token_strings(self.bins)
        return "".join(strings[int(b)] for b in self.action_tokens.to_bins(values).flatten())

    def _normalised(self, actions: torch.Tensor) -> torch.Tensor:
        gripper = self.normalizer.gripper_target(actions) * 2 - 1
        return torch.cat([self.normalizer.normalize_arm(actions), gripper[..., None]], dim=-1)

    def loss(self, logits, labels):
        return answer_token_loss(logits, labels, self.action_tokens.ids.to(labels.device), self.bin_sigma)

    @torch.no_grad()
    def predict(self, backbone: VLMBackbone, pixel_values: torch.Tensor, prompts: list[str],
                previous_gripper: float = 1.0) -> tuple[list[str], np.ndarray]:
        """Greedy action tokens and their (B, n, D) actions. Decoding is constrained to action tokens, so every
        answer is well formed and `previous_gripper` (the text head's fallback) is never needed."""
        count = self.chunk_size * self.action_dim
        processor = LogitsProcessorList([_OnlyTokenRange(self.action_tokens.first_id, self.bins)])
        inputs = backbone.build_inputs(prompts)
        inputs.pop("position_ids", None)
        output = backbone.model.generate(pixel_values=pixel_values.to(backbone.model.dtype), **inputs,
                                         max_new_tokens=count, min_new_tokens=count, do_sample=False,
                                         logits_processor=processor, pad_token_id=backbone.tokenizer.pad_token_id,
                                         output_scores=self.decoding == "expectation", return_dict_in_generate=True)
        tokens = output.sequences[:, inputs["input_ids"].shape[1] :]
        if self.decoding == "expectation":
            first = self.action_tokens.first_id
            probs = torch.stack(output.scores, dim=1)[..., first : first + self.bins].float().softmax(-1)
            centres = self.action_tokens.decode(self.action_tokens.ids.to(probs.device))
            values = (probs * centres).sum(-1)
        else:
            values = self.action_tokens.decode(tokens)
        values = values.view(len(prompts), self.chunk_size, self.action_dim)
        actions = self.normalizer.denormalize(values[..., :-1], values[..., -1] > 0)
        self.n_parsed += len(prompts)  # constrained decoding: every answer is well formed
        texts = backbone.tokenizer.batch_decode(tokens, skip_special_tokens=False)
        return texts, actions.numpy()


def add_action_tokens(backbone: VLMBackbone, bins: int) -> ActionTokenizer:
    """Add the action tokens (once) and grow the embeddings; returns their id range. A checkpoint that already has
    them (an exported policy) keeps its ids."""
    tokenizer = backbone.tokenizer
    strings = ActionTokenizer.token_strings(bins)
    vocab = tokenizer.get_vocab()
    if strings[0] not in vocab:
        tokenizer.add_special_tokens({"additional_special_tokens": strings}, replace_extra_special_tokens=False)
        vocab = tokenizer.get_vocab()
    ids = [vocab[s] for s in strings]
    if ids != list(range(ids[0], ids[0] + bins)):
        raise ValueError(f"action tokens of {backbone.source} are not one contiguous id range")
    needed = ids[-1] + 1
    if backbone.model.get_input_embeddings().num_embeddings < needed:
        backbone.model.resize_token_embeddings(needed, mean_resizing=False)
    return ActionTokenizer(ids[0], bins)


# ------------------------------------------------------------------------------------- LLARVA text actions


class TextActionHead(LanguageActionHead):
    """LLARVA's one-step text actions. `history_steps` recent proprio states (first `state_dims` numbers of each)
    go into the prompt as in LLARVA; numbers are rounded to `decimals`. With `visual_trace`, the answer also
    carries the end effector's future pixel track, taken from `trace_state_dims` of the window's later states
    (normalised image coordinates, as in the toy dataset) when the sample has no trace of its own."""

    def __init__(self, decimals: int = 2, history_steps: int = 5, state_dims: int | None = None,
                 visual_trace: bool = False, trace_state_dims: tuple[int, int] = (0, 1), image_size: int = 224,
                 robot: str = ROBOT):
        super().__init__()
        self.decimals, self.history_steps, self.state_dims = decimals, history_steps, state_dims
        self.visual_trace, self.trace_state_dims, self.image_size = visual_trace, tuple(trace_state_dims), image_size
        self.robot = robot

    @property
    def steps_predicted(self) -> int:
        return 1

    def prompt(self, instruction: str, state_history: np.ndarray | None = None) -> str:
        """LLARVA's human turn without the `<image>` marker (the backbone places the image)."""
        history = None
        if self.history_steps and state_history is not None:
            history = np.asarray(state_history)[-self.history_steps :, : self.state_dims]
        return llarva_prompt(instruction, history, visual_trace=self.visual_trace, robot=self.robot,
                             decimals=self.decimals, image_marker=False)

    def target_text(self, actions: np.ndarray, trace: list[list[int]] | None = None, **_: Any) -> str:
        return llarva_answer(np.asarray(actions)[0], (trace or []) if self.visual_trace else None, self.decimals)

    def trace_from_states(self, future_states: np.ndarray) -> list[list[int]]:
        xy = np.asarray(future_states)[:, list(self.trace_state_dims)]
        return [[round(x * self.image_size), round(y * self.image_size)] for x, y in xy.tolist()]

    def parse(self, text: str, previous_gripper: float) -> tuple[np.ndarray, bool]:
        """The first bracketed list after the answer prefix -> D numbers. Unparseable text falls back to a zero
        arm and the previous gripper state (a rollout must not crash) and is counted as a failure."""
        values, ok = parse_llarva_action(text, self.action_dim, previous_gripper, open_missing_gripper=False)
        if ok:
            self.n_parsed += 1
        else:
            self.n_failed += 1
        return values, ok

    def max_new_tokens(self, backbone: VLMBackbone) -> int:
        worst = [-(10 ** (self.decimals + 1)) / 10 ** self.decimals] * self.action_dim  # longest numbers
        text = self.target_text(np.array([worst]), trace=[[self.image_size] * 2] * 10 if self.visual_trace else None)
        return len(backbone.tokenizer(text, add_special_tokens=False)["input_ids"]) + 4

    @torch.no_grad()
    def predict(self, backbone: VLMBackbone, pixel_values: torch.Tensor, prompts: list[str],
                previous_gripper: float = 1.0) -> tuple[list[str], np.ndarray]:
        """Greedy answers and their (B, 1, D) actions; an unparseable answer keeps `previous_gripper` (open by
        default; a rollout passes the last executed state)."""
        texts = backbone.generate(pixel_values, prompts, max_new_tokens=self.max_new_tokens(backbone))
        actions = np.stack([self.parse(t, previous_gripper=previous_gripper)[0] for t in texts])
        return texts, actions[:, None, :]


LANGUAGE_HEADS = {"discrete": DiscreteActionHead, "text_actions": TextActionHead}


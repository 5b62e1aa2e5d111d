"""Keypoints written as text: the target is serialised by a codec, the loss covers the answer tokens only, and
prediction is greedy decoding parsed back by the same codec (failures counted, never guessed)."""

from __future__ import annotations

import re

import torch
from torch import nn
from transformers import LogitsProcessorList

from affordvla.backbones.base import IGNORE_INDEX, VLMBackbone
from affordvla.data.kalie_tasks import TASKS, kalie_prompt
from affordvla.data.sample import KeypointSample
from affordvla.heads.codecs import KeypointCodec, make_codec
from affordvla.heads.constrained import TokenConstraint, codec_automaton

PROMPT_STYLES = ("instruction", "kalie")


class KeypointTextHead(nn.Module):
    """Has no parameters of its own: it reads the backbone's LM logits.

    `location_sigma` > 0 replaces the one-hot target of each `<locNNNN>` answer token by a Gaussian over the
    neighbouring location tokens (sigma in bins): an answer one bin off is nearly right, and with 1024 bins the
    one-hot loss gives a tiny model almost no signal about *how* far off it is.

    `constrained` decodes through the codec's answer grammar (heads/constrained.py), so every answer parses.
    """

    def __init__(self, codec: str = "paligemma_loc", prompt_style: str = "instruction", location_sigma: float = 0.0,
                 max_new_tokens: int | None = None, codec_kwargs: dict | None = None, constrained: bool = False):
        super().__init__()
        if prompt_style not in PROMPT_STYLES:
            raise ValueError(f"unknown prompt_style {prompt_style!r}; valid: {PROMPT_STYLES}")
        self.codec: KeypointCodec = make_codec(codec, **(codec_kwargs or {}))
        self.prompt_style = prompt_style
        self.location_sigma = float(location_sigma)
        self._max_new_tokens = max_new_tokens
        self._location_ids: torch.Tensor | None = None
        self.constrained = constrained
        self._constraint: tuple[object, TokenConstraint] | None = None  # (tokenizer, its constraint)

    # --- text ---------------------------------------------------------------------------------------------
    def prompt(self, sample: KeypointSample) -> str:
        if self.prompt_style == "kalie" and sample.task in TASKS:
            return kalie_prompt(TASKS[sample.task])
        return sample.instruction

    def target_text(self, sample: KeypointSample) -> str:
        return self.codec.encode(sample.keypoints)

    @property
    def answer_budget(self) -> int | None:
        """The configured (or, after the first prediction, derived) bound on answer tokens; None before either."""
        return self._max_new_tokens

    def max_new_tokens(self, backbone: VLMBackbone, example: KeypointSample) -> int:
        if self._max_new_tokens is None:  # the encoded answer plus EOS, with slack for sloppy generations
            n = len(backbone.tokenizer(self.target_text(example), add_special_tokens=False)["input_ids"])
            self._max_new_tokens = n + 1 + max(2, n // 4)
        return self._max_new_tokens

    def match_point_count(self, count: int | None) -> None:
        """On fixed-count data (KALIE: 5 points) a variable-count codec (RoboPoint's tuple lists) writes and
        reads exactly `count` points, so every answer is scored point by point and decoding stops there."""
        if count is not None and not self.codec.fixed_count and getattr(self.codec, "num_points", None) is None:
            self.codec.num_points = count
            self._constraint = None

    # --- loss ---------------------------------------------------------------------------------------------
    def bind(self, backbone: VLMBackbone) -> None:
        """Look up the location-token ids once (they are contiguous in PaliGemma's vocabulary)."""
        vocab = backbone.tokenizer.get_vocab()
        ids = [vocab[t] for t in sorted(vocab) if re.fullmatch(r"<loc\d{4}>", t)]
        self._location_ids = torch.tensor(sorted(ids), dtype=torch.long) if ids else None

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Next-token loss on answer positions. `logits` covers the last `logits.shape[1]` positions."""
        labels = labels[:, -logits.shape[1] :]
        shift_logits = logits[:, :-1].float()
        shift_labels = labels[:, 1:]
        mask = shift_labels != IGNORE_INDEX
        picked_logits, picked_labels = shift_logits[mask], shift_labels[mask]
        log_probs = picked_logits.log_softmax(-1)
        nll = -log_probs.gather(1, picked_labels[:, None]).squeeze(1)
        with torch.no_grad():
            token_accuracy = (picked_logits.argmax(-1) == picked_labels).float().mean()
        if self.location_sigma > 0 and self._location_ids is not None:
            nll = self._soft_location_loss(log_probs, picked_labels, nll)
        return {"loss": nll.mean(), "token_accuracy": token_accuracy}

    def _soft_location_loss(self, log_probs, labels, nll):
        loc_ids = self._location_ids.to(labels.device)
        first = int(loc_ids[0])
        is_loc = (labels >= first) & (labels < first + len(loc_ids))
        if not is_loc.any():
            return nll
        bins = torch.arange(len(loc_ids), device=labels.device, dtype=torch.float32)
        centre = (labels[is_loc] - first).float()
        weights = torch.exp(-0.5 * ((bins[None, :] - centre[:, None]) / self.location_sigma) ** 2)
        weights = weights / weights.sum(-1, keepdim=True)
        soft = -(weights * log_probs[is_loc][:, first : first + len(loc_ids)]).sum(-1)
        nll = nll.clone()
        nll[is_loc] = soft
        return nll

    # --- prediction ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, backbone: VLMBackbone, pixel_values: torch.Tensor, samples: list[KeypointSample]):
        """Greedy answers and their parsed keypoints ((K, 2) arrays, or None where the text did not parse)."""
        texts = self.answer(backbone, pixel_values, [self.prompt(s) for s in samples],
                            self.max_new_tokens(backbone, samples[0]))
        return texts, [self.codec.try_decode(t) for t in texts]

    @torch.no_grad()
    def answer(self, backbone: VLMBackbone, pixel_values: torch.Tensor, prompts: list[str],
               max_new_tokens: int) -> list[str]:
        """Greedy answers to ready-made prompts (a benchmark's own questions), under the codec's grammar when
        `constrained`: the decoding every evaluation of this head shares."""
        kwargs = {}
        if self.constrained:
            kwargs["logits_processor"] = LogitsProcessorList(
                [self.constraint(backbone).logits_processor(max_new_tokens, backbone.tokenizer.eos_token_id)])
        return backbone.generate(pixel_values, prompts, max_new_tokens=max_new_tokens, **kwargs)

    def constraint(self, backbone: VLMBackbone) -> TokenConstraint:
        """The codec's answer grammar over the backbone's vocabulary, built once per tokenizer."""
        if self._constraint is None or self._constraint[0] is not backbone.tokenizer:
            self._constraint = (backbone.tokenizer, TokenConstraint(codec_automaton(self.codec), backbone.tokenizer))
        return self._constraint[1]


"""Keypoints written as text: the target is serialised by a codec, the loss covers the answer tokens only, and
prediction is greedy decoding parsed back by the same codec (failures counted, never guessed)."""

from __future__ import annotations

import re
from typing import Any

import torch
from transformers import LogitsProcessorList

from affordvla.backbones.base import IGNORE_INDEX, VLMBackbone, answer_logits
from affordvla.formats.codecs import KeypointCodec, make_codec
from affordvla.formats.sample import KeypointSample, numbered_point_names
from affordvla.heads.constrained import TokenConstraint, codec_automaton
from affordvla.heads.keypoint_head import PROMPT_STYLES, KeypointHead
from affordvla.heads.soft_targets import soft_bin_nll

__all__ = ["PROMPT_STYLES", "KeypointTextHead"]


class KeypointTextHead(KeypointHead):
    """Has no parameters of its own: it reads the backbone's LM logits.

    `location_sigma` > 0 replaces the one-hot target of each `<locNNNN>` answer token by a Gaussian over the
    neighbouring location tokens (sigma in bins): an answer one bin off is nearly right, and with 1024 bins the
    one-hot loss gives a tiny model almost no signal about *how* far off it is. Codecs that write coordinates in
    digits (KALIE's "531", RoboPoint's "0.531") get the same Gaussian, of the same width in the image, spread
    over each digit given the true digits before it (`digit_targets`), when the tokenizer splits numbers into
    single digits as Llama's does.

    `constrained` decodes through the codec's answer grammar (heads/constrained.py), so every answer parses.
    """

    writes_text = True

    def __init__(self, codec: str = "paligemma_loc", prompt_style: str = "instruction", location_sigma: float = 0.0,
                 max_new_tokens: int | None = None, codec_kwargs: dict | None = None, constrained: bool = False):
        super().__init__()
        if prompt_style not in PROMPT_STYLES:
            raise ValueError(f"unknown prompt_style {prompt_style!r}; valid: {PROMPT_STYLES}")
        self.codec: KeypointCodec = make_codec(codec, **(codec_kwargs or {}))
        self.codec_kwargs = dict(codec_kwargs or {})
        self.prompt_style = prompt_style
        self.location_sigma = float(location_sigma)
        self._max_new_tokens = self.configured_max_new_tokens = max_new_tokens
        self._location_ids: torch.Tensor | None = None
        self._digit_ids: torch.Tensor | None = None  # the tokens "0".."9", when numbers tokenise digit by digit
        self._digit_of: dict[int, int] = {}  # token id -> its digit
        self._dot_ids: frozenset[int] = frozenset()
        self.constrained = constrained
        self._constraint: tuple[object, TokenConstraint] | None = None  # (tokenizer, its constraint)

    # --- text ---------------------------------------------------------------------------------------------
    @property
    def point_names(self) -> tuple[str, ...]:
        names, count = self.codec.point_names, getattr(self.codec, "num_points", None)
        if self.codec.fixed_count or count is None or count == len(names):
            return names
        return names[:count] if count < len(names) else numbered_point_names(count)  # matched to the data

    @property
    def kalie_answers(self) -> bool:
        return self.codec.name == "kalie_json"

    def settings(self) -> dict[str, Any]:
        codec_kwargs = dict(self.codec_kwargs)
        if getattr(self.codec, "num_points", None) is not None:  # set by match_point_count: it decodes by it
            codec_kwargs["num_points"] = self.codec.num_points
        return {"codec": self.codec.name, "codec_kwargs": codec_kwargs, "prompt_style": self.prompt_style,
                "location_sigma": self.location_sigma, "max_new_tokens": self.configured_max_new_tokens,
                "constrained": self.constrained}

    def batch_inputs(self, backbone: VLMBackbone, samples: list[KeypointSample]) -> dict[str, Any]:
        prompts = [self.prompt(s) for s in samples]
        return {"inputs": backbone.build_inputs(prompts, [self.target_text(s) for s in samples])}

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
        reads exactly `count` points, so every answer is scored point by point and decoding stops there. A fixed-count
        codec (PaliGemma's <loc> tokens, KALIE's JSON: one entry per point name) cannot write other data's answers:
        refused here, at setup, rather than by the first batch the loader collates."""
        names = list(self.codec.point_names)
        if self.codec.fixed_count and count != len(names):
            points = "a varying number of points per answer" if count is None else f"{count} points per answer"
            raise ValueError(f"head.codec={self.codec.name} writes exactly {len(names)} points ({', '.join(names)}), "
                             f"but the dataset has {points}: use head.codec=robopoint, which writes any number of "
                             "points")
        if count is not None and not self.codec.fixed_count and getattr(self.codec, "num_points", None) is None:
            self.codec.num_points = count
            self._constraint = None

    # --- loss ---------------------------------------------------------------------------------------------
    def bind(self, backbone: VLMBackbone) -> None:
        """Look up the location-token ids once (they are contiguous in PaliGemma's vocabulary), and the digit
        tokens when the codec writes digits and the tokenizer gives every digit a token of its own."""
        tokenizer = backbone.tokenizer
        vocab = tokenizer.get_vocab()
        ids = [vocab[t] for t in sorted(vocab) if re.fullmatch(r"<loc\d{4}>", t)]
        self._location_ids = torch.tensor(sorted(ids), dtype=torch.long) if ids else None
        digits = tokenizer.convert_ids_to_tokens(tokenizer("0123456789", add_special_tokens=False)["input_ids"])
        split = [t for t in digits if t != "\u2581"] == list("0123456789")  # a leading "▁" of its own is fine
        self._digit_ids = (torch.tensor([vocab[str(d)] for d in range(10)])
                           if split and self.codec.integer_unit is not None else None)
        self._digit_of = {} if self._digit_ids is None else {int(t): d for d, t in enumerate(self._digit_ids)}
        self._dot_ids = frozenset(i for t, i in vocab.items() if t == ".")

    def losses(self, backbone: VLMBackbone, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.loss(*answer_logits(backbone, batch["pixel_values"], batch["inputs"]))

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
            nll = soft_bin_nll(log_probs, picked_labels, nll, int(self._location_ids[0]), len(self._location_ids),
                               self.location_sigma)
        if self.location_sigma > 0 and self._digit_ids is not None:
            nll = self._soft_digit_loss(log_probs, shift_labels, nll)
        return {"loss": nll.mean(), "token_accuracy": token_accuracy}

    def _soft_digit_loss(self, log_probs, labels, nll):
        positions, targets = self.digit_targets(labels)
        if not positions:
            return nll
        positions = torch.tensor(positions, device=nll.device)
        digit_log_probs = log_probs[positions][:, self._digit_ids.to(nll.device)]
        nll = nll.clone()
        nll[positions] = -(targets.to(digit_log_probs) * digit_log_probs).sum(-1)
        return nll

    def digit_targets(self, labels: torch.Tensor) -> tuple[list[int], torch.Tensor]:
        """Every coordinate digit among the answer tokens of `labels` (their index in row-major order, as the
        loss picks them) and its target over the ten digits: the mass of a Gaussian around the true coordinate
        (sigma `location_sigma` / 1024 of the image) on the numbers each digit leads to after the true digits
        before it. A run of digits after "." is a fraction of the codec's `integer_unit`."""
        digit_of = self._digit_of
        sigma_image = self.location_sigma / 1024
        index, runs = [], []  # runs: (value, digits before, digits after, sigma in units of the last digit)
        offset = 0
        for row in labels.tolist():
            answer = [t for t in row if t != IGNORE_INDEX]
            start = 0
            while start < len(answer):
                if answer[start] not in digit_of:
                    start += 1
                    continue
                end = start
                while end < len(answer) and answer[end] in digit_of:
                    end += 1
                digits = [digit_of[t] for t in answer[start:end]]
                fraction = start > 0 and answer[start - 1] in self._dot_ids
                unit = self.codec.integer_unit * (10.0 ** -len(digits) if fraction else 1.0)
                value = int("".join(map(str, digits)))
                for place in range(len(digits)):
                    index.append(offset + start + place)
                    runs.append((value, int("".join(map(str, digits[:place])) or 0), len(digits) - place - 1,
                                 sigma_image / unit))
                start = end
            offset += len(answer)
        if not runs:
            return [], torch.empty(0, 10)
        value, prefix, after, sigma = torch.tensor(runs, dtype=torch.float64).unbind(-1)
        step = 10.0 ** after[:, None]  # the span of numbers one digit here stands for
        low = (prefix[:, None] * 10 + torch.arange(10, dtype=torch.float64)) * step - 0.5
        mass = (torch.special.ndtr((low + step - value[:, None]) / sigma[:, None])
                - torch.special.ndtr((low - value[:, None]) / sigma[:, None]))
        return index, (mass / mass.sum(-1, keepdim=True)).float()

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


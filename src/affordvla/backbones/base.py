"""The interface every VLM backbone offers to the heads.

A backbone owns its model, its processor (image preprocessing + tokenizer) and its prompt layout. Heads see
only tensors and text: they ask the backbone to turn (images, prompts, answers) into model inputs, to run the
model, and to decode greedily.
"""

from __future__ import annotations

import abc
import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

IGNORE_INDEX = -100


# transformers' multimodal models (PaliGemma, Llava) share this module layout and these linear-layer names
TRANSFORMERS_VLM_PARTS: dict[str, tuple[str, ...]] = {
    "vision_tower": ("model.vision_tower.",),
    "projector": ("model.multi_modal_projector.",),
    "language_model": ("model.language_model.", "lm_head."),
}
TRANSFORMERS_VLM_LORA_TARGETS: dict[str, list[str]] = {
    "language_model": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "vision_tower": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
}


def pack_prompts_and_answers(prefixes: list[list[int]], suffixes: list[list[int]], pad_token_id: int
                             ) -> dict[str, torch.Tensor]:
    """Token id lists -> batch tensors: prompts left-padded so every answer starts at the same column (as in
    generation), answers right-padded. `answer_mask` marks answer tokens; `labels` holds them, IGNORE_INDEX
    elsewhere."""
    prefix_len = max(len(p) for p in prefixes)
    total = prefix_len + max(len(s) for s in suffixes)
    batch = len(prefixes)
    input_ids = torch.full((batch, total), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, total), dtype=torch.long)
    answer_mask = torch.zeros((batch, total), dtype=torch.bool)
    for i, (prefix, suffix) in enumerate(zip(prefixes, suffixes)):
        start = prefix_len - len(prefix)
        input_ids[i, start : prefix_len + len(suffix)] = torch.tensor(prefix + suffix)
        attention_mask[i, start : prefix_len + len(suffix)] = 1
        answer_mask[i, prefix_len : prefix_len + len(suffix)] = True
    labels = torch.where(answer_mask, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return {"input_ids": input_ids, "attention_mask": attention_mask, "answer_mask": answer_mask, "labels": labels}


def causal_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) padding mask -> (B, 1, L, L) boolean causal mask, passed to the language model as is. Explicit
    because a language model called on its own may default to bidirectional attention (PaliGemma's Gemma config
    sets `use_bidirectional_attention`). Every position may see itself, so rows of padding never go empty."""
    length = attention_mask.shape[1]
    lower = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
    mask = lower[None] & attention_mask.bool()[:, None, :]
    return (mask | torch.eye(length, dtype=torch.bool, device=attention_mask.device))[:, None]


class BackboneLoadError(ValueError):
    """A backbone checkpoint directory is missing, incomplete or of another family."""


def read_checkpoint_config(path: str | Path, expected_model_type: str) -> dict:
    """config.json of a local checkpoint, with clear errors for a missing path or another family."""
    path = Path(path)
    if not path.is_dir():
        raise BackboneLoadError(f"backbone checkpoint directory {path} does not exist")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise BackboneLoadError(f"{path} has no config.json: not a transformers checkpoint directory")
    config = json.loads(config_file.read_text())
    model_type = config.get("model_type")
    if model_type != expected_model_type:
        raise BackboneLoadError(
            f"{config_file} is a '{model_type}' checkpoint, but this backbone loads '{expected_model_type}'"
        )
    return config


def check_loading_info(info: dict, weights: str | Path, layout: str) -> None:
    """transformers' `output_loading_info` of a load: weights of another family or a damaged checkpoint leave
    keys missing (initialised at random, with only a log line) or unexpected. Raise instead, naming the file with
    the counts and a few names of each kind."""
    problems = {kind: sorted(info.get(kind) or []) for kind in ("missing_keys", "unexpected_keys")}
    problems["mismatched_keys"] = sorted(f"{name} is {tuple(in_file)} in the file, {tuple(in_model)} in the model"
                                         for name, in_file, in_model in info.get("mismatched_keys") or [])
    if any(problems.values()):
        details = "; ".join(f"{kind.replace('_', ' ')}: {len(keys)} ({', '.join(keys[:4])}"
                            f"{', ...' if len(keys) > 4 else ''})" for kind, keys in problems.items() if keys)
        raise BackboneLoadError(f"{weights} does not match the {layout}: {details}")


class VLMBackbone(nn.Module, abc.ABC):
    """A vision-language model behind one interface: preprocessing, token inputs, forward and generation, and
    the embedding-level calls policy heads use. Each family (PaliGemma, LLaVA, CogVLM) subclasses it."""

    family: ClassVar[str]
    # Prefixes of parameter names per part, for per-part learning rates and freezing.
    part_prefixes: ClassVar[dict[str, tuple[str, ...]]]
    # Names of the linear layers LoRA adapts by default, per part (see backbones/finetuning.py).
    lora_targets: ClassVar[dict[str, list[str]]]
    # Class names of the repeated transformer blocks: the units FSDP shards one by one and activation
    # checkpointing recomputes (affordvla.distributed). Names, not classes, so one family covers its variants
    # (PaliGemma 1 on Gemma, PaliGemma 2 on Gemma 2); the classes come from the loaded model.
    decoder_layer_names: ClassVar[tuple[str, ...]] = ()
    vision_layer_names: ClassVar[tuple[str, ...]] = ()
    # The wrapped Hugging Face model: its sub-modules and config are attributes that no stub describes.
    model: Any

    def __init__(self, model: nn.Module, processor: Any, source: str):
        super().__init__()
        self.model = model
        self.processor = processor
        self.source = source

    # --- construction -------------------------------------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> VLMBackbone: ...

    def save_pretrained(self, out_dir: str | Path) -> None:
        self.model.save_pretrained(out_dir)
        self.processor.save_pretrained(out_dir)

    # --- properties ---------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    @abc.abstractmethod
    def hidden_size(self) -> int: ...

    @property
    @abc.abstractmethod
    def image_seq_length(self) -> int: ...

    # --- inputs -------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def preprocess_images(self, images: list[np.ndarray]) -> torch.Tensor:
        """HxWx3 uint8 images -> pixel tensor (B, C, H, W) exactly as the processor would produce."""

    @abc.abstractmethod
    def build_inputs(self, prompts: list[str], answers: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Token tensors for a batch: prompts left-padded (so every answer starts at the same column, as in
        generation) and answers right-padded; `labels` is IGNORE_INDEX everywhere but answer tokens."""

    # --- model --------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def forward(self, pixel_values: torch.Tensor, inputs: dict[str, torch.Tensor], logits_to_keep: int = 0):
        """Returns an output with `.logits` (for the last `logits_to_keep` positions, all when 0)."""

    @abc.abstractmethod
    def generate(self, pixel_values: torch.Tensor, prompts: list[str], max_new_tokens: int, **kwargs) -> list[str]:
        """Greedy continuation of each prompt, decoded with special tokens kept (answers may be made of them)."""

    @abc.abstractmethod
    def vision_patch_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, patches, vision width): what the projector reads, one row per patch in row-major order (no CLS).
        The dense pointing stage (pretraining/pointing.py) trains the vision tower on these."""

    # --- embedding level (policy heads splice learnable tokens into the sequence) ---------------------------
    # The defaults follow transformers' multimodal layout (`model.model.get_image_features`,
    # `model.model.language_model`, `model.lm_head`, `config.image_token_id`), shared by PaliGemma and Llava;
    # a native model (CogVLM) overrides them.
    def embed_inputs(self, pixel_values: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Token embeddings of `inputs["input_ids"]` with the image features at the image-token positions:
        exactly what the model's own forward feeds its language model."""
        model = self.model.model
        input_ids = inputs["input_ids"]
        embeds = model.get_input_embeddings()(input_ids)
        features = model.get_image_features(pixel_values=pixel_values.to(self.model.dtype)).pooler_output
        if isinstance(features, (list, tuple)):
            features = torch.cat(list(features), dim=0)
        image_mask = (input_ids == self.model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
        return embeds.masked_scatter(image_mask, features.to(embeds.dtype))

    def hidden_states(self, inputs_embeds: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Last hidden states (B, L, hidden) of the language model over `inputs_embeds`, causal attention."""
        out = self.model.model.language_model(inputs_embeds=inputs_embeds,
                                              attention_mask=causal_mask(inputs["attention_mask"]),
                                              position_ids=inputs["position_ids"], use_cache=False)
        return out.last_hidden_state

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.model.lm_head(hidden)
        cap = getattr(self.model.config.get_text_config(), "final_logit_softcapping", None)  # Gemma 2
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def append_positions(self, inputs: dict[str, torch.Tensor], count: int) -> dict[str, torch.Tensor]:
        """`inputs` with `count` attended positions appended to every row (for learnable tokens placed after
        the left-padded prompt): positions continue, token types repeat the last one, ids are padding."""
        batch = inputs["input_ids"].shape[0]
        out = {}
        for key, value in inputs.items():
            if key == "labels" or value.dim() != 2:
                continue
            if key == "position_ids":
                extra = value[:, -1:] + torch.arange(1, count + 1, device=value.device)
            elif key == "attention_mask":
                extra = torch.ones(batch, count, dtype=value.dtype, device=value.device)
            elif key == "input_ids":
                extra = torch.full((batch, count), self.tokenizer.pad_token_id, dtype=value.dtype, device=value.device)
            else:  # token types and the like: the appended tokens belong with the text after the prompt
                extra = value[:, -1:].expand(batch, count)
            out[key] = torch.cat([value, extra], dim=1)
        return out

    # --- optimisation helpers -----------------------------------------------------------------------------
    def _layer_classes(self, names: tuple[str, ...]) -> tuple[type[nn.Module], ...]:
        found = {type(m) for m in self.model.modules() if type(m).__name__ in names}
        return tuple(sorted(found, key=lambda c: c.__qualname__))

    @property
    def decoder_layer_classes(self) -> tuple[type[nn.Module], ...]:
        """The language model's block classes present in this model (one per block type)."""
        return self._layer_classes(self.decoder_layer_names)

    @property
    def vision_layer_classes(self) -> tuple[type[nn.Module], ...]:
        """The vision tower's block classes present in this model."""
        return self._layer_classes(self.vision_layer_names)

    def parameter_parts(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters grouped by part (e.g. vision_tower, projector, language_model)."""
        parts: dict[str, list[nn.Parameter]] = {name: [] for name in self.part_prefixes}
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            part = next((p for p, prefixes in self.part_prefixes.items() if name.startswith(prefixes)), None)
            if part is None:
                raise KeyError(f"parameter {name} of {self.family} belongs to no part of {list(self.part_prefixes)}")
            parts[part].append(param)
        return parts

    def freeze(self, parts: list[str]) -> None:
        unknown = sorted(set(parts) - set(self.part_prefixes))
        if unknown:
            raise ValueError(f"cannot freeze unknown parts {unknown}; valid parts: {sorted(self.part_prefixes)}")
        for name, param in self.model.named_parameters():
            if any(name.startswith(self.part_prefixes[p]) for p in parts):
                param.requires_grad_(False)


def answer_logits(backbone: VLMBackbone, pixel_values: torch.Tensor, inputs: dict[str, torch.Tensor]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """LM logits over the answer columns only, and the labels. Answers are right-aligned after a left-padded
    prefix (pack_prompts_and_answers), so the logits from the first answer column onwards are all a loss needs."""
    labels = inputs["labels"]
    first_answer = int((labels != IGNORE_INDEX).float().argmax(dim=1).min())
    output = backbone(pixel_values, inputs, logits_to_keep=labels.shape[1] - first_answer + 1)
    return output.logits, labels

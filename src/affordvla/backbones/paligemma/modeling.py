"""PaliGemma (1 and 2) through transformers' own classes.

Prompt layout, as PaliGemma was trained: `<image>` x N, `<bos>`, the prefix text, `\n`, then the answer and
`<eos>`. With `prefix_lm=True` (how PaliGemma was pre-trained; keep it for real checkpoints) the prefix (image +
prompt) attends bidirectionally (token_type_ids = 0) and the answer causally. `prefix_lm=False` makes every
token causal: a randomly initialised tiny model learns to read positions out of the image in a few hundred
steps that way, and not at all in the same steps with the bidirectional prefix (docs/tiny-vlm-learning-log.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from PIL import Image
from transformers import AutoProcessor, PaliGemmaForConditionalGeneration

from affordvla.backbones.base import (
    TRANSFORMERS_VLM_LORA_TARGETS,
    TRANSFORMERS_VLM_PARTS,
    VLMBackbone,
    check_loading_info,
    pack_prompts_and_answers,
    read_checkpoint_config,
)


class PaliGemmaBackbone(VLMBackbone):
    """The PaliGemma family behind VLMBackbone: transformers' PaliGemma model, with prefix-LM or causal attention."""

    family = "paligemma"
    decoder_layer_names = ("GemmaDecoderLayer", "Gemma2DecoderLayer", "Gemma3DecoderLayer")
    vision_layer_names = ("SiglipEncoderLayer",)
    part_prefixes = TRANSFORMERS_VLM_PARTS
    lora_targets = TRANSFORMERS_VLM_LORA_TARGETS

    def __init__(self, model, processor, source: str, prefix_lm: bool = True):
        super().__init__(model, processor, source)
        self.prefix_lm = prefix_lm
        model.config.affordvla_prefix_lm = prefix_lm  # saved with the weights, so an export keeps its attention

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str | torch.dtype = "float32", prefix_lm: bool | None = None,
                        **kwargs) -> PaliGemmaBackbone:
        """`prefix_lm=None` takes the setting the checkpoint was fine-tuned with (True for PaliGemma's own)."""
        config = read_checkpoint_config(path, "paligemma")
        if prefix_lm is None:
            prefix_lm = config.get("affordvla_prefix_lm", True)
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        # weights of another family would load with their missing tensors initialised at random: refused
        # with output_loading_info the call returns (model, info), which its annotation leaves out
        model, info = cast(Any, PaliGemmaForConditionalGeneration.from_pretrained(
            path, dtype=dtype, output_loading_info=True, **kwargs))
        check_loading_info(info, path, f"PaliGemma layout of {Path(path) / 'config.json'}")
        processor = AutoProcessor.from_pretrained(path)
        return cls(model, processor, str(path), prefix_lm=prefix_lm)

    @property
    def hidden_size(self) -> int:
        return self.model.config.text_config.hidden_size

    @property
    def image_seq_length(self) -> int:
        return self.processor.image_seq_length

    @property
    def image_size(self) -> int:
        return self.model.config.vision_config.image_size

    def preprocess_images(self, images: list[np.ndarray]) -> torch.Tensor:
        pil = [Image.fromarray(np.asarray(im)) for im in images]
        return self.processor.image_processor(pil, return_tensors="pt")["pixel_values"]

    def _prefix_text(self, prompt: str) -> str:
        return self.processor.image_token * self.image_seq_length + self.tokenizer.bos_token + prompt + "\n"

    def build_inputs(self, prompts: list[str], answers: list[str] | None = None) -> dict[str, torch.Tensor]:
        tok = self.tokenizer
        prefixes = tok([self._prefix_text(p) for p in prompts], add_special_tokens=False)["input_ids"]
        suffixes = (
            tok([a + tok.eos_token for a in answers], add_special_tokens=False)["input_ids"]
            if answers is not None
            else [[] for _ in prompts]
        )
        packed = pack_prompts_and_answers(prefixes, suffixes, tok.pad_token_id)
        input_ids, attention_mask, labels = packed["input_ids"], packed["attention_mask"], packed["labels"]
        # prefix-LM: prompt tokens are type 0 (bidirectional), answers type 1; all type 1 gives plain causal attention
        causal_prompt = attention_mask.bool() if not self.prefix_lm else torch.zeros_like(packed["answer_mask"])
        token_type_ids = (packed["answer_mask"] | causal_prompt).long()
        # 1-indexed positions that skip padding: exactly what PaliGemma's generate() computes.
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0) + 1
        out = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids,
               "position_ids": position_ids}
        if answers is not None:
            out["labels"] = labels
        return out

    def forward(self, pixel_values: torch.Tensor, inputs: dict[str, torch.Tensor], logits_to_keep: int = 0):
        return self.model(
            pixel_values=pixel_values.to(self.model.dtype),
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            token_type_ids=inputs["token_type_ids"],
            position_ids=inputs["position_ids"],
            logits_to_keep=logits_to_keep,
            use_cache=False,
        )

    def vision_patch_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.model.vision_tower(pixel_values=pixel_values.to(self.model.dtype)).last_hidden_state

    @torch.no_grad()
    def generate(self, pixel_values: torch.Tensor, prompts: list[str], max_new_tokens: int, **kwargs) -> list[str]:
        inputs = self.build_inputs(prompts)
        inputs.pop("position_ids")  # generate() derives the same positions from the mask
        output = self.model.generate(
            pixel_values=pixel_values.to(self.model.dtype),
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            **kwargs,
        )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=False)
        eos, pad = self.tokenizer.eos_token, self.tokenizer.pad_token
        return [t.split(eos)[0].replace(pad, "") for t in texts]

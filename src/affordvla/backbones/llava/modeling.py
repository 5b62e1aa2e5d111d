"""LLaVA-1.5 (and RoboPoint, once converted) through transformers' own LlavaForConditionalGeneration.

Prompt layout, Vicuna v1 as LLaVA-1.5 and RoboPoint were trained::

    <s>{system} USER: <image>\\n{prompt} ASSISTANT: {answer}</s>

`<image>` is expanded by the processor into one token per visual feature. Images are padded to a square with
the CLIP mean colour before the CLIP preprocessing (`image_aspect_ratio: pad`), so nothing is cropped away.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from affordvla.backbones.base import (
    TRANSFORMERS_VLM_LORA_TARGETS,
    TRANSFORMERS_VLM_PARTS,
    VLMBackbone,
    check_loading_info,
    pack_prompts_and_answers,
    read_checkpoint_config,
)
from affordvla.backbones.llava.conventions import VICUNA_SYSTEM
from affordvla.backbones.llava.convert import convert_original_llava, is_original_llava


def pad_to_square(image: np.ndarray, fill: tuple[int, ...]) -> np.ndarray:
    """Centre the image on a square canvas of `fill` colour (LLaVA's expand2square)."""
    height, width = image.shape[:2]
    if height == width:
        return image
    side = max(height, width)
    canvas = np.empty((side, side, 3), dtype=np.uint8)
    canvas[:] = fill
    top, left = (side - height) // 2, (side - width) // 2
    canvas[top : top + height, left : left + width] = image
    return canvas


class LlavaBackbone(VLMBackbone):
    """The LLaVA-1.5 family (RoboPoint's layout) behind VLMBackbone: transformers' Llava model, images padded to
    square as LLaVA does, and the Vicuna v1 conversation template."""

    family = "llava"
    decoder_layer_names = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer")
    vision_layer_names = ("CLIPEncoderLayer", "SiglipEncoderLayer")
    part_prefixes = TRANSFORMERS_VLM_PARTS
    lora_targets = TRANSFORMERS_VLM_LORA_TARGETS

    def __init__(self, model, processor, source: str, system_prompt: str = VICUNA_SYSTEM):
        super().__init__(model, processor, source)
        self.system_prompt = system_prompt
        mean = processor.image_processor.image_mean
        self.pad_colour = tuple(int(round(255 * m)) for m in mean)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str | torch.dtype = "float32",
                        vision_tower: str | None = None, **kwargs) -> LlavaBackbone:
        """A transformers Llava directory, or an original-LLaVA / RoboPoint one (converted in memory; its vision
        tower is the local CLIP directory `vision_tower` or the one its config names)."""
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        config_file = Path(path) / "config.json"
        if config_file.is_file() and is_original_llava(json.loads(config_file.read_text())):
            model, processor = convert_original_llava(path, vision_tower)
            return cls(model.to(dtype), processor, str(path))  # type: ignore[arg-type]  # transformers' wrapped `to`
        read_checkpoint_config(path, "llava")
        # weights of another family would load with their missing tensors initialised at random: refused
        # with output_loading_info the call returns (model, info), which its annotation leaves out
        model, info = cast(Any, LlavaForConditionalGeneration.from_pretrained(
            path, dtype=dtype, output_loading_info=True, **kwargs))
        check_loading_info(info, path, f"Llava layout of {Path(path) / 'config.json'}")
        processor = AutoProcessor.from_pretrained(path)
        return cls(model, processor, str(path))

    @property
    def hidden_size(self) -> int:
        return self.model.config.text_config.hidden_size

    @property
    def image_seq_length(self) -> int:
        vision = self.model.config.vision_config
        return (vision.image_size // vision.patch_size) ** 2

    @property
    def image_size(self) -> int:
        return self.model.config.vision_config.image_size

    def preprocess_images(self, images: list[np.ndarray]) -> torch.Tensor:
        squared = [Image.fromarray(pad_to_square(np.asarray(im), self.pad_colour)) for im in images]
        return self.processor.image_processor(squared, return_tensors="pt")["pixel_values"]

    def prompt_text(self, prompt: str) -> str:
        """The conversation up to the answer, with `<image>` expanded to the number of visual tokens."""
        image = self.processor.image_token * self.image_seq_length
        return f"{self.system_prompt} USER: {image}\n{prompt} ASSISTANT:"

    def build_inputs(self, prompts: list[str], answers: list[str] | None = None) -> dict[str, torch.Tensor]:
        tok = self.tokenizer
        prefixes = [[tok.bos_token_id] + tok(self.prompt_text(p), add_special_tokens=False)["input_ids"]
                    for p in prompts]
        suffixes = ([tok(" " + a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for a in answers]
                    if answers is not None else [[] for _ in prompts])
        packed = pack_prompts_and_answers(prefixes, suffixes, tok.pad_token_id)
        input_ids, attention_mask, labels = packed["input_ids"], packed["attention_mask"], packed["labels"]
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # what generate() derives from the mask
        out = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        if answers is not None:
            out["labels"] = labels
        return out

    def forward(self, pixel_values: torch.Tensor, inputs: dict[str, torch.Tensor], logits_to_keep: int = 0):
        return self.model(pixel_values=pixel_values.to(self.model.dtype), input_ids=inputs["input_ids"],
                          attention_mask=inputs["attention_mask"], position_ids=inputs["position_ids"],
                          logits_to_keep=logits_to_keep, use_cache=False)

    def vision_patch_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The layer(s) `vision_feature_layer` names, concatenated as the projector reads them, CLS row dropped."""
        config = self.model.config
        hidden = self.model.model.vision_tower(pixel_values=pixel_values.to(self.model.dtype),
                                               output_hidden_states=True).hidden_states
        layers = [config.vision_feature_layer] if isinstance(config.vision_feature_layer, int) \
            else config.vision_feature_layer
        return torch.cat([hidden[layer][:, 1:] for layer in layers], dim=-1)

    @torch.no_grad()
    def generate(self, pixel_values: torch.Tensor, prompts: list[str], max_new_tokens: int, **kwargs) -> list[str]:
        inputs = self.build_inputs(prompts)
        inputs.pop("position_ids")
        output = self.model.generate(pixel_values=pixel_values.to(self.model.dtype), **inputs,
                                     max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=self.tokenizer.pad_token_id,
                                     eos_token_id=self.tokenizer.eos_token_id, **kwargs)
        texts = self.tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=False)
        eos, pad = self.tokenizer.eos_token, self.tokenizer.pad_token
        return [t.split(eos)[0].replace(pad, "").strip() for t in texts]

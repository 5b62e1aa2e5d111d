"""CogVLM's prompt templates and its processor (image preprocessing + tokenizer).

The original preprocesses with torchvision: resize to image_size x image_size (bicubic, on the PIL image), scale
to [0, 1], normalise with the CLIP mean and std. A CLIP image processor on the PIL backend with a fixed
height/width and no centre crop does exactly that, and is saved as a standard preprocessor_config.json.

The official checkpoints ship no tokenizer (they use lmsys/vicuna-7b-v1.5's) and no preprocessor config, so
both can come from elsewhere: the tokenizer from a separate local directory, the image processor from the model
config.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer, CLIPImageProcessorPil

from affordvla.backbones.base import BackboneLoadError
from affordvla.backbones.cogvlm.configuration import CogVLMConfig

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC

# The original's `_history_to_prompt` for a single turn: "chat" and "vqa" wrap the query, "base" takes it raw.
PROMPT_TEMPLATES = {"chat": "Question: {} Answer:", "vqa": "Question: {} Short answer:", "base": "{}"}
# The same chat layout for `tokenizer.apply_chat_template` (earlier turns end with "\n", as in the original).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% set text = message['content'] if message['content'] is string else "
    "(message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('')) %}"
    "{% if message['role'] == 'user' %}{{ 'Question: ' + text + ' Answer:' }}"
    "{% else %}{{ ' ' + text + '\\n' }}{% endif %}{% endfor %}"
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def format_prompt(query: str, template_version: str) -> str:
    if template_version not in PROMPT_TEMPLATES:
        raise ValueError(f"unknown CogVLM template_version {template_version!r}; valid: {sorted(PROMPT_TEMPLATES)}")
    return PROMPT_TEMPLATES[template_version].format(query)


def build_image_processor(image_size: int) -> CLIPImageProcessorPil:
    return CLIPImageProcessorPil(size={"height": image_size, "width": image_size}, do_center_crop=False,
                                 resample=BICUBIC, image_mean=CLIP_MEAN, image_std=CLIP_STD)


class CogVLMProcessor:
    """The tokenizer and image processor of one checkpoint, written as standard transformers files."""

    def __init__(self, image_processor: CLIPImageProcessorPil, tokenizer):
        self.image_processor = image_processor
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, path: str | Path, config: CogVLMConfig,
                        tokenizer_path: str | Path | None = None) -> CogVLMProcessor:
        """`tokenizer_path` (a local Vicuna-7B-v1.5 tokenizer for the official checkpoints) overrides the
        checkpoint's own tokenizer files; the image size must be the vision tower's."""
        path = Path(path)
        image_size = config.vision.image_size
        tokenizer_dir = Path(tokenizer_path) if tokenizer_path is not None else path
        if not any((tokenizer_dir / name).is_file() for name in TOKENIZER_FILES):
            hint = ("" if tokenizer_path is not None else "; the official CogVLM checkpoints ship none (they use "
                    "lmsys/vicuna-7b-v1.5's): pass a local tokenizer directory as backbone.tokenizer")
            raise BackboneLoadError(f"{tokenizer_dir} has no tokenizer files ({', '.join(TOKENIZER_FILES)}){hint}")
        # the config is given so AutoTokenizer does not try to read config.json as one of its own model types
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, config=config)
        if tokenizer.pad_token is None:  # Vicuna's tokenizer has none; CogVLM pads (and marks images) with id 0
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(config.pad_token_id)
        preprocessor_file = path / "preprocessor_config.json"
        if preprocessor_file.is_file():
            image_processor = CLIPImageProcessorPil.from_pretrained(path)
            size = image_processor.size
            if (size.get("height"), size.get("width")) != (image_size, image_size):
                raise BackboneLoadError(f"{preprocessor_file} resizes to {dict(size)}, but the vision tower of this "
                                        f"checkpoint takes {image_size}x{image_size} images")
        else:
            image_processor = build_image_processor(image_size)
        return cls(image_processor, tokenizer)

    def save_pretrained(self, out_dir: str | Path) -> None:
        self.tokenizer.save_pretrained(out_dir)
        self.image_processor.save_pretrained(out_dir)

    def preprocess(self, images: list[np.ndarray]) -> torch.Tensor:
        """HxWx3 uint8 images -> (B, 3, image_size, image_size) float pixels."""
        pil = [Image.fromarray(np.asarray(image)).convert("RGB") for image in images]
        return self.image_processor(pil, return_tensors="pt")["pixel_values"]

"""Write an offline tiny LLaVA-1.5 checkpoint directory: config, safetensors, Llama tokenizer, processor.

Same classes as llava-hf/llava-1.5-7b-hf (CLIP vision tower, 2-layer GELU projector, Llama decoder; features from
the second-to-last vision layer without the CLS token), shrunk to a few million parameters. The tokenizer is a
byte-fallback BPE built locally with Llama's `<unk>` `<s>` `</s>`, plus `<image>` and `<pad>` appended as the
llava-hf conversion does, and a chat template for Vicuna v1 (LLaVA-1.5's and RoboPoint's conversation format).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import torch
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlamaTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from affordvla.backbones.llava.conventions import (
    CHAT_TEMPLATE,
    CLIP_MEAN,
    CLIP_STD,
    IMAGE_TOKEN,
)
from affordvla.offline.tiny_paligemma import sincos_2d
from affordvla.offline.tokenizer_corpus import train_bpe


def build_tokenizer(bpe_vocab_size: int = 800) -> LlamaTokenizer:
    vocab, merges = train_bpe(["<unk>", "<s>", "</s>"], bpe_vocab_size, style="llama")
    tokenizer = LlamaTokenizer(vocab=vocab, merges=merges)
    tokenizer.add_special_tokens({"pad_token": "<pad>", "extra_special_tokens": [IMAGE_TOKEN]})
    tokenizer.add_bos_token = True  # type: ignore[misc]  # Llama starts every sequence with <s>
    tokenizer.add_eos_token = False  # type: ignore[misc]  # settable at run time; the stub declares it read-only
    return tokenizer


def tiny_config(vocab_size: int, image_token_id: int, pad_token_id: int, *, image_size: int = 128,
                patch_size: int = 16, hidden_size: int = 128, vision_layers: int = 3, text_layers: int = 3,
                heads: int = 4, intermediate_size: int = 512) -> LlavaConfig:
    vision = CLIPVisionConfig(hidden_size=hidden_size, intermediate_size=intermediate_size,
                              num_hidden_layers=vision_layers, num_attention_heads=heads, image_size=image_size,
                              patch_size=patch_size, projection_dim=hidden_size)
    text = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                       num_hidden_layers=text_layers, num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=1024, pad_token_id=pad_token_id, bos_token_id=1, eos_token_id=2)
    # transformers' LlavaConfig takes these through **kwargs, which its annotated signature leaves out
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token_id,  # type: ignore[call-arg]
                       projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
                       image_seq_length=(image_size // patch_size) ** 2, pad_token_id=pad_token_id)


def write_tiny_llava(out_dir: str | Path, *, seed: int = 0, **config_overrides) -> Path:
    """Build, initialise and save the tiny checkpoint."""
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    image_token_id = cast(int, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))  # one token, one id
    config = tiny_config(len(tokenizer), image_token_id, tokenizer.pad_token_id,
                         **config_overrides)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    vision: Any = config.vision_config  # the CLIPVisionConfig tiny_config built: int sizes
    grid = vision.image_size // vision.patch_size
    with torch.no_grad():  # 2-D sin-cos positions: each patch starts out knowing where it is; CLS keeps a zero position
        table = model.model.vision_tower.embeddings.position_embedding.weight
        table[0].zero_()
        table[1:] = sincos_2d(grid, vision.hidden_size)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": vision.image_size}, crop_size={"height": vision.image_size, "width": vision.image_size},
        image_mean=CLIP_MEAN, image_std=CLIP_STD, resample=3, do_center_crop=True)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=vision.patch_size,
                               vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
                               num_additional_image_tokens=1)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir

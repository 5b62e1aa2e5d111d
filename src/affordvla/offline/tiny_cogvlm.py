"""Write an offline tiny CogVLM checkpoint directory: config, safetensors, Llama tokenizer, processor.

The same classes and parameter names as THUDM/cogvlm-chat-hf (EVA2-CLIP tower, GLU adapter, boi/eoi, LLaMA decoder
with visual experts), shrunk to a few million parameters. The tokenizer is a byte-fallback BPE built locally with
Llama's `<unk>` `<s>` `</s>` at ids 0-2, padding with `<unk>` as CogVLM does (its image placeholders are pad ids),
and a chat template for CogVLM's "Question: ... Answer:" layout.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaTokenizer

from affordvla.backbones.cogvlm.configuration import CogVLMConfig
from affordvla.backbones.cogvlm.modeling import CogVLMForCausalLM
from affordvla.backbones.cogvlm.processing import (
    CHAT_TEMPLATE,
    CogVLMProcessor,
    build_image_processor,
)
from affordvla.offline.tiny_paligemma import sincos_2d
from affordvla.offline.tokenizer_corpus import train_bpe


def build_tokenizer(bpe_vocab_size: int = 800) -> LlamaTokenizer:
    vocab, merges = train_bpe(["<unk>", "<s>", "</s>"], bpe_vocab_size, style="llama")
    tokenizer = LlamaTokenizer(vocab=vocab, merges=merges)
    tokenizer.pad_token = "<unk>"  # CogVLM's pad_token_id 0
    tokenizer.add_bos_token = True  # type: ignore[misc]  # settable at run time; the stub declares it read-only
    tokenizer.add_eos_token = False  # type: ignore[misc]
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_config(vocab_size: int, *, image_size: int = 128, patch_size: int = 16, hidden_size: int = 128,
                vision_layers: int = 3, text_layers: int = 3, heads: int = 4, intermediate_size: int = 512,
                template_version: str = "chat") -> CogVLMConfig:
    vision = {"image_size": image_size, "patch_size": patch_size, "hidden_size": hidden_size,
              "num_hidden_layers": vision_layers, "num_heads": heads, "intermediate_size": intermediate_size}
    return CogVLMConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                        num_hidden_layers=text_layers, num_attention_heads=heads, max_position_embeddings=1024,
                        template_version=template_version, vision_config=vision, pad_token_id=0, bos_token_id=1,
                        eos_token_id=2, architectures=["CogVLMForCausalLM"])


def write_tiny_cogvlm(out_dir: str | Path, *, seed: int = 0, **config_overrides) -> Path:
    """Build, initialise and save the tiny checkpoint."""
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    config = tiny_config(len(tokenizer), **config_overrides)
    torch.manual_seed(seed)
    model = CogVLMForCausalLM(config)
    vision = config.vision
    with torch.no_grad():  # 2-D sin-cos positions: each patch starts out knowing where it is; CLS keeps a zero position
        table = model.model.vision.patch_embedding.position_embedding.weight
        table[0].zero_()
        table[1:] = sincos_2d(vision.image_size // vision.patch_size, vision.hidden_size)
    processor = CogVLMProcessor(build_image_processor(vision.image_size), tokenizer)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir

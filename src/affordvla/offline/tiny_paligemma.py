"""Write an offline tiny PaliGemma checkpoint directory: config, safetensors, tokenizer and processor files.

The directory is loaded by the same `from_pretrained` code as a real PaliGemma checkpoint. Its initialisation is
chosen so a tiny model can learn to point quickly:
- 2-D sin-cos patch position embeddings, so every patch token starts out knowing where it is;
- the 1024 `<locNNNN>` embeddings (tied with the LM head) start as a smooth sin-cos code of the coordinate,
  so neighbouring bins share gradient instead of being 1024 unrelated classes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, cast

import torch
from transformers import (
    Gemma2Config,
    GemmaConfig,
    GemmaTokenizer,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
)

from affordvla.offline.tokenizer_corpus import train_bpe

SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]  # Gemma's ids 0..4
LOC_TOKENS = [f"<loc{i:04d}>" for i in range(1024)]
SEG_TOKENS = [f"<seg{i:03d}>" for i in range(128)]
IMAGE_TOKEN = "<image>"


def build_tokenizer(bpe_vocab_size: int = 800) -> GemmaTokenizer:
    """A Gemma-style BPE tokenizer (byte fallback, '▁' for spaces) with PaliGemma's extra tokens.

    Id layout mirrors PaliGemma: text vocabulary first, then `<loc0000>`..`<loc1023>`, `<seg000>`..`<seg127>`,
    then `<image>`.
    """
    vocab, merges = train_bpe(SPECIAL, bpe_vocab_size)
    tokenizer = GemmaTokenizer(vocab=vocab, merges=merges)  # type: ignore[arg-type]  # merges as pairs work too
    tokenizer.add_tokens(LOC_TOKENS + SEG_TOKENS)
    tokenizer.add_special_tokens({"extra_special_tokens": [IMAGE_TOKEN]})
    tokenizer.add_bos_token = False  # type: ignore[misc]  # settable at run time; the stub declares it read-only
    tokenizer.add_eos_token = False  # type: ignore[misc]
    return tokenizer


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """(grid*grid, dim) 2-D sin-cos embedding, row-major like SigLIP's patch order; half the channels per axis."""
    quarter = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    coords = torch.arange(grid, dtype=torch.float64)
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    parts = []
    for axis in (xs.reshape(-1), ys.reshape(-1)):
        angles = axis[:, None] * omega[None, :]
        parts += [torch.sin(angles), torch.cos(angles)]
    return torch.cat(parts, dim=1).float()


def coordinate_code(bins: int, dim: int, scale: float) -> torch.Tensor:
    """(bins, dim) sin-cos code of the bin value: nearby coordinates get nearby embeddings."""
    half = dim // 2
    # wavelengths from 2 bins up to ~4x the range, so the code is unique and smooth
    wavelengths = torch.logspace(math.log10(8.0), math.log10(4.0 * bins), half, dtype=torch.float64)
    values = torch.arange(bins, dtype=torch.float64)[:, None] * (2 * math.pi / wavelengths[None, :])
    code = torch.cat([torch.sin(values), torch.cos(values)], dim=1)
    return (code * scale / math.sqrt(half)).float()


def tiny_config(
    vocab_size: int,
    image_token_id: int,
    *,
    image_size: int = 128,
    patch_size: int = 16,
    hidden_size: int = 128,
    vision_layers: int = 3,
    text_layers: int = 3,
    heads: int = 4,
    kv_heads: int = 1,
    intermediate_size: int = 512,
    text_model: str = "gemma",
) -> PaliGemmaConfig:
    """PaliGemma's layout at tiny size. `text_model="gemma2"` gives PaliGemma 2: a Gemma 2 decoder with its
    logit soft-capping, query scaling and alternating sliding-window / global layers (window as in the real
    checkpoints, longer than any tiny sequence)."""
    vision = SiglipVisionConfig(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=vision_layers,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=hidden_size,  # type: ignore[call-arg]  # kept as a config attribute; PaliGemma reads it
        vision_use_head=False,
    )
    text_kwargs: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": text_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden_size // heads,
        "max_position_embeddings": 1024,
    }
    text: GemmaConfig | Gemma2Config
    if text_model == "gemma":
        text = GemmaConfig(**text_kwargs)
    elif text_model == "gemma2":
        text = Gemma2Config(**text_kwargs, sliding_window=4096, query_pre_attn_scalar=hidden_size // heads,
                            final_logit_softcapping=30.0, attn_logit_softcapping=50.0)
    else:
        raise ValueError(f"unknown PaliGemma text model {text_model!r}; valid: gemma (PaliGemma), gemma2 (PaliGemma 2)")
    config = PaliGemmaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        vocab_size=vocab_size,
        projection_dim=hidden_size,
        hidden_size=hidden_size,
    )
    cast(SiglipVisionConfig, config.vision_config).projection_dim = hidden_size
    return config


def write_tiny_paligemma(out_dir: str | Path, *, seed: int = 0, mimetic_attention: bool = False,
                         **config_overrides) -> Path:
    """Build, initialise and save the tiny checkpoint (config.json, model.safetensors, tokenizer, processor)."""
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    image_token_id = cast(int, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))  # one token, one id
    config = tiny_config(len(tokenizer), image_token_id, **config_overrides)
    # the SiglipVisionConfig tiny_config built: int sizes, where transformers also types tuples and lists
    vision: Any = config.vision_config
    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(config)
    _initialise_for_pointing(model, tokenizer)
    if mimetic_attention:
        for layer in model.model.vision_tower.encoder.layers:
            mimetic_init(layer.self_attn, vision.num_attention_heads)

    num_patches = (vision.image_size // vision.patch_size) ** 2
    image_processor = SiglipImageProcessorPil(
        size={"height": vision.image_size, "width": vision.image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        resample=3,  # bicubic, as PaliGemma's
    )
    image_processor.image_seq_length = num_patches  # type: ignore[attr-defined]  # PaliGemmaProcessor reads it
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


@torch.no_grad()
def mimetic_init(attention, num_heads: int, qk: tuple[float, float] = (0.7, 0.7),
                 vo: tuple[float, float] = (0.4, 0.4)) -> None:
    """Mimetic initialisation (Trockman & Kolter, 2023): W_q W_k^T ~ a I + b Z per head and W_v W_o ~ a I - b Z,
    so each attention layer starts by attending to tokens like itself (with sin-cos positions: its neighbours)
    and mixing them in, the structure a trained ViT has and a small-data ViT otherwise learns slowly."""
    dim = attention.q_proj.weight.shape[0]
    head_dim = dim // num_heads

    def factor(alpha: float, beta: float, sign: float) -> tuple[torch.Tensor, torch.Tensor]:
        target = alpha * torch.eye(dim) + sign * beta * torch.randn(dim, dim) / math.sqrt(dim)
        u, s, vh = torch.linalg.svd(target)
        return u * s.sqrt(), (s.sqrt()[:, None] * vh)

    for head in range(num_heads):
        rows = slice(head * head_dim, (head + 1) * head_dim)
        left, right = factor(*qk, 1.0)  # x^T W_q^T W_k x with W_q = left^T, W_k = right (top head_dim parts)
        attention.q_proj.weight[rows] = left[:, :head_dim].T
        attention.k_proj.weight[rows] = right[:head_dim]
    left, right = factor(*vo, -1.0)  # out_proj @ v_proj = left @ right: every singular pair goes to one head
    attention.v_proj.weight.copy_(right)
    attention.out_proj.weight.copy_(left)
    for proj in (attention.q_proj, attention.k_proj, attention.v_proj, attention.out_proj):
        proj.bias.zero_()


@torch.no_grad()
def _initialise_for_pointing(model: PaliGemmaForConditionalGeneration, tokenizer) -> None:
    vision: Any = model.config.vision_config  # int sizes (see write_tiny_paligemma)
    grid = vision.image_size // vision.patch_size
    embeddings = model.model.vision_tower.embeddings
    embeddings.position_embedding.weight.copy_(sincos_2d(grid, vision.hidden_size))
    table = model.model.language_model.embed_tokens.weight
    first_loc = tokenizer.convert_tokens_to_ids(LOC_TOKENS[0])
    # Gemma multiplies input embeddings by sqrt(hidden); keep loc codes at the scale of the other rows.
    scale = float(table[:first_loc].norm(dim=1).mean())
    table[first_loc : first_loc + len(LOC_TOKENS)] = coordinate_code(len(LOC_TOKENS), table.shape[1], scale)

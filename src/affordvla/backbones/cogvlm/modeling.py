"""CogVLM v1, written natively (no remote code), and the backbone that wraps it.

Module and parameter names follow the official checkpoints (THUDM/cogvlm-chat-hf, cogvlm-base-490-hf), so their
safetensors load as they are. From the image to the logits:

1. EVA2-CLIP (`model.vision`): patches + a CLS token with learned positions, transformer layers whose LayerNorms
   normalise the *sublayer outputs* (x + LN(attn(x)), x + LN(mlp(x))), CLS dropped; a GLU adapter projects the
   patches to the language width; learned `boi` / `eoi` embeddings are put around them.
2. The sequence `[BOS] [boi patches eoi] text`; `token_type_ids` are 1 on the image run. Its embeddings replace
   the placeholder tokens' embeddings.
3. A LLaMA decoder whose attention projections and MLP exist twice: a *vision expert* used where a token and the
   next one are image tokens (boi and the patches), the *language expert* everywhere else (eoi included).
4. Rotary positions in which the whole image run after boi counts as one step: [BOS 0, boi 1, patches 2 ...,
   eoi 3, text 4 ...].

`CogVLMBackbone` at the end gives this model the interface every backbone offers the heads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
)

from affordvla.backbones.base import (
    BackboneLoadError,
    VLMBackbone,
    check_loading_info,
    pack_prompts_and_answers,
    read_checkpoint_config,
)
from affordvla.backbones.cogvlm.configuration import CogVLMConfig, EVA2CLIPConfig
from affordvla.backbones.cogvlm.processing import CogVLMProcessor, format_prompt

LANGUAGE_TOKEN_TYPE = 0
VISION_TOKEN_TYPE = 1
PADDING_TOKEN_TYPE = -1  # only inside build_position_ids

# ================================================================================================================
# Vision: EVA2-CLIP and the GLU adapter
# ================================================================================================================


class PatchEmbedding(nn.Module):
    """EVA2-CLIP's patch embedding: a strided convolution, a prepended CLS token and learned positions."""

    def __init__(self, vision: EVA2CLIPConfig):
        super().__init__()
        self.image_size = vision.image_size
        self.proj = nn.Conv2d(vision.in_channels, vision.hidden_size, kernel_size=vision.patch_size,
                              stride=vision.patch_size)
        self.cls_embedding = nn.Parameter(torch.zeros(1, vision.hidden_size))
        assert vision.num_positions is not None  # EVA2CLIPConfig derives it when not given
        self.position_embedding = nn.Embedding(vision.num_positions, vision.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"CogVLM's vision tower takes {self.image_size}x{self.image_size} images (its position "
                             f"table is fixed), got {tuple(pixel_values.shape[-2:])}")
        patches = self.proj(pixel_values).flatten(2).transpose(1, 2)  # (B, patches, D), row-major
        cls = self.cls_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class EVA2CLIPAttention(nn.Module):
    """EVA2-CLIP's self-attention with one fused query/key/value projection."""

    def __init__(self, vision: EVA2CLIPConfig):
        super().__init__()
        self.num_heads = vision.num_heads
        self.query_key_value = nn.Linear(vision.hidden_size, 3 * vision.hidden_size)
        self.dense = nn.Linear(vision.hidden_size, vision.hidden_size)
        self.output_dropout = nn.Dropout(vision.dropout_prob)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        batch, length, width = hidden.shape
        # the fused projection is laid out [q | k | v], each split into heads
        qkv = self.query_key_value(hidden).view(batch, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        context = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # every patch sees every patch
        return self.output_dropout(self.dense(context.transpose(1, 2).reshape(batch, length, width)))


class EVA2CLIPMLP(nn.Module):
    """EVA2-CLIP's two-layer feed-forward block."""

    def __init__(self, vision: EVA2CLIPConfig):
        super().__init__()
        self.fc1 = nn.Linear(vision.hidden_size, vision.intermediate_size)
        self.act = ACT2FN[vision.hidden_act]
        self.fc2 = nn.Linear(vision.intermediate_size, vision.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden)))


class EVA2CLIPLayer(GradientCheckpointingLayer):
    """One EVA2-CLIP block (attention, then MLP), each sublayer's output normalised before the residual add."""

    def __init__(self, vision: EVA2CLIPConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(vision.hidden_size, eps=vision.layer_norm_eps)
        self.attention = EVA2CLIPAttention(vision)
        self.mlp = EVA2CLIPMLP(vision)
        self.post_attention_layernorm = nn.LayerNorm(vision.hidden_size, eps=vision.layer_norm_eps)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # EVA2-CLIP normalises what each sublayer returns, not what it reads
        hidden = hidden + self.input_layernorm(self.attention(hidden))
        return hidden + self.post_attention_layernorm(self.mlp(hidden))


class EVA2CLIPTransformer(nn.Module):
    """The stack of EVA2-CLIP blocks."""

    def __init__(self, vision: EVA2CLIPConfig):
        super().__init__()
        self.layers = nn.ModuleList([EVA2CLIPLayer(vision) for _ in range(vision.num_hidden_layers)])

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            hidden = layer(hidden)
        return hidden


class GLUAdapter(nn.Module):
    """Vision width -> language width: a projection, LayerNorm + GELU, then a SiLU-gated MLP (no biases)."""

    def __init__(self, config: CogVLMConfig, in_features: int):
        super().__init__()
        self.linear_proj = nn.Linear(in_features, config.hidden_size, bias=False)
        self.norm1 = nn.LayerNorm(config.hidden_size)
        self.act1 = nn.GELU()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        hidden = self.act1(self.norm1(self.linear_proj(features)))
        return self.dense_4h_to_h(F.silu(self.gate_proj(hidden)) * self.dense_h_to_4h(hidden))


class EVA2CLIPModel(nn.Module):
    """Pixels (B, 3, S, S) -> the image run the language model reads: (B, patches + 2, hidden) = boi, patches, eoi."""

    def __init__(self, config: CogVLMConfig):
        super().__init__()
        vision = config.vision
        self.patch_embedding = PatchEmbedding(vision)
        self.transformer = EVA2CLIPTransformer(vision)
        self.linear_proj = GLUAdapter(config, in_features=vision.hidden_size)
        self.boi = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.eoi = nn.Parameter(torch.zeros(1, 1, config.hidden_size))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.transformer(self.patch_embedding(pixel_values))
        patches = self.linear_proj(hidden[:, 1:])  # the CLS position only served the transformer
        batch = patches.shape[0]
        return torch.cat([self.boi.expand(batch, -1, -1), patches, self.eoi.expand(batch, -1, -1)], dim=1)


# ================================================================================================================
# Token routing and positions
# ================================================================================================================


def vision_expert_mask(token_type_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: positions that use the vision experts, i.e. an image token followed by another one (boi and
    the patches; eoi, the last of the run, goes to the language experts)."""
    is_vision = token_type_ids == VISION_TOKEN_TYPE
    mask = torch.zeros_like(is_vision)
    mask[:, :-1] = is_vision[:, :-1] & is_vision[:, 1:]
    return mask


def build_position_ids(token_type_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Rotary positions as the original computes them: every language token advances the position by one, the
    first and last token of an image run (boi, eoi) count as language, and the patches between them all share
    the position right after boi. Padding does not advance (so after left padding the first real token is at 1).

    [BOS, boi, p, p, ..., p, eoi, t, t] -> [0, 1, 2, 2, ..., 2, 3, 4, 5]
    """
    types = token_type_ids.clone()
    if attention_mask is not None:
        types[attention_mask == 0] = PADDING_TOKEN_TYPE
    is_vision = types == VISION_TOKEN_TYPE
    is_language = types == LANGUAGE_TOKEN_TYPE
    # a sequence edge counts as a language neighbour; padding does not
    language_before = F.pad(is_language[:, :-1], (1, 0), value=True)
    language_after = F.pad(is_language[:, 1:], (0, 1), value=True)
    run_edge = is_vision & (language_before | language_after)
    as_language = is_language | run_edge
    inner_vision = is_vision & ~run_edge
    after_language = F.pad(as_language[:, :-1], (1, 0), value=False)
    advances = as_language | (inner_vision & after_language)
    advances[:, 0] = False
    return advances.long().cumsum(dim=-1)


def causal_attention_mask(attention_mask: torch.Tensor, query_length: int) -> torch.Tensor:
    """(B, 1, Lq, Lk) bool, True where a query may attend: earlier or same positions that are not padding. The
    queries are the last `query_length` positions of the `attention_mask` (B, Lk) (the others are cached)."""
    key_length = attention_mask.shape[1]
    keys = torch.arange(key_length, device=attention_mask.device)
    queries = keys[key_length - query_length :]
    causal = keys[None, :] <= queries[:, None]
    allowed = causal[None] & attention_mask.bool()[:, None, :]
    # a padding query would see no key at all (NaN in softmax); it sees itself instead, and nothing reads it
    return (allowed | (keys[None, :] == queries[:, None])[None])[:, None]


@dataclass
class ExpertRouting:
    """Flat (batch * length) indices of the positions each expert computes, found once per forward so that the
    layers gather and scatter without searching the mask again (each search is a host sync on a GPU)."""

    vision: torch.Tensor
    language: torch.Tensor

    @classmethod
    def from_token_types(cls, token_type_ids: torch.Tensor) -> ExpertRouting:
        to_vision = vision_expert_mask(token_type_ids).flatten()
        return cls(vision=to_vision.nonzero().squeeze(1), language=(~to_vision).nonzero().squeeze(1))


def run_experts(hidden: torch.Tensor, routing: ExpertRouting, vision_expert: nn.Module,
                language_expert: nn.Module) -> torch.Tensor:
    """Each position through its own expert (only the positions routed to it are computed)."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    language_out = language_expert(flat.index_select(0, routing.language))
    out = language_out.new_empty(flat.shape[0], language_out.shape[-1]).index_copy(0, routing.language, language_out)
    if routing.vision.numel():
        vision_out = vision_expert(flat.index_select(0, routing.vision)).to(out.dtype)
        out = out.index_copy(0, routing.vision, vision_out)
    return out.view(*hidden.shape[:-1], -1)


# ================================================================================================================
# Language: a LLaMA decoder with visual experts
# ================================================================================================================


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, computed in float32 and cast back (LLaMA's)."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        as_float = hidden.float()
        normed = as_float * torch.rsqrt(as_float.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * normed).to(hidden.dtype)


class RotaryEmbedding(nn.Module):
    """GPT-NeoX layout (the two halves of each head rotate together). `inv_freq` is saved with the weights, as
    in the official checkpoints."""

    inv_freq: torch.Tensor  # a registered buffer

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        self.head_dim = head_dim
        self.base = base
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=True)

    def compute_inv_freq(self) -> torch.Tensor:
        return 1.0 / (self.base ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape (B, 1, L, head_dim), broadcast over heads."""
        angles = position_ids[..., None].float() * self.inv_freq.float()
        angles = torch.cat([angles, angles], dim=-1)[:, None]
        return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


class SwiGLUMLP(nn.Module):
    """LLaMA's gated feed-forward block: down(act(gate(x)) * up(x))."""

    def __init__(self, config: CogVLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(hidden)) * self.up_proj(hidden))


class VisionExpertMLP(nn.Module):
    """CogVLM's feed-forward with a visual expert: image tokens go through one MLP, text tokens another."""

    def __init__(self, config: CogVLMConfig):
        super().__init__()
        self.language_mlp = SwiGLUMLP(config)
        self.vision_mlp = SwiGLUMLP(config)

    def forward(self, hidden: torch.Tensor, routing: ExpertRouting) -> torch.Tensor:
        return run_experts(hidden, routing, self.vision_mlp, self.language_mlp)


class VisionExpertAttention(nn.Module):
    """CogVLM's attention with visual-expert projections: image and text tokens have their own query/key/value
    and output weights, and attend to each other in one rotary-position attention."""

    def __init__(self, config: CogVLMConfig):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.rotary_emb = RotaryEmbedding(self.head_dim)
        self.vision_expert_query_key_value = nn.Linear(self.hidden_size, 3 * self.hidden_size, bias=False)
        self.vision_expert_dense = nn.Linear(self.hidden_size, self.hidden_size, bias=False)
        self.language_expert_query_key_value = nn.Linear(self.hidden_size, 3 * self.hidden_size, bias=False)
        self.language_expert_dense = nn.Linear(self.hidden_size, self.hidden_size, bias=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:2], self.num_heads, self.head_dim).transpose(1, 2)  # (B, heads, L, head_dim)

    def forward(self, hidden: torch.Tensor, routing: ExpertRouting, position_ids: torch.Tensor,
                attention_mask: torch.Tensor, past_key_value: tuple[torch.Tensor, torch.Tensor] | None = None,
                use_cache: bool = False):
        batch, length, _ = hidden.shape
        qkv = run_experts(hidden, routing, self.vision_expert_query_key_value, self.language_expert_query_key_value)
        query, key, value = (self._heads(part) for part in qkv.split(self.hidden_size, dim=-1))
        cos, sin = self.rotary_emb(position_ids, query.dtype)
        query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
        if past_key_value is not None:
            key = torch.cat([past_key_value[0], key], dim=2)
            value = torch.cat([past_key_value[1], value], dim=2)
        context = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
        context = context.transpose(1, 2).reshape(batch, length, self.hidden_size)
        out = run_experts(context, routing, self.vision_expert_dense, self.language_expert_dense)
        return out, ((key, value) if use_cache else None)


class CogVLMDecoderLayer(GradientCheckpointingLayer):
    """One CogVLM decoder block: pre-norm visual-expert attention and MLP with residuals."""

    def __init__(self, config: CogVLMConfig):
        super().__init__()
        self.self_attn = VisionExpertAttention(config)
        self.mlp = VisionExpertMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden: torch.Tensor, routing: ExpertRouting, position_ids: torch.Tensor,
                attention_mask: torch.Tensor, past_key_value: tuple[torch.Tensor, torch.Tensor] | None = None,
                use_cache: bool = False):
        attended, present = self.self_attn(self.input_layernorm(hidden), routing, position_ids, attention_mask,
                                           past_key_value=past_key_value, use_cache=use_cache)
        hidden = hidden + attended
        hidden = hidden + self.mlp(self.post_attention_layernorm(hidden), routing)
        return hidden, present


class CogVLMPreTrainedModel(PreTrainedModel):
    """Shared `PreTrainedModel` settings of the CogVLM classes: config class, weight init, checkpointing units."""

    config_class = CogVLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["CogVLMDecoderLayer", "EVA2CLIPLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, PatchEmbedding):
            init.normal_(module.cls_embedding, mean=0.0, std=std)
        elif isinstance(module, EVA2CLIPModel):
            init.normal_(module.boi, mean=0.0, std=std)
            init.normal_(module.eoi, mean=0.0, std=std)
        elif isinstance(module, RotaryEmbedding):
            init.copy_(module.inv_freq, module.compute_inv_freq())


class CogVLMModel(CogVLMPreTrainedModel):
    """CogVLM without its LM head: token embeddings, the EVA2-CLIP tower and the visual-expert decoder."""

    def __init__(self, config: CogVLMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([CogVLMDecoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.vision = EVA2CLIPModel(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:  # type: ignore[override]  # embeddings only
        self.embed_tokens = value

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor,
              pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with each row's image run (boi, patches, eoi) put at its image-typed positions."""
        embeds = self.embed_tokens(input_ids)
        is_vision = token_type_ids == VISION_TOKEN_TYPE
        if pixel_values is None:
            if is_vision.any():
                raise ValueError("token_type_ids mark image positions but no pixel_values were given")
            return embeds
        per_row = is_vision.sum(dim=1)
        expected = self.config.vision_token_count
        if pixel_values.shape[0] != input_ids.shape[0] or bool((per_row != expected).any()):
            raise ValueError(f"each row takes one image and {expected} image-typed tokens; got {pixel_values.shape[0]} "
                             f"images for {input_ids.shape[0]} rows with {per_row.tolist()} image tokens")
        features = self.vision(pixel_values.to(self.vision.boi.dtype))
        return embeds.masked_scatter(is_vision[..., None], features.to(embeds.dtype))

    def decode(self, inputs_embeds: torch.Tensor, token_type_ids: torch.Tensor, attention_mask: torch.Tensor,
               position_ids: torch.Tensor, past_key_values: list | None = None,
               use_cache: bool = False) -> BaseModelOutputWithPast:
        """The decoder over `inputs_embeds` (the new positions only when `past_key_values` holds the others);
        `attention_mask` covers past and new positions."""
        routing = ExpertRouting.from_token_types(token_type_ids)
        mask = causal_attention_mask(attention_mask, inputs_embeds.shape[1])
        hidden = inputs_embeds
        presents = []
        for index, layer in enumerate(self.layers):
            past = past_key_values[index] if past_key_values is not None else None
            hidden, present = layer(hidden, routing, position_ids, mask, past_key_value=past, use_cache=use_cache)
            presents.append(present)
        # past_key_values: the name transformers still accepts (renamed to the dataclass field `cache`)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden),  # type: ignore[call-arg]
                                       past_key_values=presents if use_cache else None)

    def forward(self, input_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: list | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool = False) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        given = input_ids if input_ids is not None else inputs_embeds
        assert given is not None  # exactly one of the two, checked above
        shape, device = given.shape[:2], given.device
        if token_type_ids is None:
            token_type_ids = torch.full(shape, LANGUAGE_TOKEN_TYPE, dtype=torch.long, device=device)
        past_length = past_key_values[0][0].shape[2] if past_key_values is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(shape[0], past_length + shape[1], dtype=torch.long, device=device)
        if position_ids is None:
            if past_key_values is not None:
                raise ValueError("with past_key_values, give the new tokens' position_ids (the image run shares "
                                 "positions, so they cannot be counted from the cache length)")
            position_ids = build_position_ids(token_type_ids, attention_mask)
        if inputs_embeds is None:
            assert input_ids is not None  # exactly one of the two, checked above
            inputs_embeds = self.embed(input_ids, token_type_ids, pixel_values)
        return self.decode(inputs_embeds, token_type_ids, attention_mask, position_ids, past_key_values, use_cache)


class CogVLMForCausalLM(CogVLMPreTrainedModel):
    """CogVLM with its LM head, under the official parameter names, loaded with `from_pretrained`."""

    def __init__(self, config: CogVLMConfig):
        super().__init__(config)
        self.model = CogVLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:  # type: ignore[override]  # embeddings only
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(self, input_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: list | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool = False,
                logits_to_keep: int = 0) -> CausalLMOutputWithPast:
        """`logits_to_keep` > 0 computes logits for the last that many positions only."""
        out = self.model(input_ids=input_ids, pixel_values=pixel_values, token_type_ids=token_type_ids,
                         attention_mask=attention_mask, position_ids=position_ids, past_key_values=past_key_values,
                         inputs_embeds=inputs_embeds, use_cache=use_cache)
        hidden = out.last_hidden_state
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        return CausalLMOutputWithPast(logits=logits, past_key_values=out.past_key_values)  # type: ignore[call-arg]


# ================================================================================================================
# The backbone
# ================================================================================================================


COGVLM_PARTS: dict[str, tuple[str, ...]] = {
    "vision_tower": ("model.vision.patch_embedding.", "model.vision.transformer."),
    "projector": ("model.vision.linear_proj.", "model.vision.boi", "model.vision.eoi"),
    "language_model": ("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head."),
}
COGVLM_LORA_TARGETS: dict[str, list[str]] = {
    # both experts: the vision expert is how the language model reads the image
    "language_model": ["language_expert_query_key_value", "language_expert_dense", "vision_expert_query_key_value",
                       "vision_expert_dense", "gate_proj", "up_proj", "down_proj"],
    "vision_tower": ["query_key_value", "dense", "fc1", "fc2"],
}


def read_cogvlm_config(path: str | Path) -> CogVLMConfig:
    """The checkpoint's config, with clear errors for another family. The official config.json names no
    model_type (its class was remote code), so `CogVLMForCausalLM` in `architectures` identifies it too."""
    config_file = Path(path) / "config.json"
    raw = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if raw.get("model_type") or "CogVLMForCausalLM" not in raw.get("architectures", []):
        read_checkpoint_config(path, "cogvlm")
    if "num_multi_query_heads" in raw:
        raise BackboneLoadError(f"{config_file} is a CogVLM2 checkpoint (grouped-query attention, LLaMA-3); this "
                                "backbone loads CogVLM v1")
    if not isinstance(raw.get("vision_config"), dict):
        raise BackboneLoadError(f"{config_file} has no vision_config: not a CogVLM checkpoint")
    try:
        return CogVLMConfig.from_pretrained(path)
    except ValueError as error:
        raise BackboneLoadError(f"{config_file}: {error}") from None


def weights_file(path: Path) -> Path:
    for name in ("model.safetensors.index.json", "model.safetensors"):
        if (path / name).is_file():
            return path / name
    raise BackboneLoadError(f"{path} has no model.safetensors or model.safetensors.index.json")


class CogVLMBackbone(VLMBackbone):
    """The CogVLM family behind VLMBackbone: the native model, its processor and its chat template."""

    family = "cogvlm"
    decoder_layer_names = ("CogVLMDecoderLayer",)
    vision_layer_names = ("EVA2CLIPLayer",)
    part_prefixes = COGVLM_PARTS
    lora_targets = COGVLM_LORA_TARGETS

    def __init__(self, model: CogVLMForCausalLM, processor: CogVLMProcessor, source: str,
                 template_version: str | None = None):
        super().__init__(model, processor, source)
        if template_version is not None:
            format_prompt("", template_version)  # fails early on an unknown one
            model.config.template_version = template_version  # saved with the weights, so an export keeps it
        self.template_version = model.config.template_version

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str | torch.dtype = "float32", tokenizer: str | None = None,
                        template_version: str | None = None, **kwargs) -> CogVLMBackbone:
        """A local CogVLM v1 directory (config.json + safetensors, sharded or not). `tokenizer` is a local
        tokenizer directory for checkpoints without one (the official ones use lmsys/vicuna-7b-v1.5's).
        `template_version` ("chat", "vqa", "base") overrides the prompt layout the checkpoint's config names."""
        path = Path(path)
        config = read_cogvlm_config(path)
        weights = weights_file(path)
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        # mismatches are reported below with the other problems, naming the file, rather than raised deep inside
        # (with output_loading_info the call returns (model, info), which its annotation leaves out)
        model, info = cast(Any, CogVLMForCausalLM.from_pretrained(path, config=config, dtype=dtype,
                                                                  output_loading_info=True,
                                                                  ignore_mismatched_sizes=True, **kwargs))
        check_loading_info(info, weights, f"CogVLM layout of {path / 'config.json'}")
        processor = CogVLMProcessor.from_pretrained(path, config, tokenizer)
        return cls(model.eval(), processor, str(path), template_version=template_version)

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def image_seq_length(self) -> int:
        """Language-model positions one image takes: boi, the patches, eoi."""
        return self.model.config.vision_token_count

    @property
    def image_size(self) -> int:
        return self.model.config.vision.image_size

    def preprocess_images(self, images: list[np.ndarray]) -> torch.Tensor:
        return self.processor.preprocess(images)

    def build_inputs(self, prompts: list[str], answers: list[str] | None = None) -> dict[str, torch.Tensor]:
        """`[BOS] + image placeholders (pad ids, token type 1) + template(prompt)`, then ` answer</s>`: the layout
        of the original `build_conversation_input_ids`, with the answer as the model generates it."""
        tok = self.tokenizer
        image_run = [tok.pad_token_id] * self.image_seq_length
        prefixes = [[tok.bos_token_id] + image_run
                    + tok(format_prompt(p, self.template_version), add_special_tokens=False)["input_ids"]
                    for p in prompts]
        suffixes = ([tok(" " + a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for a in answers]
                    if answers is not None else [[] for _ in prompts])
        packed = pack_prompts_and_answers(prefixes, suffixes, tok.pad_token_id)
        attention_mask = packed["attention_mask"]
        # the image run starts right after each row's BOS, the first attended column
        first = attention_mask.argmax(dim=1, keepdim=True) + 1
        columns = torch.arange(attention_mask.shape[1])[None]
        token_type_ids = ((columns >= first) & (columns < first + self.image_seq_length)).long()
        out = {"input_ids": packed["input_ids"], "attention_mask": attention_mask, "token_type_ids": token_type_ids,
               "position_ids": build_position_ids(token_type_ids, attention_mask)}
        if answers is not None:
            out["labels"] = packed["labels"]
        return out

    def forward(self, pixel_values: torch.Tensor, inputs: dict[str, torch.Tensor], logits_to_keep: int = 0):
        return self.model(input_ids=inputs["input_ids"], pixel_values=pixel_values,
                          token_type_ids=inputs["token_type_ids"], attention_mask=inputs["attention_mask"],
                          position_ids=inputs["position_ids"], logits_to_keep=logits_to_keep)

    # --- embedding level --------------------------------------------------------------------------------------
    # Learnable tokens appended after the prompt are language tokens (token type 0, language experts) whose
    # positions continue after the prompt's: the base class's `append_positions` already builds exactly that.
    def embed_inputs(self, pixel_values: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.model.embed(inputs["input_ids"], inputs["token_type_ids"], pixel_values)

    def hidden_states(self, inputs_embeds: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.model.decode(inputs_embeds, inputs["token_type_ids"], inputs["attention_mask"],
                                       inputs["position_ids"]).last_hidden_state

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden)

    # --- generation -------------------------------------------------------------------------------------------
    def vision_patch_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        vision = self.model.model.vision
        hidden = vision.transformer(vision.patch_embedding(pixel_values.to(self.model.dtype)))
        return hidden[:, 1:]  # what the GLU adapter reads (EVA2CLIPModel.forward)

    @torch.no_grad()
    def generate(self, pixel_values: torch.Tensor, prompts: list[str], max_new_tokens: int, **kwargs) -> list[str]:
        """Greedy decoding with a key/value cache; each answer ends at the first EOS. `logits_processor` (a list of
        transformers LogitsProcessors, e.g. the head's answer grammar) filters each step's scores, which it sees
        with the prompt and the tokens generated so far, as in transformers' `generate`."""
        processors = kwargs.pop("logits_processor", None) or []
        if kwargs:
            raise TypeError(f"CogVLM's greedy generate takes no options but logits_processor, got {sorted(kwargs)}")
        device = pixel_values.device
        inputs = {k: v.to(device) for k, v in self.build_inputs(prompts).items()}
        attention_mask, position_ids = inputs["attention_mask"], inputs["position_ids"]
        eos = self.tokenizer.eos_token_id
        out = self.model(input_ids=inputs["input_ids"], pixel_values=pixel_values,
                         token_type_ids=inputs["token_type_ids"], attention_mask=attention_mask,
                         position_ids=position_ids, use_cache=True, logits_to_keep=1)
        new_tokens: list[torch.Tensor] = []
        sequence = inputs["input_ids"]  # prompt + generated ids, for the processors
        finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            if step:  # feed the last token: language-typed, attended, one position after the previous one
                attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
                position_ids = position_ids[:, -1:] + 1
                last = new_tokens[-1][:, None]
                out = self.model(input_ids=last, token_type_ids=torch.zeros_like(last),
                                 attention_mask=attention_mask, position_ids=position_ids,
                                 past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)
            scores = out.logits[:, -1]
            for processor in processors:
                scores = processor(sequence, scores)
            token = scores.argmax(dim=-1)
            if processors:
                sequence = torch.cat([sequence, token[:, None]], dim=1)
            new_tokens.append(token)
            finished |= token == eos
            if bool(finished.all()):
                break
        rows = torch.stack(new_tokens, dim=1).tolist() if new_tokens else [[] for _ in prompts]
        texts = []
        for row in rows:
            row = row[: row.index(eos)] if eos in row else row
            texts.append(self.tokenizer.decode(row, skip_special_tokens=False).strip())
        return texts

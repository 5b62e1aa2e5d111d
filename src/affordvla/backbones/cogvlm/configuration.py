"""CogVLM v1 configuration, laid out like the official config.json (THUDM/cogvlm-chat-hf).

The official file keeps `vision_config` as a plain dict (EVA2-CLIP-E settings) beside the LLaMA-style decoder
settings; so does this class, so a config written here reads like the official one and the official one loads
here unchanged. `CogVLMConfig.vision` gives the same dict as typed fields.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from transformers import PretrainedConfig

TEMPLATE_VERSIONS = ("chat", "vqa", "base")


@dataclass(frozen=True)
class EVA2CLIPConfig:
    """The vision tower's settings; defaults are EVA2-CLIP-E at 490 px as in cogvlm-chat-hf."""

    image_size: int = 490
    patch_size: int = 14
    hidden_size: int = 1792
    num_hidden_layers: int = 63
    num_heads: int = 16
    intermediate_size: int = 15360
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    in_channels: int = 3
    dropout_prob: float = 0.0
    num_positions: int | None = None  # patches + 1 (the CLS position); derived when not given

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"vision image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.num_positions is None:
            object.__setattr__(self, "num_positions", self.num_patches + 1)
        if self.num_positions != self.num_patches + 1:
            raise ValueError(f"vision num_positions {self.num_positions} must be patches + 1 = {self.num_patches + 1} "
                             f"for image_size {self.image_size} and patch_size {self.patch_size}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_dict(cls, values: dict) -> EVA2CLIPConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


class CogVLMConfig(PretrainedConfig):
    """CogVLM's config.json: the LLaMA-style decoder's sizes and token ids, with the EVA2-CLIP tower's settings kept
    as a plain dict under `vision_config`, as the official file keeps them."""

    model_type = "cogvlm"

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 4096,
        intermediate_size: int = 11008,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        hidden_act: str = "silu",
        max_position_embeddings: int = 2048,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-5,
        template_version: str = "chat",
        vision_config: dict | None = None,
        pad_token_id: int = 0,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        tie_word_embeddings: bool = False,
        use_cache: bool = True,
        **kwargs,
    ):
        if template_version not in TEMPLATE_VERSIONS:
            raise ValueError(f"template_version must be one of {TEMPLATE_VERSIONS}, got {template_version!r}")
        if hidden_size % num_attention_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_attention_heads {num_attention_heads}")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.template_version = template_version
        self.vision_config = asdict(EVA2CLIPConfig.from_dict(vision_config or {}))
        self.use_cache = use_cache
        # the official checkpoints name the remote code here; nothing of it is used, so an export must not point at it
        kwargs.pop("auto_map", None)
        # PreTrainedConfig takes the token ids through **kwargs, which its annotated signature leaves out
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id,  # type: ignore[call-arg]
                         eos_token_id=eos_token_id, tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def vision(self) -> EVA2CLIPConfig:
        return EVA2CLIPConfig.from_dict(self.vision_config)

    @property
    def vision_token_count(self) -> int:
        """Language-model positions one image takes: boi, one per patch, eoi."""
        return self.vision.num_patches + 2


def cogvlm_chat_config(**overrides) -> CogVLMConfig:
    """THUDM/cogvlm-chat-hf: Vicuna-7B-v1.5 decoder with visual experts, EVA2-CLIP-E at 490 px, chat template."""
    return CogVLMConfig(**{"template_version": "chat", "architectures": ["CogVLMForCausalLM"], **overrides})


def cogvlm_base490_config(**overrides) -> CogVLMConfig:
    """THUDM/cogvlm-base-490-hf: the same architecture, pre-trained only, prompted with the raw text."""
    return CogVLMConfig(**{"template_version": "base", "architectures": ["CogVLMForCausalLM"], **overrides})

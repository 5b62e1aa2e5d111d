"""Write offline tiny random-weight checkpoints for every model KALIE's synthesis stage uses.

Each writer produces a real checkpoint directory (config, safetensors weights, tokenizer and processor files built
locally) in the layout of the public checkpoint it stands in for, so the stage loads it with the same
`from_pretrained` code as real weights:

| writer | stands in for | loaded by |
|---|---|---|
| `write_tiny_grounding_dino` | IDEA-Research/grounding-dino-tiny (Swin + BERT) | `AutoModelForZeroShotObjectDetection`, `AutoProcessor` |
| `write_tiny_sam` | facebook/sam-vit-huge | `SamModel`, `SamProcessor` |
| `write_tiny_dpt` | a DPT depth model (Intel/dpt-large layout; dpt-hybrid-midas loads alike) | `AutoModelForDepthEstimation`, `AutoImageProcessor` |
| `write_tiny_stable_diffusion` | an SD1.5 base (model_index.json + unet/ vae/ text_encoder/ tokenizer/ scheduler/) | `StableDiffusionControlNetInpaintPipeline.from_pretrained` |
| `write_tiny_controlnet` | lllyasviel/control_v11p_sd15_* | `ControlNetModel.from_pretrained` |

The weights are random: the models run and are deterministic, but what they find or paint means nothing. They are
sized (0.05-0.5 M parameters each, 5 MB on disk in all) so a 64-128 px inpainting call takes a fraction of a
second on CPU.

`affordvla.synthesis.checkpoints` is how the model-backed parts load such a directory (tiny or real).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE, WordPiece
from tokenizers.trainers import BpeTrainer, WordPieceTrainer

from affordvla.offline.tokenizer_corpus import tokenizer_corpus
from affordvla.synthesis.inpaint import ControlNetInpaintBackend
from affordvla.synthesis.masks import GroundedSamMasks

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
BERT_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
CLIP_MAX_LENGTH = 77  # SD1.5's text encoder context

# Words the synthesis stage feeds the text encoders (object names, KALIE's prompt suffix and negative prompt, the
# appearance words an LLM or a template writes), on top of the project's common corpus.
_SYNTHESIS_TEXT = (
    "top down view, highres, best quality, photorealistic. deformed, animal, human, eyes, skin, mouth, human face, "
    "2d, cartoon. wooden plastic metal metallic glass ceramic fabric cotton rubber paper leather striped dotted "
    "shiny matte transparent dark light bright pale orange purple pink brown grey gray silver golden beige navy "
    "open drawer usb stick computer scooper with small items in it bowl brush trash cloth towel rack laptop"
)


def _corpus() -> list[str]:
    return tokenizer_corpus() + [_SYNTHESIS_TEXT]


# ----------------------------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------------------------


def build_bert_tokenizer(vocab_size: int = 600):
    """An uncased BERT WordPiece tokenizer (GroundingDINO's text side) trained on the project's corpus."""
    from transformers import BertTokenizer

    trainer_tokenizer = Tokenizer(WordPiece(unk_token="[UNK]"))
    trainer_tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    trainer_tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = WordPieceTrainer(vocab_size=vocab_size, special_tokens=BERT_SPECIAL, show_progress=False)
    trainer_tokenizer.train_from_iterator(_corpus(), trainer)
    vocab = json.loads(trainer_tokenizer.to_str())["model"]["vocab"]
    return BertTokenizer(vocab=vocab, do_lower_case=True)


def build_clip_tokenizer(vocab_size: int = 1000):
    """A CLIP-style byte-level BPE tokenizer ('</w>' ends a word) with SD1.5's 77-token context."""
    from transformers import CLIPTokenizer

    # Train with CLIPTokenizer's own normaliser and pre-tokeniser so the merges fit how it splits text.
    template = CLIPTokenizer(vocab={CLIP_BOS: 0, CLIP_EOS: 1}, merges=[])
    backend = template.backend_tokenizer
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    backend.model = BPE(unk_token=CLIP_EOS, end_of_word_suffix="</w>", continuing_subword_prefix="")
    trainer = BpeTrainer(vocab_size=vocab_size, special_tokens=[CLIP_BOS, CLIP_EOS], initial_alphabet=alphabet,
                         end_of_word_suffix="</w>", show_progress=False)
    backend.train_from_iterator(_corpus(), trainer)
    state = json.loads(backend.to_str())["model"]
    vocab: dict[str, int] = dict(state["vocab"])
    for char in sorted(alphabet):  # like CLIP's vocabulary: every byte also as a whole one-byte word
        vocab.setdefault(char + "</w>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    tokenizer.model_max_length = CLIP_MAX_LENGTH
    return tokenizer


# ----------------------------------------------------------------------------------------------------------------
# GroundingDINO, SAM, DPT (transformers)
# ----------------------------------------------------------------------------------------------------------------


def write_tiny_grounding_dino(out_dir: str | Path, *, seed: int = 0, image_size: int = 128) -> Path:
    """GroundingDINO (Swin backbone, BERT text encoder, deformable encoder/decoder; 0.46 M parameters, most in
    the 256-position text embeddings and heads) plus its processor (image processor + the local BERT tokenizer).
    `image_size` is the processor's resize (800-1333 for the real model)."""
    from transformers import (
        BertConfig,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessorPil,
        GroundingDinoProcessor,
        SwinConfig,
    )

    out_dir = Path(out_dir)
    tokenizer = build_bert_tokenizer()
    backbone = SwinConfig(image_size=image_size, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1],
                          num_heads=[1, 1, 2, 2], window_size=4, out_indices=[2, 3, 4])
    text = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id)
    config = GroundingDinoConfig(backbone_config=backbone, text_config=text, d_model=32, num_queries=16,
                                 encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                 encoder_attention_heads=2, decoder_attention_heads=2, encoder_n_points=2,
                                 decoder_n_points=2, num_feature_levels=4)
    torch.manual_seed(seed)
    model = GroundingDinoForObjectDetection(config).eval()
    image_processor = GroundingDinoImageProcessorPil(
        size={"shortest_edge": image_size, "longest_edge": image_size}, image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD)
    processor = GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def write_tiny_sam(out_dir: str | Path, *, seed: int = 0, image_size: int = 128) -> Path:
    """SAM (ViT image encoder, prompt encoder, two-way mask decoder) shrunk to a few layers of width 32, with the
    processor resizing the longest edge to `image_size` (1024 for the real model) and low-res masks at 1/4."""
    from transformers import (
        SamConfig,
        SamImageProcessorPil,
        SamMaskDecoderConfig,
        SamModel,
        SamProcessor,
        SamPromptEncoderConfig,
        SamVisionConfig,
    )

    out_dir = Path(out_dir)
    patch = 16
    vision = SamVisionConfig(hidden_size=32, output_channels=32, num_hidden_layers=2, num_attention_heads=2,
                             image_size=image_size, patch_size=patch, window_size=4, global_attn_indexes=[1],
                             mlp_dim=64, num_pos_feats=16, initializer_range=0.02)
    prompt = SamPromptEncoderConfig(hidden_size=32, image_size=image_size, patch_size=patch, mask_input_channels=4)
    decoder = SamMaskDecoderConfig(hidden_size=32, mlp_dim=64, num_hidden_layers=2, num_attention_heads=2,
                                   iou_head_hidden_dim=32)
    config = SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)
    torch.manual_seed(seed)
    model = SamModel(config).eval()
    low_res = image_size // 4  # SAM's mask decoder upsamples the patch grid 4x
    image_processor = SamImageProcessorPil(
        size={"longest_edge": image_size}, pad_size={"height": image_size, "width": image_size},
        mask_size={"longest_edge": low_res}, mask_pad_size={"height": low_res, "width": low_res},
        image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    processor = SamProcessor(image_processor=image_processor)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def write_tiny_dpt(out_dir: str | Path, *, seed: int = 0, image_size: int = 64) -> Path:
    """A DPT depth estimator (ViT + reassemble/fusion neck + depth head), the kind of model ControlNet's depth
    annotator runs (MiDaS DPT-hybrid), with its image processor."""
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessorPil

    out_dir = Path(out_dir)
    config = DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                       image_size=image_size, patch_size=8, backbone_out_indices=[0, 1, 2, 3],
                       neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16, head_in_index=-1,
                       reassemble_factors=[4, 2, 1, 0.5])
    torch.manual_seed(seed)
    model = DPTForDepthEstimation(config).eval()
    image_processor = DPTImageProcessorPil(size={"height": image_size, "width": image_size}, keep_aspect_ratio=False,
                                           image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    image_processor.save_pretrained(out_dir)
    return out_dir


# ----------------------------------------------------------------------------------------------------------------
# Stable Diffusion 1.5 + ControlNet (diffusers)
# ----------------------------------------------------------------------------------------------------------------

# The tiny UNet and ControlNet share these so the ControlNet's residuals fit the UNet's blocks, as SD1.5's do.
_TINY_BLOCKS = {"block_out_channels": (16, 32), "layers_per_block": 1, "cross_attention_dim": 32,
                "attention_head_dim": 4, "norm_num_groups": 8,
                "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D")}


def write_tiny_stable_diffusion(out_dir: str | Path, *, seed: int = 0, unet_in_channels: int = 4) -> Path:
    """An SD1.5-layout pipeline directory (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/;
    no safety checker). `unet_in_channels` 4 is a base model (inpainting by latent blending, as KALIE's webui
    does with an SD1.5 model); 9 is an inpainting UNet (latents + mask + masked-image latents)."""
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    out_dir = Path(out_dir)
    tokenizer = build_clip_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=unet_in_channels, out_channels=4,
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), **_TINY_BLOCKS)
    # Four blocks, like SD's VAE, so latents are 1/8 of the image: a 64-px crop denoises on an 8x8 grid.
    vae = AutoencoderKL(block_out_channels=(8, 16, 32, 32), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=8, sample_size=64)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=CLIP_MAX_LENGTH, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)).eval()
    # SD1.5's noise schedule (scaled-linear betas 0.00085..0.012), in the sampler KALIE uses (DPM++ 2M).
    scheduler = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                            num_train_timesteps=1000, steps_offset=1, algorithm_type="dpmsolver++",
                                            solver_order=2)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out_dir)
    return out_dir


def write_tiny_controlnet(out_dir: str | Path, *, seed: int = 1) -> Path:
    """A ControlNet matching `write_tiny_stable_diffusion`'s UNet (one config.json + safetensors, like
    lllyasviel/control_v11p_sd15_softedge)."""
    from diffusers import ControlNetModel

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    # four conditioning stages (three stride-2) bring the hint to latent size, 1/8, as in SD1.5 ControlNets
    controlnet = ControlNetModel(in_channels=4, conditioning_embedding_out_channels=(8, 8, 16, 16), **_TINY_BLOCKS)
    out_dir.mkdir(parents=True, exist_ok=True)
    controlnet.save_pretrained(out_dir)
    return out_dir


# ----------------------------------------------------------------------------------------------------------------
# All at once
# ----------------------------------------------------------------------------------------------------------------

TINY_MODELS = {
    "grounding_dino": write_tiny_grounding_dino,
    "sam": write_tiny_sam,
    "dpt": write_tiny_dpt,
    "stable_diffusion": write_tiny_stable_diffusion,
    "controlnet": write_tiny_controlnet,
}


def ensure_tiny_models(root: str | Path, names: list[str] | None = None) -> dict[str, Path]:
    """Write each tiny checkpoint under `root/<name>` unless a complete one is already there; return the paths.

    A directory counts as complete once its `.complete` marker exists, written after `save_pretrained` returns,
    so an interrupted write is rebuilt rather than loaded half-written."""
    root = Path(root)
    paths = {}
    for name in names or list(TINY_MODELS):
        if name not in TINY_MODELS:
            raise KeyError(f"unknown tiny model {name!r}; choose from {sorted(TINY_MODELS)}")
        path = root / name
        if not (path / ".complete").exists():
            TINY_MODELS[name](path)
            (path / ".complete").write_text("ok\n")
        paths[name] = path
    return paths


# ----------------------------------------------------------------------------------------------------------------
# The stage's model-backed parts on the tiny checkpoints
# ----------------------------------------------------------------------------------------------------------------


def tiny_grounded_sam(root: str | Path, **options) -> GroundedSamMasks:
    """The provider on the project's tiny offline GroundingDINO and SAM under `root` (written on first use).
    Random weights: what it finds is arbitrary; for plumbing tests and timings."""
    paths = ensure_tiny_models(root, ["grounding_dino", "sam"])
    return GroundedSamMasks(paths["grounding_dino"], paths["sam"], **options)


def tiny_backend(root: str | Path, *, working_size: int = 64, **options) -> ControlNetInpaintBackend:
    """The backend on the project's tiny offline SD + ControlNet checkpoints under `root` (written on first use):
    the real pipeline and parameters, random weights, a small working size; for tests and benchmarks."""
    paths = ensure_tiny_models(root, ["stable_diffusion", "controlnet"])
    return ControlNetInpaintBackend(paths["stable_diffusion"], paths["controlnet"], working_size=working_size,
                                    **options)

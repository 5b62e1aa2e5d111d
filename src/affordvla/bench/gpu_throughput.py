"""Tokens per second and model-FLOPs utilisation (MFU) of one LoRA training step at real model sizes.

Each family is built at a real size (PaliGemma-3B at 224 px, LLaVA-1.5-7B at 336 px, CogVLM-17B at 490 px) with
random weights, directly on the GPU in bf16: nothing is downloaded, and a step costs the same whatever the weights
hold. The prompts are tokenised by the family's tiny tokenizer (its ids lie inside every real vocabulary), with
KALIE's five keypoints as the answer in the family's own format, so the sequence is what fine-tuning sees. LoRA
(rank 8) adapts the language model; tower and projector are frozen, as in `backbone.lora` by default.

Model FLOPs of one step, per sequence of T positions with P image patches and A answer positions (the ones that
get logits):
- vision tower and projector, forward only (frozen, and nothing upstream of them needs a gradient):
  2 x their weights per patch, plus attention scores 4 x layers x P^2 x width;
- language model, forward and the backward pass for input gradients (frozen weights need no weight gradient):
  4 x the weights a position uses (embeddings excluded; CogVLM uses one of its two expert sets per position),
  plus attention scores 12 x layers x T^2 x width (forward 4, backward 8);
- LM head on the A positions: 4 x its weights each; the adapters, which are trained: 6 x their weights per position.
The first decoder layer reads the embeddings, which need no gradient, so autograd skips its query/key/value input
gradients: the count is that much high (1/(2 x layers) of those projections' share, well under 1% at real depth).
MFU is those FLOPs per second over the GPU's dense bf16 peak. `tests/test_gpu_throughput.py` checks the count
against torch's FLOP counter on a shrunken configuration on CPU.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from affordvla.backbones.base import IGNORE_INDEX
from affordvla.pretraining.pointing import NATIVE_CODECS, tiny_writer

log = logging.getLogger(__name__)
FAMILIES = ("paligemma", "llava", "cogvlm")
LORA = {"rank": 8, "alpha": 16, "dropout": 0.0}
# dense bf16 tensor-core peak (no sparsity), FLOP/s; AFFORDVLA_PEAK_TFLOPS overrides for other GPUs
PEAK_BF16 = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "L40S": 362.05e12}
PROMPT = "Sweep the trash off the table with the brush."


def real_size_config(family: str, image_token_id: int, **shrink):
    """The family's real-size configuration; `shrink` overrides sizes (the CPU test builds a small one)."""
    if family == "paligemma":  # paligemma-3b-pt-224: SigLIP So400m/14 + Gemma 2B
        from transformers import GemmaConfig, PaliGemmaConfig, SiglipVisionConfig

        size = {"image_size": 224, "patch_size": 14, "vision_hidden": 1152, "vision_intermediate": 4304,
                "vision_layers": 27, "vision_heads": 16, "hidden": 2048, "intermediate": 16384, "layers": 18,
                "heads": 8, "kv_heads": 1, "head_dim": 256, "vocab": 257216, **shrink}
        vision = SiglipVisionConfig(hidden_size=size["vision_hidden"], intermediate_size=size["vision_intermediate"],
                                    num_hidden_layers=size["vision_layers"], num_attention_heads=size["vision_heads"],
                                    image_size=size["image_size"], patch_size=size["patch_size"],
                                    projection_dim=size["hidden"], vision_use_head=False)
        text = GemmaConfig(vocab_size=size["vocab"], hidden_size=size["hidden"],
                           intermediate_size=size["intermediate"], num_hidden_layers=size["layers"],
                           num_attention_heads=size["heads"], num_key_value_heads=size["kv_heads"],
                           head_dim=size["head_dim"])
        return PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                               projection_dim=size["hidden"], hidden_size=size["hidden"])
    if family == "llava":  # llava-1.5-7b: CLIP ViT-L/14 at 336 px + Vicuna-7B
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

        size = {"image_size": 336, "patch_size": 14, "vision_hidden": 1024, "vision_intermediate": 4096,
                "vision_layers": 24, "vision_heads": 16, "hidden": 4096, "intermediate": 11008, "layers": 32,
                "heads": 32, "vocab": 32064, **shrink}
        vision = CLIPVisionConfig(hidden_size=size["vision_hidden"], intermediate_size=size["vision_intermediate"],
                                  num_hidden_layers=size["vision_layers"], num_attention_heads=size["vision_heads"],
                                  image_size=size["image_size"], patch_size=size["patch_size"])
        text = LlamaConfig(vocab_size=size["vocab"], hidden_size=size["hidden"],
                           intermediate_size=size["intermediate"], num_hidden_layers=size["layers"],
                           num_attention_heads=size["heads"], num_key_value_heads=size["heads"])
        return LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token_id,
                           projector_hidden_act="gelu", vision_feature_layer=-2,
                           vision_feature_select_strategy="default",
                           image_seq_length=(size["image_size"] // size["patch_size"]) ** 2)
    if family == "cogvlm":  # cogvlm-chat-hf: EVA2-CLIP-E at 490 px + a Vicuna-7B with vision experts
        from affordvla.backbones.cogvlm.configuration import CogVLMConfig

        size = {"image_size": 490, "patch_size": 14, "vision_hidden": 1792, "vision_intermediate": 15360,
                "vision_layers": 63, "vision_heads": 16, "hidden": 4096, "intermediate": 11008, "layers": 32,
                "heads": 32, "vocab": 32000, **shrink}
        vision = {"image_size": size["image_size"], "patch_size": size["patch_size"],
                  "hidden_size": size["vision_hidden"], "intermediate_size": size["vision_intermediate"],
                  "num_hidden_layers": size["vision_layers"], "num_heads": size["vision_heads"]}
        return CogVLMConfig(vocab_size=size["vocab"], hidden_size=size["hidden"],
                            intermediate_size=size["intermediate"], num_hidden_layers=size["layers"],
                            num_attention_heads=size["heads"], vision_config=vision)
    raise ValueError(f"unknown family {family!r}; valid: {FAMILIES}")


def real_size_backbone(family: str, device: str, dtype: torch.dtype, work: Path, **shrink):
    """A randomly initialised real-size backbone on `device`, with the tiny checkpoint's processor."""
    from affordvla.backbones.factory import FAMILIES as BACKBONES

    tiny = BACKBONES[family].from_pretrained(tiny_writer(family)(work / f"{family}-tiny", image_size=32,
                                                                 patch_size=8, hidden_size=32, vision_layers=1,
                                                                 text_layers=1, intermediate_size=64))
    image_token_id = tiny.tokenizer.convert_tokens_to_ids("<image>") if family != "cogvlm" else None
    config = real_size_config(family, image_token_id, **shrink)
    model_class = type(tiny.model)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = model_class(config)
    finally:
        torch.set_default_dtype(default_dtype)
    if family == "paligemma":  # the processor writes this many <image> tokens per prompt
        vision = config.vision_config
        tiny.processor.image_seq_length = (vision.image_size // vision.patch_size) ** 2
    backbone = BACKBONES[family](model, tiny.processor, f"random {family} at real size")
    backbone.train()
    return backbone


@dataclass
class StepShape:
    """The sizes one training step works on, for counting its matrix-product FLOPs."""

    batch: int
    positions: int  # T: every position of a (padded) sequence
    patches: int  # P: image patches the tower sees per image
    answer: int  # A: positions that get logits


def _matmul_weights(backbone) -> dict[str, int]:
    """Weights of the linear and convolution layers (the matrix products) per part; LoRA's own apart, the LM head
    apart, and CogVLM's vision experts left out of the language model (a position uses one expert set)."""
    from torch import nn

    totals = {"patch_embedding": 0, "vision_tower": 0, "projector": 0, "language_model": 0, "lm_head": 0,
              "adapters": 0}
    for name, module in backbone.model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        weights = module.weight.numel()
        if backbone.family == "cogvlm" and ("vision_expert" in name or "vision_mlp" in name):
            continue  # the same size as the language expert (and its adapters), which the count keeps
        if isinstance(module, nn.Conv2d):  # the patch embedding: once per patch
            totals["patch_embedding"] += weights
        elif "lora_" in name:
            totals["adapters"] += weights
        elif name == "lm_head":
            totals["lm_head"] += weights
        else:
            part = next(p for p, prefixes in backbone.part_prefixes.items() if f"{name}.".startswith(prefixes))
            totals[part] += weights
    return totals


def lora_step_flops(backbone, shape: StepShape) -> float:
    """Model FLOPs of one LoRA step (module docstring), from the configuration and the layers' weights."""
    config = backbone.model.config
    text = config.get_text_config()
    width = text.num_attention_heads * (getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)
    vision = config.vision if backbone.family == "cogvlm" else config.vision_config
    tower_positions = shape.patches + (0 if backbone.family == "paligemma" else 1)  # CLIP's and EVA's CLS
    weights = _matmul_weights(backbone)
    per_sequence = (2 * weights["patch_embedding"] * shape.patches
                    + 2 * weights["vision_tower"] * tower_positions
                    + 4 * vision.num_hidden_layers * tower_positions**2 * vision.hidden_size
                    + 2 * weights["projector"] * shape.patches
                    + 4 * weights["language_model"] * shape.positions
                    + 12 * text.num_hidden_layers * shape.positions**2 * width
                    + 4 * weights["lm_head"] * shape.answer
                    + 6 * weights["adapters"] * shape.positions)
    return float(shape.batch * per_sequence)


def lora_step_inputs(backbone, batch_size: int, device: str, dtype: torch.dtype):
    """Random pixels and a KALIE prompt + five-keypoint answer per row, laid out by the backbone."""
    from affordvla.heads.keypoint_text import KeypointTextHead

    head = KeypointTextHead(codec=NATIVE_CODECS[backbone.family])
    head.bind(backbone)
    keypoints = np.random.default_rng(0).uniform(0.1, 0.9, (batch_size, 5, 2))
    inputs = backbone.build_inputs([PROMPT] * batch_size, [head.codec.encode(k) for k in keypoints])
    size = backbone.image_size
    pixels = torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    return head, pixels, {k: v.to(device) for k, v in inputs.items()}


def measure(family: str, *, batch_size: int, steps: int = 5, warmup: int = 2, device: str = "cuda",
            dtype: torch.dtype = torch.bfloat16, **shrink) -> dict[str, float]:
    """Seconds per LoRA step, tokens/s and model FLOPs of one step for a real-size (or shrunken) family."""
    from affordvla.backbones.finetuning import LoraSettings, apply_lora

    with tempfile.TemporaryDirectory(prefix="affordvla-throughput-") as work:
        backbone = real_size_backbone(family, device, dtype, Path(work), **shrink)
    apply_lora(backbone, LoraSettings(**LORA))
    head, pixels, inputs = lora_step_inputs(backbone, batch_size, device, dtype)
    answer = int((inputs["labels"] != IGNORE_INDEX).sum(dim=1).max()) + 1
    optimizer = torch.optim.AdamW([p for p in backbone.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        out = backbone(pixels, inputs, logits_to_keep=answer)
        head.loss(out.logits, inputs["labels"])["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    synchronize = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        step()
    synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize()
    seconds = (time.perf_counter() - started) / steps
    vision = backbone.model.config.vision if family == "cogvlm" else backbone.model.config.vision_config
    shape = StepShape(batch=batch_size, positions=inputs["input_ids"].shape[1],
                      patches=(vision.image_size // vision.patch_size) ** 2, answer=answer)
    flops = lora_step_flops(backbone, shape)
    return {"step_s": seconds, "tokens_per_s": shape.batch * shape.positions / seconds, "step_flops": flops,
            "flops_per_s": flops / seconds}


def peak_flops(device_name: str) -> float | None:
    if os.environ.get("AFFORDVLA_PEAK_TFLOPS"):
        return float(os.environ["AFFORDVLA_PEAK_TFLOPS"]) * 1e12
    return next((peak for name, peak in PEAK_BF16.items() if name in device_name), None)


def run(families=FAMILIES, batch_sizes: dict[str, int] | None = None) -> dict[str, float]:
    if not torch.cuda.is_available():
        log.info("gpu_throughput: no CUDA device here; tokens/s and MFU are measured on a GPU machine")
        return {}
    batch_sizes = {"paligemma": 8, "llava": 4, "cogvlm": 2, **(batch_sizes or {})}
    name = torch.cuda.get_device_name()
    peak = peak_flops(name)
    if peak is None:
        log.warning("no bf16 peak known for %s (set AFFORDVLA_PEAK_TFLOPS): MFU is left out", name)
    figures = {}
    for family in families:
        result = measure(family, batch_size=batch_sizes[family])
        figures[f"backbone.{family}.lora_tokens_per_s"] = result["tokens_per_s"]
        figures[f"backbone.{family}.lora_step_s"] = result["step_s"]
        if peak is not None:
            figures[f"backbone.{family}.lora_mfu"] = result["flops_per_s"] / peak
        log.info("%s on %s: %s", family, name, result)
        torch.cuda.empty_cache()
    return figures

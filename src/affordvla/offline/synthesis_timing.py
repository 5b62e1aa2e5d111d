"""Timing helpers for the diffusion backend.

- `time_tiny_inpaint`: one `ControlNetInpaintBackend.inpaint` call on the tiny offline checkpoints (the figure the
  synthesis benchmark sets against the rest of the stage).
- `sd15_configs` / `build_sd15_random`: Stable Diffusion 1.5's real-size UNet, ControlNet (v1.1), VAE and CLIP
  text encoder, built from their published configurations with random weights (nothing is downloaded), and
  `time_sd15_inpaint` timing KALIE's generation on them at 512x512, 20 steps: the cost of real weights on a GPU
  without having them. Not for CPU: the UNet alone has 860 M parameters.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from affordvla.synthesis.interfaces import InpaintRequest


def demo_request(size: int = 128, seed: int = 0) -> InpaintRequest:
    """A request on a textured square image with an object-sized inpaint mask in the middle."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:size, :size]
    mask = (np.abs(yy - size / 2) < size / 6) & (np.abs(xx - size / 2) < size / 5)
    context = np.zeros_like(image)
    context[np.abs(yy - size / 2).astype(int) == int(size / 6)] = 255
    return InpaintRequest(image=image, object_mask=mask, affine=np.eye(2, 3), moved_mask=mask, inpaint_mask=mask,
                          context=context, prompt="a red plastic brush, top down view, highres, best quality, "
                          "photorealistic", seed=42)


def time_inpaint_call(backend, request: InpaintRequest, repeats: int = 3) -> dict[str, float]:
    """Median and minimum seconds of `backend.inpaint(request)` over `repeats` calls after one warm-up call."""
    backend.inpaint(request)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        backend.inpaint(request)
        times.append(time.perf_counter() - start)
    return {"median_s": float(np.median(times)), "min_s": float(np.min(times))}


def time_tiny_inpaint(root: str | Path, *, image_size: int = 128, working_size: int = 64, repeats: int = 3,
                      **options) -> dict[str, float]:
    """Load time and per-call time of the diffusion backend on the tiny checkpoints under `root`."""
    from affordvla.offline.tiny_synthesis import tiny_backend

    start = time.perf_counter()
    backend = tiny_backend(root, working_size=working_size, **options)
    load = time.perf_counter() - start
    timing = time_inpaint_call(backend, demo_request(image_size), repeats)
    return {"load_s": load, "inpaint_median_s": timing["median_s"], "inpaint_min_s": timing["min_s"],
            "image_size": image_size, "working_size": working_size, "steps": backend.steps}


# ---------------------------------------------------------------------------------------------- SD1.5 real size

_SD15_BLOCKS = {
    "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2, "cross_attention_dim": 768,
    "attention_head_dim": 8, "norm_num_groups": 32, "norm_eps": 1e-5, "act_fn": "silu",
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1, "in_channels": 4,
}


def sd15_configs() -> dict[str, dict]:
    """The published configurations of SD1.5's UNet, a v1.1 SD1.5 ControlNet, SD1.5's VAE and its CLIP ViT-L/14
    text encoder (keyword arguments of the diffusers / transformers classes)."""
    return {
        "unet": {**_SD15_BLOCKS, "out_channels": 4, "sample_size": 64, "mid_block_scale_factor": 1,
                 "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")},
        "controlnet": {**_SD15_BLOCKS, "conditioning_embedding_out_channels": (16, 32, 96, 256),
                       "controlnet_conditioning_channel_order": "rgb"},
        "vae": {"block_out_channels": (128, 256, 512, 512), "in_channels": 3, "out_channels": 3,
                "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 512,
                "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
                "scaling_factor": 0.18215},
        "text_encoder": {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072,
                         "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77,
                         "hidden_act": "quick_gelu", "projection_dim": 768},
        "scheduler": {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                      "num_train_timesteps": 1000, "steps_offset": 1},
    }


def build_sd15_random(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                      parts: tuple[str, ...] = ("unet", "controlnet", "vae", "text_encoder")) -> dict:
    """SD1.5's parts at real size with random weights, built from `sd15_configs` on `device` in `dtype`
    (device "meta" checks sizes without memory or time). The tokenizer is the project's small local CLIP
    tokenizer: its ids all lie inside the real vocabulary, so the text encoder runs as it would."""
    from diffusers import (
        AutoencoderKL,
        ControlNetModel,
        DPMSolverMultistepScheduler,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from affordvla.offline.tiny_synthesis import build_clip_tokenizer

    configs = sd15_configs()
    builders = {
        "unet": lambda: UNet2DConditionModel(**configs["unet"]),
        "controlnet": lambda: ControlNetModel(**configs["controlnet"]),
        "vae": lambda: AutoencoderKL(**configs["vae"]),
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])),
    }
    out = {}
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in place, in the wanted dtype and on the device
    try:
        with torch.device(device):
            for name in parts:
                out[name] = builders[name]().eval()
    finally:
        torch.set_default_dtype(previous)
    if torch.device(device).type != "meta":
        out["tokenizer"] = build_clip_tokenizer()
        out["scheduler"] = DPMSolverMultistepScheduler(**configs["scheduler"], algorithm_type="dpmsolver++",
                                                       solver_order=2)
    return out


def time_sd15_inpaint(device: str = "cuda", dtype: str = "float16", *, working_size: int = 512, steps: int = 20,
                      repeats: int = 3, image_size: int = 700) -> dict[str, float]:
    """KALIE's generation (DPM++ 2M, 20 steps, CFG 7, strength 0.75, ControlNet) with SD1.5-size random models on
    `device`: seconds per inpainting call including crop, resize and paste-back. Meant for a GPU."""
    from affordvla.synthesis.checkpoints import resolve_dtype
    from affordvla.synthesis.inpaint import ControlNetInpaintBackend

    torch_dtype = resolve_dtype(dtype)
    parts = build_sd15_random(device, torch_dtype)
    backend = ControlNetInpaintBackend.from_components(**parts, device=device, dtype=torch_dtype,
                                                       working_size=working_size, steps=steps)
    timing = time_inpaint_call(backend, demo_request(image_size), repeats)
    return {"inpaint_median_s": timing["median_s"], "inpaint_min_s": timing["min_s"], "working_size": working_size,
            "steps": steps, "device": str(device), "dtype": str(dtype)}

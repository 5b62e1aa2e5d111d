"""KALIE's diffusion inpainting: Stable Diffusion 1.5 + ControlNet, "only masked".

For one object move the backend
1. takes the "only masked" crop: the inpaint mask's bounding box plus 50 px of padding (in a 700-px image, as in
   KALIE; scaled with the image's longer side), widened to a square and kept inside the image;
2. resizes image, mask and context map to the working size (512 for SD1.5; configurable so tiny models run at
   64-128) and runs diffusers' `StableDiffusionControlNetInpaintPipeline` with KALIE's generation parameters:
   DPM++ 2M (`DPMSolverMultistepScheduler`, dpmsolver++, order 2), 20 steps, CFG 7, denoising strength 0.75,
   the request's seed, KALIE's negative prompt, ControlNet weight 1.0 over the whole schedule. The webui's
   "latent nothing" fill is reproduced: the initial latents are zero inside the mask before noise is added;
3. resizes the result back to the crop and pastes it into the full image through a feathered mask.

Paste-back guarantee: the feathered alpha is `mask * clip(2 * blur(mask) - 1, 0, 1)` with a Gaussian blur of
`mask_blur` px (4 px at 700, scaled like the padding). It is zero outside `request.inpaint_mask`, so every pixel
outside the inpaint mask is returned bit-identical; it is one wherever the blur kernel (3 sigma) lies wholly inside
the mask, so the mask's core is fully re-rendered. (The webui's blur also spreads a few px outside the mask; here the
recipe's 10-px dilation of the mask already leaves that room, and the contract says the mask bounds the change.)

ControlNet control modes: "balanced" (default) and "prompt_more_important" (KALIE's depth unit), the latter as
sd-webui-controlnet's soft injection: residual i of n is scaled by 0.825 ** (n - 1 - i), the middle block's by 1.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from affordvla.synthesis.checkpoints import (
    checkpoint_dir,
    load_or_explain,
    resolve_device,
    resolve_dtype,
)
from affordvla.synthesis.interfaces import InpaintRequest

NEGATIVE_PROMPT = "deformed, animal, human, eyes, skin, mouth, human face, 2d, cartoon"
CONTROL_MODES = ("balanced", "prompt_more_important")
LATENT_FILLS = ("nothing", "original")


def scaled_pixels(value: float, image_shape: tuple[int, ...], reference: int | None) -> float:
    """`value` px of a `reference`-px image, in pixels of this image (by the longer side); as is when None."""
    return float(value) if not reference else float(value) * max(image_shape[:2]) / float(reference)


def only_masked_box(mask: np.ndarray, padding: float) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1), end-exclusive: the mask's bounding box grown by `padding` px on every side, then widened
    to a square about its centre and shifted to lie inside the image (clipped only where the image is smaller
    than the square)."""
    height, width = mask.shape
    ys, xs = np.nonzero(mask)
    pad = math.ceil(padding)
    x0, x1 = max(0, int(xs.min()) - pad), min(width, int(xs.max()) + 1 + pad)
    y0, y1 = max(0, int(ys.min()) - pad), min(height, int(ys.max()) + 1 + pad)

    def widen(lo: int, hi: int, side: int, limit: int) -> tuple[int, int]:
        side = min(side, limit)
        lo = lo - (side - (hi - lo)) // 2
        lo = min(max(0, lo), limit - side)
        return lo, lo + side

    side = max(x1 - x0, y1 - y0)
    x0, x1 = widen(x0, x1, side, width)
    y0, y1 = widen(y0, y1, side, height)
    return x0, y0, x1, y1


def feather(mask: np.ndarray, blur: float) -> np.ndarray:
    """HxW float alpha in [0, 1]: zero outside `mask`, rising over about 2 * `blur` px inside its edge."""
    inside = mask.astype(np.float32)
    if blur < 0.25:
        return inside
    radius = math.ceil(3 * blur)
    blurred = cv2.GaussianBlur(inside, (2 * radius + 1, 2 * radius + 1), blur, borderType=cv2.BORDER_REPLICATE)
    ramp = np.clip(2.0 * blurred - 1.0, 0.0, 1.0)
    ramp[blurred > 1.0 - 1e-5] = 1.0  # the whole kernel inside (up to float rounding of its weights)
    return inside * ramp


def _resize(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Area averaging when shrinking, bicubic when enlarging; `size` is (width, height)."""
    shrinking = size[0] * size[1] < array.shape[0] * array.shape[1]
    return cv2.resize(array, size, interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC)


def _pipeline_class():
    from diffusers import StableDiffusionControlNetInpaintPipeline

    class LatentFillPipeline(StableDiffusionControlNetInpaintPipeline):
        """The diffusers pipeline plus the webui's "latent nothing" fill: while the initial latents are prepared,
        the encoded image is zeroed where `fill_mask` (1x1xSxS, 1 = masked) is set, so the old object does not
        show through the 25% of the image that strength 0.75 keeps."""

        fill_mask: torch.Tensor | None = None
        _preparing_latents = False

        def prepare_latents(self, *args, **kwargs):
            self._preparing_latents = True
            try:
                return super().prepare_latents(*args, **kwargs)
            finally:
                self._preparing_latents = False

        def _encode_vae_image(self, image, generator):
            latents = super()._encode_vae_image(image, generator)
            if self._preparing_latents and self.fill_mask is not None:
                # the pipeline downsamples its mask the same way (nearest), so the two masks agree
                keep = 1.0 - torch.nn.functional.interpolate(self.fill_mask.to(latents), size=latents.shape[-2:])
                latents = latents * keep
            return latents

    return LatentFillPipeline


class ControlNetInpaintBackend:
    """`InpaintBackend` on diffusers: an SD1.5-layout base model directory plus a ControlNet directory.

    `base_model`: a local diffusers pipeline directory (model_index.json, unet/, vae/, text_encoder/, tokenizer/,
    scheduler/), a base UNet (4 input channels, inpainting by latent blending as KALIE's webui does) or an
    inpainting UNet (9). `controlnet`: a local ControlNet directory (config.json + weights) matching the base.
    """

    name = "controlnet_inpaint"

    def __init__(self, base_model: str | Path, controlnet: str | Path, *, device: str | None = "cpu",
                 dtype: str = "float32", working_size: int = 512, steps: int = 20, guidance_scale: float = 7.0,
                 strength: float = 0.75, controlnet_scale: float = 1.0, guidance_start: float = 0.0,
                 guidance_end: float = 1.0, control_mode: str = "balanced", padding: float = 50.0,
                 mask_blur: float = 4.0, reference_size: int | None = 700, negative_prompt: str = NEGATIVE_PROMPT,
                 latent_fill: str = "nothing"):
        from diffusers import ControlNetModel

        _check_options(control_mode, latent_fill)  # before minutes of loading
        self.base_model = checkpoint_dir(base_model, "Stable Diffusion base model",
                                         ("model_index.json", "unet/config.json", "vae/config.json",
                                          "text_encoder/config.json", "scheduler/scheduler_config.json"))
        self.controlnet_path = checkpoint_dir(controlnet, "ControlNet")
        dtype = resolve_dtype(dtype)
        with warnings.catch_warnings():  # newer diffusers rename torch_dtype to dtype; older ones know only this
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            controlnet_model = load_or_explain("ControlNet", self.controlnet_path, ControlNetModel.from_pretrained,
                                               torch_dtype=dtype)
            pipeline = load_or_explain(
                "Stable Diffusion base model", self.base_model, _pipeline_class().from_pretrained,
                controlnet=controlnet_model, safety_checker=None, feature_extractor=None,
                requires_safety_checker=False, torch_dtype=dtype)
        self._configure(pipeline, device=device, dtype=dtype, working_size=working_size, steps=steps,
                        guidance_scale=guidance_scale, strength=strength, controlnet_scale=controlnet_scale,
                        guidance_start=guidance_start, guidance_end=guidance_end, control_mode=control_mode,
                        padding=padding, mask_blur=mask_blur, reference_size=reference_size,
                        negative_prompt=negative_prompt, latent_fill=latent_fill)

    @classmethod
    def from_components(cls, *, vae, text_encoder, tokenizer, unet, controlnet, scheduler,
                        **options) -> ControlNetInpaintBackend:
        """The backend on models already in memory (e.g. randomly initialised real-size ones for a timing);
        `options` are the constructor's keyword options."""
        backend = cls.__new__(cls)
        backend.base_model = backend.controlnet_path = "(in memory)"
        pipeline = _pipeline_class()(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                     controlnet=controlnet, scheduler=scheduler, safety_checker=None,
                                     feature_extractor=None, requires_safety_checker=False)
        backend._configure(pipeline, **options)
        return backend

    def _configure(self, pipeline, *, device: str | None = "cpu", dtype: str | torch.dtype = "float32",
                   working_size: int = 512, steps: int = 20, guidance_scale: float = 7.0, strength: float = 0.75,
                   controlnet_scale: float = 1.0, guidance_start: float = 0.0, guidance_end: float = 1.0,
                   control_mode: str = "balanced", padding: float = 50.0, mask_blur: float = 4.0,
                   reference_size: int | None = 700, negative_prompt: str = NEGATIVE_PROMPT,
                   latent_fill: str = "nothing") -> None:
        from diffusers import DPMSolverMultistepScheduler

        _check_options(control_mode, latent_fill)
        self.device, self.dtype = resolve_device(device), resolve_dtype(dtype)
        self.working_size, self.steps = int(working_size), int(steps)
        self.guidance_scale, self.strength = float(guidance_scale), float(strength)
        self.controlnet_scale, self.guidance_start, self.guidance_end = (float(controlnet_scale),
                                                                         float(guidance_start), float(guidance_end))
        self.control_mode, self.latent_fill = control_mode, latent_fill
        self.padding, self.mask_blur, self.reference_size = float(padding), float(mask_blur), reference_size
        self.negative_prompt = negative_prompt
        if self.working_size % pipeline.vae_scale_factor:
            raise ValueError(f"working_size {self.working_size} is not a multiple of the VAE's downsampling factor "
                             f"{pipeline.vae_scale_factor}")
        # KALIE's sampler, DPM++ 2M, on the base model's own noise schedule
        pipeline.scheduler = DPMSolverMultistepScheduler.from_config(
            pipeline.scheduler.config, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=False)
        if pipeline.unet.dtype != self.dtype:
            pipeline.to(dtype=self.dtype)
        pipeline.to(self.device)
        pipeline.set_progress_bar_config(disable=True)
        if control_mode == "prompt_more_important":
            pipeline.controlnet.register_forward_hook(_soft_injection)
        self.pipeline = pipeline

    # -- InpaintBackend ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def inpaint(self, request: InpaintRequest) -> np.ndarray:
        image, mask = _check_request(request)
        if not mask.any():
            return image.copy()
        x0, y0, x1, y1 = only_masked_box(mask, scaled_pixels(self.padding, image.shape, self.reference_size))
        crop_size = (x1 - x0, y1 - y0)
        work = (self.working_size, self.working_size)
        crop_image = _resize(image[y0:y1, x0:x1], work)
        crop_context = _resize(np.ascontiguousarray(request.context[y0:y1, x0:x1]), work)
        crop_mask = _resize(mask[y0:y1, x0:x1].astype(np.float32), work) >= 0.5
        if not crop_mask.any():  # a sliver that vanished in the resize: keep the pixel that carried it
            cy, cx = np.argwhere(mask[y0:y1, x0:x1])[0]
            crop_mask[int(cy * work[1] / crop_size[1]), int(cx * work[0] / crop_size[0])] = True

        pipe = self.pipeline
        fill = torch.from_numpy(crop_mask.astype(np.float32))[None, None]
        pipe.fill_mask = fill if self.latent_fill == "nothing" else None
        try:
            generator = torch.Generator(device="cpu").manual_seed(int(request.seed))  # same noise on any device
            result = pipe(
                prompt=request.prompt, negative_prompt=self.negative_prompt,
                image=Image.fromarray(crop_image), mask_image=Image.fromarray(crop_mask.astype(np.uint8) * 255),
                control_image=Image.fromarray(crop_context), height=self.working_size, width=self.working_size,
                strength=self.strength, num_inference_steps=self.steps, guidance_scale=self.guidance_scale,
                controlnet_conditioning_scale=self.controlnet_scale, control_guidance_start=self.guidance_start,
                control_guidance_end=self.guidance_end, generator=generator, output_type="np").images[0]
        finally:
            pipe.fill_mask = None
        generated = np.clip(np.rint(result * 255.0), 0, 255).astype(np.uint8)
        generated = _resize(generated, crop_size)

        blur = scaled_pixels(self.mask_blur, image.shape, self.reference_size)
        alpha = feather(mask[y0:y1, x0:x1], blur)[:, :, None]
        out = image.copy()
        region = out[y0:y1, x0:x1]
        blended = np.rint(alpha * generated + (1.0 - alpha) * region).astype(np.uint8)
        out[y0:y1, x0:x1] = np.where(alpha > 0, blended, region)
        return out

    def describe(self) -> dict:
        unet = self.pipeline.unet.config
        return {
            "backend": self.name,
            "pipeline": "diffusers StableDiffusionControlNetInpaintPipeline",
            "base_model": str(self.base_model), "controlnet": str(self.controlnet_path),
            "unet_in_channels": int(unet.in_channels),
            "sampler": "DPM++ 2M (DPMSolverMultistepScheduler, dpmsolver++, order 2)",
            "steps": self.steps, "guidance_scale": self.guidance_scale, "strength": self.strength,
            "controlnet_scale": self.controlnet_scale, "guidance_start": self.guidance_start,
            "guidance_end": self.guidance_end, "control_mode": self.control_mode,
            "working_size": self.working_size, "padding": self.padding, "mask_blur": self.mask_blur,
            "reference_size": self.reference_size, "negative_prompt": self.negative_prompt,
            "latent_fill": self.latent_fill if unet.in_channels == 4 else "original (inpainting UNet)",
            "paste_back": "feathered inside the inpaint mask; pixels outside it unchanged",
            "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
        }


def _soft_injection(module, args, output):
    """Forward hook on the ControlNet: sd-webui-controlnet's "My prompt is more important" weights."""
    tuple_output = isinstance(output, tuple)
    down, mid = output if tuple_output else (output.down_block_res_samples, output.mid_block_res_sample)
    n = len(down) + 1
    down = tuple(d * (0.825 ** float(n - 1 - i)) for i, d in enumerate(down))
    if tuple_output:
        return down, mid
    output.down_block_res_samples = down
    return output


def _check_options(control_mode: str, latent_fill: str) -> None:
    if control_mode not in CONTROL_MODES:
        raise ValueError(f"control_mode must be one of {CONTROL_MODES}, got {control_mode!r}")
    if latent_fill not in LATENT_FILLS:
        raise ValueError(f"latent_fill must be one of {LATENT_FILLS}, got {latent_fill!r}")


def _check_request(request: InpaintRequest) -> tuple[np.ndarray, np.ndarray]:
    image, mask, context = request.image, request.inpaint_mask, request.context
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"InpaintRequest.image must be HxWx3 uint8, got shape {image.shape} dtype {image.dtype}")
    if mask.shape != image.shape[:2]:
        raise ValueError(f"InpaintRequest.inpaint_mask has shape {mask.shape}, the image {image.shape[:2]}")
    if context.shape != image.shape or context.dtype != np.uint8:
        raise ValueError(f"InpaintRequest.context must be HxWx3 uint8 like the image {image.shape}, got shape "
                         f"{context.shape} dtype {context.dtype}")
    return np.ascontiguousarray(image), mask.astype(bool)

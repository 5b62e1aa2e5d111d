"""Build a backbone from config: load a local checkpoint, building the offline tiny variant first if asked."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from affordvla.backbones.base import BackboneLoadError, VLMBackbone
from affordvla.backbones.cogvlm.modeling import CogVLMBackbone
from affordvla.backbones.finetuning import (
    LoraSettings,
    apply_lora,
    enable_gradient_checkpointing,
    load_adapter,
    quantization_kwargs,
)
from affordvla.backbones.llava.modeling import LlavaBackbone
from affordvla.backbones.paligemma.modeling import PaliGemmaBackbone
from affordvla.locking import exclusive

log = logging.getLogger(__name__)

FAMILIES: dict[str, type[VLMBackbone]] = {"paligemma": PaliGemmaBackbone, "llava": LlavaBackbone,
                                          "cogvlm": CogVLMBackbone}


def load_backbone(family: str, pretrained: str, build: Callable[[Path], Path] | None = None,
                  dtype: str = "float32", lora: dict | None = None, adapter: str | None = None,
                  gradient_checkpointing: bool = False, quantization: str | None = None,
                  keypoint_codec: str | None = None, **kwargs) -> VLMBackbone:
    """`pretrained` is a local checkpoint directory. When it does not exist and `build` is given (offline tiny
    variants), `build(pretrained)` writes it first; later runs reuse it.

    Fine-tuning controls: `lora` (LoraSettings fields) injects adapters, `adapter` loads an exported unmerged
    adapter on top of the base, `gradient_checkpointing` trades compute for memory, `quantization` ("4bit" /
    "8bit") loads the weights through bitsandbytes on a GPU. `keypoint_codec` names the family's own answer format
    for points (the keypoint-text head's default codec); it is configuration, not something the weights hold."""
    if family not in FAMILIES:
        raise ValueError(f"unknown backbone family {family!r}; valid: {sorted(FAMILIES)}")
    path = Path(pretrained)
    if not (path / "config.json").exists():
        if build is None:
            raise BackboneLoadError(
                f"backbone checkpoint {path} does not exist; point backbone.pretrained at a local {family} "
                "checkpoint directory (no model hub is contacted)"
            )
        with exclusive(path):  # parallel jobs of a sweep: one builds, the others wait and load its result
            if not (path / "config.json").exists():
                log.info("building offline %s checkpoint at %s", family, path)
                build(path)
    if lora is not None and adapter is not None:
        raise ValueError("give either backbone.lora (train new adapters) or backbone.adapter (load trained ones)")
    backbone = FAMILIES[family].from_pretrained(path, dtype=dtype, **quantization_kwargs(quantization), **kwargs)
    if adapter is not None:
        load_adapter(backbone, adapter)
    if lora is not None:
        apply_lora(backbone, LoraSettings(**lora))
    if gradient_checkpointing:
        enable_gradient_checkpointing(backbone)
    return backbone

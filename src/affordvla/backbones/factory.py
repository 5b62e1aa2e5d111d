"""Build a backbone from config: load a local checkpoint, building the offline tiny variant first if asked."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from affordvla.backbones.base import BackboneLoadError, VLMBackbone
from affordvla.backbones.llava.modeling import LlavaBackbone
from affordvla.backbones.paligemma.modeling import PaliGemmaBackbone

log = logging.getLogger(__name__)

FAMILIES: dict[str, type[VLMBackbone]] = {"paligemma": PaliGemmaBackbone, "llava": LlavaBackbone}


def load_backbone(family: str, pretrained: str, build: Callable[[Path], Path] | None = None,
                  dtype: str = "float32", **kwargs) -> VLMBackbone:
    """`pretrained` is a local checkpoint directory. When it does not exist and `build` is given (offline tiny
    variants), `build(pretrained)` writes it first; later runs reuse it."""
    if family not in FAMILIES:
        raise ValueError(f"unknown backbone family {family!r}; valid: {sorted(FAMILIES)}")
    path = Path(pretrained)
    if not (path / "config.json").exists():
        if build is None:
            raise BackboneLoadError(
                f"backbone checkpoint {path} does not exist; point backbone.pretrained at a local {family} "
                "checkpoint directory (no model hub is contacted)"
            )
        log.info("building offline %s checkpoint at %s", family, path)
        build(path)
    return FAMILIES[family].from_pretrained(path, dtype=dtype, **kwargs)

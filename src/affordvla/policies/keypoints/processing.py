"""Keypoint samples -> batches: the pixels (cached per image) beside what the head asks for."""

from __future__ import annotations

from typing import Any

import torch

from affordvla.backbones.base import VLMBackbone
from affordvla.formats.sample import KeypointSample
from affordvla.heads.keypoint_head import KeypointHead


class KeypointBatchCollator:
    """Samples -> model inputs: pixel values, the head's inputs and targets (`KeypointHead.batch_inputs`), and
    the samples themselves for the evaluator. Pixel tensors are cached per image (the toy datasets fit in memory,
    and preprocessing is the slowest part of a tiny model's step)."""

    def __init__(self, backbone: VLMBackbone, head: KeypointHead, cache_pixels: bool = True):
        self.backbone = backbone
        self.head = head
        self.cache_pixels = cache_pixels
        self._pixels: dict[tuple[Any, Any, Any], torch.Tensor] = {}  # (source, entry, view)

    def _pixel_values(self, samples: list[KeypointSample]) -> torch.Tensor:
        if not self.cache_pixels:
            return self.backbone.preprocess_images([s.image for s in samples])
        keys = [(s.meta.get("source"), s.meta.get("entry"), s.meta.get("view", "full")) for s in samples]
        # samples that cannot name their image, and randomly augmented ones, are never cached
        if any(None in key or key[2] == "augmented" for key in keys):
            return self.backbone.preprocess_images([s.image for s in samples])
        missing = [i for i, k in enumerate(keys) if k not in self._pixels]
        if missing:
            fresh = self.backbone.preprocess_images([samples[i].image for i in missing])
            for i, tensor in zip(missing, fresh):
                self._pixels[keys[i]] = tensor
        return torch.stack([self._pixels[k] for k in keys])

    def __call__(self, samples: list[KeypointSample]) -> dict[str, Any]:
        return {"pixel_values": self._pixel_values(samples), **self.head.batch_inputs(self.backbone, samples),
                "samples": samples}

"""One synthetic variant of one KALIE entry: objects chained in order, each moved by its own affine
with its keypoints, its mask and its context map, then re-rendered by the inpainting backend.

The recipe only talks to the protocols of `interfaces.py`, so the diffusion backend (inpaint.py) and the offline
compositing backend are interchangeable, as are the mask providers and context annotators.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np

from affordvla.data.kalie import SCALE, KalieEntry, to_kalie_int
from affordvla.formats.kalie_tasks import TASKS
from affordvla.formats.sample import KALIE_POINT_NAMES
from affordvla.synthesis.geometry import (
    AffineRanges,
    compose_context,
    inpaint_mask,
    inside,
    object_region,
    sample_affine,
    scaled_px,
    transform_points,
    warp_image,
    warp_mask,
)
from affordvla.synthesis.interfaces import (
    ContextAnnotator,
    InpaintBackend,
    InpaintRequest,
    MaskProvider,
)

PROMPT_SUFFIX = ", top down view, highres, best quality, photorealistic"  # KALIE's inpainting prompt suffix
TARGET, CARRIED = "Target Point", ("Pre-contact Point", "Post-contact Point")


class PromptSource(Protocol):
    """Appearance descriptions of an object (an LLM client or templates)."""

    def descriptions(self, image: np.ndarray, task: str, object_name: str, n: int) -> list[str]: ...


def describe_part(part: Any) -> Any:
    """What the manifest records about a model part: its own describe() when it has one, else its class."""
    if part is None:
        return None
    if hasattr(part, "describe"):
        return part.describe()
    return {"class": f"{type(part).__module__}.{type(part).__qualname__}", "name": getattr(part, "name", None)}


def derive_seed(*parts: Any) -> int:
    """A 31-bit seed from any parts (stable across processes and platforms, unlike hash())."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


@dataclass
class Variant:
    """One synthesised variant of an entry: the new image, its keypoints, the moved masks and the record of how
    it was made."""

    image: np.ndarray
    points: dict[str, tuple[int, int]]  # 0-1000 ints, KALIE_POINT_NAMES order
    masks: dict[str, np.ndarray]  # the moved silhouettes of the objects that moved
    record: dict[str, Any] = field(default_factory=dict)  # seeds, affines, prompts: for the manifest


class KalieRecipe:
    """KALIE's per-entry synthesis with pluggable models.

    Lengths (`translation_px`, `erode_px`, `dilate_px`, `keypoint_margin_px`) are in KALIE's 700-px units and
    scaled to the image. `keypoint_region` decides which keypoints belong to an object: inside its mask
    (the reference) or inside the mask's convex hull (default: the toy trash pile's centre lies between the
    scraps), in both cases dilated by `keypoint_margin_px`. A Target Point that moves carries the Pre- and
    Post-contact Points with it.
    """

    def __init__(self, backend: InpaintBackend, masks: MaskProvider, annotator: ContextAnnotator | None = None,
                 prompts: PromptSource | None = None, *, num_variants: int = 1, seed: int = 0,
                 affine: AffineRanges | Mapping[str, Any] | None = None, erode_px: float = 5.0,
                 dilate_px: float = 10.0, keypoint_region: str = "hull", keypoint_margin_px: float = 10.0,
                 max_affine_tries: int = 10, prompt_suffix: str = PROMPT_SUFFIX, image_filter: Any = None,
                 filter_attempts: int = 3):
        if num_variants < 0:
            raise ValueError(f"num_variants must be >= 0, got {num_variants}")
        if keypoint_region not in ("mask", "hull"):
            raise ValueError(f"keypoint_region must be 'mask' or 'hull', got {keypoint_region!r}")
        if max_affine_tries < 1:
            raise ValueError(f"max_affine_tries must be >= 1, got {max_affine_tries}")
        if filter_attempts < 1:
            raise ValueError(f"filter_attempts must be >= 1, got {filter_attempts}")
        # KALIE's optional VLM check (`keep(image, task, objects) -> bool`, e.g. prompts.ChatFilter): a rejected
        # variant is drawn again with a derived seed, up to `filter_attempts` times, then left out
        self.image_filter, self.filter_attempts = image_filter, int(filter_attempts)
        self.backend, self.mask_provider, self.annotator, self.prompts = backend, masks, annotator, prompts
        self.num_variants = int(num_variants)
        self.seed = int(seed)
        if affine is None:
            affine = AffineRanges()
        elif not isinstance(affine, AffineRanges):
            affine = dict(affine)
            if "scale" in affine:
                affine["scale"] = tuple(affine["scale"])
            affine = AffineRanges(**affine)
        self.affine = affine
        self.erode_px, self.dilate_px = float(erode_px), float(dilate_px)
        self.keypoint_region, self.keypoint_margin_px = keypoint_region, float(keypoint_margin_px)
        self.max_affine_tries = int(max_affine_tries)
        self.prompt_suffix = prompt_suffix
        self.backend_seconds = 0.0  # time inside backend.inpaint, for the benchmark's share

    def parameters(self) -> dict[str, Any]:
        return {"num_variants": self.num_variants, "seed": self.seed,
                "affine": {**asdict(self.affine), "scale": list(self.affine.scale)},
                "erode_px": self.erode_px, "dilate_px": self.dilate_px, "keypoint_region": self.keypoint_region,
                "keypoint_margin_px": self.keypoint_margin_px, "max_affine_tries": self.max_affine_tries,
                "prompt_suffix": self.prompt_suffix, "length_unit": f"px at {self.affine.reference_size} px",
                "filter_attempts": self.filter_attempts if self.image_filter is not None else None}

    def models(self) -> dict[str, Any]:
        return {"backend": describe_part(self.backend), "masks": describe_part(self.mask_provider),
                "annotator": describe_part(self.annotator), "prompts": describe_part(self.prompts),
                "filter": describe_part(self.image_filter)}

    # ------------------------------------------------------------------------------------------ per entry
    def entry_masks(self, entry: KalieEntry, image: np.ndarray) -> dict[str, np.ndarray]:
        """Each object's silhouette, in `other.objects` order; objects the provider does not find are left out."""
        if hasattr(self.mask_provider, "masks_for_entry"):
            found = self.mask_provider.masks_for_entry(entry, image, list(entry.objects))
        else:
            found = self.mask_provider.masks(image, list(entry.objects))
        out = {}
        for name in entry.objects:
            if name in found:
                mask = np.asarray(found[name], dtype=bool)
                if mask.shape != image.shape[:2]:
                    raise ValueError(f"mask of {name!r} is {mask.shape}, the image {image.shape[:2]}")
                if mask.any():
                    out[name] = mask
        return out

    def descriptions(self, entry: KalieEntry, image: np.ndarray) -> tuple[dict[str, list[str]], bool]:
        """Appearance descriptions per object and whether they are new: cached ones (`other.prompts`, as KALIE
        writes them back) are used first, then the prompt source, else the object's own name."""
        cached = entry.other.get("prompts")
        if isinstance(cached, dict) and all(isinstance(cached.get(o), list) and cached[o] for o in entry.objects):
            return {o: [str(d) for d in cached[o]] for o in entry.objects}, False
        if self.prompts is None:
            return {o: [o] for o in entry.objects}, False
        n = max(1, self.num_variants)
        # KALIE's prompt quotes the instruction; the generated toy data stores the task's name instead
        task = TASKS[entry.task].instruction if entry.task in TASKS else entry.task
        out = {}
        for o in entry.objects:
            found = [str(d) for d in self.prompts.descriptions(image, task, o, n)]
            out[o] = found or [o]
        return out, True

    def keypoint_owners(self, points_px: np.ndarray, masks: Mapping[str, np.ndarray]) -> list[str | None]:
        """The object each keypoint moves with (the first in chain order whose region holds it), or None."""
        owners: list[str | None] = [None] * len(points_px)
        for name, mask in masks.items():
            margin = round(scaled_px(self.keypoint_margin_px, max(mask.shape), self.affine.reference_size))
            hit = inside(object_region(mask, self.keypoint_region, margin), points_px)
            for k in np.nonzero(hit)[0]:
                if owners[k] is None:
                    owners[k] = name
        target = KALIE_POINT_NAMES.index(TARGET)
        if owners[target] is not None:
            for name in CARRIED:
                owners[KALIE_POINT_NAMES.index(name)] = owners[target]
        return owners

    # ------------------------------------------------------------------------------------------ one variant
    def variant(self, image: np.ndarray, points: Mapping[str, Sequence[int]], masks: Mapping[str, np.ndarray],
                descriptions: Mapping[str, Sequence[str]], variant: int, seed: int) -> Variant:
        """Variant number `variant` (which description to use) drawn from `seed`: every object of `masks` in
        order is moved, its keypoints with it, and re-rendered; each object's output is the next one's input."""
        height, width = image.shape[:2]
        size = max(height, width)
        ref = self.affine.reference_size
        erode_kernel = max(1, round(scaled_px(self.erode_px, size, ref)))
        dilate_radius = max(1, round(scaled_px(self.dilate_px, size, ref)))
        points_px = np.array([[points[n][0] / SCALE * width, points[n][1] / SCALE * height]
                              for n in KALIE_POINT_NAMES], dtype=np.float64)
        owners = self.keypoint_owners(points_px, masks)
        moved_px = points_px.copy()
        current = np.asarray(image)
        moved_masks: dict[str, np.ndarray] = {}
        objects: dict[str, Any] = {}
        prompts: list[str] = []
        for j, (name, mask) in enumerate(masks.items()):
            rng = np.random.default_rng([seed, j])
            owned = [k for k, o in enumerate(owners) if o == name]
            # Redraw (a few times) a map that would push one of the object's keypoints out of the image.
            for attempt in range(self.max_affine_tries):  # noqa: B007 - the tries taken are recorded below
                affine, drawn = sample_affine(rng, mask, self.affine)
                new = transform_points(points_px[owned], affine)
                if np.all((new >= 0) & (new <= [width, height])):
                    break
            moved_mask = warp_mask(mask, affine)
            context = self.annotator(current) if self.annotator is not None else np.zeros_like(current)
            context = compose_context(context, warp_image(context, affine), mask, moved_mask, erode_kernel)
            options = descriptions.get(name) or [name]
            prompt = options[variant % len(options)] + self.prompt_suffix
            request_seed = derive_seed(seed, j, "inpaint")
            request = InpaintRequest(image=current, object_mask=mask, affine=affine, moved_mask=moved_mask,
                                     inpaint_mask=inpaint_mask(mask, moved_mask, dilate_radius), context=context,
                                     prompt=prompt, seed=request_seed)
            started = time.perf_counter()
            out = self.backend.inpaint(request)
            self.backend_seconds += time.perf_counter() - started
            out = np.asarray(out)
            if out.shape != current.shape or out.dtype != np.uint8:
                raise ValueError(f"backend {getattr(self.backend, 'name', self.backend)!r} returned "
                                 f"{out.dtype} {out.shape} for a {current.dtype} {current.shape} image")
            current = out
            moved_px[owned] = new
            moved_masks[name] = moved_mask
            prompts.append(prompt)
            objects[name] = {"affine": np.round(affine, 6).tolist(),
                             "drawn": {k: round(v, 6) for k, v in drawn.items()},
                             "tries": attempt + 1, "points": [KALIE_POINT_NAMES[k] for k in owned],
                             "inpaint_seed": request_seed}
        clamped = int(np.sum((moved_px < 0) | (moved_px > [width, height])))
        new_points = {n: (to_kalie_int(moved_px[k, 0] / width), to_kalie_int(moved_px[k, 1] / height))
                      if owners[k] is not None else (int(points[n][0]), int(points[n][1]))
                      for k, n in enumerate(KALIE_POINT_NAMES)}
        record = {"variant": variant, "seed": seed, "objects": objects, "prompt": prompts,
                  "clamped_coordinates": clamped}
        return Variant(current, new_points, moved_masks, record)

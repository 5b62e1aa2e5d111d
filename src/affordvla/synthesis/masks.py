"""Object masks for KALIE's synthesis: GroundingDINO finds each named object's box, SAM cuts its silhouette.

KALIE runs GroundingDINO (SwinT-OGC) once per object with the object name as caption, box threshold
0.3 and text threshold 0.22, keeps the single highest-scoring box, and prompts SAM (vit_h) with that box,
`multimask_output=False`. Here both models run through transformers (`GroundingDinoForObjectDetection`,
`SamModel`) from local checkpoint directories: the project's tiny random-weight ones, or converted real weights
(IDEA-Research/grounding-dino-tiny, facebook/sam-vit-huge layouts).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from affordvla.synthesis.checkpoints import (
    checkpoint_dir,
    load_or_explain,
    resolve_device,
    resolve_dtype,
)


@dataclass
class Detection:
    """One GroundingDINO box for a caption: box, score and the caption words that matched."""

    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in image pixels
    score: float  # the box's best token probability (GroundingDINO's box score)
    phrase: str  # the caption tokens above the text threshold


def grounding_caption(name: str) -> str:
    """GroundingDINO's caption convention: lower case, ending with a period."""
    caption = name.strip().lower()
    return caption if caption.endswith(".") else caption + "."


class GroundedSamMasks:
    """`MaskProvider`: GroundingDINO box per object name, then a SAM mask prompted by that box.

    A name counts as found when some box scores above `box_threshold` and at least one of the name's own tokens
    scores above `text_threshold` for it (GroundingDINO's phrase for the box is then not empty); of those boxes the
    highest-scoring one is kept. A name that is not found, or whose SAM mask comes out empty, is left out of the
    result (the recipe counts a skip); `last_detections` and `last_skipped` tell which and why.
    """

    name = "grounded_sam"

    def __init__(self, detector: str | Path, segmenter: str | Path, *, box_threshold: float = 0.3,
                 text_threshold: float = 0.22, multimask_output: bool = False, device: str | None = "cpu",
                 dtype: str = "float32"):
        from transformers import (
            AutoModelForZeroShotObjectDetection,
            AutoProcessor,
            SamModel,
            SamProcessor,
        )

        self.box_threshold = float(box_threshold)
        self.text_threshold = float(text_threshold)
        self.multimask_output = bool(multimask_output)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        self.detector_path = checkpoint_dir(detector, "GroundingDINO")
        self.segmenter_path = checkpoint_dir(segmenter, "SAM")
        self.detector_processor = load_or_explain("GroundingDINO processor", self.detector_path,
                                                  AutoProcessor.from_pretrained)
        self.detector = load_or_explain("GroundingDINO", self.detector_path,
                                        AutoModelForZeroShotObjectDetection.from_pretrained, dtype=self.dtype)
        self.segmenter_processor = load_or_explain("SAM processor", self.segmenter_path, SamProcessor.from_pretrained)
        self.segmenter = load_or_explain("SAM", self.segmenter_path, SamModel.from_pretrained, dtype=self.dtype)
        self.detector.to(self.device).eval()
        self.segmenter.to(self.device).eval()
        tokenizer = self.detector_processor.tokenizer
        # Tokens that are not part of the name: a phrase made only of these is empty.
        self._not_name_ids = {i for i in (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id,
                                          tokenizer.convert_tokens_to_ids(".")) if i is not None}
        self.last_detections: dict[str, Detection] = {}
        self.last_skipped: dict[str, str] = {}

    # -- GroundingDINO ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def detect(self, image: np.ndarray, name: str) -> Detection | None:
        """The best box for `name` that passes both thresholds, or None."""
        height, width = image.shape[:2]
        inputs = self.detector_processor(images=Image.fromarray(image), text=grounding_caption(name),
                                         return_tensors="pt").to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        outputs = self.detector(**inputs)
        input_ids = inputs["input_ids"][0].cpu()
        probs = outputs.logits[0, :, : len(input_ids)].float().sigmoid().cpu()  # (queries, caption tokens)
        scores = probs.max(dim=-1).values
        name_token = torch.tensor([int(i) not in self._not_name_ids for i in input_ids])
        phrase_tokens = (probs > self.text_threshold) & name_token[None, :]
        candidates = (scores > self.box_threshold) & phrase_tokens.any(dim=-1)
        if not bool(candidates.any()):
            return None
        best = int(torch.where(candidates, scores, torch.full_like(scores, -1.0)).argmax())
        cx, cy, w, h = outputs.pred_boxes[0, best].float().cpu().tolist()  # relative centre/size
        box = (max(0.0, (cx - w / 2) * width), max(0.0, (cy - h / 2) * height),
               min(float(width), (cx + w / 2) * width), min(float(height), (cy + h / 2) * height))
        phrase = self.detector_processor.tokenizer.decode(input_ids[phrase_tokens[best]].tolist())
        return Detection(box=box, score=float(scores[best]), phrase=phrase)

    # -- SAM --------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def segment(self, image: np.ndarray, boxes: list[tuple[float, float, float, float]]) -> list[np.ndarray]:
        """One HxW bool mask per box; the image is encoded once for all of them."""
        if not boxes:
            return []
        inputs = self.segmenter_processor(images=Image.fromarray(image), input_boxes=[[list(b) for b in boxes]],
                                          return_tensors="pt").to(self.device)
        embeddings = self.segmenter.get_image_embeddings(inputs["pixel_values"].to(self.dtype))
        outputs = self.segmenter(image_embeddings=embeddings, input_boxes=inputs["input_boxes"].to(self.dtype),
                                 multimask_output=self.multimask_output)
        masks = self.segmenter_processor.image_processor.post_process_masks(
            outputs.pred_masks.float().cpu(), inputs["original_sizes"].cpu(), inputs["reshaped_input_sizes"].cpu())[0]
        iou = outputs.iou_scores[0].float().cpu()  # (boxes, masks per box)
        return [masks[i, int(iou[i].argmax())].numpy().astype(bool) for i in range(len(boxes))]

    # -- MaskProvider -----------------------------------------------------------------------------------------

    def masks(self, image: np.ndarray, object_names: list[str]) -> dict[str, np.ndarray]:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an HxWx3 uint8 image, got shape {image.shape} dtype {image.dtype}")
        self.last_detections, self.last_skipped = {}, {}
        found = {}
        for name in object_names:
            detection = self.detect(image, name)
            if detection is None:
                self.last_skipped[name] = "no box above the thresholds"
            else:
                found[name] = detection
        result = {}
        for name, mask in zip(found, self.segment(image, [d.box for d in found.values()])):
            if mask.any():
                self.last_detections[name] = found[name]
                result[name] = mask
            else:
                self.last_skipped[name] = "empty SAM mask"
        return result

    def describe(self) -> dict:
        return {"provider": self.name, "detector": str(self.detector_path), "segmenter": str(self.segmenter_path),
                "box_threshold": self.box_threshold, "text_threshold": self.text_threshold,
                "multimask_output": self.multimask_output, "device": str(self.device),
                "dtype": str(self.dtype).removeprefix("torch.")}

"""The decoding record of keypoint-text exports written before policy.json (format version 0): `decoding.json`
beside the model, or the run's resolved config, say how the run decoded and viewed its evaluation images, so such
an export is still scored as its run did."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Beside an exported keypoint-text model: how its run decoded and viewed the evaluation images, so that
# `affordvla-eval keypoints --model <export>` scores it as the run did (flags only override).
DECODING_RECORD = "decoding.json"
# what an evaluation rebuilds the keypoint-text head from (training-only settings such as location_sigma aside)
DECODING_HEAD_KEYS = ("codec", "codec_kwargs", "prompt_style", "constrained", "max_new_tokens")
KEYPOINT_TEXT_HEAD = "affordvla.heads.keypoint_text.KeypointTextHead"


def decoding_settings(head: Mapping[str, Any], prefix_lm: bool | None,
                      eval_centre_crop: float | None) -> dict[str, Any]:
    """The settings of a keypoint-text run that change its evaluation numbers: the head's decoding, the backbone's
    attention mask and the evaluation view. `head` is the run's resolved head config."""
    target = head.get("_target_", KEYPOINT_TEXT_HEAD)
    if target != KEYPOINT_TEXT_HEAD:
        raise ValueError(f"head {target} is not the keypoint-text head: only its answers are decoded as text")
    settings = {key: head[key] for key in DECODING_HEAD_KEYS if key in head}
    return {**settings, "prefix_lm": prefix_lm, "centre_crop": eval_centre_crop}


def run_decoding_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """`decoding_settings` of a run from its resolved config (runs exported before the record existed)."""
    dataset = config.get("dataset") or {}
    crop = dataset.get("eval_centre_crop")
    if crop is None and isinstance(dataset.get("augmentation"), Mapping):  # KALIE's view: the augmentation's crop
        crop = dataset["augmentation"].get("crop_fraction")
    return decoding_settings(config.get("head") or {}, (config.get("backbone") or {}).get("prefix_lm"), crop)


def read_decoding_record(export_dir: str | Path) -> dict[str, Any] | None:
    """The export's recorded decoding settings; None when it records none (an older export, a plain model)."""
    path = Path(export_dir) / DECODING_RECORD
    if not path.is_file():
        return None
    try:
        settings = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); it should hold the run's decoding settings") from None
    known = [*DECODING_HEAD_KEYS, "prefix_lm", "centre_crop"]
    if not isinstance(settings, dict) or set(settings) - set(known):
        found = sorted(settings) if isinstance(settings, dict) else type(settings).__name__
        raise ValueError(f"{path}: expected an object of decoding settings with keys among {known}, got {found}")
    return settings

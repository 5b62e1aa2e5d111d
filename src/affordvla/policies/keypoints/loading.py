"""Reading a keypoint export: policy.json (format 1), or the files of version 0 (decoding.json beside a
keypoint-text model, or a run's config_resolved.yaml beside an export older than that record; keypoint_head.json
and keypoint_head.safetensors beside a regression one). Settings are read first and checked without any weights,
so a wrong flag or record costs nothing; `build` then loads the backbone and the head."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from omegaconf import OmegaConf
from safetensors.torch import load_file

from affordvla.backbones.factory import family_of, load_backbone
from affordvla.policies.base import (
    HEAD_WEIGHTS,
    POLICY_FILE,
    PolicyFormatError,
    read_head_state,
)
from affordvla.policies.keypoints.decoding import (
    DECODING_HEAD_KEYS,
    DECODING_RECORD,
    read_decoding_record,
    run_decoding_settings,
)
from affordvla.policies.keypoints.inference import KeypointPolicy
from affordvla.policies.keypoints.modeling import KeypointPolicyModule, head_class

log = logging.getLogger(__name__)

# version 0 files of the regression head
REGRESSION_WEIGHTS, REGRESSION_CONFIG = "keypoint_head.safetensors", "keypoint_head.json"
RUN_CONFIG = "config_resolved.yaml"  # beside an export written by affordvla-train: <run>/model
# what a caller may override at load: the head's decoding, and how the backbone and the images are set up
OVERRIDABLE = (*DECODING_HEAD_KEYS, "prefix_lm", "centre_crop")


@dataclass
class KeypointSettings:
    """What rebuilds a keypoint policy, without its weights: the head's class and constructor arguments, the
    backbone's load settings and the evaluation view; `source` is the file they were read from."""

    head_class: str
    head: dict[str, Any]
    prefix_lm: bool | None = None
    centre_crop: float | None = None
    dataset_metadata: dict[str, Any] = field(default_factory=dict)
    head_weights: Path | None = None
    source: Path | None = None
    given: list[str] = field(default_factory=list)  # the overridden settings

    @property
    def decoding(self) -> dict[str, Any]:
        """The settings that change what it predicts: the head's decoding, attention mask and view."""
        head = {k: self.head[k] for k in DECODING_HEAD_KEYS if k in self.head and (k != "codec_kwargs" or self.head[k])}
        return {**head, "prefix_lm": self.prefix_lm, "centre_crop": self.centre_crop}


def read_settings(export_dir: str | Path, record: dict[str, Any], overrides: dict[str, Any] | None = None,
                  run_config: dict[str, Any] | None = None) -> KeypointSettings:
    """The settings of the keypoint export in `export_dir` (its `record` as policies.loading reads it), with
    `overrides` that are not None applied. `run_config` (a run's resolved config) stands in for the record of
    a version-0 keypoint-text export that has none."""
    export_dir = Path(export_dir)
    if record.get("format_version") == 0:
        settings = (_regression_v0(export_dir) if (export_dir / REGRESSION_CONFIG).is_file()
                    else _text_v0(export_dir, run_config, overrides))
    else:
        settings = _from_record(export_dir, record)
    return _override(settings, overrides or {})


def build(export_dir: str | Path, settings: KeypointSettings, record: dict[str, Any]) -> KeypointPolicy:
    """The policy the settings describe, with the backbone and head weights of `export_dir`."""
    export_dir = Path(export_dir)
    extra: dict[str, Any] = {} if settings.prefix_lm is None else {"prefix_lm": settings.prefix_lm}
    backbone = load_backbone(family_of(export_dir), str(export_dir), **extra)
    backbone.eval()
    try:
        head = head_class(settings.head_class, str(settings.source or export_dir))(**settings.head)
    except TypeError as exc:  # a setting the head does not take
        raise PolicyFormatError(f"{settings.source or export_dir}: the {settings.head_class} settings "
                                f"{settings.head} do not build it ({exc})") from None
    module = KeypointPolicyModule(backbone, head)
    module.configure_from_metadata(settings.dataset_metadata)
    module.centre_crop = settings.centre_crop
    weights = settings.head_weights
    state = load_file(str(weights)) if weights is not None else read_head_state(export_dir)
    try:
        module.load_head_state(state)
    except PolicyFormatError as exc:
        raise PolicyFormatError(f"{weights or export_dir / HEAD_WEIGHTS}: {exc}") from None
    # the record as version 1 writes it, with the version the export was read as
    full = {**module.policy_record(), "format_version": record.get("format_version"),
            "source": record.get("source", {})}
    return KeypointPolicy(module, full, source=export_dir, decoding=settings.decoding)


def load(export_dir: str | Path, record: dict[str, Any], *, overrides: dict[str, Any] | None = None,
         run_config: dict[str, Any] | None = None) -> KeypointPolicy:
    """`load_policy`'s loader for keypoint exports; `overrides` replace recorded settings (OVERRIDABLE)."""
    return build(export_dir, read_settings(export_dir, record, overrides, run_config), record)


# ------------------------------------------------------------------------------------------------ the formats


def _from_record(export_dir: Path, record: dict[str, Any]) -> KeypointSettings:
    path = export_dir / POLICY_FILE
    head = record.get("head")
    if not isinstance(head, dict) or not isinstance(head.get("settings"), dict):
        raise PolicyFormatError(f"{path}: expected a 'head' object with 'class' and 'settings', got {head!r}")
    head_class(head.get("class"), str(path))
    load_settings = (record.get("backbone") or {}).get("load") or {}
    return KeypointSettings(head["class"], dict(head["settings"]), prefix_lm=load_settings.get("prefix_lm"),
                            centre_crop=head.get("centre_crop"), dataset_metadata=record.get("dataset_metadata") or {},
                            source=path)


def _text_v0(export_dir: Path, run_config: dict[str, Any] | None,
             overrides: dict[str, Any] | None) -> KeypointSettings:
    """decoding.json, else the run's config (given, or beside the export); a model that records neither is
    decoded by the flags alone, which must name the codec."""
    recorded = read_decoding_record(export_dir)
    source: Path | None = export_dir / DECODING_RECORD
    if recorded is None:
        beside = export_dir.parent / RUN_CONFIG
        if run_config is None and beside.is_file():
            run_config, source = cast(dict[str, Any], OmegaConf.to_container(OmegaConf.load(beside))), beside
        if run_config is not None:
            recorded = run_decoding_settings(run_config)
    if recorded is None:
        if (overrides or {}).get("codec") is None:
            raise ValueError(f"{export_dir} records no decoding settings (no {DECODING_RECORD}, no run config beside "
                             "it): pass --codec, and --constrained / --prompt-style / --prefix-lm / --centre-crop "
                             "as its run trained, or evaluate the run with --run-id")
        recorded, source = {}, None
    head = {k: recorded[k] for k in DECODING_HEAD_KEYS if k in recorded}
    return KeypointSettings("KeypointTextHead", head, prefix_lm=recorded.get("prefix_lm"),
                            centre_crop=recorded.get("centre_crop"), dataset_metadata=_metadata_beside(export_dir),
                            source=source)


def _regression_v0(export_dir: Path) -> KeypointSettings:
    path = export_dir / REGRESSION_CONFIG
    try:
        head = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PolicyFormatError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(head, dict):
        raise PolicyFormatError(f"{path}: expected an object of head settings, got {type(head).__name__}")
    weights = export_dir / REGRESSION_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} does not exist: {export_dir} holds no exported regression head")
    view: dict[str, Any] = {}
    beside = export_dir.parent / RUN_CONFIG
    if beside.is_file():  # the run's attention mask and view; its head is not the text head, so none of that
        config = cast(dict[str, Any], OmegaConf.to_container(OmegaConf.load(beside)))
        view = run_decoding_settings({**config, "head": {}})
    return KeypointSettings("KeypointRegressionHead", head, prefix_lm=view.get("prefix_lm"),
                            centre_crop=view.get("centre_crop"), dataset_metadata=_metadata_beside(export_dir),
                            head_weights=weights, source=path)


def _metadata_beside(export_dir: Path) -> dict[str, Any]:
    path = export_dir / "dataset_metadata.json"  # written beside every export by affordvla-train
    try:
        found = json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError as exc:
        raise PolicyFormatError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    return found if isinstance(found, dict) else {}


def _override(settings: KeypointSettings, overrides: dict[str, Any]) -> KeypointSettings:
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(given) - set(OVERRIDABLE))
    if unknown:
        raise ValueError(f"cannot override {unknown} of a keypoint policy; valid: {list(OVERRIDABLE)}")
    head_keys = {k for k in given if k not in ("prefix_lm", "centre_crop")}
    if settings.head_class != "KeypointTextHead" and head_keys - {"prompt_style"}:
        raise ValueError(f"{settings.source}: {settings.head_class} writes no text: {sorted(head_keys)} do not "
                         "apply to it")
    head = dict(settings.head)
    if "codec" in given and "codec_kwargs" not in given:
        head.pop("codec_kwargs", None)  # the recorded codec's own arguments
    head.update({k: given[k] for k in head_keys})
    settings.head = head
    settings.prefix_lm = given.get("prefix_lm", settings.prefix_lm)
    settings.centre_crop = given.get("centre_crop", settings.centre_crop)
    settings.given = sorted(given)
    return settings

"""Build a backbone from config: load a local checkpoint, building the offline tiny variant first if asked."""

from __future__ import annotations

import difflib
import json
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
from affordvla.weight_files import WeightFileError, check_weight_directory

log = logging.getLogger(__name__)

FAMILIES: dict[str, type[VLMBackbone]] = {"paligemma": PaliGemmaBackbone, "llava": LlavaBackbone,
                                          "cogvlm": CogVLMBackbone}


def family_of(model_dir: str | Path) -> str:
    """The backbone family of a model folder, from its config.json (an original LLaVA checkpoint counts as
    llava)."""
    from affordvla.backbones.llava.convert import is_original_llava

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: no such model folder (an export: <run>/model)")
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{model_dir} has no config.json: not a model directory")
    config = json.loads(config_file.read_text())
    family = "llava" if is_original_llava(config) else config.get("model_type")
    if family not in FAMILIES:
        raise ValueError(f"{config_file}: model_type {family!r} is not one of {sorted(FAMILIES)}")
    return family


def _suggest(name: str, valid) -> str:
    close = difflib.get_close_matches(name, list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _buildable(path: Path, build: object, build_root: str | Path | None) -> bool:
    """A missing checkpoint is built only where the project builds its own: under `build_root` (the artifacts
    folder), never at a path a user typed, which is input to read."""
    if build is None or build_root is None:
        return False
    return path.resolve().is_relative_to(Path(build_root).resolve())


def check_backbone_paths(family: str, pretrained: str, build: object = None, build_root: str | Path | None = None,
                         adapter: str | None = None, vision_tower: str | None = None, tokenizer: str | None = None,
                         lora: object = None, option: str = "backbone") -> None:
    """Every path of a backbone config checked before anything is built or loaded: the checkpoint directory
    (config.json, weight files whose headers are intact), the adapter, the vision tower, the tokenizer. Reads a
    few kilobytes, so `affordvla-train` runs it before any data or model work; errors name the option."""
    if lora is not None and adapter is not None:
        raise ValueError(f"give either {option}.lora (train new adapters) or {option}.adapter (load trained ones)")
    if family not in FAMILIES:
        raise ValueError(f"{option}.family={family!r} is not a backbone family{_suggest(family, FAMILIES)}; "
                         f"valid: {sorted(FAMILIES)}")
    path = Path(pretrained)
    expected = f"a local {family} checkpoint directory (config.json and safetensors weights; no model hub is contacted)"
    if not path.exists():
        if _buildable(path, build, build_root):
            return  # built on first use
        if build is not None:
            raise BackboneLoadError(
                f"{option}.pretrained={path} does not exist; expected {expected}. A path given here is only read: "
                f"the offline tiny backbones are built under {build_root} (drop the {option}.pretrained override "
                "to use the config's own)")
        raise BackboneLoadError(f"{option}.pretrained={path} does not exist; expected {expected}")
    if not path.is_dir():
        raise BackboneLoadError(f"{option}.pretrained={path} is a file; expected {expected}")
    config_file = path / "config.json"
    if not config_file.is_file():
        if _buildable(path, build, build_root):
            return  # an interrupted build: built again
        raise BackboneLoadError(f"{option}.pretrained={path} has no config.json; expected {expected}")
    try:
        json.loads(config_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BackboneLoadError(f"{option}.pretrained={path}: {config_file} is not valid JSON") from None
    try:
        check_weight_directory(path)
    except WeightFileError as exc:
        raise BackboneLoadError(f"{option}.pretrained={path}: {exc}") from None
    for name, value, what in (("adapter", adapter, "an adapter exported by affordvla-export --adapter-only "
                               "(adapter_config.json and adapter_model.safetensors)"),
                              ("vision_tower", vision_tower, "a local CLIP vision tower directory (config.json "
                               "and weights)"),
                              ("tokenizer", tokenizer, "a local tokenizer directory")):
        if value is None:
            continue
        given = Path(value)
        if not given.is_dir():
            state = "is a file" if given.exists() else "does not exist"
            raise BackboneLoadError(f"{option}.{name}={given} {state}; expected {what}")
        if name == "adapter":
            if not (given / "adapter_config.json").is_file():
                raise BackboneLoadError(f"{option}.adapter={given} has no adapter_config.json; expected {what}")
            try:
                check_weight_directory(given)
            except WeightFileError as exc:
                raise BackboneLoadError(f"{option}.adapter={given}: {exc}") from None


def load_backbone(family: str, pretrained: str, build: Callable[[Path], Path] | None = None,
                  dtype: str = "float32", lora: dict | None = None, adapter: str | None = None,
                  gradient_checkpointing: bool = False, quantization: str | None = None,
                  keypoint_codec: str | None = None, build_root: str | None = None, **kwargs) -> VLMBackbone:
    """`pretrained` is a local checkpoint directory. When it does not exist, `build` is given (offline tiny
    variants) and it lies under `build_root` (the project's artifacts folder), `build(pretrained)` writes it
    first; later runs reuse it. A path anywhere else must exist: it is the user's, and only read.

    Fine-tuning controls: `lora` (LoraSettings fields) injects adapters, `adapter` loads an exported unmerged
    adapter on top of the base, `gradient_checkpointing` trades compute for memory, `quantization` ("4bit" /
    "8bit") loads the weights through bitsandbytes on a GPU. `keypoint_codec` names the family's own answer format
    for points (the keypoint-text head's default codec); it is configuration, not something the weights hold."""
    check_backbone_paths(family, pretrained, build, build_root, adapter, kwargs.get("vision_tower"),
                         kwargs.get("tokenizer"), lora)
    path = Path(pretrained)
    if not (path / "config.json").exists():
        with exclusive(path):  # parallel jobs of a sweep: one builds, the others wait and load its result
            if not (path / "config.json").exists():
                log.info("building offline %s checkpoint at %s", family, path)
                assert build is not None  # check_backbone_paths refused a missing checkpoint it cannot build
                build(path)
    try:
        backbone = FAMILIES[family].from_pretrained(path, dtype=dtype, **quantization_kwargs(quantization), **kwargs)
    except RuntimeError as exc:  # transformers' reports (tensor shapes that do not fit) name no file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        reason = "tensor shapes differ from the model's; the report above lists them" if "mismatched" in first \
            else first
        raise BackboneLoadError(f"backbone.pretrained={path}: its weights do not load into the {family} model its "
                                f"config.json describes ({reason})") from exc
    if adapter is not None:
        load_adapter(backbone, adapter)
    if lora is not None:
        apply_lora(backbone, LoraSettings(**lora))
    if gradient_checkpointing:
        enable_gradient_checkpointing(backbone)
    return backbone

"""Fine-tuning controls shared by every backbone: LoRA through peft, gradient checkpointing, quantised loading,
and export (LoRA merged into a plain transformers directory, or the adapter alone).

LoRA layers are injected into the backbone's own model object, so parameter names keep their part prefixes
(`model.language_model...q_proj.lora_A.default.weight`) and per-part learning rates and freezing still apply.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)
ADAPTER_INFO = "affordvla_adapter.json"


@dataclass
class LoraSettings:
    """LoRA settings of a backbone (`backbone.lora`): rank, alpha, dropout and which layers get adapters."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    vision_tower: bool = False  # also adapt the vision tower's attention and MLP
    target_modules: list[str] | None = None  # module-name suffixes; None = the family's defaults
    extra_trainable: list[str] = field(default_factory=list)  # parts trained in full besides the adapters


def lora_target_regex(backbone, settings: LoraSettings) -> str:
    """A regex over module names: the chosen linear layers inside the language model (and the vision tower)."""
    targets = backbone.lora_targets
    parts = {"language_model": settings.target_modules or targets["language_model"]}
    if settings.vision_tower:
        parts["vision_tower"] = settings.target_modules or targets["vision_tower"]
    alternatives = []
    for part, names in parts.items():
        prefixes = "|".join(p.rstrip(".").replace(".", r"\.") for p in backbone.part_prefixes[part])
        alternatives.append(rf"(?:{prefixes})\..*\.(?:{'|'.join(names)})")
    return "^(?:" + "|".join(alternatives) + ")$"


def apply_lora(backbone, settings: LoraSettings) -> None:
    """Inject LoRA adapters; every other weight is frozen except the parts named in `extra_trainable`."""
    from peft import LoraConfig, get_peft_model

    # peft annotates lora_alpha as int but scales by alpha / rank, so a float alpha works as written
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha,  # type: ignore[arg-type]
                        lora_dropout=settings.dropout,
                        target_modules=lora_target_regex(backbone, settings), bias="none")
    # get_peft_model injects into backbone.model in place; the wrapper is kept (unregistered) for merge/save
    wrapper = get_peft_model(backbone.model, config)
    object.__setattr__(backbone, "_peft", wrapper)
    for name, param in backbone.model.named_parameters():
        param.requires_grad_("lora_" in name)
    for part in settings.extra_trainable:
        for name, param in backbone.model.named_parameters():
            if name.startswith(backbone.part_prefixes[part]) and "lora_" not in name:
                param.requires_grad_(True)
    trainable = sum(p.numel() for p in backbone.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in backbone.model.parameters())
    log.info("LoRA r=%d on %s: %d of %d parameters trainable (%.2f%%)", settings.rank,
             "language model + vision tower" if settings.vision_tower else "language model", trainable, total,
             100 * trainable / total)


def load_adapter(backbone, adapter_dir: str | Path) -> None:
    """Load an unmerged adapter (written by `export_backbone(..., merge=False)`) on top of the base weights."""
    from peft import PeftModel

    wrapper = PeftModel.from_pretrained(backbone.model, str(adapter_dir))
    object.__setattr__(backbone, "_peft", wrapper)


def has_lora(backbone) -> bool:
    return getattr(backbone, "_peft", None) is not None


def export_backbone(backbone, out_dir: str | Path, *, merge: bool = True) -> Path:
    """Write the backbone for use without affordvla: LoRA merged into the weights (a plain transformers
    directory), or with merge=False the adapter alone (peft format) plus the processor."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if has_lora(backbone) and not merge:
        backbone._peft.save_pretrained(out_dir)
        backbone.processor.save_pretrained(out_dir)
        (out_dir / ADAPTER_INFO).write_text(json.dumps({"family": backbone.family, "base": backbone.source}, indent=2))
        return out_dir
    model = backbone.model
    if has_lora(backbone):
        # merging changes the live model: export is the last thing a run does with it
        model = backbone._peft.merge_and_unload()
        backbone.model = model
        object.__setattr__(backbone, "_peft", None)
    model.save_pretrained(out_dir)
    backbone.processor.save_pretrained(out_dir)
    return out_dir


def enable_gradient_checkpointing(backbone) -> None:
    backbone.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    backbone.model.config.use_cache = False


def quantization_kwargs(quantization: str | None) -> dict[str, Any]:
    """from_pretrained kwargs for 4/8-bit loading through bitsandbytes, which needs a CUDA GPU."""
    if quantization in (None, "none"):
        return {}
    if quantization not in ("4bit", "8bit"):
        raise ValueError(f"quantization must be null, '4bit' or '8bit', got {quantization!r}")
    if not torch.cuda.is_available():
        raise ValueError(f"quantization={quantization} loads weights through bitsandbytes, which needs a CUDA GPU; "
                         "none is available here (drop backbone.quantization to train in full precision)")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ValueError(f"quantization={quantization} needs the bitsandbytes package: "
                         "pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                    bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True)
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    return {"quantization_config": config, "device_map": {"": torch.cuda.current_device()}}

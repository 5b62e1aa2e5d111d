"""`load(export_dir, record)`: an exported action policy, rebuilt from its record.

Heads are rebuilt by name from the registries of known heads (heads/policy_heads.HEADS and
heads/language_actions.LANGUAGE_HEADS), never by importing a class a file names. Version-0 exports (written
before policy.json had a format version) hold policy.json with the normaliser, formulation, camera, dataset
metadata and, from affordvla-train, the head's Hydra config and `prefix_lm`; older ones need the run's
config_resolved.yaml beside the export folder for the head. Their head weights are policy_head.safetensors.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file

from affordvla.backbones.factory import family_of, load_backbone
from affordvla.heads.action_normalization import ActionNormalizer
from affordvla.heads.language_actions import LANGUAGE_HEADS
from affordvla.heads.policy_heads import HEADS
from affordvla.policies.actions.base import ActionPolicyModuleBase
from affordvla.policies.actions.continuous import ContinuousActionModule
from affordvla.policies.actions.inference import ActionPolicy
from affordvla.policies.actions.language import LanguageActionModule
from affordvla.policies.base import POLICY_FILE, PolicyFormatError, read_head_state

LEGACY_WEIGHTS = "policy_head.safetensors"
RUN_CONFIG = "config_resolved.yaml"
# a version-0 record names its head by the class path Hydra instantiated; looked up here, never imported
LEGACY_TARGETS = {f"{cls.__module__}.{getattr(cls, '__qualname__', '')}": name
                  for name, cls in {**HEADS, **LANGUAGE_HEADS}.items()}


def build_module(backbone, head: dict[str, Any]) -> ActionPolicyModuleBase:
    """The module a head record describes, on `backbone`, for inference (no optimiser)."""
    name, settings = head.get("class"), dict(head.get("settings") or {})
    common = {"camera": head.get("camera"), "normalization": head.get("normalization")}
    if name in HEADS:
        return ContinuousActionModule(backbone, functools.partial(HEADS[name], **settings),
                                      formulation=head.get("formulation", "policy_head"),
                                      latent_tokens=int(head.get("latent_tokens", 1)),
                                      gripper_loss_weight=head.get("gripper_loss_weight", 0.01), **common)
    if name in LANGUAGE_HEADS:
        return LanguageActionModule(backbone, LANGUAGE_HEADS[name](**settings), **common)
    raise PolicyFormatError(f"head class {name!r} is not an action head this affordvla knows "
                            f"({sorted(HEADS) + sorted(LANGUAGE_HEADS)})")


def load(export_dir: str | Path, record: dict[str, Any], run_config: DictConfig | dict | None = None
         ) -> ActionPolicy:
    """The policy in `export_dir` (read_policy_record's `record`). `run_config` (the training run's resolved
    config) is only read for a version-0 export that does not record its head."""
    export_dir = Path(export_dir)
    if record.get("format_version") == 0:
        record = legacy_record(export_dir, run_config)
        legacy = export_dir / LEGACY_WEIGHTS
        state = load_file(str(legacy)) if legacy.is_file() else {}
    else:
        state = read_head_state(export_dir)
    head = record.get("head") or {}
    for key in ("class", "normalizer"):
        if key not in head:
            raise PolicyFormatError(f"{export_dir / POLICY_FILE}: the head record has no {key!r}")
    backbone = record.get("backbone") or {}
    loaded = load_backbone(backbone.get("family") or family_of(export_dir), str(export_dir),
                           **(backbone.get("load") or {}))
    module = build_module(loaded, head)
    module.configure(record.get("dataset_metadata") or {}, ActionNormalizer.from_dict(head["normalizer"]))
    module.load_head_state(state)
    return ActionPolicy(module, record, export_dir)


def legacy_record(export_dir: Path, run_config: DictConfig | dict | None = None) -> dict[str, Any]:
    """The format-1 record a version-0 action export implies (its policy.json, and the run's head config)."""
    path = export_dir / POLICY_FILE
    old = json.loads(path.read_text())
    missing = [k for k in ("normalizer", "dataset_metadata") if k not in old]
    if missing:
        raise PolicyFormatError(f"{path}: a policy.json without format_version must hold {missing} (an action "
                                "policy export)")
    head_config, prefix_lm = old.get("head"), old.get("prefix_lm")
    if head_config is None or run_config is not None:  # the run's own config wins, as before the format
        if run_config is None:
            config_file = export_dir.parent / RUN_CONFIG
            if not config_file.is_file():
                raise FileNotFoundError(f"{path} does not record its head and there is no {config_file}: the "
                                        "training run's resolved config is needed to rebuild the head (pass "
                                        "--config, or --run-id)")
            run_config = cast(DictConfig, OmegaConf.load(config_file))
        run_config = OmegaConf.create(run_config) if not isinstance(run_config, DictConfig) else run_config
        head_config = OmegaConf.to_container(run_config.head, resolve=True)
        prefix_lm = run_config.backbone.get("prefix_lm")
    target = head_config.get("_target_")
    if target not in LEGACY_TARGETS:
        raise PolicyFormatError(f"{path}: head _target_ {target!r} is not an action head this affordvla knows "
                                f"({sorted(LEGACY_TARGETS)})")
    settings = {k: v for k, v in head_config.items() if not k.startswith("_")}
    normalizer = old["normalizer"]
    head = {"class": LEGACY_TARGETS[target], "settings": settings, "camera": old.get("camera"),
            "formulation": old.get("formulation", "policy_head"), "latent_tokens": old.get("latent_tokens", 1),
            "normalizer": normalizer,
            "normalization": {"mode": normalizer["mode"], "clip_bound": normalizer["clip_bound"]}}
    return {"kind": "actions", "format_version": 0, "sample_kind": "action_window", "head": head,
            "backbone": {"family": family_of(export_dir),
                         "load": {} if prefix_lm is None else {"prefix_lm": bool(prefix_lm)}},
            "dataset_metadata": old["dataset_metadata"], "source": {}}

"""Checks `affordvla-train` runs on the composed config before any work (data generation, backbone builds).

A mistyped option or path should cost seconds: every option of an instantiated component is matched against its
constructor's parameters (suggesting the close match), and every model or checkpoint path the config carries is
checked for what must be there, each error naming the option, the path and what was expected.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from affordvla.backbones.factory import check_backbone_paths, load_backbone
from affordvla.checkpointing import check_checkpoint_dir
from affordvla.export import check_export_dir

# the config groups whose entries are instantiated with their keys as keyword arguments
CHECKED_GROUPS = ("trainer", "module", "head", "backbone", "dataset", "callbacks", "logger")
HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}
SHOWN_OPTIONS = 12


def check_run_config(cfg: DictConfig) -> None:
    """Everything `affordvla-train` can check before it starts working; raises on the first problem. Paths first:
    they need no import of the components' modules, so a mistyped path fails in milliseconds."""
    try:
        check_model_paths(cfg)
        check_options(cfg)
    except MissingMandatoryValue as exc:  # OmegaConf's message spans three lines and says nothing of the fix
        raise ValueError(f"{exc.full_key} must be given: the config leaves it ??? (add {exc.full_key}=<value> to "
                         "the command)") from None


def _targets(node: Any, prefix: str) -> Iterator[tuple[str, DictConfig]]:
    """Every (dotted name, config) under `node` that names a `_target_`, the node itself included."""
    if isinstance(node, DictConfig):
        if "_target_" in node:
            yield prefix, node
        for key in node:
            if not OmegaConf.is_missing(node, key):  # a `???` left for the user is reported where it is read
                yield from _targets(node[key], f"{prefix}.{key}")
    elif isinstance(node, ListConfig):
        for i, item in enumerate(node):
            yield from _targets(item, f"{prefix}[{i}]")


def accepted_options(target: Any) -> set[str] | None:
    """The keyword arguments `target` takes, or None when it takes any (a `**kwargs` passed on elsewhere)."""
    try:
        parameters = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def check_options(cfg: DictConfig, groups: tuple[str, ...] = CHECKED_GROUPS) -> None:
    """Every key of an instantiated config must be a parameter of its `_target_`: `+trainer.max_step=3` is named
    with its close match here, instead of ending in the constructor's TypeError after the data and the backbone
    were prepared."""
    for group in groups:
        if cfg.get(group) is None:
            continue
        for name, node in _targets(cfg[group], group):
            try:
                target = get_object(str(node._target_))
            except Exception as exc:
                raise ValueError(f"{name}._target_={node._target_} cannot be imported: {exc}") from None
            accepted = accepted_options(target)
            if accepted is None:
                continue
            for key in node:
                if key in HYDRA_KEYS or key in accepted:
                    continue
                close = difflib.get_close_matches(str(key), sorted(accepted), n=1)
                options = (f"{', '.join(sorted(accepted)[:SHOWN_OPTIONS])}"
                           f"{', ...' if len(accepted) > SHOWN_OPTIONS else ''}")
                # the options too: a close match may not be the one meant (episodes: val_ or train_episodes)
                hint = (f"; did you mean {name}.{close[0]}? (its options: {options})" if close else
                        f"; its options: {options}")
                raise ValueError(f"{name}.{key} is not an option of {node._target_}{hint}")


def check_model_paths(cfg: DictConfig) -> None:
    """The backbone's checkpoint (and adapter, vision tower, tokenizer), `ckpt_path` and `export_dir`: each must
    be what the run will read or may write, before anything is built."""
    backbone = cfg.get("backbone")
    if backbone is not None and get_object(str(backbone.get("_target_", ""))) is load_backbone:
        check_backbone_paths(backbone.family, str(backbone.pretrained), build=backbone.get("build"),
                             build_root=backbone.get("build_root"), adapter=backbone.get("adapter"),
                             vision_tower=backbone.get("vision_tower"), tokenizer=backbone.get("tokenizer"),
                             lora=backbone.get("lora"))
    if cfg.get("ckpt_path"):
        check_checkpoint_dir(cfg.ckpt_path, "ckpt_path")
    if cfg.get("export_dir") and cfg.get("train", True):
        check_export_dir(Path(cfg.export_dir), "export_dir")

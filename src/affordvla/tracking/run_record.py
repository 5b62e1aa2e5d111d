"""What every run records: tags, a few flattened key parameters, the resolved config and the overrides."""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

TAG_KEYS = ("backbone", "head", "dataset", "synthesis", "experiment", "scale")
# Dotted config keys logged as MLflow params (params are immutable and short: a few, not the whole config).
PARAM_KEYS = (
    "backbone.pretrained",
    "head.codec",
    "head.prompt_style",
    "dataset.root",
    "dataset.batch_size",
    "module.optimizer.lr",
    "module.part_lr",
    "trainer.max_steps",
    "trainer.accumulate_grad_batches",
    "trainer.precision",
    "seed",
)


def git_sha(path: str | Path | None = None) -> str:
    """HEAD of the repository holding `path` (default: this package), '+dirty' when files differ."""
    where = Path(path) if path else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


# Top-level keys that say where a run writes or how it reports, not what it computes: left out of the config hash.
HASH_EXCLUDED = ("hydra", "paths", "logger", "ckpt_path", "export_dir", "task_name")
# Callbacks that only record or display; others (a benchmark scored at test time) change the metrics and count.
REPORTING_CALLBACKS = ("model_checkpoint", "rng_state", "keypoint_overlays", "action_traces", "lr_monitor",
                       "progress_bar")


def config_hash(cfg: DictConfig) -> str:
    """12 hex digits identifying what a run computes: the config before interpolation (so `${paths...}` stays
    symbolic and machine independent) without the keys in HASH_EXCLUDED and the reporting callbacks. Two runs of
    one table cell share it; a run cut short by `stop_after_steps` does not share it with a full one."""
    content = OmegaConf.to_container(cfg, resolve=False)
    for key in HASH_EXCLUDED:
        content.pop(key, None)
    callbacks = content.get("callbacks") or {}
    content["callbacks"] = {k: v for k, v in callbacks.items() if k not in REPORTING_CALLBACKS}
    text = json.dumps(content, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def run_tags(choices: Mapping[str, Any], task_name: str, cfg_hash: str | None = None) -> dict[str, str]:
    """Tags naming the option chosen in every config group (Hydra's runtime choices)."""
    tags = {key: str(choices.get(key) or "none") for key in TAG_KEYS}
    tags["git_sha"] = git_sha()
    tags["task_name"] = task_name
    if cfg_hash:
        tags["config_hash"] = cfg_hash
    return tags


def flatten_params(cfg: DictConfig, keys=PARAM_KEYS) -> dict[str, Any]:
    params = {}
    for key in keys:
        value = OmegaConf.select(cfg, key, default=None)
        if value is None:
            continue
        if isinstance(value, DictConfig):
            for sub, v in OmegaConf.to_container(value, resolve=True).items():
                params[f"{key}.{sub}"] = v
        else:
            params[key] = value
    return params


def write_run_files(cfg: DictConfig, output_dir: Path, overrides: list[str], extra: dict[str, Any]) -> dict[str, Path]:
    """Resolved config, overrides and run metadata written into the run directory; returns the paths."""
    output_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "config": output_dir / "config_resolved.yaml",
        "overrides": output_dir / "overrides.json",
        "run_info": output_dir / "run_info.json",
    }
    files["config"].write_text(OmegaConf.to_yaml(cfg, resolve=True))
    files["overrides"].write_text(json.dumps(overrides, indent=2))
    files["run_info"].write_text(json.dumps(extra, indent=2, default=str))
    return files

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
HASH_EXCLUDED = ("hydra", "paths", "logger", "ckpt_path", "export_dir", "task_name", "scale_tag")
# Callbacks that only record or display; others (a benchmark scored at test time) change the metrics and count.
REPORTING_CALLBACKS = ("model_checkpoint", "rng_state", "keypoint_overlays", "action_traces", "lr_monitor",
                       "progress_bar", "run_lineage")


def config_hash(cfg: DictConfig) -> str:
    """12 hex digits identifying what a run computes: the config before interpolation (so `${paths...}` stays
    symbolic and machine independent) without the keys in HASH_EXCLUDED and the reporting callbacks. Two runs of
    one table cell share it; a run cut short by `stop_after_steps` does not share it with a full one."""
    content = OmegaConf.to_container(cfg, resolve=False)
    for key in HASH_EXCLUDED:
        content.pop(key, None)
    callbacks = content.get("callbacks") or {}
    content["callbacks"] = {k: v for k, v in callbacks.items() if k not in REPORTING_CALLBACKS}
    module = content.get("module")
    if isinstance(module, dict) and isinstance(module.get("callbacks"), dict):  # a policy kind's own callbacks
        module["callbacks"] = {k: v for k, v in module["callbacks"].items() if k not in REPORTING_CALLBACKS}
    text = json.dumps(content, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def run_tags(choices: Mapping[str, Any], task_name: str, cfg_hash: str | None = None,
             scale: str | None = None) -> dict[str, str]:
    """Tags naming the option chosen in every config group (Hydra's runtime choices). `scale` (the config's
    `scale_tag`, set by a debug config that shrinks the run) replaces the scale group's choice: a `debug=smoke`
    run of a full-scale config is not a full-scale result."""
    tags = {key: str(choices.get(key) or "none") for key in TAG_KEYS}
    if scale:
        tags["scale"] = str(scale)
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


# ---------------------------------------------------------------------------------------------- resumed runs

# the checkpoint's entry naming the run that wrote it (callbacks.RunLineageCallback)
LINEAGE_KEY = "run_lineage"


def read_run_lineage(ckpt_path: str | Path | None) -> dict[str, Any] | None:
    """What a checkpoint records about the run that wrote it; None for no checkpoint, a folder that is not one
    (the checkpoint checks report those) or a checkpoint written before the record existed."""
    import torch

    from affordvla.checkpointing import STATE_NAME

    state_file = Path(ckpt_path) / STATE_NAME if ckpt_path else None
    if state_file is None or not state_file.is_file():
        return None
    try:  # memory-mapped: the optimizer state it holds is not read
        state = torch.load(state_file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises several types for a damaged file
        raise ValueError(f"{state_file}: cannot be read as a training state ({exc})") from None
    lineage = state.get(LINEAGE_KEY) if isinstance(state, dict) else None
    return dict(lineage) if isinstance(lineage, Mapping) else None


def resume_record(ckpt_path: str | Path | None) -> dict[str, Any]:
    """What a resumed run's run_info.json records of its parent: the checkpoint, the parent's run folder and
    MLflow run. Empty when the run does not resume."""
    if not ckpt_path:
        return {}
    lineage = read_run_lineage(ckpt_path) or {}
    return {"resumed_from": str(Path(ckpt_path).resolve()), "parent_run_dir": lineage.get("run_dir"),
            "parent_mlflow_run_id": lineage.get("mlflow_run_id")}

"""affordvla-export: write a trained model for use outside training, from an MLflow run or a checkpoint directory.

    affordvla-export --run-id ID [--tracking-uri URI] [--step N] [--out DIR] [--adapter-only]
    affordvla-export --checkpoint <run>/checkpoints/step_000300 [--config FILE] [--out DIR] [--adapter-only]

By default LoRA (if the run trained any) is merged into the weights and the export holds what `affordvla-train`
writes to `export_dir`: the backbone as a checkpoint directory, the head's weights, policy.json (what
`affordvla.policies.load_policy` reads) and dataset_metadata.json. With
`--adapter-only` the backbone is written as its LoRA adapter alone (peft format, loadable with
`backbone.adapter=<dir>` on the run's base checkpoint) beside the same head files. The module is rebuilt from the
run's recorded config (config_resolved.yaml in the run folder) and the checkpoint's weights. The output folder
(default outputs/exports/<run folder>-<step>) must be new, empty, or an earlier export.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from affordvla.backbones.finetuning import has_lora
from affordvla.checkpointing import check_checkpoint_matches, read_checkpoint
from affordvla.cli import console_command
from affordvla.policies import PolicyModule

log = logging.getLogger("affordvla.export")
EXPORT_MARKER = "affordvla_export.json"
RUN_CONFIG = "config_resolved.yaml"
SHOWN_FILES = 4


def check_export_dir(path: str | Path, option: str = "--out") -> Path:
    """An export is written only into a new or empty folder, or over an earlier export (it holds EXPORT_MARKER):
    never into a folder of the user's."""
    path = Path(path)
    expected = f"a new or empty folder, or an earlier export (holding {EXPORT_MARKER})"
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option}={path} is a file; expected {expected}")
    if path.is_dir():
        found = sorted(p.name for p in path.iterdir())
        if found and EXPORT_MARKER not in found:
            shown = ", ".join(found[:SHOWN_FILES]) + (", ..." if len(found) > SHOWN_FILES else "")
            raise ValueError(f"{option}={path} already holds files not written by an export ({shown}); expected "
                             f"{expected}: choose another folder")
        return path
    parent = next(p for p in path.parents if p.exists())
    if not parent.is_dir():
        raise ValueError(f"{option}={path} cannot be created: {parent} is a file")
    return path


def build_module(cfg: DictConfig, metadata: dict[str, Any]) -> PolicyModule:
    """A fresh module as the config and the dataset describe it (the head is sized from the dataset's metadata):
    the container trained weights are loaded into for an export."""
    module: PolicyModule = instantiate(cfg.module, backbone=instantiate(cfg.backbone), head=instantiate(cfg.head))
    module.configure_from_metadata(metadata)
    return module


def write_export(module: PolicyModule, out_dir: str | Path, *, merge: bool = True,
                 source: dict[str, Any] | None = None) -> Path:
    """Write `module` for use without training (`PolicyModule.export`: the backbone, LoRA merged or with
    `merge=False` the adapter alone, the head's weights and policy.json), and the dataset metadata beside it.
    `affordvla-train` (to `export_dir`) and `affordvla-export` both write through here. The marker is written
    first, so an interrupted export can be written over."""
    out_dir = check_export_dir(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {"merged": merge or not has_lora(module.backbone), **(source or {})}
    marker = out_dir / EXPORT_MARKER
    marker.write_text(json.dumps(record | {"complete": False}, indent=2))
    module.export(out_dir, merge=merge, source=source)
    (out_dir / "dataset_metadata.json").write_text(json.dumps(module.dataset_metadata, indent=2))
    marker.write_text(json.dumps(record | {"complete": True}, indent=2))
    return out_dir


# ------------------------------------------------------------------------------------ finding what to export

def run_folder_of(run_id: str, tracking_uri: str) -> Path:
    """The output folder of an affordvla-train run, from the resolved config it logged to MLflow."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from affordvla.tracking.runs import store_exists

    if not store_exists(tracking_uri):
        raise FileNotFoundError(f"--run-id {run_id}: there is no MLflow store at {tracking_uri} (set AFFORDVLA_ROOT "
                                "to the project folder the run was trained in, or pass --tracking-uri)")
    client = MlflowClient(tracking_uri)
    try:
        client.get_run(run_id)
    except MlflowException as exc:
        raise ValueError(f"--run-id {run_id}: no such run in {tracking_uri} ({exc.message})") from None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = client.download_artifacts(run_id, f"run/{RUN_CONFIG}", tmp)
        except Exception as exc:  # MLflow raises several types for a missing artifact
            raise ValueError(f"--run-id {run_id} has no artifact run/{RUN_CONFIG}: not an affordvla-train run "
                             f"({exc})") from None
        output_dir = OmegaConf.load(local).get("paths", {}).get("output_dir")
    if not output_dir or not Path(output_dir).is_dir():
        raise FileNotFoundError(f"--run-id {run_id}: its run folder {output_dir} is not on this machine")
    return Path(output_dir)


def checkpoint_of(run_dir: Path, step: int | None) -> Path:
    """The run's checkpoint at `step`, or its latest complete one."""
    folder = run_dir / "checkpoints"
    found = {int(p.name.removeprefix("step_")): p for p in folder.glob("step_*")
             if p.is_dir() and p.name.removeprefix("step_").isdigit()}
    if step is not None:
        if step not in found:
            raise FileNotFoundError(f"--step {step}: {folder} has no step_{step:06d}; it has "
                                    f"{sorted(found) or 'no checkpoints'}")
        return found[step]
    if not found:
        raise FileNotFoundError(f"{folder} holds no checkpoint (step_NNNNNN folders): nothing to export from")
    return found[max(found)]


def config_of(checkpoint: Path, config: str | None) -> DictConfig:
    """The config the checkpoint was trained with: `config`, else the run folder's config_resolved.yaml
    (<run>/checkpoints/step_N -> <run>)."""
    path = Path(config) if config else checkpoint.parent.parent / RUN_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the run's resolved config is needed to rebuild the model "
                                f"of {checkpoint}; pass --config <run>/{RUN_CONFIG}")
    cfg = OmegaConf.load(path)
    missing = [key for key in ("backbone", "head", "module") if key not in cfg]
    if missing:
        raise ValueError(f"--config {path} has no {', '.join(missing)}: not a config written by affordvla-train")
    return cfg


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, *, config: str | None = None,
                      adapter_only: bool = False, source: dict[str, Any] | None = None) -> Path:
    """Rebuild the run's module, load the checkpoint's weights and write the export."""
    from affordvla.checkpointing import check_checkpoint_dir

    checkpoint = check_checkpoint_dir(checkpoint, "--checkpoint")
    cfg = config_of(checkpoint, config)
    if adapter_only and cfg.backbone.get("lora") is None:
        raise ValueError(f"--adapter-only: the run of {checkpoint} trained no LoRA adapter (backbone.lora is null); "
                         "drop --adapter-only to export the full weights")
    out_dir = check_export_dir(out_dir)
    state = read_checkpoint(checkpoint, option="--checkpoint")
    metadata = state.get("dataset_metadata") or {}
    module = build_module(cfg, metadata)
    check_checkpoint_matches(checkpoint, module, option="--checkpoint")
    module.load_state_dict(state["state_dict"], strict=True)
    step = state.get("global_step")
    log.info("exporting %s (step %s) to %s", checkpoint, step, out_dir)
    return write_export(module.eval(), out_dir, merge=not adapter_only,
                        source={"checkpoint": str(checkpoint), "step": step, **(source or {})})


def _default_out(checkpoint: Path, adapter_only: bool) -> Path:
    from affordvla.resolvers import project_root

    name = f"{checkpoint.parent.parent.name}-{checkpoint.name}{'-adapter' if adapter_only else ''}"
    return Path(project_root()) / "outputs" / "exports" / name


@console_command("affordvla-export")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="affordvla-export", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run-id", help="an affordvla-train MLflow run: its latest checkpoint (or --step)")
    source.add_argument("--checkpoint", help="a checkpoint directory, e.g. <run>/checkpoints/step_000300")
    parser.add_argument("--tracking-uri", help="MLflow store of --run-id (default $AFFORDVLA_MLFLOW_URI, else "
                        "sqlite:///<AFFORDVLA_ROOT or here>/outputs/mlflow.db)")
    parser.add_argument("--step", type=int, help="with --run-id: the checkpoint of this step (default the latest)")
    parser.add_argument("--config", help="with --checkpoint: the run's config_resolved.yaml (default: the run "
                        "folder's, two levels above the checkpoint)")
    parser.add_argument("--out", help="output folder: new, empty or an earlier export (default "
                        "outputs/exports/<run folder>-<step>)")
    parser.add_argument("--adapter-only", action="store_true", help="write the LoRA adapter alone (peft format) "
                        "instead of merging it into the weights; the head's files are written beside it")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.run_id:
        from affordvla.tracking.runs import default_tracking_uri

        checkpoint = checkpoint_of(run_folder_of(args.run_id, args.tracking_uri or default_tracking_uri()),
                                   args.step)
        origin = {"run_id": args.run_id}
    else:
        if args.step is not None:
            raise ValueError("--step goes with --run-id; --checkpoint names the step itself")
        checkpoint, origin = Path(args.checkpoint), {}
    out = Path(args.out) if args.out else _default_out(checkpoint, args.adapter_only)
    written = export_checkpoint(checkpoint, out, config=args.config, adapter_only=args.adapter_only, source=origin)
    print(written)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""affordvla-train: the one entrypoint. Composes the config, instantiates data, backbone, head and trainer,
trains, evaluates on the held-out split, and returns the optimised metric (so Hydra sweepers need no glue)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import get_class, get_method, instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig

import affordvla.resolvers  # noqa: F401  (registers ${project_root:})
from affordvla.callbacks import StopAfterSteps, log_artifact
from affordvla.checkpointing import SafetensorsCheckpointIO
from affordvla.cli import failures_reported
from affordvla.distributed import (
    check_launch_under_hydra,
    check_resumable,
    module_for_export,
    wants_backbone,
)
from affordvla.export import build_module, write_export
from affordvla.paths import CONFIG_DIR
from affordvla.policies import PolicyModule
from affordvla.preflight import check_run_config
from affordvla.synthesis.pipeline import apply_synthesis
from affordvla.tracking.run_record import (
    config_hash,
    flatten_params,
    resume_record,
    run_tags,
    write_run_files,
)

log = logging.getLogger("affordvla.train")


def _instantiate_group(group: DictConfig | None, **kwargs) -> list[Any]:
    """Instantiate every entry of a dict-of-configs group (callbacks, loggers) that has a _target_."""
    if not group:
        return []
    return [instantiate(entry, **kwargs) for entry in group.values() if isinstance(entry, DictConfig)
            and "_target_" in entry]


def _hydra_runtime() -> tuple[dict[str, Any], list[str], Path]:
    runtime = HydraConfig.get().runtime
    choices = dict(runtime.choices)
    overrides = list(HydraConfig.get().overrides.task)
    return choices, overrides, Path(runtime.output_dir)


def sweep_tags(overrides: list[str]) -> dict[str, str]:
    """Tags that tie a multirun job to its sweep (the sweep directory is unique per sweep), so the sweep's runs
    can be gathered and compared afterwards (affordvla.sweeps.report). Empty for a single run."""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return {}
    return {"sweep_dir": str(Path(hydra_cfg.sweep.dir).resolve()), "sweep_job": str(hydra_cfg.job.num),
            "sweep_overrides": json.dumps(overrides)}


def train(cfg: DictConfig) -> dict[str, float]:
    """Run one training job from a composed config; returns every logged metric."""
    started = time.perf_counter()
    check_run_config(cfg)  # options and model paths: seconds, before any data or backbone work
    cfg_hash = config_hash(cfg)  # of the unresolved config: `${paths...}` stays symbolic, machine independent
    L.seed_everything(cfg.seed, workers=True)
    choices, overrides, output_dir = _hydra_runtime()

    datamodule = apply_synthesis(cfg.get("synthesis"), instantiate(cfg.dataset))  # synthesis=none: unchanged
    check_pairing(get_class(cfg.module._target_), datamodule, cfg)
    # the data is generated, read and pre-flight checked before any model is built
    datamodule.prepare_data()
    datamodule.setup("fit")
    backbone = instantiate(cfg.backbone)
    module: PolicyModule = instantiate(cfg.module, backbone=backbone, head=instantiate(cfg.head))
    module.configure_from_metadata(datamodule.metadata())  # sizes the head and checks it against the data
    datamodule.collate = module.make_collate()

    tags = run_tags(choices, cfg.task_name, cfg_hash, scale=cfg.get("scale_tag")) | sweep_tags(overrides)
    loggers = _instantiate_group(cfg.get("logger"), tags=tags)
    callbacks = _instantiate_group(cfg.get("callbacks"))
    if cfg.get("stop_after_steps"):
        callbacks.append(StopAfterSteps(cfg.stop_after_steps))
    if not loggers:  # nothing to monitor the learning rate into
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                     plugins=[SafetensorsCheckpointIO(module)], **_strategy(cfg, backbone))
    check_launch_under_hydra(trainer, HydraConfig.get().mode)
    check_resumable(trainer, cfg.get("ckpt_path"))
    # Under DDP every rank runs this function (Lightning re-executes the command for ranks > 0, or SLURM starts
    # one task per GPU): the run's files, export and MLflow records are written by global rank 0 only.
    rank_zero = trainer.is_global_zero

    if rank_zero:
        run_files = write_run_files(cfg, output_dir, overrides, {
            "tags": tags, "dataset": datamodule.metadata(), "backbone_source": backbone.source,
            "world_size": trainer.world_size, **resume_record(cfg.get("ckpt_path")),  # a resumed run's parent
        })
        skipped = datamodule.metadata().get("skipped")  # entries left out under dataset.on_error=skip
        for logger in loggers:
            logger.log_hyperparams(flatten_params(cfg))
            if isinstance(skipped, int):
                logger.log_metrics({"data/skipped_entries": float(skipped)}, step=0)
        if loggers:
            for path in run_files.values():
                log_artifact(trainer, path, "run")

    metrics: dict[str, float] = {}
    if cfg.train:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    if cfg.test:
        trainer.test(module, datamodule=datamodule)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    metrics["train_seconds"] = time.perf_counter() - started

    if cfg.get("export_dir") and cfg.train and not trainer.fast_dev_run:
        # every rank enters: under FSDP the full weights are gathered (a collective) into a module on rank 0
        with module_for_export(trainer, module, lambda: build_module(cfg, datamodule.metadata())) as trained:
            if trained is not None:
                write_export(trained, cfg.export_dir, source={"run_dir": str(output_dir),
                                                               "step": trainer.global_step})
    if rank_zero:
        metrics_file = output_dir / "metrics.json"
        metrics_file.write_text(json.dumps(metrics, indent=2, sort_keys=True))
        if loggers:
            for logger in loggers:
                logger.log_metrics({"train_seconds": metrics["train_seconds"]})
            log_artifact(trainer, metrics_file, "run")
        _report(metrics)
    return metrics


def _strategy(cfg: DictConfig, backbone) -> dict[str, Any]:
    """`trainer.strategy` built here when it is a factory that needs the backbone (FSDP wraps the backbone's own
    block classes); otherwise left to the trainer's instantiation."""
    spec = cfg.trainer.get("strategy")
    if not isinstance(spec, DictConfig) or "_target_" not in spec or not wants_backbone(get_method(spec._target_)):
        return {}
    return {"strategy": instantiate(spec, backbone=backbone)}


def check_pairing(module_class: type[PolicyModule], datamodule, cfg: DictConfig) -> None:
    """The module must train on the kind of samples the dataset yields. Checked before the backbone is built: a
    mismatch should cost seconds, not a checkpoint build."""
    wanted, given = module_class.sample_kind, datamodule.sample_kind
    if wanted != given:
        name = cfg.dataset.get("name", cfg.dataset.get("source"))
        hint = ("module=action_policy (continuous heads: lstm, gpt, mlp) or module=language_actions (discrete, "
                "text_actions)" if given == "action_window" else "module=keypoint_text or module=keypoint_regression")
        raise ValueError(f"dataset {name!r} yields {given} samples but module {cfg.module._target_} trains on "
                         f"{wanted} samples; use {hint}")


def _report(metrics: dict[str, float]) -> None:
    shown = {k: v for k, v in metrics.items() if k.startswith(("test/", "val/")) or k == "train_seconds"}
    if shown:
        log.info("results: %s", json.dumps({k: round(v, 4) for k, v in sorted(shown.items())}))


def run(cfg: DictConfig) -> float | None:
    """Train, always closing the loggers (one failed job must not break a multirun), and return the metric."""
    try:
        metrics = train(cfg)
    finally:
        _close_mlflow_runs()
    name = cfg.get("optimized_metric")
    if name and name not in metrics:
        log.warning("optimized_metric %s was not logged; available: %s", name, sorted(metrics))
        return None
    return metrics.get(name) if name else None


def _close_mlflow_runs() -> None:
    try:
        import mlflow

        while mlflow.active_run() is not None:
            mlflow.end_run()
    except Exception:
        log.exception("could not close the MLflow run")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    with failures_reported("affordvla-train"):
        return run(cfg)


if __name__ == "__main__":
    main()

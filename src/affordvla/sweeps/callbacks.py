"""Hydra callbacks for multiruns (`hydra.callbacks` in conf/hydra/default.yaml). They run in the launching
process only: before any job starts, and after every job has ended."""

from __future__ import annotations

import logging
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

import affordvla.resolvers  # noqa: F401  (the paths use ${project_root:})

log = logging.getLogger(__name__)


def _mlflow_target(config: DictConfig) -> tuple[str, str, str | None] | None:
    """(tracking URI, experiment name, artifact location) of the run config's MLflow logger, None without one."""
    logger = OmegaConf.select(config, "logger.mlflow", default=None)
    if not logger or "tracking_uri" not in logger:
        return None
    return str(logger.tracking_uri), str(logger.experiment_name), logger.get("artifact_location")


class PrepareMlflowStore(Callback):
    """Create the MLflow store and the sweep's experiment once, before parallel jobs race to do it (each job's
    logger also does it under a lock, so this is the fast path, not the only guard)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        target = _mlflow_target(config)
        if target is None:
            return
        from affordvla.tracking.mlflow_setup import prepare_experiment

        prepare_experiment(*target)


class SweepReport(Callback):
    """After a sweep: chart the optimised metric of every job, labelled by the overrides that vary, and log the
    PNG + CSV to the MLflow run `sweep-<task>-<sweep dir name>` in experiment `<jobs' experiment>-sweeps`. A failure
    here is logged, not raised: the jobs have already run and recorded themselves."""

    def __init__(self, enabled: bool = True, direction: str = "minimize"):
        self.enabled = enabled
        self.direction = direction

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        target = _mlflow_target(config)
        metric = config.get("optimized_metric")
        if not self.enabled or target is None or not metric:
            return
        from pathlib import Path

        from affordvla.sweeps.report import log_sweep_summary

        direction = OmegaConf.select(config, "hydra.sweeper.direction", default=None) or self.direction
        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            log_sweep_summary(target[0], target[1], sweep_dir, metric, direction=str(direction).lower(),
                              name=f"sweep-{config.task_name}-{sweep_dir.name}")
        except Exception:
            log.exception("could not log the sweep summary of %s", sweep_dir)

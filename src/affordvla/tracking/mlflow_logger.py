"""Lightning's MLFlowLogger, made safe for many jobs writing to one sqlite store at once."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only

from affordvla.tracking.mlflow_setup import (
    install_sqlite_busy_timeout,
    prepare_experiment,
    sqlite_path,
    with_retries,
)


class SharedStoreMLFlowLogger(MLFlowLogger):
    """MLFlowLogger whose store and experiment are created under an inter-process lock before the parent opens
    the store (MlflowClient runs the schema migrations on an empty file as soon as it is built, so two jobs
    starting together would both migrate), and whose run creation is retried while sqlite is busy.

    Only global rank 0 touches the store: the other ranks of a DDP job get Lightning's dummy experiment."""

    def __init__(self, experiment_name: str = "lightning_logs", tracking_uri: str | None = None, **kwargs: Any):
        install_sqlite_busy_timeout()
        if tracking_uri is not None and sqlite_path(tracking_uri) is None:
            kwargs["artifact_location"] = None  # a tracking server keeps artifacts in its own store
        experiment_id = None
        if tracking_uri is not None and rank_zero_only.rank == 0:
            experiment_id = prepare_experiment(tracking_uri, experiment_name, kwargs.get("artifact_location"))
        super().__init__(experiment_name=experiment_name, tracking_uri=tracking_uri, **kwargs)
        if experiment_id is not None:
            self._experiment_id = experiment_id  # the parent then skips its own (racy) get-or-create

    @property
    def experiment(self):
        if self._initialized or rank_zero_only.rank != 0:
            return super().experiment
        return with_retries(lambda: MLFlowLogger.experiment.fget(self), "creating the MLflow run")

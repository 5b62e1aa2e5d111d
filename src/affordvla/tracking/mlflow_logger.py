"""Lightning's MLFlowLogger, made safe for many jobs writing to one sqlite store at once, and continuing the MLflow
run of a resumed checkpoint."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only

from affordvla.tracking.mlflow_setup import (
    install_sqlite_busy_timeout,
    prepare_experiment,
    sqlite_path,
    with_retries,
)
from affordvla.tracking.run_record import read_run_lineage

log = logging.getLogger(__name__)
PARENT_RUN_TAG = "mlflow.parentRunId"  # MLflow's own: the UI nests the child under its parent
RESUMED_FROM_TAG = "resumed_from"


class SharedStoreMLFlowLogger(MLFlowLogger):
    """MLFlowLogger whose store and experiment are created under an inter-process lock before the parent opens
    the store (MlflowClient runs the schema migrations on an empty file as soon as it is built, so two jobs
    starting together would both migrate), and whose run creation is retried while sqlite is busy.

    `resume_from` (the run's `ckpt_path`): the checkpoint names the MLflow run that wrote it. When that run is in
    this store and has this config's hash, the resumed job logs into it (one continued run; metrics of the steps
    between the checkpoint and the interruption are logged again); otherwise it starts a child run of it.

    Only global rank 0 touches the store: the other ranks of a DDP job get Lightning's dummy experiment."""

    def __init__(self, experiment_name: str = "lightning_logs", tracking_uri: str | None = None,
                 resume_from: str | None = None, **kwargs: Any):
        install_sqlite_busy_timeout()
        if tracking_uri is not None and sqlite_path(tracking_uri) is None:
            kwargs["artifact_location"] = None  # a tracking server keeps artifacts in its own store
        experiment_id = None
        self._continued = False  # logging into the run of the resumed checkpoint
        self._resume_from = str(resume_from) if resume_from else None
        if tracking_uri is not None and rank_zero_only.rank == 0:
            experiment_id = prepare_experiment(tracking_uri, experiment_name, kwargs.get("artifact_location"))
            if self._resume_from:
                kwargs = self._link_to_parent(tracking_uri, kwargs)
        super().__init__(experiment_name=experiment_name, tracking_uri=tracking_uri, **kwargs)
        if experiment_id is not None and not self._continued:
            self._experiment_id = experiment_id  # the parent then skips its own (racy) get-or-create

    def _link_to_parent(self, tracking_uri: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        lineage = read_run_lineage(self._resume_from) or {}
        tags = {**(kwargs.get("tags") or {}), RESUMED_FROM_TAG: str(Path(self._resume_from).resolve())}
        parent_id = lineage.get("mlflow_run_id")
        parent = None
        if parent_id:
            try:
                parent = with_retries(lambda: MlflowClient(tracking_uri).get_run(parent_id), "reading the parent run")
            except MlflowException:
                log.info("the checkpoint's MLflow run %s is not in %s: starting a new run", parent_id, tracking_uri)
        if parent is not None and parent.data.tags.get("config_hash") == tags.get("config_hash"):
            self._continued = True
            log.info("resuming %s: continuing MLflow run %s", self._resume_from, parent_id)
            return {**kwargs, "run_id": parent_id, "tags": tags}
        if parent is not None:
            tags[PARENT_RUN_TAG] = parent_id
            log.info("resuming %s with another config: a child run of MLflow run %s", self._resume_from, parent_id)
        return {**kwargs, "tags": tags}

    @property
    def experiment(self):
        if self._initialized or rank_zero_only.rank != 0:
            return super().experiment
        client = with_retries(lambda: MLFlowLogger.experiment.fget(self), "creating the MLflow run")
        if self._continued:  # the interrupted run is running again, from this checkpoint
            client.update_run(self._run_id, status="RUNNING")
            client.set_tag(self._run_id, RESUMED_FROM_TAG, self.tags[RESUMED_FROM_TAG])
        return client

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        if self._continued and isinstance(params, Mapping):
            # MLflow params are immutable: the continued run keeps those it logged (the same config, so the same
            # values unless a path moved, e.g. another AFFORDVLA_ROOT)
            logged = self.experiment.get_run(self.run_id).data.params
            moved = sorted(k for k, v in params.items() if k in logged and logged[k] != str(v)[:250])
            if moved:
                log.warning("continued MLflow run %s keeps its logged params %s", self.run_id, moved)
            params = {k: v for k, v in params.items() if k not in logged}
        super().log_hyperparams(params)

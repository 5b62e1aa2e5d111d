"""MLflow store setup shared by every stage: sqlite by default, created once, safe against racing jobs."""

from __future__ import annotations

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException


def ensure_experiment(client: MlflowClient, name: str) -> str:
    """The id of experiment `name`, creating it if needed; a parallel job creating it first is not an error."""
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:
        existing = client.get_experiment_by_name(name)
        if existing is None:
            raise
        return existing.experiment_id

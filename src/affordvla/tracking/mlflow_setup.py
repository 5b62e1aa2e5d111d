"""MLflow store setup shared by every stage: sqlite by default, created once, safe against racing jobs."""

from __future__ import annotations

from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException


def artifact_location(tracking_uri: str, name: str) -> str | None:
    """Beside a sqlite store, `mlartifacts/<experiment>`; MLflow's default is `./mlruns` under whatever folder the
    job happens to run in. Other stores (a server) keep their own default."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return str(Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts" / name)


def ensure_experiment(client: MlflowClient, name: str) -> str:
    """The id of experiment `name`, creating it if needed; a parallel job creating it first is not an error."""
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location(client.tracking_uri, name))
    except MlflowException:
        existing = client.get_experiment_by_name(name)
        if existing is None:
            raise
        return existing.experiment_id

"""MLflow store setup shared by every stage: sqlite by default, created once, safe against racing jobs.

Parallel jobs (joblib multirun, several `affordvla-train` at once) share one sqlite file, and sqlite allows one
writer at a time. Three things go wrong without care, and each has its guard here:
- two processes find an empty file and both run MLflow's schema migrations: creating the store and the
  experiment happens under an exclusive file lock beside the database (`prepare_experiment`);
- two processes both find no experiment and both create it (UNIQUE constraint): the loser reads the winner's;
- a writer waits for another's transaction longer than sqlite's default 5 s ("database is locked"): every
  sqlite connection opened through SQLAlchemy in this process waits up to `SQLITE_BUSY_TIMEOUT_S` instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from affordvla.locking import exclusive

log = logging.getLogger(__name__)
T = TypeVar("T")

SQLITE_BUSY_TIMEOUT_S = float(os.environ.get("AFFORDVLA_SQLITE_BUSY_TIMEOUT_S", 120))
_busy_timeout_installed = False


def install_sqlite_busy_timeout(seconds: float = SQLITE_BUSY_TIMEOUT_S) -> None:
    """Make every sqlite connection that SQLAlchemy opens in this process (MLflow's store, Optuna's storage) wait
    up to `seconds` for another writer's lock instead of failing after 5 s. Idempotent."""
    global _busy_timeout_installed
    if _busy_timeout_installed:
        return
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    @event.listens_for(Engine, "connect")
    def _busy_timeout(dbapi_connection, _record) -> None:
        if type(dbapi_connection).__module__.startswith("sqlite3"):
            dbapi_connection.execute(f"PRAGMA busy_timeout = {int(seconds * 1000)}")

    _busy_timeout_installed = True


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI, None for any other store."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return Path(tracking_uri.removeprefix("sqlite:///").split("?", 1)[0])


def artifact_location(tracking_uri: str, name: str) -> str | None:
    """Beside a sqlite store, `mlartifacts/<experiment>`; MLflow's default is `./mlruns` under whatever folder the
    job happens to run in. Other stores (a server) keep their own default."""
    path = sqlite_path(tracking_uri)
    return None if path is None else str(path.parent / "mlartifacts" / name)


@contextlib.contextmanager
def store_lock(tracking_uri: str) -> Iterator[None]:
    """An exclusive inter-process lock (`<db>.lock`) held while a sqlite store is created or an experiment added;
    a no-op for a tracking server, which serialises its own writes."""
    path = sqlite_path(tracking_uri)
    if path is None:
        yield
        return
    with exclusive(path):
        yield


def _is_transient(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "database is locked" in text or "database is busy" in text or "unable to open database" in text


def with_retries(action: Callable[[], T], what: str, attempts: int = 8, first_wait_s: float = 0.2) -> T:
    """`action()`, retried with exponential back-off while sqlite reports a lock it did not get in time."""
    for attempt in range(attempts):
        try:
            return action()
        except Exception as exc:  # MlflowException or sqlalchemy OperationalError, depending on the layer
            if attempt == attempts - 1 or not _is_transient(exc):
                raise
            wait = first_wait_s * 2**attempt
            log.warning("%s: %s; retrying in %.1f s", what, exc, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


def ensure_experiment(client: MlflowClient, name: str, artifact_location_: str | None = None) -> str:
    """The id of experiment `name`, creating it if needed; a parallel job creating it first is not an error. A
    deleted experiment of that name is restored rather than shadowed (MLflow refuses to reuse the name)."""
    location = artifact_location_ or artifact_location(client.tracking_uri, name)
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        if existing.lifecycle_stage == "deleted":
            client.restore_experiment(existing.experiment_id)
        return existing.experiment_id
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:
        existing = client.get_experiment_by_name(name)  # another process won the race (UNIQUE name)
        if existing is None:
            raise
        return existing.experiment_id


def prepare_experiment(tracking_uri: str, name: str, artifact_location_: str | None = None) -> str:
    """Create the store (schema) and experiment `name` if needed, serialised across processes; returns its id.
    Called by the launching process before a sweep and by every job's logger before it opens the store."""
    install_sqlite_busy_timeout()
    with store_lock(tracking_uri):
        client = with_retries(lambda: MlflowClient(tracking_uri), f"opening MLflow store {tracking_uri}")
        return with_retries(lambda: ensure_experiment(client, name, artifact_location_),
                            f"creating MLflow experiment {name!r}")

"""Reading runs back from MLflow: the helpers behind `affordvla-table`, `affordvla-reproduce` and the notebooks.

Runs come back as plain records (one dict per run: ids, tags, final metrics); `runs_frame` turns them into a
pandas DataFrame where pandas is installed (MLflow depends on it). Nothing here writes to the store.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Run, ViewType

TABLES_EXPERIMENT = "affordvla-tables"
# What a training run is compared against: predicting the training set's mean keypoints.
BASELINE_METRIC = "test/mean_baseline_error"
KEY_TEST_METRICS = ("test/keypoint_error", "test/kalie_corrected/avg_mse", "test/parse_failure_rate")
# Tags every affordvla-train run carries (run_record.run_tags); `task_name` tells training runs from the
# pre-training stage and from rendered tables, which live in the same store.
TRAINING_RUN_TAG = "task_name"


def default_tracking_uri() -> str:
    """$AFFORDVLA_MLFLOW_URI, else the project's store: `outputs/mlflow.db` under $AFFORDVLA_ROOT or the current
    directory, the same place `affordvla-train` writes to by default."""
    uri = os.environ.get("AFFORDVLA_MLFLOW_URI")
    if uri:
        return uri
    from affordvla.resolvers import project_root

    return f"sqlite:///{Path(project_root()) / 'outputs' / 'mlflow.db'}"


def store_exists(tracking_uri: str) -> bool:
    """False for a sqlite URI whose file is not there (MLflow would silently create an empty store)."""
    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri.removeprefix("sqlite:///").split("?", 1)[0]).is_file()
    return True


class RunNotFound(ValueError):
    """An MLflow run id that the store does not hold."""


def open_store(tracking_uri: str | None = None) -> MlflowClient:
    """A client of the store (default: `default_tracking_uri()`, as every affordvla command), refusing a sqlite
    store whose file is not there: opening it would create an empty database and then report the run missing."""
    uri = tracking_uri or default_tracking_uri()
    if not store_exists(uri):
        raise FileNotFoundError(f"MLflow store {uri} does not exist: no run was recorded there (the default store "
                                "is outputs/mlflow.db under $AFFORDVLA_ROOT or the current folder; pass "
                                "--tracking-uri or set AFFORDVLA_ROOT / AFFORDVLA_MLFLOW_URI)")
    return MlflowClient(uri)


def get_run(client: MlflowClient, run_id: str) -> Run:
    """The run, or RunNotFound naming the id and the store."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as exc:
        raise RunNotFound(f"run {run_id!r} not found in MLflow store {client.tracking_uri} "
                          f"({exc.message.splitlines()[0]})") from None


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def search_runs(client: MlflowClient, *, tags: dict[str, str] | None = None, status: str | None = "FINISHED",
                exclude_experiments: Sequence[str] = (TABLES_EXPERIMENT,), newest_first: bool = True) -> list[Run]:
    """Runs of every experiment of the store (but `exclude_experiments`) whose tags equal `tags`."""
    experiments = [e for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)
                   if e.name not in exclude_experiments]
    if not experiments:
        return []
    clauses = [f"tags.`{key}` = {_quote(value)}" for key, value in (tags or {}).items()]
    if status:
        clauses.append(f"attributes.status = {_quote(status)}")
    order = ["attributes.start_time DESC" if newest_first else "attributes.start_time ASC"]
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs([e.experiment_id for e in experiments], " and ".join(clauses),
                                  order_by=order, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def latest_run(client: MlflowClient, tags: dict[str, str]) -> Run | None:
    """The most recently started finished run with these tags, or None."""
    runs = search_runs(client, tags=tags)
    return runs[0] if runs else None


def run_record(run: Run, experiment_names: dict[str, str] | None = None) -> dict[str, Any]:
    """One flat dict per run: `run_id`, `run_name`, `experiment`, `status`, `start_time` (ms), `tag.<key>`
    for every tag but MLflow's own, and the final value of every metric under its own name."""
    info = run.info
    record: dict[str, Any] = {
        "run_id": info.run_id,
        "run_name": info.run_name,
        "experiment": (experiment_names or {}).get(info.experiment_id, info.experiment_id),
        "status": info.status,
        "start_time": info.start_time,
    }
    for key, value in sorted(run.data.tags.items()):
        if not key.startswith("mlflow."):
            record[f"tag.{key}"] = value
    record.update(sorted(run.data.metrics.items()))
    return record


def load_runs(tracking_uri: str | None = None, *, training_only: bool = True,
              tags: dict[str, str] | None = None, status: str | None = "FINISHED") -> list[dict[str, Any]]:
    """Records of the store's runs, newest first. `training_only` keeps affordvla-train runs (tagged
    `task_name`). An absent sqlite store gives no runs instead of creating an empty database."""
    uri = tracking_uri or default_tracking_uri()
    if not store_exists(uri):
        return []
    client = MlflowClient(uri)
    names = {e.experiment_id: e.name for e in client.search_experiments(view_type=ViewType.ALL)}
    records = [run_record(run, names) for run in search_runs(client, tags=tags, status=status)]
    if training_only:
        records = [r for r in records if f"tag.{TRAINING_RUN_TAG}" in r]
    return records


def runs_frame(records: Iterable[dict[str, Any]]):
    """The records as a pandas DataFrame (one row per run, NaN where a run lacks a metric or tag)."""
    try:
        import pandas as pd
    except ImportError as exc:  # pragma: no cover - mlflow installs pandas
        raise ImportError("runs_frame needs pandas (pip install pandas); the records themselves are plain "
                          "dicts") from exc
    return pd.DataFrame(list(records))


def metric_names(records: Iterable[dict[str, Any]], prefix: str = "test/") -> list[str]:
    """Every metric name starting with `prefix` that at least one record has, sorted."""
    names: set[str] = set()
    for record in records:
        names.update(k for k in record if k.startswith(prefix))
    return sorted(names)


def select_metrics(record: dict[str, Any], names: Sequence[str]) -> dict[str, float | None]:
    """The named metrics of one record; None where the run did not log it."""
    return {name: (float(record[name]) if record.get(name) is not None else None) for name in names}


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else None


def compare_backbones(records: Iterable[dict[str, Any]], metrics: Sequence[str] = KEY_TEST_METRICS,
                      baseline: str = BASELINE_METRIC) -> list[dict[str, Any]]:
    """One row per `backbone` and `scale` tag (a smoke run is never averaged into full-scale ones): number of runs,
    the newest run's id, the datasets of its runs (tags), the mean of each metric over its runs, the mean baseline,
    and `vs_baseline` = mean(metric / baseline) of the first metric over the runs that logged both (below 1 beats
    predicting the mean). Rows sorted by scale (full first), then `vs_baseline`, then name."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for record in records:  # records are newest first: the first of each group is its newest run
        key = (str(record.get("tag.backbone", "none")), str(record.get("tag.scale") or ""))
        groups.setdefault(key, []).append(record)
    first = metrics[0] if metrics else None
    rows = []
    for (backbone, scale), group in groups.items():
        row: dict[str, Any] = {"backbone": backbone, "scale": scale, "runs": len(group),
                               "newest_run": group[0]["run_id"]}
        # what the runs were trained on: a comparison across datasets is worth a filter (tags=...)
        row["datasets"] = ", ".join(sorted({str(r["tag.dataset"]) for r in group if r.get("tag.dataset")}))
        for name in metrics:
            row[name] = _mean([r.get(name) for r in group])
        row[baseline] = _mean([r.get(baseline) for r in group])
        ratios = [r[first] / r[baseline] for r in group
                  if first and r.get(first) is not None and r.get(baseline)]
        row["vs_baseline"] = _mean(ratios)
        rows.append(row)
    rows.sort(key=lambda r: (r["scale"] != "full", r["scale"], r["vs_baseline"] is None, r["vs_baseline"] or 0.0,
                             r["backbone"]))
    return rows


def download_artifact(run_id: str, artifact_path: str, dst: str | Path, tracking_uri: str | None = None) -> Path:
    """Download one artifact (file or folder) of a run into `dst`; returns the local path."""
    client = MlflowClient(tracking_uri or default_tracking_uri())
    Path(dst).mkdir(parents=True, exist_ok=True)
    return Path(client.download_artifacts(run_id, artifact_path, str(dst)))


def list_artifact_files(run_id: str, folder: str, tracking_uri: str | None = None) -> list[str]:
    """Paths of the files in one artifact folder of a run (not recursive), sorted."""
    client = MlflowClient(tracking_uri or default_tracking_uri())
    return sorted(a.path for a in client.list_artifacts(run_id, folder) if not a.is_dir)


def latest_overlay(run_id: str, dst: str | Path, split: str = "test", tracking_uri: str | None = None,
                   folder: str = "overlays") -> Path | None:
    """The keypoint overlay grid of the run's last `split` evaluation (`overlays/<split>_step<N>.png`, logged
    by KeypointOverlayCallback), downloaded into `dst`; None when the run logged none (action runs log
    `action_traces/` instead: pass folder="action_traces")."""
    candidates = [p for p in list_artifact_files(run_id, folder, tracking_uri)
                  if Path(p).name.startswith(f"{split}_step") and p.endswith(".png")]
    if not candidates:
        return None
    # zero-padded step numbers: the last name is the last step
    return download_artifact(run_id, candidates[-1], dst, tracking_uri)

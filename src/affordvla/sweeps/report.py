"""Compare the runs of one sweep: gather them from MLflow (train.py tags each job with its sweep directory),
draw the optimised metric per job, and log the chart and a CSV table to an MLflow run of the sweep's own."""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Run

log = logging.getLogger(__name__)
SUMMARY_TAG = "sweep_summary_of"


def sweep_runs(client: MlflowClient, experiment_id: str, sweep_dir: str | Path) -> list[Run]:
    """The job runs of the sweep in `sweep_dir`, in job order."""
    where = str(Path(sweep_dir).resolve()).replace("'", "\\'")
    runs = client.search_runs([experiment_id], filter_string=f"tags.sweep_dir = '{where}'", max_results=10_000)
    return sorted(runs, key=lambda r: int(r.data.tags.get("sweep_job", 0)))


def varying_overrides(overrides: Sequence[Sequence[str]]) -> list[str]:
    """Per job, only the overrides whose value differs between jobs (the common ones say nothing on a chart);
    the full list when every job has the same overrides."""
    parsed = [dict(o.split("=", 1) if "=" in o else (o, "") for o in job) for job in overrides]
    keys = sorted({k for job in parsed for k in job})
    varying = [k for k in keys if len({job.get(k) for job in parsed}) > 1] or keys
    return [" ".join(f"{k}={job[k]}" for k in varying if k in job) for job in parsed]


def summary_rows(runs: Sequence[Run], metric: str) -> list[dict[str, Any]]:
    """One row per job: its number, label, status, the optimised metric (NaN when the job did not log it) and
    every other final val/ and test/ metric."""
    labels = varying_overrides([json.loads(r.data.tags.get("sweep_overrides", "[]")) for r in runs])
    rows = []
    for run, label in zip(runs, labels):
        row = {"job": int(run.data.tags.get("sweep_job", -1)), "label": label, "run_id": run.info.run_id,
               "status": run.info.status, metric: run.data.metrics.get(metric, math.nan)}
        row.update({k: v for k, v in sorted(run.data.metrics.items()) if k.startswith(("val/", "test/"))})
        rows.append(row)
    return rows


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    return path


def draw_chart(rows: Sequence[dict[str, Any]], metric: str, path: Path, direction: str = "minimize",
               title: str = "") -> Path:
    """A horizontal bar per job (label = its varying overrides), the best job highlighted; jobs without the
    metric are marked as missing rather than dropped."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    values = [row[metric] for row in rows]
    finite = [v for v in values if not math.isnan(v)]
    best = values.index((min if direction == "minimize" else max)(finite)) if finite else None  # first of ties
    labels = [f"#{row['job']} {row['label']}" for row in rows]
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.45 * len(rows)))
    colours = ["tab:orange" if i == best else "tab:blue" for i in range(len(values))]
    ax.barh(range(len(rows)), [0 if math.isnan(v) else v for v in values], color=colours)
    for y, value in enumerate(values):
        ax.text(0 if math.isnan(value) else value, y, " missing" if math.isnan(value) else f" {value:.4g}",
                va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()  # job 0 on top
    ax.set_xlabel(f"{metric} ({'lower' if direction == 'minimize' else 'higher'} is better)")
    ax.set_title(title or "sweep", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def summary_experiment_name(experiment_name: str) -> str:
    """Sweep summaries go to an experiment of their own beside the jobs' (`<experiment>-sweeps`), so that the
    jobs' experiment holds training runs only (tables and reproduce read every run there)."""
    return f"{experiment_name}-sweeps"


def log_sweep_summary(tracking_uri: str, experiment_name: str, sweep_dir: str | Path, metric: str, *,
                      direction: str = "minimize", name: str | None = None) -> str | None:
    """Chart + CSV of the sweep's runs (in experiment `experiment_name`), written into `sweep_dir` and logged to an
    MLflow run `name` (default `sweep-<dir name>`) in `<experiment_name>-sweeps`. Returns that run's id, or None
    when no job run was found."""
    from affordvla.tracking.mlflow_setup import prepare_experiment

    sweep_dir = Path(sweep_dir).resolve()
    client = MlflowClient(tracking_uri)
    jobs_experiment = client.get_experiment_by_name(experiment_name)
    runs = sweep_runs(client, jobs_experiment.experiment_id, sweep_dir) if jobs_experiment else []
    if not runs:
        log.warning("no MLflow runs tagged with sweep %s in %s: nothing to compare", sweep_dir, experiment_name)
        return None
    experiment_id = prepare_experiment(tracking_uri, summary_experiment_name(experiment_name))
    name = name or f"sweep-{sweep_dir.name}"
    rows = summary_rows(runs, metric)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    csv_path = write_csv(rows, sweep_dir / "sweep_summary.csv")
    png_path = draw_chart(rows, metric, sweep_dir / "sweep_summary.png", direction, title=f"{name}: {metric}")
    finite = [r for r in rows if not math.isnan(r[metric])]
    run = client.create_run(experiment_id, run_name=name,
                            tags={SUMMARY_TAG: str(sweep_dir), "sweep_jobs": str(len(rows)),
                                  "sweep_experiment": experiment_name})
    if finite:
        best = (min if direction == "minimize" else max)(finite, key=lambda r: r[metric])
        client.log_metric(run.info.run_id, f"best/{metric}", best[metric])
        client.set_tag(run.info.run_id, "best_run_id", best["run_id"])
        client.set_tag(run.info.run_id, "best_overrides", best["label"])
    client.log_artifact(run.info.run_id, str(png_path), "sweep")
    client.log_artifact(run.info.run_id, str(csv_path), "sweep")
    client.set_terminated(run.info.run_id, "FINISHED")
    log.info("sweep summary of %d runs logged to MLflow run %s (%s)", len(rows), name, run.info.run_id)
    return run.info.run_id

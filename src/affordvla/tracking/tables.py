"""Paper tables from MLflow runs, the library behind `affordvla-table` (affordvla/tables.py).

`<table>/table.yaml` names the columns (metric keys) and rows (experiment configs `conf/experiment/<cell>.yaml`,
with the published numbers). For every row, the newest finished run tagged `experiment=<cell>` and
`scale=<scale>` gives the measured values. A run whose `config_hash` tag differs from the hash of the cell as
composed now is marked stale; a row without a run is marked missing. This module reads the spec, collects the
cells, renders table.md, table.csv, table.json and table.png and logs them to MLflow; training missing cells is
the command's part.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from affordvla.tracking.runs import TABLES_EXPERIMENT, latest_run

SPEC_NAME = "table.yaml"
TOP_KEYS = {"title", "source", "notes", "smoke_overrides", "columns", "rows"}
COLUMN_KEYS = {"name", "metric", "lower_is_better", "format"}
ROW_KEYS = {"name", "experiment", "published", "metrics"}
DEFAULT_FORMAT = "{:.4g}"
# Statuses of a cell, as written in the tables.
OK, STALE, MISSING, FAILED, REFERENCE = "ok", "stale", "missing", "failed", "reference"


class TableError(ValueError):
    """A table spec or cell that cannot be rendered; the message names the file and the entry."""


@dataclass
class Column:
    """One column of a paper table: the metric it shows, which direction is better, and its number format."""

    name: str
    metric: str
    lower_is_better: bool | None = None
    format: str = DEFAULT_FORMAT

    def render(self, value: float | None) -> str:
        if value is None:
            return "—"
        if math.isnan(value):
            return "nan"
        return self.format.format(value)


@dataclass
class Row:
    """One row of a paper table: the experiment config of its cell (None for a reference row) and the paper's
    published numbers."""

    name: str
    experiment: str | None  # None: a reference row, the paper's own model, shown with its published numbers only
    published: dict[str, float | None] = field(default_factory=dict)
    metrics: dict[str, str] = field(default_factory=dict)  # column name -> metric key, overriding the column's

    def metric(self, column: Column) -> str:
        return self.metrics.get(column.name, column.metric)


@dataclass
class TableSpec:
    """A paper table as `table.yaml` describes it: its columns, rows, source and smoke-scale overrides."""

    path: Path
    name: str
    title: str
    columns: list[Column]
    rows: list[Row]
    source: str = ""
    notes: str = ""
    smoke_overrides: list[str] = field(default_factory=list)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def load_spec(folder: str | Path) -> TableSpec:
    """Read and check `<folder>/table.yaml`; every problem is reported with the file and the entry."""
    folder = Path(folder)
    path = folder / SPEC_NAME
    if not folder.is_dir():
        raise TableError(f"{folder}: no such experiment folder")
    if not path.is_file():
        raise TableError(f"{path}: not found (an experiment folder holds its table spec in {SPEC_NAME})")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise TableError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise TableError(f"{path}: expected a mapping with 'columns' and 'rows', got {type(data).__name__}")
    unknown = sorted(set(data) - TOP_KEYS)
    if unknown:
        raise TableError(f"{path}: unknown key(s) {unknown}; allowed: {sorted(TOP_KEYS)}")
    for key in ("title", "source", "notes"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise TableError(f"{path}: '{key}' must be a string")
    smoke = data.get("smoke_overrides") or []
    if not isinstance(smoke, list) or not all(isinstance(o, str) and "=" in o for o in smoke):
        raise TableError(f"{path}: 'smoke_overrides' must be a list of Hydra overrides (key=value strings)")
    columns = _parse_columns(path, data.get("columns"))
    rows = _parse_rows(path, data.get("rows"), {c.name for c in columns})
    return TableSpec(path=path, name=folder.resolve().name, title=data.get("title") or folder.resolve().name,
                     columns=columns, rows=rows, source=data.get("source") or "", notes=data.get("notes") or "",
                     smoke_overrides=list(smoke))


def _parse_columns(path: Path, entries: Any) -> list[Column]:
    if not isinstance(entries, list) or not entries:
        raise TableError(f"{path}: 'columns' must be a non-empty list of {{name, metric}} mappings")
    columns: list[Column] = []
    for i, entry in enumerate(entries):
        where = f"{path}: columns[{i}]"
        if not isinstance(entry, dict):
            raise TableError(f"{where}: expected a mapping with 'name' and 'metric', got {entry!r}")
        if isinstance(entry.get("name"), str):
            where += f" ({entry['name']!r})"
        unknown = sorted(set(entry) - COLUMN_KEYS)
        if unknown:
            raise TableError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(COLUMN_KEYS)}")
        for key in ("name", "metric"):
            if not isinstance(entry.get(key), str) or not entry[key]:
                raise TableError(f"{where}: '{key}' is missing or not a string")
        if entry["name"] in {c.name for c in columns}:
            raise TableError(f"{where}: duplicate column name {entry['name']!r}")
        lower = entry.get("lower_is_better")
        if lower is not None and not isinstance(lower, bool):
            raise TableError(f"{where}: 'lower_is_better' must be true or false")
        fmt = entry.get("format", DEFAULT_FORMAT)
        try:
            fmt.format(1.5)
        except (AttributeError, ValueError, IndexError, KeyError) as exc:
            raise TableError(f"{where}: 'format' {fmt!r} cannot format a number ({exc})") from None
        columns.append(Column(entry["name"], entry["metric"], lower, fmt))
    return columns


def _parse_rows(path: Path, entries: Any, column_names: set[str]) -> list[Row]:
    if not isinstance(entries, list) or not entries:
        raise TableError(f"{path}: 'rows' must be a non-empty list of {{name, experiment}} mappings")
    rows: list[Row] = []
    for i, entry in enumerate(entries):
        where = f"{path}: rows[{i}]"
        if not isinstance(entry, dict):
            raise TableError(f"{where}: expected a mapping with 'name' and 'experiment', got {entry!r}")
        if isinstance(entry.get("name"), str):
            where += f" ({entry['name']!r})"
        unknown = sorted(set(entry) - ROW_KEYS)
        if unknown:
            raise TableError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(ROW_KEYS)}")
        if not isinstance(entry.get("name"), str) or not entry["name"]:
            raise TableError(f"{where}: 'name' is missing or not a string")
        # a row without an experiment is a reference row: a model of the paper this framework does not train
        reference = entry.get("experiment") is None and "experiment" in entry
        if not reference and (not isinstance(entry.get("experiment"), str) or not entry["experiment"]):
            raise TableError(f"{where}: 'experiment' is missing or not a string (null marks a reference row "
                             "of published numbers only)")
        if entry["name"] in {r.name for r in rows}:
            raise TableError(f"{where}: duplicate row name {entry['name']!r}")
        published = entry.get("published") or {}
        metrics = entry.get("metrics") or {}
        for key, mapping in (("published", published), ("metrics", metrics)):
            if not isinstance(mapping, dict):
                raise TableError(f"{where}: '{key}' must map column names to values")
            strangers = sorted(set(mapping) - column_names)
            if strangers:
                raise TableError(f"{where}: '{key}' names unknown column(s) {strangers}; columns are "
                                 f"{sorted(column_names)}")
        for column, value in published.items():
            if value is not None and not _is_number(value):
                raise TableError(f"{where}: published[{column!r}] must be a number or null, got {value!r}")
        for column, value in metrics.items():
            if not isinstance(value, str) or not value:
                raise TableError(f"{where}: metrics[{column!r}] must be a metric key, got {value!r}")
        if reference and not any(v is not None for v in published.values()):
            raise TableError(f"{where}: a reference row (experiment: null) needs published numbers")
        rows.append(Row(entry["name"], entry["experiment"],
                        {k: (float(v) if v is not None else None) for k, v in published.items()}, dict(metrics)))
    return rows


# ---------------------------------------------------------------------------------------------- configuration

def scale_overrides(spec: TableSpec, scale: str) -> list[str]:
    """The overrides a scale adds to every cell: none at full scale; the table's `smoke_overrides` at a smoke
    scale, with `scale=<scale>` added when they do not choose one (so runs are tagged with the scale)."""
    if scale == "full":
        return []
    if not scale.startswith("smoke"):
        raise TableError(f"scale must be 'full' or a name starting with 'smoke', got {scale!r}")
    chosen = [o.split("=", 1)[1] for o in spec.smoke_overrides if o.split("=", 1)[0].lstrip("+~") == "scale"]
    if chosen and chosen[-1] != scale:
        raise TableError(f"{spec.path}: smoke_overrides choose scale={chosen[-1]} but --scale {scale} was asked")
    return list(spec.smoke_overrides) + ([] if chosen else [f"scale={scale}"])


def cell_overrides(spec: TableSpec, row: Row, scale: str, extra: list[str]) -> list[str]:
    return [f"experiment={row.experiment}", *scale_overrides(spec, scale), *extra]


def current_hash(spec: TableSpec, row: Row, overrides: list[str]) -> str:
    """config_hash of the cell as `affordvla-train <overrides>` would compose it now."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    import affordvla.resolvers  # noqa: F401  (${project_root:})
    from affordvla.paths import CONFIG_DIR
    from affordvla.tracking.run_record import config_hash

    where = f"{spec.path}: row {row.name!r}"
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name="train", overrides=overrides)
    except MissingConfigException as exc:
        first = str(exc).split("\n")[0]
        if f"experiment/{row.experiment}" in first:
            raise TableError(f"{where}: unknown experiment config {row.experiment!r} (no "
                             f"{Path(CONFIG_DIR) / 'experiment' / (row.experiment + '.yaml')})") from None
        raise TableError(f"{where}: cannot compose {' '.join(overrides)}: {exc}") from None
    except (HydraException, OmegaConfBaseException) as exc:
        raise TableError(f"{where}: cannot compose {' '.join(overrides)}: {exc}") from None
    finally:
        GlobalHydra.instance().clear()
    return config_hash(cfg)


# ---------------------------------------------------------------------------------------------- collection

@dataclass
class Cell:
    """One row's result: its status (ok, stale, missing, failed, reference), the config hashes compared and the
    measured values of the run found."""

    row: Row
    status: str
    current_hash: str
    values: dict[str, float | None]  # column name -> measured value
    run_id: str | None = None
    run_hash: str | None = None
    run_name: str | None = None
    git_sha: str | None = None


def collect(spec: TableSpec, tracking_uri: str, scale: str, hashes: dict[str, str]) -> list[Cell]:
    """The newest finished run of every row (tags experiment=<cell>, scale=<scale>) and its metrics."""
    from mlflow import MlflowClient

    from affordvla.tracking.runs import store_exists

    client = MlflowClient(tracking_uri) if store_exists(tracking_uri) else None
    cells = []
    for row in spec.rows:
        if row.experiment is None:
            cells.append(Cell(row, REFERENCE, "", {c.name: None for c in spec.columns}))
            continue
        run = latest_run(client, {"experiment": row.experiment, "scale": scale}) if client else None
        if run is None:
            cells.append(Cell(row, MISSING, hashes[row.name], {c.name: None for c in spec.columns}))
            continue
        metrics = run.data.metrics
        run_hash = run.data.tags.get("config_hash")
        cells.append(Cell(row, OK if run_hash == hashes[row.name] else STALE, hashes[row.name],
                          {c.name: metrics.get(row.metric(c)) for c in spec.columns}, run.info.run_id, run_hash,
                          run.info.run_name, run.data.tags.get("git_sha")))
    return cells


# ---------------------------------------------------------------------------------------------- rendering

def _best(spec: TableSpec, cells: list[Cell]) -> dict[str, str | None]:
    """Per column with a direction, the row name holding the best measured value of the up-to-date cells."""
    best: dict[str, str | None] = {}
    for column in spec.columns:
        if column.lower_is_better is None:
            continue
        candidates = [(c.values[column.name], c.row.name) for c in cells
                      if c.status == OK and c.values[column.name] is not None
                      and not math.isnan(c.values[column.name])]
        if candidates:
            sign = 1 if column.lower_is_better else -1
            best[column.name] = min(candidates, key=lambda vc: sign * vc[0])[1]
    return best


def _status_text(cell: Cell) -> str:
    if cell.status == STALE:
        return f"STALE (config now `{cell.current_hash}`)"
    return {OK: "ok", MISSING: "MISSING (no run)", FAILED: "FAILED (see log)",
            REFERENCE: "reference (published only)"}[cell.status]


def render_markdown(spec: TableSpec, cells: list[Cell], scale: str, tracking_uri: str) -> str:
    best = _best(spec, cells)
    lines = [f"# {spec.title}", ""]
    if spec.source:
        lines += [f"Source: {spec.source}", ""]
    if spec.notes:
        lines += [spec.notes.strip(), ""]
    lines += [f"Scale: `{scale}`. Runs from `{tracking_uri}`.", ""]
    header = ["row"]
    for column in spec.columns:
        arrow = {True: " ↓", False: " ↑", None: ""}[column.lower_is_better]
        header += [f"{column.name}{arrow}", f"{column.name} (published)"]
    header += ["run", "config_hash", "status"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (2 * len(spec.columns)) + ["---"] * 3) + "|")
    for cell in cells:
        entries = [cell.row.name]
        for column in spec.columns:
            measured = column.render(cell.values[column.name]) if cell.run_id else "—"
            if cell.run_id and cell.values[column.name] is None:
                measured = "n/a"  # the run did not log this metric
            if best.get(column.name) == cell.row.name:
                measured = f"**{measured}**"
            entries += [measured, column.render(cell.row.published.get(column.name))]
        entries += [f"`{cell.run_id[:8]}`" if cell.run_id else "—",
                    f"`{cell.run_hash}`" if cell.run_hash else "—", _status_text(cell)]
        lines.append("| " + " | ".join(entries) + " |")
    lines += ["", "Bold: best up-to-date measured value (↓ lower is better, ↑ higher is better). "
              "STALE: the run's config_hash differs from the cell's config as composed now (re-run it). "
              "MISSING: no finished run of the cell at this scale. reference: a model of the paper that this "
              "framework does not train, with its published numbers only. n/a: the run did not log the metric. "
              "— : no value.", ""]
    return "\n".join(lines)


def render_csv(spec: TableSpec, cells: list[Cell]) -> str:
    """Machine-readable: full-precision values (repr), empty where there is none."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    header = ["row", "experiment"]
    for column in spec.columns:
        header += [column.name, f"{column.name} (published)"]
    writer.writerow(header + ["run_id", "config_hash", "current_config_hash", "status"])
    for cell in cells:
        values = [cell.row.name, cell.row.experiment or ""]
        for column in spec.columns:
            for value in (cell.values[column.name], cell.row.published.get(column.name)):
                values.append("" if value is None else repr(float(value)))
        writer.writerow(values + [cell.run_id or "", cell.run_hash or "", cell.current_hash, cell.status])
    return buffer.getvalue()


def render_json(spec: TableSpec, cells: list[Cell], scale: str, tracking_uri: str) -> dict[str, Any]:
    return {
        "table": spec.name, "title": spec.title, "source": spec.source, "scale": scale,
        "tracking_uri": tracking_uri,
        "columns": [{"name": c.name, "metric": c.metric, "lower_is_better": c.lower_is_better} for c in spec.columns],
        "rows": [{"name": c.row.name, "experiment": c.row.experiment, "status": c.status, "run_id": c.run_id,
                  "run_name": c.run_name, "config_hash": c.run_hash, "current_config_hash": c.current_hash,
                  "git_sha": c.git_sha, "measured": c.values,
                  "published": {k.name: c.row.published.get(k.name) for k in spec.columns},
                  "metrics": {k.name: c.row.metric(k) for k in spec.columns}} for c in cells],
    }


def render_chart(spec: TableSpec, cells: list[Cell], path: Path) -> None:
    """One panel per column: measured and published bars side by side for every row (hatched: stale run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(spec.columns)
    figure, axes = plt.subplots(n, 1, figsize=(max(6.0, 1.1 * len(cells) + 2), 3.2 * n), squeeze=False)
    x = range(len(cells))
    width = 0.38
    for axis, column in zip(axes[:, 0], spec.columns):
        measured = [c.values[column.name] for c in cells]
        published = [c.row.published.get(column.name) for c in cells]
        for i, (value, cell) in enumerate(zip(measured, cells)):
            if value is not None:
                axis.bar(i - width / 2, value, width, color="tab:blue", hatch="//" if cell.status == STALE else None,
                         label="measured" if i == next(j for j, v in enumerate(measured) if v is not None) else None)
            else:
                axis.text(i - width / 2, 0, cell.status if cell.status != OK else "n/a", rotation=90,
                          ha="center", va="bottom", fontsize=7, color="tab:red")
        if any(v is not None for v in published):
            first = next(j for j, v in enumerate(published) if v is not None)
            for i, value in enumerate(published):
                if value is not None:
                    axis.bar(i + width / 2, value, width, color="tab:gray", label="published" if i == first else None)
        direction = {True: " (lower is better)", False: " (higher is better)", None: ""}[column.lower_is_better]
        axis.set_title(f"{column.name}{direction}", fontsize=10)
        axis.set_xticks(list(x))
        axis.set_xticklabels([c.row.name for c in cells], rotation=20, ha="right", fontsize=8)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    figure.suptitle(spec.title, fontsize=11)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)


def write_outputs(spec: TableSpec, cells: list[Cell], out: Path, scale: str, tracking_uri: str) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = {"markdown": out / "table.md", "csv": out / "table.csv", "json": out / "table.json",
             "chart": out / "table.png"}
    files["markdown"].write_text(render_markdown(spec, cells, scale, tracking_uri), encoding="utf-8")
    files["csv"].write_text(render_csv(spec, cells), encoding="utf-8")
    files["json"].write_text(json.dumps(render_json(spec, cells, scale, tracking_uri), indent=2), encoding="utf-8")
    render_chart(spec, cells, files["chart"])
    return files


def log_table(spec: TableSpec, cells: list[Cell], files: dict[str, Path], tracking_uri: str, scale: str) -> str:
    """Log the rendered files as MLflow run `table-<name>` of experiment `affordvla-tables`; returns its id."""
    from mlflow import MlflowClient

    from affordvla.tracking.mlflow_setup import ensure_experiment

    client = MlflowClient(tracking_uri)
    experiment_id = ensure_experiment(client, TABLES_EXPERIMENT)
    counts = {s: sum(c.status == s for c in cells) for s in (OK, STALE, MISSING, FAILED)}
    run = client.create_run(experiment_id, run_name=f"table-{spec.name}",
                            tags={"table": spec.name, "scale": scale,
                                  **{f"cells_{k}": str(v) for k, v in counts.items()}})
    for path in files.values():
        client.log_artifact(run.info.run_id, str(path), "table")
    client.set_terminated(run.info.run_id)
    return run.info.run_id

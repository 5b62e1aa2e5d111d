"""affordvla-table: spec checks, run collection (newest finished run per cell and scale), stale and missing marks,
Markdown/CSV/chart output, MLflow logging, and --run-missing training a real cell."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import compose_train, log_finished_run
from mlflow import MlflowClient
from PIL import Image

from affordvla import tables
from affordvla.tracking.run_record import config_hash
from affordvla.tracking.tables import Row, TableError, TableSpec, current_hash, load_spec

SPEC = {
    "title": "Toy heads",
    "source": "made up for the test",
    "notes": "Numbers are invented.",
    "smoke_overrides": ["scale=smoke"],
    "columns": [
        {"name": "action MSE", "metric": "val/action_mse", "lower_is_better": True, "format": "{:.3f}"},
        {"name": "gripper acc (%)", "metric": "val/gripper_accuracy", "lower_is_better": False, "format": "{:.1f}"},
    ],
    "rows": [
        {"name": "lstm", "experiment": "toy_actions_lstm", "published": {"action MSE": 0.05, "gripper acc (%)": 91.0}},
        {"name": "mlp", "experiment": "toy_actions_mlp", "published": {"action MSE": 0.07}},
        {"name": "gpt", "experiment": "toy_actions_gpt", "published": {"action MSE": None}},
        {"name": "discrete", "experiment": "toy_actions_discrete", "metrics": {"gripper acc (%)": "val/gripper_pct"}},
    ],
}


def _write_spec(folder: Path, spec: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "table.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return folder


_SPEC_FOR_HASH = TableSpec(path=Path("table.yaml"), name="t", title="t", columns=[], rows=[])


def _hash(experiment: str, *extra: str) -> str:
    """The config hash of a cell as affordvla-table composes it."""
    return current_hash(_SPEC_FOR_HASH, Row("r", experiment), [f"experiment={experiment}", *extra])


def _log_run(client: MlflowClient, experiment: str, *, tags: dict, metrics: dict, start: int,
             status: str = "FINISHED") -> str:
    return log_finished_run(client, f"affordvla-{experiment}",
                            {"experiment": experiment, "task_name": experiment, **tags}, metrics, start, status)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store with runs for three of the four cells (hashes as the cells compose now, one stale). One per module:
    creating an MLflow sqlite store takes seconds; tests only add a table run, which is never a cell."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('store')}/mlflow.db"
    client = MlflowClient(uri)
    hashes = {name: _hash(name) for name in ("toy_actions_lstm", "toy_actions_mlp", "toy_actions_discrete")}
    full = {"scale": "full"}
    ids = {
        "lstm_old": _log_run(client, "toy_actions_lstm", start=1000,
                             metrics={"val/action_mse": 0.5, "val/gripper_accuracy": 10.0},
                             tags={**full, "config_hash": hashes["toy_actions_lstm"]}),
        "lstm": _log_run(client, "toy_actions_lstm", start=3000,
                         metrics={"val/action_mse": 0.0412, "val/gripper_accuracy": 93.26},
                         tags={**full, "config_hash": hashes["toy_actions_lstm"], "git_sha": "abc"}),
        # newer, but failed: not a result
        "lstm_failed": _log_run(client, "toy_actions_lstm", start=4000, status="FAILED",
                                metrics={"val/action_mse": 9.9},
                                tags={**full, "config_hash": hashes["toy_actions_lstm"]}),
        # newest, but another scale
        "lstm_smoke": _log_run(client, "toy_actions_lstm", start=5000, metrics={"val/action_mse": 7.0},
                               tags={"scale": "smoke", "config_hash": _hash("toy_actions_lstm", "scale=smoke")}),
        "mlp": _log_run(client, "toy_actions_mlp", start=2000,
                        metrics={"val/action_mse": 0.0387, "val/gripper_accuracy": 95.0},
                        tags={**full, "config_hash": "0123456789ab"}),
        "discrete": _log_run(client, "toy_actions_discrete", start=2500,
                             metrics={"val/action_mse": 0.1, "val/gripper_accuracy": 0.2, "val/gripper_pct": 97.5},
                             tags={**full, "config_hash": hashes["toy_actions_discrete"]}),
    }
    return uri, ids, hashes


def test_current_hash_is_the_hash_of_the_composed_cell(tmp_path):
    cfg = compose_train(["experiment=toy_actions_lstm", f"paths.root_dir={tmp_path}"], tmp_path / "run")
    assert _hash("toy_actions_lstm") == config_hash(cfg)  # paths.* do not count
    assert _hash("toy_actions_lstm") != _hash("toy_actions_mlp")
    assert _hash("toy_actions_lstm", "seed=3") != _hash("toy_actions_lstm")


def test_table_markdown_csv_chart(tmp_path, store):
    uri, ids, hashes = store
    folder = _write_spec(tmp_path / "toy_heads", SPEC)
    spec, cells, files = tables.build_table(folder, tracking_uri=uri, out=tmp_path / "out")
    assert [c.status for c in cells] == ["ok", "stale", "missing", "ok"]
    lstm, mlp, discrete = hashes["toy_actions_lstm"], hashes["toy_actions_mlp"], hashes["toy_actions_discrete"]
    gpt = _hash("toy_actions_gpt")
    assert cells[2].current_hash == gpt

    markdown = files["markdown"].read_text().splitlines()
    assert markdown[:7] == ["# Toy heads", "", "Source: made up for the test", "", "Numbers are invented.", "",
                            f"Scale: `full`. Runs from `{uri}`."]
    start = markdown.index("| row | action MSE ↓ | action MSE (published) | gripper acc (%) ↑ | gripper acc (%) "
                           "(published) | run | config_hash | status |")
    assert markdown[start + 1:start + 6] == [
        "|---|---:|---:|---:|---:|---|---|---|",
        # the newest *finished full-scale* run; bold = best of the up-to-date cells (the stale mlp is better)
        f"| lstm | **0.041** | 0.050 | 93.3 | 91.0 | `{ids['lstm'][:8]}` | `{lstm}` | ok |",
        f"| mlp | 0.039 | 0.070 | 95.0 | — | `{ids['mlp'][:8]}` | `0123456789ab` | STALE (config now `{mlp}`) |",
        "| gpt | — | — | — | — | — | — | MISSING (no run) |",
        # the row's own metric for the gripper column (97.5, not val/gripper_accuracy's 0.2)
        f"| discrete | 0.100 | — | **97.5** | — | `{ids['discrete'][:8]}` | `{discrete}` | ok |",
    ]

    assert files["csv"].read_text().splitlines() == [
        "row,experiment,action MSE,action MSE (published),gripper acc (%),gripper acc (%) (published),run_id,"
        "config_hash,current_config_hash,status",
        f"lstm,toy_actions_lstm,0.0412,0.05,93.26,91.0,{ids['lstm']},{lstm},{lstm},ok",
        f"mlp,toy_actions_mlp,0.0387,0.07,95.0,,{ids['mlp']},0123456789ab,{mlp},stale",
        f"gpt,toy_actions_gpt,,,,,,,{gpt},missing",
        f"discrete,toy_actions_discrete,0.1,,97.5,,{ids['discrete']},{discrete},{discrete},ok",
    ]
    data = json.loads(files["json"].read_text())
    assert data["rows"][0]["git_sha"] == "abc" and data["rows"][3]["metrics"]["gripper acc (%)"] == "val/gripper_pct"

    assert files["chart"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(files["chart"]) as image:
        image.verify()
        assert image.size[0] > 300 and image.size[1] > 300


def test_smoke_scale_collects_smoke_runs_with_the_smoke_hash(tmp_path, store):
    uri, ids, _ = store
    folder = _write_spec(tmp_path / "toy_heads", SPEC)
    _, cells, _ = tables.build_table(folder, tracking_uri=uri, out=tmp_path / "out", scale="smoke")
    assert [c.status for c in cells] == ["ok", "missing", "missing", "missing"]
    assert cells[0].run_id == ids["lstm_smoke"] and cells[0].values["action MSE"] == 7.0


def test_log_records_the_table_as_an_mlflow_run(tmp_path, store, capsys):
    uri, ids, _ = store
    folder = _write_spec(tmp_path / "toy_heads", SPEC)
    code = tables.main([str(folder), "--tracking-uri", uri, "--out", str(tmp_path / "out"), "--log"])
    assert code == 0
    assert "| gpt | — | — | — | — | — | — | MISSING (no run) |" in capsys.readouterr().out
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("affordvla-tables").experiment_id])
    assert run.info.run_name == "table-toy_heads"
    assert run.data.tags["cells_ok"] == "2" and run.data.tags["cells_stale"] == "1"
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "table")}
    assert logged == {"table/table.md", "table/table.csv", "table/table.json", "table/table.png"}
    # the table run is not mistaken for a cell on the next rendering; --strict fails on incomplete tables
    _, cells, _ = tables.build_table(folder, tracking_uri=uri, out=tmp_path / "out")
    assert cells[0].run_id == ids["lstm"]
    assert tables.main([str(folder), "--tracking-uri", uri, "--out", str(tmp_path / "out"), "--strict"]) == 1


def test_an_absent_store_gives_a_table_of_missing_cells(tmp_path):
    folder = _write_spec(tmp_path / "toy_heads", SPEC)
    uri = f"sqlite:///{tmp_path}/none.db"
    _, cells, files = tables.build_table(folder, tracking_uri=uri, out=tmp_path / "out")
    assert [c.status for c in cells] == ["missing"] * 4
    assert not (tmp_path / "none.db").exists()
    assert files["chart"].is_file()


def test_a_reference_row_shows_the_papers_numbers_beside_the_cells(tmp_path, store):
    uri, ids, hashes = store
    spec = json.loads(json.dumps(SPEC))
    spec["rows"].insert(0, {"name": "paper's model", "experiment": None, "published": {"action MSE": 0.02}})
    spec, cells, files = tables.build_table(_write_spec(tmp_path / "with_reference", spec), tracking_uri=uri,
                                            out=tmp_path / "out")
    assert [c.status for c in cells] == ["reference", "ok", "stale", "missing", "ok"]
    markdown = files["markdown"].read_text()
    assert "| paper's model | — | 0.020 | — | — | — | — | reference (published only) |" in markdown
    # the reference is not "best"
    assert f"| lstm | **0.041** | 0.050 | 93.3 | 91.0 | `{ids['lstm'][:8]}` |" in markdown
    assert "paper's model,,,0.02,,,,,,reference" in files["csv"].read_text().splitlines()


def _broken(spec_change) -> dict:
    spec = json.loads(json.dumps(SPEC))
    spec_change(spec)
    return spec


@pytest.mark.parametrize("change,expected", [
    (lambda s: s["rows"][1].pop("experiment"), "rows[1] ('mlp'): 'experiment' is missing or not a string"),
    (lambda s: s["rows"][0]["published"].update({"nope": 1.0}),
     "rows[0] ('lstm'): 'published' names unknown column(s) ['nope']"),
    (lambda s: s["rows"][2]["published"].update({"action MSE": "high"}),
     "rows[2] ('gpt'): published['action MSE'] must be a number or null"),
    (lambda s: s["rows"].append({"name": "lstm", "experiment": "toy_actions_lstm"}),
     "rows[4] ('lstm'): duplicate row name 'lstm'"),
    (lambda s: s["rows"][3].update({"experimnt": "x"}), "rows[3] ('discrete'): unknown key(s) ['experimnt']"),
    (lambda s: s["rows"][2].update({"experiment": None}),
     "rows[2] ('gpt'): a reference row (experiment: null) needs published numbers"),
    (lambda s: s["columns"][0].pop("metric"), "columns[0] ('action MSE'): 'metric' is missing or not a string"),
    (lambda s: s["columns"][1].update({"format": "{:.1q}"}),
     "columns[1] ('gripper acc (%)'): 'format' '{:.1q}' cannot format"),
    (lambda s: s.update({"rows": []}), "'rows' must be a non-empty list"),
    (lambda s: s.update({"colums": []}), "unknown key(s) ['colums']"),
])
def test_malformed_spec_names_the_file_and_the_entry(tmp_path, change, expected):
    folder = _write_spec(tmp_path / "bad", _broken(change))
    with pytest.raises(TableError) as excinfo:
        load_spec(folder)
    assert str(excinfo.value).startswith(f"{folder / 'table.yaml'}: ")
    assert expected in str(excinfo.value)


def test_missing_spec_invalid_yaml_and_unknown_experiment(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert tables.main([str(tmp_path / "empty")]) == 2
    assert f"{tmp_path / 'empty' / 'table.yaml'}: not found" in capsys.readouterr().err
    (tmp_path / "yaml").mkdir()
    (tmp_path / "yaml" / "table.yaml").write_text("rows: [\n")
    with pytest.raises(TableError, match="not valid YAML"):
        load_spec(tmp_path / "yaml")
    spec = _broken(lambda s: s["rows"][1].update({"experiment": "kalie_ablations/no_such_cell"}))
    folder = _write_spec(tmp_path / "unknown", spec)
    assert tables.main([str(folder), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]) == 2
    err = capsys.readouterr().err
    assert f"{folder / 'table.yaml'}: row 'mlp': unknown experiment config 'kalie_ablations/no_such_cell'" in err
    with pytest.raises(TableError, match="smoke_overrides choose scale=smoke but --scale smoke_b"):
        tables.build_table(_write_spec(tmp_path / "ok", SPEC), scale="smoke_b", tracking_uri=f"sqlite:///{tmp_path}/m.db")
    with pytest.raises(TableError, match="scale must be 'full' or a name starting with 'smoke'"):
        tables.build_table(tmp_path / "ok", scale="medium", tracking_uri=f"sqlite:///{tmp_path}/m.db")


@pytest.mark.slow
def test_run_missing_trains_the_cell_and_its_hash_matches(tmp_path, capsys):
    """A real cell at smoke scale through `affordvla-train` in a child process: the run it records is found, up
    to date (the hash affordvla-train records equals the hash composed here), and a changed override makes it
    stale."""
    spec = {"title": "RoboPoint smoke", "smoke_overrides": ["scale=smoke"],
            "columns": [{"name": "error", "metric": "test/keypoint_error", "lower_is_better": True}],
            "rows": [{"name": "llava tiny", "experiment": "robopoint_llava_tiny", "published": {"error": 0.5}}]}
    folder = _write_spec(tmp_path / "robopoint_smoke", spec)
    uri = f"sqlite:///{tmp_path}/outputs/mlflow.db"
    args = [str(folder), "--scale", "smoke", "--tracking-uri", uri, "--out", str(tmp_path / "out"),
            "--override", f"paths.root_dir={tmp_path}"]
    assert tables.main(args + ["--run-missing", "--strict"]) == 0
    out = capsys.readouterr().out
    assert "[1/1] llava tiny: affordvla-train experiment=robopoint_llava_tiny scale=smoke" in out
    assert "[1/1] llava tiny: done in" in out
    _, (cell,), _ = tables.build_table(folder, scale="smoke", tracking_uri=uri, out=tmp_path / "out",
                                      extra_overrides=[f"paths.root_dir={tmp_path}"])
    assert cell.status == "ok" and cell.run_id and cell.values["error"] is not None
    assert (tmp_path / "out" / "logs" / "robopoint_llava_tiny.log").is_file()
    _, (changed,), _ = tables.build_table(folder, scale="smoke", tracking_uri=uri, out=tmp_path / "out",
                                         extra_overrides=[f"paths.root_dir={tmp_path}", "seed=7"])
    assert changed.status == "stale" and changed.run_id == cell.run_id


def test_run_missing_exits_1_when_any_cell_it_trained_failed(tmp_path, store, capsys, monkeypatch):
    """--run-missing --rerun-stale trains gpt (missing) and mlp (stale); gpt's training fails, mlp's succeeds: the
    table is written with gpt marked failed, and the command exits 1 (a failed cell is a failure, not a mark)."""
    uri, _, _ = store
    trained = []

    def run_cell(row, overrides, tracking_uri, log_file, index):
        trained.append(row.name)
        return row.name != "gpt"

    monkeypatch.setattr(tables, "run_cell", run_cell)
    args = [str(_write_spec(tmp_path / "t", SPEC)), "--tracking-uri", uri, "--out", str(tmp_path / "out")]
    assert tables.main(args + ["--run-missing", "--rerun-stale"]) == 1
    assert sorted(trained) == ["gpt", "mlp"]
    assert "1 cell(s) failed to train: ['gpt']" in capsys.readouterr().err
    assert "FAILED" in (tmp_path / "out" / "table.md").read_text()

"""affordvla.tracking.runs: runs read back from MLflow as records, backbone comparison, overlay download."""

from __future__ import annotations

import math

import pytest
from conftest import log_finished_run
from mlflow import MlflowClient
from PIL import Image

from affordvla.tracking import runs

_run = log_finished_run


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One store for the module (creating an MLflow sqlite store takes seconds); tests only add artifacts."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('store')}/mlflow.db"
    client = MlflowClient(uri)
    train = {"task_name": "train"}
    ids = {
        "pg_old": _run(client, "affordvla-train", {**train, "backbone": "paligemma_tiny", "dataset": "kalie",
                                                    "scale": "full"},
                       {"test/keypoint_error": 0.30, "test/mean_baseline_error": 0.25}, 1000),
        "pg_new": _run(client, "affordvla-train", {**train, "backbone": "paligemma_tiny", "dataset": "toy_kalie",
                                                    "scale": "full"},
                       {"test/keypoint_error": 0.10, "test/mean_baseline_error": 0.20, "test/parse_failure_rate": 0.5},
                       3000),
        "llava": _run(client, "affordvla-robopoint", {**train, "backbone": "llava_tiny", "scale": "full"},
                      {"test/keypoint_error": 0.40, "test/mean_baseline_error": 0.50, "val/keypoint_error": 0.45},
                      2000),
        # not training runs, or not finished: left out
        "pretrain": _run(client, "affordvla-pretrain", {"backbone": "paligemma_tiny"}, {"pretrain/seconds": 3.0}, 4000),
        "table": _run(client, runs.TABLES_EXPERIMENT, {**train, "backbone": "x"}, {}, 5000),
        "failed": _run(client, "affordvla-train", {**train, "backbone": "cogvlm_tiny"}, {"test/keypoint_error": 9.0},
                       6000, status="FAILED"),
    }
    return uri, ids


def test_load_runs_keeps_finished_training_runs_newest_first(store):
    uri, ids = store
    records = runs.load_runs(uri)
    assert [r["run_id"] for r in records] == [ids["pg_new"], ids["llava"], ids["pg_old"]]
    first = records[0]
    assert first["experiment"] == "affordvla-train" and first["status"] == "FINISHED" and first["start_time"] == 3000
    assert first["tag.backbone"] == "paligemma_tiny" and first["test/keypoint_error"] == 0.10
    assert not any(k.startswith("tag.mlflow.") for k in first)
    everything = runs.load_runs(uri, training_only=False, status=None)
    assert {r["run_id"] for r in everything} == set(ids.values()) - {ids["table"]}
    llava_only = runs.load_runs(uri, tags={"backbone": "llava_tiny"})
    assert [r["run_id"] for r in llava_only] == [ids["llava"]]


def test_metric_selection_and_frame(store):
    uri, ids = store
    records = runs.load_runs(uri)
    assert runs.metric_names(records) == ["test/keypoint_error", "test/mean_baseline_error", "test/parse_failure_rate"]
    assert runs.metric_names(records, "val/") == ["val/keypoint_error"]
    assert runs.select_metrics(records[1], ["test/keypoint_error", "test/parse_failure_rate"]) == {
        "test/keypoint_error": 0.40, "test/parse_failure_rate": None}
    frame = runs.runs_frame(records)
    assert list(frame["run_id"]) == [ids["pg_new"], ids["llava"], ids["pg_old"]]
    assert math.isnan(frame.loc[1, "test/parse_failure_rate"])


def test_compare_backbones_by_hand(store):
    uri, ids = store
    # a debug=smoke run of the same backbone (tagged scale=smoke), newest of all: a row of its own
    smoke = {"run_id": "smoke-run", "tag.backbone": "paligemma_tiny", "tag.scale": "smoke",
             "test/keypoint_error": 5.0, "test/mean_baseline_error": 1.0}
    rows = runs.compare_backbones([smoke, *runs.load_runs(uri)])
    # full scale, paligemma: errors 0.10 and 0.30 (mean 0.20), baselines 0.20 and 0.25 (mean 0.225),
    # ratios 0.5 and 1.2 (mean 0.85); llava: 0.40 / 0.50 = 0.8 -> llava first; the smoke row after the full ones
    assert [(r["backbone"], r["scale"]) for r in rows] == [
        ("llava_tiny", "full"), ("paligemma_tiny", "full"), ("paligemma_tiny", "smoke")]
    llava, paligemma, paligemma_smoke = rows
    assert llava["runs"] == 1 and llava["newest_run"] == ids["llava"] and llava["vs_baseline"] == pytest.approx(0.8)
    assert paligemma["runs"] == 2 and paligemma["newest_run"] == ids["pg_new"]
    assert paligemma["datasets"] == "kalie, toy_kalie" and llava["datasets"] == ""
    assert paligemma_smoke["runs"] == 1 and paligemma_smoke["vs_baseline"] == pytest.approx(5.0)
    assert paligemma["test/keypoint_error"] == pytest.approx(0.20)
    assert paligemma["test/mean_baseline_error"] == pytest.approx(0.225)
    assert paligemma["vs_baseline"] == pytest.approx(0.85)
    assert paligemma["test/parse_failure_rate"] == pytest.approx(0.5)  # only the run that logged it
    assert paligemma["test/kalie_corrected/avg_mse"] is None
    assert runs.compare_backbones([]) == []


def test_latest_overlay_downloads_the_last_step_of_the_split(store, tmp_path):
    uri, ids = store
    client = MlflowClient(uri)
    for name, colour in (("val_step000002.png", "red"), ("test_step000002.png", "green"),
                         ("test_step000010.png", "blue")):
        path = tmp_path / "src" / name
        path.parent.mkdir(exist_ok=True)
        Image.new("RGB", (8, 8), colour).save(path)
        client.log_artifact(ids["pg_new"], str(path), "overlays")
    assert runs.list_artifact_files(ids["pg_new"], "overlays", uri) == [
        "overlays/test_step000002.png", "overlays/test_step000010.png", "overlays/val_step000002.png"]
    local = runs.latest_overlay(ids["pg_new"], tmp_path / "dl", tracking_uri=uri)
    assert local.name == "test_step000010.png"
    with Image.open(local) as image:
        assert image.getpixel((0, 0)) == (0, 0, 255)
    overlay = runs.latest_overlay(ids["pg_new"], tmp_path / "dl", split="val", tracking_uri=uri)
    assert overlay.name == "val_step000002.png"
    assert runs.latest_overlay(ids["llava"], tmp_path / "dl", tracking_uri=uri) is None


def test_default_uri_and_absent_store(tmp_path, monkeypatch):
    monkeypatch.setenv("AFFORDVLA_MLFLOW_URI", "sqlite:///x.db")
    assert runs.default_tracking_uri() == "sqlite:///x.db"
    monkeypatch.delenv("AFFORDVLA_MLFLOW_URI")
    monkeypatch.setenv("AFFORDVLA_ROOT", str(tmp_path))
    assert runs.default_tracking_uri() == f"sqlite:///{tmp_path}/outputs/mlflow.db"
    assert runs.load_runs() == []  # and no empty database was created
    assert not (tmp_path / "outputs").exists()

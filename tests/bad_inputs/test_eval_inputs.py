"""Bad inputs to the evaluation and records commands (affordvla-eval, affordvla-reproduce): each fails at once with
a message naming the file, run or option, and creates nothing (no empty MLflow store above all)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from affordvla.policies.keypoints.decoding import DECODING_RECORD

from .conftest import assert_clear_failure


def _store(workspace) -> Path:
    """An MLflow store where affordvla-train would write it (under AFFORDVLA_ROOT), holding no run."""
    from mlflow import MlflowClient

    path = workspace.project / "outputs" / "mlflow.db"
    path.parent.mkdir(parents=True)
    MlflowClient(f"sqlite:///{path}").search_experiments()  # creates the schema
    return path


def _fake_export(folder: Path, decoding: str | None) -> Path:
    """A folder laid out as affordvla-train exports a keypoint-text PaliGemma (config.json of the family), without
    weights: every case below must fail before a model is loaded."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "paligemma", "architectures":
                                                    ["PaliGemmaForConditionalGeneration"]}))
    if decoding is not None:
        (folder / DECODING_RECORD).write_text(decoding)
    return folder


@pytest.mark.parametrize("command", [["keypoints"], ["rollout", "--env", "toy", "--log-to-run"]],
                         ids=["keypoints", "rollout"])
def test_run_id_without_a_store_names_the_store_and_creates_none(workspace, command):
    result = workspace.run("affordvla-eval", *command, "--run-id", "0123abcd")
    store = workspace.project / "outputs" / "mlflow.db"
    assert_clear_failure(workspace, result, str(store), "does not exist",
                         created=(store, workspace.home / "outputs"))


def test_unknown_run_id_names_the_run_and_the_store(workspace):
    store = _store(workspace)
    before = store.stat().st_size
    result = workspace.run("affordvla-eval", "keypoints", "--run-id", "feedface0123")
    assert_clear_failure(workspace, result, "'feedface0123' not found", str(store))
    assert store.stat().st_size == before


def test_tracking_uri_of_a_store_that_does_not_exist(workspace):
    missing = workspace.home / "elsewhere" / "mlflow.db"
    result = workspace.run("affordvla-eval", "keypoints", "--run-id", "0123abcd", "--tracking-uri",
                           f"sqlite:///{missing}")
    assert_clear_failure(workspace, result, str(missing), created=(missing, missing.parent))


def test_reproduce_without_a_store_creates_none(workspace):
    result = workspace.run("affordvla-reproduce", "0123abcd")
    store = workspace.project / "outputs" / "mlflow.db"
    assert_clear_failure(workspace, result, str(store), created=(store,))


def test_model_folder_that_is_not_an_export(workspace):
    folder = workspace.user("photos")
    (folder / "cat.png").write_bytes(b"\x89PNG\r\n")
    workspace.watch(folder)
    result = workspace.run("affordvla-eval", "keypoints", "--model", str(folder))
    assert_clear_failure(workspace, result, str(folder), "config.json")


def test_model_folder_that_does_not_exist(workspace):
    missing = workspace.home / "runs" / "modle"
    result = workspace.run("affordvla-eval", "keypoints", "--model", str(missing))
    assert_clear_failure(workspace, result, str(missing), "no such", created=(missing,))


def test_missing_data_folder(workspace):
    export = _fake_export(workspace.user("export"), json.dumps({"codec": "paligemma_loc", "constrained": True}))
    missing = workspace.home / "data" / "kalei"
    workspace.watch(export)
    result = workspace.run("affordvla-eval", "keypoints", "--model", str(export), "--data", str(missing))
    assert_clear_failure(workspace, result, str(missing), "--data", created=(missing,))


def test_decoding_record_that_is_not_json(workspace):
    export = _fake_export(workspace.user("export"), '{"codec": "paligemma_loc", ')
    workspace.watch(export)
    result = workspace.run("affordvla-eval", "keypoints", "--model", str(export))
    assert_clear_failure(workspace, result, str(export / DECODING_RECORD), "not valid JSON")


def test_model_that_records_no_decoding_needs_the_codec(workspace):
    """The silent default decoding gave another number than the run's (unconstrained against constrained)."""
    export = _fake_export(workspace.user("export"), None)
    workspace.watch(export)
    result = workspace.run("affordvla-eval", "keypoints", "--model", str(export))
    assert_clear_failure(workspace, result, str(export), DECODING_RECORD, "--codec")


def test_centre_crop_outside_the_unit_interval(workspace):
    export = _fake_export(workspace.user("export"), json.dumps({"codec": "paligemma_loc"}))
    workspace.watch(export)
    result = workspace.run("affordvla-eval", "keypoints", "--model", str(export), "--centre-crop", "1.5")
    assert_clear_failure(workspace, result, "--centre-crop 1.5")


@pytest.mark.parametrize("command,flag,content", [
    (["calvin"], "--results", "5, 3, 0\n"),
    (["where2place", "--data", "W2P"], "--answers", '{"question_id": 0, "text": "[(0.1, 0.2)]"}\n{"question_id": 1,\n'),
], ids=["calvin_results", "where2place_answers"])
def test_predictions_file_that_is_not_json(workspace, command, flag, content):
    from affordvla.data.robopoint import write_where2place

    user = workspace.user("results")
    predictions = user / "predictions.json"
    predictions.write_text(content)
    if "W2P" in command:
        import numpy as np

        region = np.zeros((48, 64), np.uint8)
        region[10:20, 20:30] = 255
        write_where2place(user / "w2p", [(np.zeros((48, 64, 3), np.uint8), region, "q", "seen")] * 2)
        command = [c.replace("W2P", str(user / "w2p")) for c in command]
    workspace.watch(user)
    result = workspace.run("affordvla-eval", *command, flag, str(predictions))
    assert_clear_failure(workspace, result, str(predictions))

"""affordvla-eval: keypoints from an MLflow run reproduce the run's own test metrics; Where2Place and CALVIN."""

import json

import numpy as np
import pytest
from conftest import compose_train

from affordvla.evaluate import main
from affordvla.train import train


def test_keypoints_from_a_run_reproduce_its_test_metrics(tmp_path, smoke_overrides, capsys):
    from mlflow import MlflowClient

    cfg = compose_train(smoke_overrides, tmp_path / "run")
    metrics = train(cfg)
    uri = f"sqlite:///{tmp_path}/outputs/mlflow.db"
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("affordvla-train").experiment_id])
    capsys.readouterr()
    assert main(["--out", str(tmp_path / "eval.json"), "keypoints", "--run-id", run.info.run_id,
                 "--tracking-uri", uri]) == 0
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    assert evaluated["keypoint_error"] == pytest.approx(metrics["test/keypoint_error"], abs=1e-6)
    assert evaluated["parse_failure_rate"] == pytest.approx(metrics["test/parse_failure_rate"])
    assert evaluated["mean_baseline_error"] == pytest.approx(metrics["test/mean_baseline_error"], abs=1e-6)
    assert json.loads(capsys.readouterr().out) == evaluated


def test_where2place_and_calvin_commands(tmp_path, capsys):
    from affordvla.data.robopoint import write_where2place

    region = np.zeros((480, 640), np.uint8)
    region[100:200, 200:300] = 255
    write_where2place(tmp_path / "w2p", [(np.zeros((480, 640, 3), np.uint8), region, "q", "unseen")])
    (tmp_path / "answers.jsonl").write_text(json.dumps({"question_id": 0, "text": "[(0.39, 0.31)]"}) + "\n")
    assert main(["where2place", "--data", str(tmp_path / "w2p"), "--answers", str(tmp_path / "answers.jsonl")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["where2place_score"] == pytest.approx(100.0, abs=1) and out["where2place_unseen"] == out["where2place_score"]
    (tmp_path / "results.json").write_text(json.dumps([5, 3, 0, 4]))
    assert main(["calvin", "--results", str(tmp_path / "results.json")]) == 0
    assert json.loads(capsys.readouterr().out)["avg_len"] == 3.0
    assert main(["where2place", "--data", str(tmp_path / "w2p")]) == 1
    assert "needs --model" in capsys.readouterr().err


def test_keypoints_of_a_regression_head_run_is_refused_with_the_reason(tmp_path, capsys):
    from conftest import log_finished_run
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run_id = log_finished_run(client, "affordvla-train", {}, {}, start=0)
    (tmp_path / "model").mkdir()
    config = tmp_path / "config_resolved.yaml"
    config.write_text(f"export_dir: {tmp_path / 'model'}\ndataset: {{root: /data}}\nbackbone: {{}}\n"
                      "head: {_target_: affordvla.heads.keypoint_regression.KeypointRegressionHead}\n")
    client.log_artifact(run_id, str(config), "run")
    assert main(["keypoints", "--run-id", run_id, "--tracking-uri", uri]) == 1
    assert "KeypointRegressionHead, not the keypoint-text head" in capsys.readouterr().err

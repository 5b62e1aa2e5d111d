"""affordvla-eval: keypoints from an MLflow run reproduce the run's own test metrics; Where2Place and CALVIN."""

import json

import numpy as np
import pytest
from conftest import compose_train

from affordvla.evaluate import keypoint_settings, main
from affordvla.train import train


def test_keypoints_from_a_run_and_from_its_export_agree_with_its_test_metrics(tmp_path, smoke_overrides, capsys,
                                                                              monkeypatch, caplog):
    """The export records how its run decoded (constrained, codec, prompt, prefix_lm, crop): `--model <export>`
    alone scores it as `--run-id` does, and both reproduce the run's own test metrics. `--run-id` finds the run
    in the store under AFFORDVLA_ROOT, as affordvla-train wrote it, with no --tracking-uri."""
    from mlflow import MlflowClient

    cfg = compose_train(smoke_overrides, tmp_path / "run")
    metrics = train(cfg)
    export = tmp_path / "run" / "model"
    record = keypoint_settings(export)  # what the export records (policy.json; decoding.json before it)
    assert record == {"codec": "paligemma_loc", "constrained": True, "max_new_tokens": None,
                      "prompt_style": "instruction", "prefix_lm": False, "centre_crop": None}
    uri = f"sqlite:///{tmp_path}/outputs/mlflow.db"
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("affordvla-train").experiment_id])
    monkeypatch.chdir(tmp_path / "run")  # not the project folder: the store comes from AFFORDVLA_ROOT
    monkeypatch.setenv("AFFORDVLA_ROOT", str(tmp_path))
    monkeypatch.delenv("AFFORDVLA_MLFLOW_URI", raising=False)
    capsys.readouterr()
    assert main(["--out", str(tmp_path / "by_run.json"), "keypoints", "--run-id", run.info.run_id]) == 0
    by_run = json.loads((tmp_path / "by_run.json").read_text())
    assert json.loads(capsys.readouterr().out) == by_run
    assert main(["--out", str(tmp_path / "by_export.json"), "keypoints", "--model", str(export)]) == 0
    by_export = json.loads((tmp_path / "by_export.json").read_text())
    assert by_export == by_run
    assert by_run["keypoint_error"] == pytest.approx(metrics["test/keypoint_error"], abs=1e-6)
    assert by_run["parse_failure_rate"] == pytest.approx(metrics["test/parse_failure_rate"]) == 0.0  # constrained
    assert by_run["mean_baseline_error"] == pytest.approx(metrics["test/mean_baseline_error"], abs=1e-6)
    assert not (tmp_path / "run" / "outputs").exists()  # no store was created where the command ran
    # an explicit flag overrides the record, and says so
    caplog.clear()
    with caplog.at_level("INFO", logger="affordvla.evaluate"):
        assert main(["keypoints", "--model", str(export), "--no-constrained", "--prompt-style", "kalie"]) == 0
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("decoding settings")]
    assert '"constrained": false' in line and '"prompt_style": "kalie"' in line and '"codec": "paligemma_loc"' in line
    assert "flags override ['constrained', 'prompt_style']" in line


def test_where2place_and_calvin_commands(tmp_path, capsys):
    from affordvla.data.robopoint import write_where2place

    region = np.zeros((480, 640), np.uint8)
    region[100:200, 200:300] = 255
    write_where2place(tmp_path / "w2p", [(np.zeros((480, 640, 3), np.uint8), region, "q", "unseen")])
    (tmp_path / "answers.jsonl").write_text(json.dumps({"question_id": 0, "text": "[(0.39, 0.31)]"}) + "\n")
    assert main(["where2place", "--data", str(tmp_path / "w2p"), "--answers", str(tmp_path / "answers.jsonl")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["where2place_score"] == pytest.approx(100.0, abs=1)
    assert out["where2place_unseen"] == out["where2place_score"]
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

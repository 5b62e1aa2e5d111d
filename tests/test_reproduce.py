"""affordvla-reproduce: a smoke run re-run from its logged config gives identical metrics and weights; a tampered
metric or tensor is caught; the comparisons and the replayed command line on their own."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import compose_train
from mlflow import MlflowClient
from safetensors.torch import save_file

from affordvla import reproduce as reproduce_command
from affordvla.checkpointing import load_state_dict, save_state_dict
from affordvla.tracking import reproduce
from affordvla.tracking.mlflow_setup import ensure_experiment


@pytest.mark.slow
def test_a_smoke_run_reproduces_bit_for_bit_and_tampering_is_caught(tmp_path, smoke_overrides, capsys):
    from affordvla.train import train

    cfg = compose_train(smoke_overrides, tmp_path / "run")
    train(cfg)
    uri = f"sqlite:///{tmp_path}/outputs/mlflow.db"
    client = MlflowClient(uri)
    (original,) = client.search_runs([client.get_experiment_by_name("affordvla-train").experiment_id])
    run_id = original.info.run_id

    again_dir = tmp_path / "again"
    code = reproduce_command.main([run_id, "--tracking-uri", uri, "--output-dir", str(again_dir), "--report",
                           str(tmp_path / "report.json")])
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "report.json").read_text())
    assert code == 0, out[-3000:]
    assert report["match"] and report["config_hash"]["original"] == original.data.tags["config_hash"]
    assert report["metrics"]["compared"] >= 10 and report["metrics"]["skipped_timings"] == ["train_seconds"]
    assert report["weights"]["original"] == str(tmp_path / "run" / "model")
    assert report["weights"]["reproduced"] == str(again_dir / "model")
    assert report["weights"]["tensors"] > 10 and not report["weights"]["differing"]
    assert f"paths.root_dir={tmp_path}" in report["overrides"]
    assert "Reproduced as run" in out and "| weights | match |" in out
    again_id = report["reproduced_run"]
    assert client.get_run(again_id).info.run_name.startswith(f"reproduce-{run_id[:8]}-")

    # a metric changed after the fact: caught, named, and forgiven only within the tolerance
    value = original.data.metrics["test/keypoint_error"]
    client.log_metric(again_id, "test/keypoint_error", value * (1 + 1e-6), step=999)
    assert reproduce_command.main([run_id, "--tracking-uri", uri, "--against", again_id, "--format", "json"]) == 1
    tampered = json.loads(capsys.readouterr().out)
    assert list(tampered["metrics"]["differing"]) == ["test/keypoint_error"]
    assert tampered["weights"]["match"] and tampered["config_hash"]["match"]
    assert reproduce_command.main([run_id, "--tracking-uri", uri, "--against", again_id, "--rtol", "1e-5"]) == 0
    capsys.readouterr()

    # one weight nudged in the reproduced export
    weights_file = again_dir / "model" / "model.safetensors"
    tensors = load_state_dict(weights_file)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1e-3
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(weights_file))
    client.log_metric(again_id, "test/keypoint_error", value, step=1000)
    assert reproduce_command.main([run_id, "--tracking-uri", uri, "--against", again_id, "--format", "json"]) == 1
    tampered = json.loads(capsys.readouterr().out)
    assert tampered["metrics"]["match"]
    assert list(tampered["weights"]["differing"]) == [name]
    assert tampered["weights"]["differing"][name] == pytest.approx(1e-3, rel=1e-2)


def test_metric_comparison():
    original = {"a": 1.0, "b": 2.0, "c": float("nan"), "train_seconds": 10.0, "gone": 1.0}
    again = {"a": 1.0, "b": 2.0 + 1e-9, "c": float("nan"), "train_seconds": 99.0, "new": 3.0}
    result = reproduce.compare_metrics(original, again)
    assert result["skipped_timings"] == ["train_seconds"]
    assert result["compared"] == 5
    assert result["differing"] == {"b": {"original": 2.0, "reproduced": 2.0 + 1e-9},
                                   "gone": {"original": 1.0, "reproduced": None},
                                   "new": {"original": None, "reproduced": 3.0}}
    loose = reproduce.compare_metrics({"a": 100.0, "b": 1.0}, {"a": 100.0001, "b": 1.0})
    assert not loose["match"]
    assert reproduce.compare_metrics({"a": 100.0}, {"a": 100.0001}, rtol=1e-6)["match"]
    assert not reproduce.compare_metrics({"a": 100.0}, {"a": 100.001}, rtol=1e-6)["match"]
    assert not reproduce.compare_metrics({"a": math.nan}, {"a": 0.0})["match"]


def _weights(folder: Path, tensors: dict[str, torch.Tensor], name: str = "model.safetensors") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_state_dict(tensors, folder / name)
    return folder


def test_weight_comparison(tmp_path):
    base = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(3)}
    a = _weights(tmp_path / "a", base)
    same = _weights(tmp_path / "same", {k: v.clone() for k, v in base.items()})
    result = reproduce.compare_weights(a, same)
    assert result["match"] and result["tensors"] == 2
    nudged = _weights(tmp_path / "nudged", {"w": base["w"] + 0.25, "b": base["b"]})
    result = reproduce.compare_weights(a, nudged)
    assert not result["match"] and result["differing"] == {"w": 0.25}
    assert reproduce.compare_weights(a, nudged, atol=0.3)["match"]
    other = _weights(tmp_path / "other", {"w": base["w"].double(), "extra": torch.zeros(1)})
    result = reproduce.compare_weights(a, other)
    assert result["differing"] == {"w": "(2, 3) torch.float32 vs (2, 3) torch.float64"}
    assert result["only_original"] == ["b"] and result["only_reproduced"] == ["extra"]
    # a policy head exported beside the backbone is compared too
    _weights(tmp_path / "same", {"head.x": torch.zeros(2)}, "policy.safetensors")
    result = reproduce.compare_weights(a, same)
    assert not result["match"] and result["only_reproduced"] == ["head.x"]
    missing = reproduce.compare_weights(None, same)
    assert not missing["match"] and "no weights found for the original run" in missing["error"]


def test_weights_location_prefers_the_export_then_the_last_checkpoint(tmp_path):
    run = tmp_path / "run"
    for step in ("step_000002", "step_000010"):
        _weights(run / "checkpoints" / step, {"w": torch.zeros(1)})
    (run / "checkpoints" / "step_000011").mkdir()  # an empty folder is not a checkpoint
    config = {"export_dir": str(run / "model"), "paths": {"output_dir": str(run)}}
    assert reproduce.weights_location(config) == run / "checkpoints" / "step_000010"
    _weights(run / "model", {"w": torch.zeros(1)})
    assert reproduce.weights_location(config) == run / "model"
    assert reproduce.weights_location({"export_dir": None, "paths": {"output_dir": str(tmp_path / "x")}}) is None


def test_replayed_overrides(tmp_path):
    logged = ["debug=smoke", "paths.mlflow_uri=sqlite:///old.db", "seed=3"]
    config = {"paths": {"root_dir": str(tmp_path)}}
    replay = reproduce.replay_overrides(logged, config, target_uri="sqlite:///new.db", output_dir=tmp_path / "o",
                                        run_name="reproduce-x", extra=["trainer=gpu"])
    assert replay == ["debug=smoke", "seed=3", f"paths.root_dir={tmp_path}", "paths.mlflow_uri=sqlite:///new.db",
                      "logger.mlflow.run_name=reproduce-x", f"hydra.run.dir={tmp_path / 'o'}", "trainer=gpu"]
    # a root the run chose itself stays; a root that is not on this machine is not pinned
    assert reproduce.replay_overrides(["paths.root_dir=/r"], config, target_uri="u", output_dir=tmp_path,
                                      run_name="n", extra=[])[0:2] == ["paths.root_dir=/r", "paths.mlflow_uri=u"]
    gone = {"paths": {"root_dir": str(tmp_path / "gone")}}
    assert not any(o.startswith("paths.root_dir") for o in reproduce.replay_overrides(
        [], gone, target_uri="u", output_dir=tmp_path, run_name="n", extra=[]))


def test_git_comparison_warns_only():
    assert reproduce.compare_git("a" * 40, "a" * 40)["warnings"] == []
    assert reproduce.compare_git("a" * 40, "b" * 40)["warnings"] == [f"code differs: {'a' * 40} vs {'b' * 40}"]
    assert reproduce.compare_git("a" * 40 + "+dirty", "a" * 40)["warnings"] == [
        "the original run's working tree had uncommitted changes"]
    assert reproduce.compare_git("unknown", "a" * 40)["warnings"] == ["git sha unknown for one of the runs"]


def test_unknown_run_and_a_run_without_a_logged_config(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert reproduce_command.main(["0" * 32, "--tracking-uri", uri]) == 2
    assert f"MLflow store {uri} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists()  # reading never creates a store
    client = MlflowClient(uri)
    client.search_experiments()
    assert reproduce_command.main(["0" * 32, "--tracking-uri", uri]) == 2
    assert f"run '{'0' * 32}' not found in {uri}" in capsys.readouterr().err
    run = client.create_run(ensure_experiment(client, "other"))
    client.set_terminated(run.info.run_id)
    assert reproduce_command.main([run.info.run_id, "--tracking-uri", uri]) == 2
    assert f"run {run.info.run_id} has no artifact run/overrides.json" in capsys.readouterr().err

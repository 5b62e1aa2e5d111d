"""The entrypoint end to end on CPU: fast_dev_run, MLflow records, exact resume, multirun, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import compose_train
from mlflow import MlflowClient

from affordvla.checkpointing import load_state_dict
from affordvla.data.kalie import KalieFormatError
from affordvla.train import train


def _mlflow_uri(root: Path) -> str:
    return f"sqlite:///{root}/outputs/mlflow.db"


def test_fast_dev_run_of_the_default(tmp_path, smoke_overrides):
    overrides = [o for o in smoke_overrides if o != "debug=smoke"] + [
        "debug=fast_dev_run", "logger=none", "dataset.generate.splits={train: 40, val: 8, test: 8}",
        "dataset.batch_size=4", "dataset.eval_batch_size=8"]
    cfg = compose_train(overrides, tmp_path / "run")
    metrics = train(cfg)
    assert "train/loss" in metrics and torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert metrics["test/num_samples"] == 8
    assert 0.0 <= metrics["test/parse_failure_rate"] <= 1.0


def test_mlflow_run_records_tags_params_metrics_and_artifacts(tmp_path, smoke_overrides):
    cfg = compose_train(smoke_overrides, tmp_path / "run")
    train(cfg)
    client = MlflowClient(_mlflow_uri(tmp_path))
    experiment = client.get_experiment_by_name("affordvla-train")
    # artifacts live beside the store, not in ./mlruns of whatever folder the job ran in
    assert experiment.artifact_location == str(tmp_path / "outputs" / "mlartifacts" / "affordvla-train")
    (run,) = client.search_runs([experiment.experiment_id])
    tags = run.data.tags
    assert tags["backbone"] == "paligemma_tiny"
    assert tags["head"] == "keypoint_text"
    assert tags["dataset"] == "toy_kalie"
    assert tags["synthesis"] == "none"
    assert tags["experiment"] == "none"
    assert tags["scale"] == "smoke"  # debug=smoke: not a full-scale result
    assert len(tags["git_sha"].split("+")[0]) in (40, 7) or tags["git_sha"] == "unknown"
    assert len(tags["config_hash"]) == 12
    params = run.data.params
    assert params["head.codec"] == "paligemma_loc"
    assert params["trainer.max_steps"] == "4"
    assert params["dataset.batch_size"] == "4"
    metric_history = client.get_metric_history(run.info.run_id, "train/loss")
    assert len(metric_history) == 4  # log_every_n_steps=1 in debug=smoke
    assert "test/keypoint_error" in run.data.metrics
    assert "test/mean_baseline_error" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "run")}
    assert {"run/config_resolved.yaml", "run/overrides.json", "run/run_info.json", "run/metrics.json"} <= artifacts
    overlays = [a.path for a in client.list_artifacts(run.info.run_id, "overlays")]
    assert "overlays/test_step000004.png" in overlays and "overlays/val_step000002.png" in overlays
    resolved = client.download_artifacts(run.info.run_id, "run/config_resolved.yaml", str(tmp_path / "dl"))
    assert "paligemma_loc" in Path(resolved).read_text()


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    (last,) = sorted((run_dir / "checkpoints").glob("step_000008"))
    return load_state_dict(last / "model.safetensors")


def test_resume_is_exact(tmp_path, smoke_overrides):
    """4 steps, stop, resume to 8 == 8 uninterrupted steps, bit for bit. The resumed job's config differs (no
    stop_after_steps): its MLflow run is a child of the first, and its folder names the first's."""
    common = smoke_overrides + ["test=false", "export_dir=null",
                                "trainer.val_check_interval=4", "callbacks.model_checkpoint.every_n_train_steps=4",
                                "dataset.generate.splits.train=20"]  # 5 batches per epoch: resume crosses epochs
    straight = compose_train(common + ["trainer.max_steps=8"], tmp_path / "straight")
    train(straight)
    first = compose_train(common + ["trainer.max_steps=8", "stop_after_steps=4"], tmp_path / "first")
    train(first)
    checkpoint = tmp_path / "first" / "checkpoints" / "step_000004"
    assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "training_state.pt").is_file()
    state = torch.load(checkpoint / "training_state.pt", weights_only=True)
    assert state["dataset_metadata"]["sizes"]["train"] > 0  # the data's description travels with the weights
    resumed = compose_train(common + ["trainer.max_steps=8", f"ckpt_path={checkpoint}"], tmp_path / "resumed")
    train(resumed)
    expected, actual = _final_weights(tmp_path / "straight"), _final_weights(tmp_path / "resumed")
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    first_weights = load_state_dict(checkpoint / "model.safetensors")
    changed = sum(not torch.equal(first_weights[k], expected[k]) for k in expected)
    assert changed > 0  # steps 5-8 did train
    client = MlflowClient(_mlflow_uri(tmp_path))
    runs = client.search_runs([client.get_experiment_by_name("affordvla-train").experiment_id])
    (child,) = [r for r in runs if "resumed_from" in r.data.tags]
    info = json.loads((tmp_path / "resumed" / "run_info.json").read_text())
    assert info["parent_run_dir"] == str(tmp_path / "first")
    assert child.data.tags["mlflow.parentRunId"] == info["parent_mlflow_run_id"] != child.info.run_id
    assert info["parent_mlflow_run_id"] in {r.info.run_id for r in runs}
    assert child.data.tags["resumed_from"] == str(checkpoint.resolve())


def test_multirun_records_two_runs_in_one_experiment(tmp_path, tiny_backbone_dir):
    env = dict(os.environ, AFFORDVLA_ROOT=str(tmp_path))
    command = [sys.executable, "-m", "affordvla.train", "-m", "debug=smoke", "seed=1,2",
               f"backbone.pretrained={tiny_backbone_dir}", "backbone.build=null", "dataset.generate.image_size=64",
               "test=false", "export_dir=null", "callbacks.progress_bar.refresh_rate=0"]
    result = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(_mlflow_uri(tmp_path))
    experiment = client.get_experiment_by_name("affordvla-train")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.params["seed"] for r in runs) == ["1", "2"]
    assert all(r.info.status == "FINISHED" for r in runs)


@pytest.mark.parametrize(
    "corruption,expected",
    [
        ("invalid_json", "line"),
        ("missing_points", "'entry_1'"),
        ("points_not_json", "'entry_1'"),
        ("missing_image", "'entry_1'"),
        ("coordinate_out_of_range", "'entry_1'"),
    ],
)
def test_malformed_dataset_stops_with_file_and_entry(tmp_path, smoke_overrides, corruption, expected):
    cfg = compose_train(smoke_overrides + ["logger=none"], tmp_path / "run")
    from hydra.utils import instantiate

    datamodule = instantiate(cfg.dataset)
    datamodule.prepare_data()
    index = Path(cfg.dataset.root) / "data_jsonformat.json"
    text = index.read_text()
    data = json.loads(text)
    if corruption == "invalid_json":
        index.write_text(text[: len(text) // 2])
    else:
        entry = data["entry_1"]
        if corruption == "missing_points":
            del entry["points"]
        elif corruption == "points_not_json":
            entry["points"] = "{Grasp Point: [1, 2]"
        elif corruption == "missing_image":
            (Path(cfg.dataset.root) / entry["img"]).unlink()
        elif corruption == "coordinate_out_of_range":
            points = json.loads(entry["points"])
            points["Target Point"] = [500, 1001]
            entry["points"] = json.dumps(points, indent=4)
        index.write_text(json.dumps(data, indent=4))
    cfg = compose_train(smoke_overrides + ["logger=none"], tmp_path / "run2")
    with pytest.raises(KalieFormatError) as excinfo:
        train(cfg)
    message = str(excinfo.value)
    assert "data_jsonformat.json" in message and expected in message


def test_a_kalie_dataset_on_disk_trains_with_kalies_augmentation(tmp_path, tiny_backbone_dir):
    """`dataset=kalie` on a folder in KALIE's JSON layout: augmented crops for training, centre crops for test."""
    from affordvla.data.kalie import write_kalie_dataset
    from affordvla.formats.kalie_tasks import TASKS
    from affordvla.formats.sample import KALIE_POINT_NAMES
    from affordvla.offline.tabletop import make_scenes

    items = [(s.image, {n: [round(v * 1000) for v in p] for n, p in zip(KALIE_POINT_NAMES, s.keypoints)},
              {"task": TASKS[s.task].instruction, "objects": list(TASKS[s.task].objects)})
             for s in make_scenes(11, 20, 70)]
    write_kalie_dataset(tmp_path / "kalie", items)
    cfg = compose_train([
        "debug=fast_dev_run", "logger=none", f"paths.root_dir={tmp_path}", f"backbone.pretrained={tiny_backbone_dir}",
        "backbone.build=null", "dataset=kalie", f"dataset.root={tmp_path / 'kalie'}", "dataset.batch_size=4",
        "dataset.eval_batch_size=8", "dataset.num_workers=0", "callbacks.progress_bar.refresh_rate=0",
    ], tmp_path / "run")
    metrics = train(cfg)
    assert metrics["test/num_samples"] == 4  # KALIE's 80/20 split of 20 entries, test = val
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))


def test_lora_run_exports_a_merged_plain_transformers_model(tmp_path, smoke_overrides):
    from hydra.utils import instantiate
    from transformers import PaliGemmaForConditionalGeneration

    from affordvla.backbones.finetuning import has_lora

    cfg = compose_train(smoke_overrides + ["logger=none", "backbone.lora={rank: 4, alpha: 8}"], tmp_path / "run")
    assert has_lora(instantiate(cfg.backbone))
    train(cfg)
    exported = PaliGemmaForConditionalGeneration.from_pretrained(cfg.export_dir)
    assert not any("lora" in name for name, _ in exported.named_parameters())

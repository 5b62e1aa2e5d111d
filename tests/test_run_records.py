"""What runs and exports record: true scale tags, debug configs that fit every dataset, the decoding record of a
keypoint-text export, and the lineage a checkpoint carries for a resumed run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import compose_train
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from affordvla.checkpointing import STATE_NAME
from affordvla.evaluate import keypoint_settings
from affordvla.policies.keypoints.decoding import DECODING_RECORD, read_decoding_record, run_decoding_settings
from affordvla.tracking.run_record import (
    LINEAGE_KEY,
    config_hash,
    read_run_lineage,
    resume_record,
    run_tags,
)
from affordvla.train import CONFIG_DIR

DATASETS = sorted(p.stem for p in (Path(CONFIG_DIR) / "dataset").glob("*.yaml"))


def _tags(cfg) -> dict[str, str]:
    return run_tags({"scale": cfg.hydra.runtime.choices.get("scale")}, "train", scale=cfg.get("scale_tag"))


@pytest.mark.parametrize("overrides,scale", [
    ([], "full"), (["debug=smoke"], "smoke"), (["scale=smoke"], "smoke"), (["scale=smoke", "debug=smoke"], "smoke"),
    (["debug=fast_dev_run"], "fast_dev_run")])
def test_scale_tag_is_the_true_scale(tmp_path, overrides, scale):
    cfg = compose_train([f"paths.root_dir={tmp_path}", *overrides], tmp_path / "run")
    assert _tags(cfg)["scale"] == scale


def test_scale_tag_and_lineage_callback_leave_the_config_hash_alone(tmp_path):
    base = compose_train([f"paths.root_dir={tmp_path}", "debug=smoke"], tmp_path / "a")
    relabelled = compose_train([f"paths.root_dir={tmp_path}", "debug=smoke", "scale_tag=other",
                                "callbacks.run_lineage=null"], tmp_path / "b")
    assert config_hash(base) == config_hash(relabelled)


@pytest.mark.parametrize("dataset", DATASETS)
def test_debug_smoke_fits_every_dataset(tmp_path, dataset):
    """debug=smoke sets only what the dataset's datamodule takes (the toy action data has no eval_batch_size and
    counts episodes, not scenes), and never asks to generate into a dataset on disk."""
    overrides = [f"paths.root_dir={tmp_path}", f"dataset={dataset}", "debug=smoke"]
    if not dataset.startswith("toy_"):
        overrides.append(f"dataset.root={tmp_path / 'user_data'}")
    cfg = compose_train(overrides, tmp_path / "run")
    assert cfg.dataset.batch_size == 4
    if not dataset.startswith("toy_"):
        assert cfg.dataset.get("generate") is None
    if dataset.startswith("toy_"):
        instantiate(cfg.dataset)
        return
    # the constructor takes every key; the one thing it refuses is the missing data, which it checks first
    with pytest.raises(InstantiationException, match="does not exist") as failure:
        instantiate(cfg.dataset)
    assert isinstance(failure.value.__cause__, FileNotFoundError), failure.value


def test_debug_smoke_of_the_toy_action_experiment(tmp_path):
    cfg = compose_train([f"paths.root_dir={tmp_path}", "experiment=toy_actions_lstm", "debug=smoke"], tmp_path / "r")
    assert cfg.dataset.generate.train_episodes == 8 and "eval_batch_size" not in cfg.dataset
    assert cfg.trainer.max_steps == 4 and _tags(cfg)["scale"] == "smoke"
    instantiate(cfg.dataset)


def test_synthesize_has_a_debug_smoke(tmp_path):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="synthesize", overrides=["debug=smoke", f"paths.root_dir={tmp_path}"])
    assert dict(cfg.dataset.generate.splits) == {"train": 40, "val": 8, "test": 8}


def test_decoding_settings_of_an_older_run_from_its_config():
    """A run exported before decoding.json: its resolved config as affordvla-train wrote it (KALIE's augmentation
    crops 450 of 700 px, and evaluation takes that centre crop unless eval_centre_crop says otherwise)."""
    config = {"head": {"_target_": "affordvla.heads.keypoint_text.KeypointTextHead", "codec": "kalie_json",
                       "prompt_style": "kalie", "location_sigma": 8.0, "max_new_tokens": None, "constrained": True},
              "backbone": {"prefix_lm": True},
              "dataset": {"eval_centre_crop": None, "augmentation": {"crop_fraction": 450 / 700}}}
    assert run_decoding_settings(config) == {"codec": "kalie_json", "prompt_style": "kalie", "max_new_tokens": None,
                                             "constrained": True, "prefix_lm": True, "centre_crop": 450 / 700}
    config["dataset"]["eval_centre_crop"] = 0.5
    assert run_decoding_settings(config)["centre_crop"] == 0.5
    config["head"]["_target_"] = "affordvla.heads.keypoint_regression.KeypointRegressionHead"
    with pytest.raises(ValueError, match="not the keypoint-text head"):
        run_decoding_settings(config)


def test_keypoint_settings_record_first_then_the_config_beside_then_flags(tmp_path):
    export = tmp_path / "run" / "model"
    export.mkdir(parents=True)
    (tmp_path / "run" / "config_resolved.yaml").write_text(
        "head: {codec: robopoint, prompt_style: instruction, constrained: false}\nbackbone: {}\ndataset: {}\n")
    assert keypoint_settings(export)["codec"] == "robopoint"  # an older export: the run's config beside it
    (export / DECODING_RECORD).write_text(json.dumps({"codec": "paligemma_loc", "constrained": True,
                                                      "prefix_lm": False, "centre_crop": None}))
    assert read_decoding_record(export)["constrained"] is True
    settings = keypoint_settings(export, {"constrained": False, "codec": None, "centre_crop": 1.0})
    assert settings == {"codec": "paligemma_loc", "constrained": False, "prefix_lm": False, "centre_crop": 1.0}
    (export / DECODING_RECORD).write_text(json.dumps({"codec": "paligemma_loc", "beam_width": 4}))
    with pytest.raises(ValueError, match="beam_width"):
        read_decoding_record(export)


def test_lineage_read_back_from_a_checkpoint(tmp_path):
    checkpoint = tmp_path / "run" / "checkpoints" / "step_000004"
    checkpoint.mkdir(parents=True)
    lineage = {"run_dir": str(tmp_path / "run"), "mlflow_run_id": "abc123", "tracking_uri": "sqlite:///x.db",
               "config_hash": "0123456789ab", "resumed_from": None}
    torch.save({"global_step": 4, "optimizer_states": [{"state": {0: torch.zeros(3)}}], LINEAGE_KEY: lineage},
               checkpoint / STATE_NAME)
    assert read_run_lineage(checkpoint) == lineage
    assert resume_record(checkpoint) == {"resumed_from": str(checkpoint.resolve()),
                                         "parent_run_dir": str(tmp_path / "run"), "parent_mlflow_run_id": "abc123"}
    assert resume_record(None) == {}
    older = tmp_path / "older"
    older.mkdir()
    torch.save({"global_step": 4}, older / STATE_NAME)  # written before checkpoints named their run
    assert read_run_lineage(older) is None and resume_record(older)["parent_run_dir"] is None
    (older / STATE_NAME).write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=STATE_NAME):
        read_run_lineage(older)

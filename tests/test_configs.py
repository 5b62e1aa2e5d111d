"""Every config in conf/ composes, and a wrong choice fails with the list of valid ones."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import compose_train
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf, open_dict

from affordvla.train import CONFIG_DIR

GROUPS = ["paths", "backbone", "head", "module", "dataset", "synthesis", "trainer", "logger", "callbacks", "hydra",
          "experiment", "debug", "scale"]
ACTION_HEADS = ("lstm", "gpt", "mlp", "discrete", "text_actions")


def _options(group: str) -> list[str]:
    folder = Path(CONFIG_DIR) / group
    return sorted(p.stem for p in folder.glob("*.yaml"))


def _compose(overrides: list[str], tmp_path: Path | None = None):
    if tmp_path is not None:
        return compose_train(overrides, tmp_path / "run")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


def test_every_group_exists_and_has_options():
    for group in GROUPS:
        if group != "experiment":  # experiments arrive with the paper tables
            assert _options(group), f"conf/{group}/ has no options"


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_option_composes(group, option, tmp_path):
    overrides = [f"{group}={option}", f"paths.root_dir={tmp_path}"]
    if group == "backbone" and not option.endswith("_tiny"):
        overrides.append("backbone.pretrained=/some/local/checkpoint")
    if group == "backbone" and option == "robopoint":
        overrides.append("backbone.vision_tower=/some/local/clip")
    needs_root = (group == "dataset" and not option.startswith("toy_")) or (
        group == "experiment" and option.startswith("robopoint"))  # data on disk, no generator
    if needs_root:
        overrides.append("dataset.root=/some/kalie/data")
    cfg = _compose(overrides, tmp_path)
    # Everything outside hydra: resolves (no missing values, no broken interpolations).
    job = cfg.copy()
    with open_dict(job):
        del job["hydra"]
    resolved = OmegaConf.to_container(job, resolve=True, throw_on_missing=True)
    language = (group == "module" and option == "language_actions") or (
        group == "experiment" and option in ("toy_actions_discrete", "toy_actions_text_actions"))
    action = language or (group == "module" and option == "action_policy") or (
        group == "head" and option in ACTION_HEADS) or (group == "experiment" and option.startswith("toy_actions"))
    expected = "affordvla.policies.actions." + ("LanguageActionModule" if language else "ContinuousActionModule")
    keypoints = "affordvla.policies.keypoints.KeypointPolicyModule"
    expected = expected if group != "head" else keypoints
    if group == "module" and option == "keypoint_regression":
        expected, action = keypoints, True
    assert resolved["module"]["_target_"] == (expected if action else keypoints)
    if group == "experiment" and action:  # an action experiment pairs the module, head and episode data
        assert resolved["dataset"]["_target_"].endswith("ActionWindowDataModule")
        assert resolved["optimized_metric"] == "val/action_mse"


def test_default_composition_is_the_embedded_default(tmp_path):
    cfg = _compose([f"paths.root_dir={tmp_path}"], tmp_path)
    assert cfg.backbone.family == "paligemma"
    assert cfg.backbone.build is not None  # the offline tiny variant builds itself
    assert cfg.head.codec == "paligemma_loc"
    assert cfg.dataset.generate is not None
    assert cfg.paths.mlflow_uri == f"sqlite:///{tmp_path}/outputs/mlflow.db"


def test_unknown_option_lists_valid_choices(tmp_path):
    with pytest.raises(MissingConfigException) as excinfo:
        _compose(["backbone=not_a_backbone", f"paths.root_dir={tmp_path}"])
    message = str(excinfo.value)
    for option in _options("backbone"):
        assert option in message


def test_config_hash_ignores_where_a_run_writes_but_not_what_it_computes(tmp_path):
    from affordvla.tracking.run_record import config_hash

    base = config_hash(_compose([f"paths.root_dir={tmp_path}"]))
    assert base == config_hash(_compose([f"paths.root_dir={tmp_path / 'elsewhere'}", "logger=none",
                                         "callbacks.progress_bar.refresh_rate=0",
                                         "module.callbacks.keypoint_overlays=null"]))
    assert base != config_hash(_compose([f"paths.root_dir={tmp_path}", "stop_after_steps=3"]))
    assert base != config_hash(_compose([f"paths.root_dir={tmp_path}", "+callbacks.benchmark={_target_: x.Y}"]))
    assert base != config_hash(_compose([f"paths.root_dir={tmp_path}", "module.optimizer.lr=1e-4"]))
    assert base != config_hash(_compose([f"paths.root_dir={tmp_path}", "backbone=llava_tiny"]))


@pytest.mark.parametrize("backbone, family, codec", [
    ("paligemma_tiny", "paligemma", "paligemma_loc"), ("paligemma2_tiny", "paligemma", "paligemma_loc"),
    ("llava_tiny", "llava", "robopoint"), ("cogvlm_tiny", "cogvlm", "kalie_json")])
def test_one_override_switches_the_backbone_and_its_answer_format(backbone, family, codec):
    cfg = _compose([f"backbone={backbone}"])
    assert cfg.head.codec == codec  # each family answers in its anchor project's format
    build = cfg.backbone.build  # every tiny family is pre-trained by the same pointing stage
    assert build._target_ == "affordvla.pretraining.pointing.build_pointing_backbone" and build.family == family
    assert f"pointing{build.steps}" in cfg.backbone.pretrained  # a changed recipe builds a new checkpoint
    assert _compose([f"backbone={backbone}", "head.codec=kalie_json"]).head.codec == "kalie_json"


@pytest.mark.parametrize("backbone", ["paligemma_tiny", "llava_tiny", "cogvlm_tiny"])
def test_each_tiny_backbone_recipe_is_shipped_and_matches_its_checkpoint(backbone):
    """`make train` on a fresh clone, or one override to another family, copies the shipped pre-trained tiny
    checkpoint instead of spending half an hour or more building it: this fails when a recipe in conf/backbone changes
    and nobody rebuilt its checkpoint."""
    import json

    from affordvla.pretraining.pointing import RECORD_FILE, shipped_checkpoint

    cfg = _compose([f"backbone={backbone}"])
    build = cfg.backbone.build
    shipped = shipped_checkpoint(Path(cfg.backbone.pretrained).name)
    assert shipped is not None and build.use_shipped
    record = json.loads((shipped / RECORD_FILE).read_text())
    recipe = {k: v for k, v in OmegaConf.to_container(build).items()
              if k not in ("_target_", "_partial_", "tracking_uri", "use_shipped", "eval_every")}
    if recipe["distill_subcells"] == 1:  # per-cell distillation alone is recorded as it was before sub-cells existed
        del recipe["distill_subcells"]
    assert record["params"] == recipe
    config = json.loads((shipped / "config.json").read_text())
    assert config["vision_config"]["patch_size"] == build.patch_size
    assert config["vision_config"]["hidden_size"] == build.hidden_size
    if backbone == "paligemma_tiny":
        assert config["text_config"]["num_key_value_heads"] == build.kv_heads

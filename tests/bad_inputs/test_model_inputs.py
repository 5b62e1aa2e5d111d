"""Bad-input corpus: model and checkpoint paths given to `affordvla-train` (backbone.pretrained, its adapter,
ckpt_path, export_dir). Each fails before any data or model work, names the option and the file, and leaves the
user's folders as they were."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from .conftest import assert_clear_failure

SMOKE_BACKBONE = {"seed": 0, "image_size": 32, "patch_size": 8, "hidden_size": 64, "vision_layers": 1,
                  "text_layers": 1, "intermediate_size": 128}


@pytest.fixture(scope="module")
def smoke_paligemma(tmp_path_factory) -> Path:
    """A smoke-sized PaliGemma checkpoint (as scale=smoke builds one), copied into each case's user folder."""
    from affordvla.offline.tiny_paligemma import write_tiny_paligemma

    return write_tiny_paligemma(tmp_path_factory.mktemp("models") / "paligemma", **SMOKE_BACKBONE)


def _user_copy(workspace, source: Path, name: str) -> Path:
    target = workspace.user("models") / name
    shutil.copytree(source, target)
    return target


def _checkpoint(folder: Path, state: dict[str, torch.Tensor]) -> Path:
    """A checkpoint folder laid out as SafetensorsCheckpointIO writes one (weights + training state)."""
    from affordvla.checkpointing import STATE_NAME, WEIGHTS_NAME, save_state_dict

    folder.mkdir(parents=True)
    save_state_dict(state, folder / WEIGHTS_NAME)
    torch.save({"epoch": 0, "global_step": 2, "dataset_metadata": {}}, folder / STATE_NAME)
    return folder


def test_mistyped_pretrained_on_a_tiny_backbone_fails_fast_creating_nothing(workspace):
    """The tiny default builds its checkpoint when it is missing; a path the user typed is only read, so a typo
    is refused at once: no `.building`/`.lock` beside it, no data generated, no backbone built."""
    typo = workspace.home / "checkpoints" / "paligemma-tny"
    result = workspace.run("affordvla-train", f"backbone.pretrained={typo}")
    assert_clear_failure(workspace, result, "backbone.pretrained", str(typo), "does not exist",
                         created=(typo, Path(f"{typo}.building"), Path(f"{typo}.lock"), typo.parent))
    outputs = workspace.project / "outputs"
    assert not (outputs / "data").exists() and not (outputs / "artifacts").exists()
    assert not (outputs / "mlflow.db").exists()


def test_the_path_check_takes_well_under_15_seconds(tmp_path):
    """The check itself reads a few files: it is what stands between a typo and a 38-minute build (the command's
    remaining time is Python's start-up)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from affordvla.backbones.base import BackboneLoadError
    from affordvla.preflight import check_run_config
    from affordvla.train import CONFIG_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"paths.root_dir={tmp_path}",
                                                      f"backbone.pretrained={tmp_path}/typo"], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path / "run")
    HydraConfig.instance().set_config(cfg)
    started = time.perf_counter()
    with pytest.raises(BackboneLoadError, match="backbone.pretrained=.*typo does not exist"):
        check_run_config(cfg)
    assert time.perf_counter() - started < 15
    assert not any(tmp_path.iterdir())


def test_pretrained_that_is_a_file(workspace):
    weights = workspace.user("models") / "paligemma.safetensors"
    weights.write_bytes(b"\0" * 64)
    result = workspace.run("affordvla-train", f"backbone.pretrained={weights}", "backbone.build=null")
    assert_clear_failure(workspace, result, f"backbone.pretrained={weights} is a file", "checkpoint directory")


def test_pretrained_folder_without_config_json(workspace):
    folder = workspace.user("downloads")
    (folder / "README.md").write_text("weights to come\n")
    result = workspace.run("affordvla-train", "backbone=paligemma", f"backbone.pretrained={folder}")
    assert_clear_failure(workspace, result, f"backbone.pretrained={folder} has no config.json")


@pytest.mark.parametrize("damage,expected", [("truncate", "is truncated"), ("garbage", "is corrupt")])
def test_pretrained_with_a_damaged_safetensors(workspace, smoke_paligemma, damage, expected):
    """An interrupted copy (the file cut short) or another file saved under the name: the file is named."""
    model = _user_copy(workspace, smoke_paligemma, "paligemma")
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"<html>404 not found</html>" * 8)
    result = workspace.run("affordvla-train", "backbone=paligemma", f"backbone.pretrained={model}")
    assert_clear_failure(workspace, result, "backbone.pretrained", str(weights), expected)


def test_adapter_that_does_not_exist(workspace, smoke_paligemma):
    model = _user_copy(workspace, smoke_paligemma, "paligemma")
    adapter = workspace.home / "adapters" / "run-7"
    result = workspace.run("affordvla-train", "backbone=paligemma", f"backbone.pretrained={model}",
                           f"backbone.adapter={adapter}")
    assert_clear_failure(workspace, result, f"backbone.adapter={adapter} does not exist", "adapter_config.json",
                         created=(adapter,))


def test_ckpt_path_that_does_not_exist(workspace):
    missing = workspace.home / "runs" / "x" / "checkpoints" / "step_000500"
    result = workspace.run("affordvla-train", f"ckpt_path={missing}")
    assert_clear_failure(workspace, result, f"ckpt_path={missing} does not exist", "model.safetensors",
                         created=(missing,))
    assert not (workspace.project / "outputs" / "artifacts").exists()  # refused before the backbone


def test_ckpt_path_of_a_partial_save(workspace):
    """A run killed while saving leaves `step_N.partial`; the message points at the last complete one."""
    checkpoints = workspace.user("run") / "checkpoints"
    _checkpoint(checkpoints / "step_000002", {"w": torch.zeros(2)})
    partial = _checkpoint(checkpoints / "step_000004.partial", {"w": torch.zeros(2)})
    result = workspace.run("affordvla-train", f"ckpt_path={partial}")
    assert_clear_failure(workspace, result, f"ckpt_path={partial} is a partial checkpoint",
                         str(checkpoints / "step_000002"))


def test_ckpt_path_that_is_a_file(workspace):
    """A Lightning `.ckpt` file: affordvla checkpoints are folders."""
    ckpt = workspace.user("run") / "last.ckpt"
    ckpt.write_bytes(b"PK\x03\x04" + b"\0" * 60)
    result = workspace.run("affordvla-train", f"ckpt_path={ckpt}")
    assert_clear_failure(workspace, result, f"ckpt_path={ckpt} is a file", "training_state.pt")


def test_ckpt_path_with_a_corrupt_safetensors(workspace):
    checkpoint = _checkpoint(workspace.user("run") / "checkpoints" / "step_000002", {"w": torch.zeros(64)})
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-40])
    result = workspace.run("affordvla-train", f"ckpt_path={checkpoint}")
    assert_clear_failure(workspace, result, "ckpt_path", str(weights), "truncated")


def test_ckpt_path_of_another_backbone_family(workspace):
    """A checkpoint of a LLaVA run given to a PaliGemma run: few tensors match, and the counts say so (instead of
    Lightning's list of hundreds of missing and unexpected keys)."""
    from affordvla.backbones.llava.modeling import LlavaBackbone
    from affordvla.offline.tiny_llava import write_tiny_llava

    llava = LlavaBackbone.from_pretrained(write_tiny_llava(workspace.project / "llava", **SMOKE_BACKBONE))
    state = {f"backbone.model.{key}": value for key, value in llava.model.state_dict().items()}
    checkpoint = _checkpoint(workspace.user("run") / "checkpoints" / "step_000002", state)
    shutil.rmtree(workspace.project / "llava")
    result = workspace.run("affordvla-train", "scale=smoke", "logger=none", f"ckpt_path={checkpoint}")
    assert_clear_failure(workspace, result, f"ckpt_path={checkpoint}", str(checkpoint / "model.safetensors"),
                         "holds the weights of another model", "expected tensors match", "paligemma backbone")


def test_export_dir_that_is_a_file(workspace):
    target = workspace.user("exports") / "model"
    target.write_text("not a folder\n")
    result = workspace.run("affordvla-train", f"export_dir={target}")
    assert_clear_failure(workspace, result, f"export_dir={target} is a file")


def test_export_dir_holding_the_users_files(workspace):
    """An export never writes into a folder of someone else's files (config.json would be overwritten)."""
    target = workspace.user("my_model")
    (target / "config.json").write_text(json.dumps({"model_type": "mine"}))
    (target / "notes.txt").write_text("keep\n")
    workspace.watch(target)
    result = workspace.run("affordvla-train", f"export_dir={target}")
    assert_clear_failure(workspace, result, f"export_dir={target}", "config.json, notes.txt",
                         "choose another folder")


def test_unknown_backbone_family(workspace, smoke_paligemma):
    model = _user_copy(workspace, smoke_paligemma, "paligemma")
    result = workspace.run("affordvla-train", "backbone=paligemma", f"backbone.pretrained={model}",
                           "backbone.family=paligema")
    assert_clear_failure(workspace, result, "backbone.family='paligema'", "did you mean 'paligemma'")


def test_real_backbone_without_its_checkpoint(workspace):
    """backbone=paligemma names no checkpoint (`???`): the option to add is named, in one line."""
    result = workspace.run("affordvla-train", "backbone=paligemma")
    assert_clear_failure(workspace, result, "backbone.pretrained must be given", "backbone.pretrained=<value>")


def test_pretrained_holding_the_weights_of_another_family(workspace, smoke_paligemma):
    """A PaliGemma folder whose model.safetensors was overwritten with a LLaVA's: refused, naming the folder,
    instead of loading with tensors initialised at random."""
    from affordvla.offline.tiny_llava import write_tiny_llava

    model = _user_copy(workspace, smoke_paligemma, "paligemma")
    llava = write_tiny_llava(workspace.project / "llava", **SMOKE_BACKBONE)
    shutil.copy(llava / "model.safetensors", model / "model.safetensors")
    shutil.rmtree(llava)
    workspace.watch(model)
    result = workspace.run("affordvla-train", "backbone=paligemma", f"backbone.pretrained={model}", "logger=none",
                           "debug=smoke")
    assert_clear_failure(workspace, result, str(model))
    assert "do not load into the paligemma model" in result.stderr or "does not match the PaliGemma" in result.stderr
